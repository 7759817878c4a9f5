"""`vlsparse eval`: accuracy on the demo benchmark, or perplexity on held-out English text."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import AllowPickleOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, QuietOpt, SeedOpt
from vlsparse.cli.quiet import quiet_transformers

DEMO_TASKS = {"demo-vqa": "vqa", "demo-multi": "multi", "demo-grid": "grid"}
TEXT_TASKS = ("pydoc-ppl",)

HELP = """Measure a model: accuracy with a 95% interval on the demo benchmark (held-out seeds,
per-question-type breakdown), or perplexity on CPython's held-out pydoc text.

Tasks: demo-vqa (single scenes), demo-multi (8-32 scenes in one prompt, 4k+ tokens),
demo-grid (one large grid image, 4k+ tokens), pydoc-ppl (language models).

Examples:

  vlsparse eval --task demo-vqa --n 500

  vlsparse eval --model ./demo-pruned --task demo-multi --n 100 --json

  vlsparse eval --model smollm2 --task pydoc-ppl
"""


def _demo_table(result: dict, model: str, task: str) -> Table:
    title = f"vlsparse eval · {model} · {task}"
    table = Table(title=title, title_justify="left", min_width=len(title))
    for col in ("question type", "n", "accuracy"):
        table.add_column(col, justify="left" if col == "question type" else "right")
    for qtype, row in sorted(result.get("per_qtype", {}).items()):
        table.add_row(qtype, str(row["n"]), f"{row['accuracy']:.3f}")
    low, high = result["ci95"]
    table.add_row("all", str(result["n"]), f"{result['accuracy']:.3f} [{low:.3f}, {high:.3f}]", style="bold")
    table.caption = (f"chance {result['chance']:.3f} · mean prompt tokens {result['mean_prompt_tokens']:.0f} · "
                     f"seeds from {result['seed']}")
    return table


def _ppl_table(result, model: str) -> Table:
    title = f"vlsparse eval · {model} · pydoc-ppl"
    table = Table(title=title, show_header=False, title_justify="left", min_width=len(title))
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("tokens scored", f"{result.tokens}")
    table.add_row("windows", f"{result.windows} × {result.seq_len}")
    return table


@friendly_errors
def eval_command(
    model: ModelOpt = None,
    task: Annotated[str, typer.Option("--task", help="demo-vqa, demo-multi, demo-grid or pydoc-ppl.")] = "demo-vqa",
    n: Annotated[int, typer.Option("--n", help="Samples to evaluate (demo tasks).", min=1)] = 200,
    seed: SeedOpt = 0,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length in tokens (pydoc-ppl).", min=16)] = 512,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from vlsparse.errors import InputError
    from vlsparse.models import load

    if task not in DEMO_TASKS and task not in TEXT_TASKS:
        raise InputError(f"unknown task {task!r}", f"choose one of {', '.join([*DEMO_TASKS, *TEXT_TASKS])}")
    err = Console(stderr=True, quiet=quiet or json_out)
    with quiet_transformers():
        loaded = load(model or "demo", device=device, dtype=dtype, allow_pickle=allow_pickle)
        if task in TEXT_TASKS:
            result = _perplexity(loaded, seq_len, err)
            payload = {"model": loaded.name, "task": task, **result.__dict__}
            table = _ppl_table(result, loaded.name)
        else:
            result = _demo_accuracy(loaded, DEMO_TASKS[task], n, seed, err)
            payload = {"model": loaded.name, "task": task, **result}
            table = _demo_table(result, loaded.name, task)
    if json_out:
        typer.echo(json.dumps(payload, indent=2))
    else:
        Console().print(table)


def _perplexity(loaded, seq_len: int, err: Console):
    from vlsparse.errors import InputError
    from vlsparse.perplexity import perplexity, pydoc_text

    if loaded.adapter.is_vlm:
        raise InputError("pydoc-ppl measures language models", "use a demo-* task for vision-language models")
    with err.status("scoring held-out pydoc text"):
        return perplexity(loaded.model, loaded.processor, pydoc_text("heldout"), seq_len=seq_len)


def _demo_accuracy(loaded, task: str, n: int, seed: int, err: Console) -> dict:
    from vlsparse.demo.evaluate import evaluate

    with err.status(f"answering {n} {task} questions"):
        return evaluate(loaded.model, loaded.processor, task=task, n=n, seed=seed)


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP)(eval_command)
