"""`vlsparse prune`: ECoFLaP allocation + Wanda pruning -> a checkpoint folder."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import CalibOpt, ForceOpt, JsonOpt, ModelArg, ModelOpt, QuietOpt, SeedOpt
from vlsparse.cli.quiet import quiet_transformers
from vlsparse.compress.allocations import DEFAULT as DEFAULT_ALLOCATION
from vlsparse.compress.allocations import NAMES as ALLOCATIONS
from vlsparse.compress.allocations import STRUCTURED as NM_ALLOCATION

HELP = """Prune the Linear weights of both towers and the projector, and write a checkpoint folder.

Each block (vision layer, projector, LM layer) gets its own sparsity (ECoFLaP:
zeroth-order scores and water-filling, within --max-deviation of --ratio; or
OWL; or uniform), then the method (--method wanda, or sparsegpt, which also
corrects the kept weights to make up for the pruned ones) zeroes weights per
output row (or N:M) in one sequential calibration loop. Blocks are read from disk one at a time, so the
model need not fit in memory. The output is a plain Hugging Face folder
(zeros in place; stock from_pretrained loads it) with vlsparse.yaml recording
the allocation and achieved sparsity; a profile of the same model found in
./profiles/ (or --profile) is carried along for `vlsparse run`.

Zeros in dense matrices save no time on dense hardware: use --pack for disk
size, 2:4 / 4:8 on GPUs with sparse tensor cores.

Examples:

  vlsparse prune --ratio 0.5

  vlsparse prune ./llava-1.5-7b-hf --allocation owl --out llava-owl

  vlsparse prune --model ./SmolLM2-135M-Instruct --ratio 0.5 --structure 2:4

  vlsparse prune --method sparsegpt --structure 2:4 --allocation uniform

  vlsparse prune smollm2 --ecoflap-scores gradient   # exact ECoFLaP scores, ~10x faster scoring

  vlsparse prune --calib mydata.jsonl --samples 64 --pack --force
"""


def groups_table(result) -> Table:
    table = Table(title=f"vlsparse prune · {result.model_name} -> {result.out}", title_justify="left")
    for name, justify in (("block", "left"), ("tower", "left"), ("weights", "right"), ("sparsity", "right"),
                          ("score", "right")):
        table.add_column(name, justify=justify)
    for row in result.groups:
        score = f"{row['score']:.3g}" if "score" in row else "-"
        table.add_row(row["group"], row["tower"], f"{row['params']:,}", f"{row['sparsity']:.2%}", score)
    table.add_section()
    table.add_row("all", "", f"{sum(r['params'] for r in result.groups):,}", f"{result.achieved:.3%}", "")
    return table


def summary_table(result) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("time", f"{result.seconds:.1f} s")
    for name, seconds in result.phases.items():  # the time split
        table.add_row(f"  {name}", f"{seconds:.1f} s ({seconds / max(result.seconds, 1e-9):.0%})")
    table.add_row("peak RSS", f"{result.peak_rss_mb:.0f} MiB (at start {result.start_rss_mb:.0f} MiB)")
    table.add_row("model weights", f"{result.model_mb:.0f} MiB")
    table.add_row("output folder", f"{result.out_mb:.0f} MiB")
    if result.profile_source:
        table.add_row("profile carried", result.profile_source)
    return table


@friendly_errors
def prune(
    model_arg: ModelArg = None,
    model: ModelOpt = None,
    ratio: Annotated[float, typer.Option("--ratio", help="Share of the pruned matrices' weights to zero.")] = 0.5,
    method: Annotated[str, typer.Option("--method", help="Pruning method for each layer: wanda, or sparsegpt "
                                                     "(OBS weight updates; slower, stronger at N:M).")
                      ] = "wanda",
    allocation: Annotated[Optional[str], typer.Option(
        "--allocation", help=f"{', '.join(ALLOCATIONS[:-1])} or {ALLOCATIONS[-1]} [default: {DEFAULT_ALLOCATION}; "
                             f"{NM_ALLOCATION} with N:M].",
        show_default=False)] = None,
    structure: Annotated[str, typer.Option("--structure", help="unstructured, 2:4 or 4:8 (N:M needs --ratio 0.5).")
                         ] = "unstructured",
    scope: Annotated[str, typer.Option("--scope", help="global: one budget for both towers; per-tower: each "
                                                        "tower (vision+projector, LM) meets --ratio.")] = "global",
    max_deviation: Annotated[float, typer.Option("--max-deviation",
                                                 help="Largest |block sparsity - ratio| (ecoflap, owl).")] = 0.1,
    calib: CalibOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Calibration samples for Wanda and OWL.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per text calibration window (LMs).")] = 256,
    ecoflap_samples: Annotated[int, typer.Option(
        "--ecoflap-samples", help="Calibration samples for ECoFLaP's scores (each costs 2 x blocks x draws "
                                  "forwards).")] = 8,
    ecoflap_scores: Annotated[str, typer.Option(
        "--ecoflap-scores", help="zeroth-order (the paper's estimate, 2 x blocks forwards a sample) or gradient "
                                 "(the quantity it estimates, computed block by block: about 4 forwards a "
                                 "sample).")] = "zeroth-order",
    epsilon: Annotated[float, typer.Option("--epsilon", help="ECoFLaP perturbation size (fp32).")] = 1e-3,
    draws: Annotated[int, typer.Option("--draws", help="ECoFLaP noise draws per block.")] = 1,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder [default: ./MODEL-ALLOC-PCT].",
                                               show_default=False)] = None,
    force: ForceOpt = False,
    pack: Annotated[bool, typer.Option("--pack", help="Write values + bitmask (smaller; read by vlsparse only).")
                    ] = False,
    profile: Annotated[Optional[str], typer.Option("--profile", help="Attention profile to carry into the "
                                                   "checkpoint [default: newest matching one in ./profiles/].",
                                                   show_default=False)] = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from vlsparse.compress.api import PruneConfig, default_model, prune_model
    from vlsparse.errors import InputError

    if model_arg and model and model_arg != model:
        raise InputError(f"two models given ({model_arg} and --model {model})", "give the model once")
    config = PruneConfig(ratio=ratio, method=method, allocation=allocation, structure=structure, scope=scope,
                         max_deviation=max_deviation, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
                         epsilon=epsilon, draws=draws, ecoflap_samples=ecoflap_samples,
                         ecoflap_scores=ecoflap_scores, pack=pack, force=force,
                         profile=profile)
    config.validate()  # before anything is printed: a bad flag is one line on stderr
    err = Console(stderr=True)
    show = not (quiet or json_out)
    chosen = model_arg or model
    if chosen is None:
        chosen, why = default_model()
        if show:
            err.print(f"Model: {chosen} ({why})", markup=False, highlight=False)
    with quiet_transformers():
        result = prune_model(chosen, out, config,
                             progress=(lambda m: err.print(m, markup=False, highlight=False)) if show else None)
    if json_out:
        typer.echo(json.dumps({"out": str(result.out), "model": result.model_name, "achieved": result.achieved,
                               "seconds": result.seconds, "phases": result.phases, "peak_rss_mb": result.peak_rss_mb,
                               "model_mb": result.model_mb, "out_mb": result.out_mb, "groups": result.groups},
                              indent=2))
        return
    if show:
        err.print(groups_table(result))
        err.print(summary_table(result))
    typer.echo(str(result.out))


def register(app: typer.Typer) -> None:
    app.command("prune", help=HELP)(prune)
