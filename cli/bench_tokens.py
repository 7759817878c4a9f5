"""`vlsparse bench tokens`: the command function; `cli/bench.py` adds it to the `bench` group (wiring only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import DeviceOpt, ForceOpt, JsonOpt, ModelOpt, QuietOpt, SeedOpt, parse_fractions
from vlsparse.cli.quiet import quiet_transformers

TOKENS_HELP = """Every visual-token-reduction method at several keep ratios against dense, on demo tasks.

For each task, method and keep ratio the model answers --n held-out questions,
taking turns per question with dense (dense, method, dense, method, ...), and
reports: accuracy with a 95% Wilson interval, accuracy on position questions and
on the rest, answers equal to dense, image tokens kept per prompt, prefill and
decode speedups over the dense turns of the same run, and the KV-cache size. A
dense row per task is the baseline. A method that cannot run on the model (a
schedule that does not fit its depth, VisionZip without a [CLS] token) gets a row
saying why. With matplotlib installed a PNG plots accuracy against image tokens
kept, one line per method (--png; default tokens-bench.png here, --no-png for none).

Methods: fastv, pyramiddrop, feather, zipvl, visionzip, divprune, todre.
Tasks: demo-vqa, demo-multi, demo-grid, demo-long.

Examples:

\b
  vlsparse bench tokens --n 20
  vlsparse bench tokens --methods fastv,divprune --keep 0.5,0.25 --tasks demo-multi --json
  vlsparse bench tokens --n 2 --methods fastv --keep 0.5 --tasks demo-vqa --no-png
  vlsparse bench tokens --methods todre --token-param todre:layers=[2]
"""


def _tasks(text: str) -> list[str]:
    from vlsparse.cli.eval import DEMO_TASKS
    from vlsparse.errors import InputError

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in DEMO_TASKS]
    if bad or not names:
        raise InputError(f"unknown task {bad[0] if bad else text!r}", f"choose from {', '.join(DEMO_TASKS)}")
    return [DEMO_TASKS[t] for t in names]


def _params(items: list[str] | None) -> dict[str, dict]:
    """``["fastv:k=3"]`` -> ``{"fastv": {"k": 3}}``."""
    from vlsparse.cli.options import parse_params
    from vlsparse.errors import InputError

    out: dict[str, dict] = {}
    for item in items or []:
        method, sep, rest = item.partition(":")
        if not sep:
            raise InputError(f"--token-param {item!r} is not METHOD:NAME=VALUE", "e.g. --token-param fastv:k=3")
        out.setdefault(method.strip().lower(), {}).update(parse_params([rest]))
    return out


@friendly_errors
def tokens_command(
    model: ModelOpt = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods, or all.")] = "all",
    keep: Annotated[str, typer.Option("--keep", help="Comma-separated keep ratios in (0, 1].")] = "0.5,0.25,0.11",
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated demo tasks.")]
    = "demo-vqa,demo-multi,demo-long",
    n: Annotated[int, typer.Option("--n", help="Questions per task (each answered dense and by the method).",
                                   min=1)] = 20,
    token_param: Annotated[Optional[list[str]], typer.Option(
        "--token-param", help="A method parameter METHOD:NAME=VALUE (repeatable), e.g. fastv:k=3.",
        show_default=False)] = None,
    png: Annotated[Optional[str], typer.Option("--png", help="Figure path [default: tokens-bench.png].",
                                               show_default=False)] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="No figure.")] = False,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (0: torch's default).", min=0)] = 0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    import importlib.util

    import torch

    from vlsparse.atomic import check_output
    from vlsparse.bench.tokens import bench_tokens, draw_figure, format_table
    from vlsparse.errors import param
    from vlsparse.tokens import METHOD_NAMES, method_named

    chosen = list(METHOD_NAMES) if methods.strip().lower() == "all" else \
        [method_named(m).NAME for m in methods.split(",") if m.strip()]
    keeps = parse_fractions(keep, "keep", "0.5,0.25")
    task_names = _tasks(tasks)
    params = _params(token_param)
    for name in params:
        method_named(name)
    figure = None
    if not no_png:
        figure = Path(png or "tokens-bench.png")
        if not png and importlib.util.find_spec("matplotlib") is None:
            figure = None
        else:
            check_output(figure, force=force, option=param("png"))
    if threads:
        torch.set_num_threads(threads)
    show = not (quiet or json_out)
    with quiet_transformers():
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=Console(stderr=True), transient=True) as bar:
                job = bar.add_task("loading", total=None)
                rows = bench_tokens(model or "demo", methods=chosen, keeps=keeps, tasks=task_names, n=n, seed=seed,
                                    params=params, device=device,
                                    progress=lambda label, done, total: bar.update(job, description=label,
                                                                                   completed=done, total=total))
        else:
            rows = bench_tokens(model or "demo", methods=chosen, keeps=keeps, tasks=task_names, n=n, seed=seed,
                                params=params, device=device)
    if figure is not None:
        draw_figure(rows, figure, force=force)
    if json_out:
        typer.echo(json.dumps({"png": str(figure) if figure else None, "rows": rows}, indent=2))
        return
    typer.echo(format_table(rows))
    if show:
        typer.echo(f"figure: {figure}" if figure else "figure: none (--no-png, or matplotlib is not installed)",
                   err=True)
