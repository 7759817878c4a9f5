"""The `vlsparse` command: wiring only; each command lives in its own module."""

from __future__ import annotations

import importlib

import typer

HELP = """Make vision-language models cheaper to run.

\b
  vlsparse profile                      find each attention head's sparse pattern -> profiles/<model>.yaml
  vlsparse prune --ratio 0.5            prune weights (ECoFLaP + Wanda) -> a checkpoint folder
  vlsparse run IMAGE "QUESTION"         answer with the compressed model and the sparse runtime

Every command takes --model (a folder, a hub id, or `demo`, the embedded model) and --help.
Set VLSPARSE_DEBUG=1 to see tracebacks.
"""

COMMAND_MODULES = ("run", "profile", "prune", "calibrate", "inspect", "eval", "bench")


def build_app() -> typer.Typer:
    app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                      rich_markup_mode=None)
    for name in COMMAND_MODULES:
        importlib.import_module(f"vlsparse.cli.{name}").register(app)

    @app.callback()
    def main() -> None:  # a callback keeps `vlsparse run ...` a subcommand even with one command
        pass

    return app


def entry() -> None:
    build_app()()
