"""`vlsparse profile`: per-head sparse-attention pattern search -> a profile (YAML + figure)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import (AllowPickleOpt, CalibOpt, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelArg,
                                  ModelOpt, QuietOpt, SeedOpt, TrustRemoteCodeOpt, existing_paths)
from vlsparse.cli.quiet import quiet_transformers

HELP = """Find each attention head's sparse pattern and budget -> a profile (YAML) and a figure (PNG).

For every language-decoder layer and query head, the candidates (dense,
A-shape, vertical-slash, block-sparse top-k and cumulative mass, grid
(diagonals at the image row or frame stride), modality-aware vertical-slash, static SparseD masks, at several
budgets) are scored by exact attention recall over all query rows of every
calibration sample; the head keeps the cheapest one (kept query-key pairs in
the kernels' 64x64 block layout) that reaches --recall on every sample, and
--tail-recall over the sample's last 64-row block (the question and the row
that predicts the answer, which the all-rows mean hardly sees). By default that
block runs dense in every head (--no-dense-tail to score it like the rest).
Indices are estimated as the runtime will (last 64 queries, pooled blocks).

Calibration: the demo scene generator for vision-language models (multi-image
and grid prompts; --calib demo:multi or demo:grid for one kind), CPython's
pydoc text for text-only models, or --calib (a JSONL of
{"images": [...], "prompt": ...} / {"text": ...} lines, a .txt file, or a
folder of .txt files).

The profile goes to --out (default ./profiles/MODEL.yaml, static masks in a
.safetensors beside it), the figure beside it (--png to move, --no-png to skip;
needs matplotlib), the summary to stderr and the profile path to stdout.

Examples:

\b
  vlsparse profile
  vlsparse profile --model ./SmolLM2-135M-Instruct --seq-len 8192 --samples 2
  vlsparse profile --model ./llava-1.5-7b-hf --calib calib.jsonl --recall 0.9 --out llava.yaml
  vlsparse profile --seq-len 8192 --calib demo:multi --out p8k/demo.yaml   # multi-image prompts only
"""


def _check_outputs(out: Path, png: str | None, no_png: bool, force: bool, inputs: list) -> None:
    """The profile, its sidecar and its figure: free (or replaceable with --force), and none of them an input."""
    from vlsparse.atomic import check_output
    from vlsparse.errors import InputError, param
    from vlsparse.profile import sidecar_path

    check_output(out, force=force, inputs=inputs)
    check_output(sidecar_path(out), force=force, inputs=inputs)
    if not no_png:
        figure = Path(png) if png else out.with_suffix(".png")
        if figure.resolve() == out.resolve():
            raise InputError("--png and --out name the same file", "give the figure its own .png path")
        check_output(figure, force=force, inputs=inputs, option=param("png"))


@friendly_errors
def profile(
    model_arg: ModelArg = None,
    model: ModelOpt = None,
    calib: CalibOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples (every one must keep --recall).",
                                         min=1)] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Target tokens per sample (demo scenes and text; JSONL "
                                                           "image prompts are used as given).", min=128)] = 4096,
    seed: SeedOpt = 0,
    recall: Annotated[float, typer.Option("--recall", help="Attention recall each head must keep on every sample.",
                                          min=0.0, max=1.0)] = 0.95,
    tail_recall: Annotated[Optional[float], typer.Option(
        "--tail-recall", help="Recall each head must keep over the last 64-row query block of every sample "
                              "[default: --recall; 0 turns the guard off].", min=0.0, max=1.0,
        show_default=False)] = None,
    dense_tail: Annotated[bool, typer.Option("--dense-tail/--no-dense-tail",
                                             help="Run the last 64-row query block dense in every head.")] = True,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Profile path [default: ./profiles/MODEL.yaml].",
                                               show_default=False)] = None,
    png: Annotated[Optional[str], typer.Option("--png", help="Figure path [default: the profile's path with .png].",
                                               show_default=False)] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="Do not draw the figure.")] = False,
    force: ForceOpt = False,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads while searching [default: 0 = auto: 1 "
                                                           "on a busy machine, else all cores].", min=0)] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from vlsparse.errors import InputError
    from vlsparse.models import load
    from vlsparse.profile import save_profile
    from vlsparse.rss import peak_rss_mb
    from vlsparse.profile.locate import default_profile_path
    from vlsparse.search.api import auto_threads, profile_model
    from vlsparse.search.calibration import calibration_from
    from vlsparse.search.report import summary, summary_table

    if model_arg and model and model_arg != model:
        raise InputError(f"two models given ({model_arg} and --model {model})", "give the model once")
    if png and no_png:
        raise InputError("--png and --no-png both given", "pass one of them")
    if out and Path(out).suffix not in (".yaml", ".yml"):
        raise InputError(f"--out {out} should end in .yaml", "e.g. --out profiles/mymodel.yaml")
    if png and Path(png).suffix != ".png":
        raise InputError(f"--png {png} should end in .png", "e.g. --png profiles/mymodel.png")
    inputs = existing_paths(model_arg, model, calib)
    if out:  # checked before any work; the default path is checked once the model's name is known
        _check_outputs(Path(out), png, no_png, force, inputs)
    err = Console(stderr=True)
    show = not (quiet or json_out)
    say = (lambda m: err.print(m, markup=False, highlight=False)) if show else None
    started = time.perf_counter()
    with quiet_transformers():
        loaded = load(model_arg or model or "demo", device=device, dtype=dtype, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)
        out_path = Path(out) if out else default_profile_path(loaded.name)
        _check_outputs(out_path, png, no_png, force, [*inputs, loaded.path])
        calibration = calibration_from(loaded, calib, samples=samples, seq_len=seq_len, seed=seed)
        result = profile_model(loaded, calibration, recall=recall, threads=threads or auto_threads(), progress=say,
                               tail_recall=tail_recall, dense_tail=dense_tail)
    seconds = time.perf_counter() - started
    save_profile(result, out_path, force=force)
    figure = None
    if not no_png:
        import importlib.util

        from vlsparse.search.report import draw_figure

        if png or importlib.util.find_spec("matplotlib") is not None:
            figure = draw_figure(result, Path(png) if png else out_path.with_suffix(".png"), force=force)
        elif show:
            err.print("Note: no figure (matplotlib is not installed; pip install 'vlsparse[plot]').")
    if json_out:
        typer.echo(json.dumps({"out": str(out_path), "png": str(figure) if figure else None, "seconds": seconds,
                               "peak_rss_mb": peak_rss_mb(), **summary(result)}, indent=2))
        return
    if show:
        err.print(summary_table(result))
        err.print(f"time {seconds:.1f} s, peak RSS {peak_rss_mb():.0f} MiB; figure: {figure or 'none'}",
                  markup=False, highlight=False)
    typer.echo(str(out_path))


def register(app: typer.Typer) -> None:
    app.command("profile", help=HELP)(profile)
