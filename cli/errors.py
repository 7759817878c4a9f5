"""Map library errors to one line on stderr and exit code 1 (traceback only with VLSPARSE_DEBUG=1)."""

from __future__ import annotations

import functools
import os

import typer

from vlsparse.errors import VlsparseError


def debug_enabled() -> bool:
    return os.environ.get("VLSPARSE_DEBUG", "") not in ("", "0", "false", "no")


def fail(message: str) -> "typer.Exit":
    typer.echo(f"Error: {' '.join(message.split())}", err=True)
    return typer.Exit(1)


def friendly_errors(command):
    """Decorator for CLI commands: typed errors become `Error: <what> — <next step>`, exit 1; the parameters
    an error names are spelled as this command line's flags (``ratio`` -> ``--ratio``)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VlsparseError as exc:
            if debug_enabled():
                raise
            raise fail(exc.one_line(flags=True)) from None
        except MemoryError:
            if debug_enabled():
                raise
            raise fail("out of memory — use fewer --samples, a shorter --seq-len, or a smaller model") from None
        except KeyboardInterrupt:
            typer.echo("Interrupted; nothing was written.", err=True)
            raise typer.Exit(130) from None

    return wrapper
