"""The `vlsparse` command: wiring only; each command lives in its own module."""

from __future__ import annotations

import importlib

import typer

HELP = """Make vision-language models cheaper to run.

\b
  vlsparse profile                      find each attention head's sparse pattern -> profiles/<model>.yaml
  vlsparse prune --ratio 0.5            prune weights (ECoFLaP + Wanda) -> a checkpoint folder
  vlsparse run IMAGE "QUESTION"         answer with the compressed model and the sparse runtime
  vlsparse recipe export CHECKPOINT     the settings of a compression as a YAML recipe, to replay elsewhere

Every command takes --model (a folder, a hub id, or `demo`, the embedded model) and --help.
Set VLSPARSE_DEBUG=1 to see tracebacks.
"""

COMMAND_MODULES = ("run", "profile", "prune", "calibrate", "recipe", "inspect", "eval", "bench")


def build_app() -> typer.Typer:
    app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                      rich_markup_mode=None)
    for name in COMMAND_MODULES:
        importlib.import_module(f"vlsparse.cli.{name}").register(app)

    @app.callback()
    def main() -> None:  # a callback keeps `vlsparse run ...` a subcommand even with one command
        pass

    return app


def _is_usage_error(exc: BaseException) -> bool:
    """A parse error from Typer (bad flag value, unknown option, missing argument): exit code 2, a message."""
    from typer.exceptions import TyperException

    return isinstance(exc, TyperException) and getattr(exc, "exit_code", None) == 2 and hasattr(exc, "format_message")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit code.

    Typer's own parse errors (``--ratio abc``, ``--n 0``, an unknown option) get the
    same one-line ``Error: <what> — <next step>`` and exit code 1 as every other
    error; a command given without arguments prints its help.
    """
    import sys

    from vlsparse.cli.errors import debug_enabled

    app = build_app()
    try:
        result = app(args=sys.argv[1:] if argv is None else argv, prog_name="vlsparse", standalone_mode=False)
    except Exception as exc:  # noqa: BLE001 - only Typer's usage errors are handled here
        if not _is_usage_error(exc) or debug_enabled():
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `vlsparse` or `vlsparse run` alone: the help
            print(exc.format_message())
            return 0
        context = getattr(exc, "ctx", None)
        command = getattr(context, "command_path", None) or "vlsparse"
        what = " ".join(exc.format_message().split())
        print(f"Error: {what} — see `{command} --help`", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def entry() -> None:
    raise SystemExit(main())
