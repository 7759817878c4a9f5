"""`vlsparse bench attention`: sparse prefill attention vs dense causal SDPA (wiring only)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from vlsparse.cli.bench_e2e import E2E_HELP, e2e_command
from vlsparse.cli.bench_tokens import TOKENS_HELP, tokens_command
from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import JsonOpt, QuietOpt, parse_fractions, parse_ints

HELP = """Benchmarks measured in one run, printed as a table (or JSON)."""

ATTENTION_HELP = """Time the sparse CPU attention path against dense causal SDPA on random inputs.

For every length, pattern and density: dense and sparse times, speedup, efficiency
(speedup x density: the speedup over the ideal 1/density, 1.0 = as fast per kept pair as
dense) and the max error against a dense masked fp32 reference (on sampled rows). With
--flex, compiled flex_attention on the same lists too (the flex backend): its time, speedup
and efficiency, and sparse_vs_flex (flex time / ours: above 1, ours is faster). Dense, ours
and flex are timed in turn, so all see the same load. --load N starts N busy processes
before timing and stops them after (a shared machine, reproduced); rows record it.
Long lengths take minutes on 2 cores; flex compiles for 10-40 s per new length.

Examples:

  vlsparse bench attention --seq 4096,8192

  vlsparse bench attention --seq 8192,32768 --densities 0.1 --flex

  vlsparse bench attention --seq 8192,32768 --densities 0.1 --flex --load 2

  vlsparse bench attention --seq 8192 --densities 0.1 --load 2 --load-kind python

  vlsparse bench attention --seq 32768 --patterns block_sparse --densities 0.05,0.1 --json
"""


@friendly_errors
def attention_command(
    seq: Annotated[str, typer.Option("--seq", help="Comma-separated sequence lengths.")] = "4096,8192,16384,32768",
    patterns: Annotated[str, typer.Option("--patterns", help="Comma-separated: vertical_slash, block_sparse, a_shape.")]
    = "vertical_slash,block_sparse,a_shape",
    densities: Annotated[str, typer.Option("--densities", help="Target kept fractions of causal pairs.")]
    = "0.05,0.1,0.25",
    heads: Annotated[int, typer.Option("--heads", help="Query heads.", min=1)] = 8,
    kv_heads: Annotated[int, typer.Option("--kv-heads", help="KV heads (default: --heads).", min=0)] = 0,
    head_dim: Annotated[int, typer.Option("--head-dim", help="Head dimension.", min=8)] = 64,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per measurement (median).", min=1)] = 3,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (0: torch's default).", min=0)] = 0,
    clock: Annotated[str, typer.Option("--clock", help="wall, or process (CPU time: stable on a busy machine; "
                                                        "use with --threads 1).")] = "wall",
    flex: Annotated[bool, typer.Option("--flex", help="Also time compiled flex_attention (compiles ~30 s per length).")]
    = False,
    load: Annotated[int, typer.Option("--load", help="Busy processes running while timing, to reproduce a shared "
                                                     "machine.", min=0)] = 0,
    load_kind: Annotated[str, typer.Option("--load-kind", help="What each busy process runs: matmul (one-thread "
                                                               "fp32 matmuls) or python (a pure Python loop).")]
    = "matmul",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    import torch

    from vlsparse.errors import InputError
    from vlsparse.bench.attention import BENCH_PATTERNS, bench_attention, format_table

    chosen = [p.strip() for p in patterns.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in BENCH_PATTERNS]
    if unknown or not chosen:
        raise InputError(f"unknown pattern {unknown[0] if unknown else patterns!r}",
                         f"choose from {', '.join(BENCH_PATTERNS)}")
    if kv_heads and heads % kv_heads:
        raise InputError(f"--heads {heads} is not a multiple of --kv-heads {kv_heads}", "e.g. --heads 8 --kv-heads 2")
    if clock not in ("wall", "process"):
        raise InputError(f"unknown clock {clock!r}", "choose wall or process")
    if threads:
        torch.set_num_threads(threads)
    say = None if quiet or json_out else (lambda msg: typer.echo(msg, err=True))
    rows = bench_attention(parse_ints(seq, "seq"), chosen, parse_fractions(densities, "densities"), heads=heads,
                           kv_heads=kv_heads or None, head_dim=head_dim, repeats=repeats, flex=flex, load=load,
                           load_kind=load_kind,
                           seed=seed, clock=clock, progress=say)
    typer.echo(json.dumps(rows, indent=2) if json_out else format_table(rows))


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)
    bench_app.command("attention", help=ATTENTION_HELP)(attention_command)
    bench_app.command("e2e", help=E2E_HELP)(e2e_command)
    bench_app.command("tokens", help=TOKENS_HELP)(tokens_command)
    app.add_typer(bench_app, name="bench")
