"""`vlsparse run IMAGE... QUESTION`: answer a question about images."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vlsparse.cli.quiet import quiet_transformers
from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import AllowPickleOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, QuietOpt, TrustRemoteCodeOpt

HELP = """Answer a QUESTION about one or more images with the model's own prompt format.

The answer goes to stdout; a summary (prompt and image tokens, prefill time,
decode speed, peak memory) goes to stderr.

Examples:

  vlsparse run examples/scene.png "What color is the circle?"

  vlsparse run --model ./llava-1.5-7b-hf photo.jpg "What is in the picture?"

  vlsparse run --model ./SmolLM2-135M-Instruct "What is the capital of France?"
"""


def summary_table(answer, model_name: str) -> Table:
    table = Table(title=f"vlsparse run · {model_name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("prompt tokens", f"{answer.prompt_tokens}")
    table.add_row("  of which image tokens", f"{answer.image_tokens}")
    table.add_row("new tokens", f"{answer.new_tokens}")
    table.add_row("prefill", f"{answer.prefill_ms:.1f} ms")
    table.add_row("decode", f"{answer.decode_tokens_per_s:.1f} tokens/s")
    table.add_row(answer.memory_kind, f"{answer.peak_memory_mb:.0f} MiB")
    return table


@friendly_errors
def run(
    inputs: Annotated[list[str], typer.Argument(help="Image file(s), then the question (the last argument).",
                                                show_default=False)],
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.", min=1)] = 16,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from vlsparse.errors import InputError
    from vlsparse.generate import generate_answer
    from vlsparse.images import load_image
    from vlsparse.models import load

    *image_paths, question = inputs
    if not question.strip():
        raise InputError("the question is empty", "pass the question as the last argument, in quotes")
    images = [load_image(Path(p)) for p in image_paths]
    err = Console(stderr=True)
    with quiet_transformers():
        loaded = load(model or "demo", device=device, dtype=dtype, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)
        batch = loaded.prepare(images, question)
        answer = generate_answer(loaded, batch, max_new_tokens=max_new_tokens)
    if json_out:
        typer.echo(json.dumps({"model": loaded.name, **asdict(answer)}, indent=2))
        return
    typer.echo(answer.text)
    if not quiet:
        err.print(summary_table(answer, loaded.name))


def register(app: typer.Typer) -> None:
    app.command("run", help=HELP, no_args_is_help=True)(run)
