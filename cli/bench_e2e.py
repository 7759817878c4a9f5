"""`vlsparse bench e2e`: the command function; `cli/bench.py` adds it to the `bench` group (wiring only).

    from vlsparse.cli.bench_e2e import E2E_HELP, e2e_command
    bench_app.command("e2e", help=E2E_HELP)(e2e_command)
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import DeviceOpt, JsonOpt, ModelOpt, QuietOpt, RecallGuardOpt, SeedOpt
from vlsparse.cli.quiet import quiet_transformers

E2E_HELP = """Dense vs sparse attention vs core tokens vs core neurons vs token reduction vs KV cache methods vs
everything combined.

On the demo's long-context task, for each configuration: accuracy (held-out
seeds), prefill ms, decode tokens/s (a speed pass with a fixed number of new
tokens on the first prompts), KV-cache size and peak resident-memory growth,
with speedups against dense. `tokens` runs the profile's visual-token-reduction
method (`vlsparse calibrate --tokens METHOD`). `combined` runs sparse attention, core
neurons and token reduction (the `tokens` method, else core tokens) on --pruned (a
`vlsparse prune --ratio 0.5` checkpoint) when given. The profile (--profile, else
./profiles/MODEL.yaml if made for this model, else the model folder's vlsparse.yaml)
should hold `attention` (from `vlsparse profile`), `core` (from `vlsparse calibrate`)
and `tokens` (from `vlsparse calibrate --tokens`); a missing part runs dense and says so.

Decode baselines: `dense` uses transformers' default cache, `dense_static` its static
cache (the strongest dense decode it offers); `decode_vs_static` compares with the latter.
`kv_fp`, `kv_uniform`, `kv_zipvl` and `kv_snapkv` decode with a KV cache method (the
profile's `kv` parameters for its method, else the defaults); `kv_quantized` is
transformers' QuantizedCache (quanto, 4 bits; needs optimum-quanto). `combined` decodes
with the profile's `kv` method, else `fp`.

Examples:

\b
  vlsparse bench e2e
  vlsparse bench e2e --pruned ./demo-pruned --n 100 --json
  vlsparse bench e2e --task grid --configs dense,core_tokens --threads 1
  vlsparse bench e2e --configs dense,tokens,combined --pruned ./demo-pruned
  vlsparse bench e2e --task long --configs dense,dense_static,kv_fp,kv_uniform,kv_zipvl,kv_snapkv
"""


@friendly_errors
def e2e_command(
    model: ModelOpt = None,
    task: Annotated[str, typer.Option("--task", help="Demo task: multi, long or grid (long context), or vqa.")] = "multi",
    n: Annotated[int, typer.Option("--n", help="Samples for accuracy, per configuration.", min=1)] = 20,
    profile: Annotated[Optional[str], typer.Option("--profile", help="Profile with attention and core sections.",
                                                   show_default=False)] = None,
    pruned: Annotated[Optional[str], typer.Option("--pruned", help="Pruned checkpoint for the combined row.",
                                                  show_default=False)] = None,
    configs: Annotated[str, typer.Option("--configs", help="Comma-separated configurations.")]
    = "dense,dense_static,sparse_attention,core_tokens,core_neurons,tokens,kv_fp,kv_uniform,kv_zipvl,kv_snapkv,"
      "kv_quantized,combined",
    speed_prompts: Annotated[int, typer.Option("--speed-prompts", help="Prompts in the speed pass.", min=1)] = 2,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="New tokens per speed-pass prompt.",
                                               min=2)] = 16,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed speed rounds (configurations take turns).",
                                         min=1)] = 3,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (0: torch's default).", min=0)] = 0,
    recall_guard: RecallGuardOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    import torch

    from vlsparse.bench.e2e import bench_e2e, format_table

    if threads:
        torch.set_num_threads(threads)
    say = None if quiet or json_out else (lambda msg: typer.echo(msg, err=True))
    with quiet_transformers():
        rows = bench_e2e(model or "demo", task=task, n=n, seed=seed, profile=profile, pruned=pruned,
                         configs=[c.strip() for c in configs.split(",") if c.strip()], speed_prompts=speed_prompts,
                         decode_tokens=decode_tokens, repeats=repeats, device=device, progress=say,
                         recall_guard=recall_guard)
    typer.echo(json.dumps(rows, indent=2) if json_out else format_table(rows))
