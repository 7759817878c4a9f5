"""`vlsparse bench`: not implemented yet (its issue is open); says so plainly and exits 2."""

from __future__ import annotations

import typer


def not_yet(ctx: typer.Context) -> None:
    typer.echo("vlsparse bench is not implemented yet in this version.", err=True)
    raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("bench", help="Not implemented yet.",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(not_yet)
