"""`vlsparse eval`: accuracy on the demo benchmark, or perplexity on held-out English text."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vlsparse.cli.errors import friendly_errors
from vlsparse.cli.options import (AllowPickleOpt, BackendOpt, DeviceOpt, DtypeOpt, JsonOpt, KVParamOpt, ModelOpt,
                                  QuietOpt, RecallGuardOpt, SeedOpt, parse_params)
from vlsparse.cli.quiet import quiet_transformers

DEMO_TASKS = {"demo-vqa": "vqa", "demo-multi": "multi", "demo-grid": "grid", "demo-long": "long",
              "demo-wild": "wild", "demo-wild-dark": "wild-dark"}
TEXT_TASKS = ("pydoc-ppl",)

HELP = """Measure a model: accuracy with a 95% interval on the demo benchmark (held-out seeds,
per-question-type breakdown), or perplexity on CPython's held-out pydoc text.

Tasks: demo-vqa (single scenes), demo-multi (28-32 scenes in one prompt, 4k+ tokens),
demo-grid (one large grid image, 4k+ tokens), demo-long (56-60 scenes, 8k+ tokens),
demo-wild (one shape of 16-40 px anywhere on white, drawn by other code than the
training scenes; vlsparse.demo.wild), demo-wild-dark (the same shapes and questions on
the training background), pydoc-ppl (language models).

Examples:

  vlsparse eval --task demo-vqa --n 500

  vlsparse eval --model ./demo-pruned --task demo-multi --n 100 --json

  vlsparse eval --model smollm2 --task pydoc-ppl

  vlsparse eval --task demo-multi --n 100 --profile profiles/demo.yaml   # sparse vs dense, same samples

With --profile, every sample is answered in turn dense and with the profile: its sparse
attention (prefills of 512+ tokens), its visual-token reduction (`tokens` section, from
`vlsparse calibrate --tokens`), and both together (`combined`) when it has both; the
report sets them side by side: accuracy per question type, answers that agree with
dense, image tokens kept, attention density kept, and median prefill time. With
--recall-guard as well, heads whose pattern misses the prompt's last-block attention run
dense for that prompt (as `run --recall-guard`); the report gives the mean number of heads
that fell back per sample and their share of the heads that ran sparse.
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


def _compare_table(result: dict, model: str, task: str, profile: Path) -> Table:
    dense, configs = result["dense"], result["configs"]
    title = f"vlsparse eval · {model} · {task} · dense vs {profile.name}"
    table = Table(title=title, title_justify="left", min_width=len(title))
    table.add_column("question type")
    table.add_column("n", justify="right")
    for name in ("dense", *configs):
        table.add_column(name, justify="right")
    for qtype, row in sorted(dense["per_qtype"].items()):
        table.add_row(qtype, str(row["n"]), f"{row['accuracy']:.3f}",
                      *(f"{c['per_qtype'][qtype]['accuracy']:.3f}" for c in configs.values()))
    table.add_row("all", str(dense["n"]), f"{dense['accuracy']:.3f}",
                  *(f"{c['accuracy']:.3f}" for c in configs.values()), style="bold")
    table.add_row("same answer as dense", "", "", *(f"{c['agreement']:.1%}" for c in configs.values()))
    table.add_row("median prefill", "", f"{result['prefill_ms']['dense']:.1f} ms",
                  *(f"{c['prefill_ms']:.1f} ms" for c in configs.values()))
    table.add_row("image tokens kept", "", "", *(_kept(c) for c in configs.values()))
    if any("recall_guard" in c for c in configs.values()):
        table.add_row("heads dense (guard) / sample", "", "", *(_fell(c) for c in configs.values()))
    density = result.get("attention_density")
    table.caption = (f"accuracy delta {result['accuracy_delta']:+.3f} · prefill speedup "
                     f"{result['prefill_speedup']:.2f}x (the profile as a whole) · attention kept "
                     f"{'n/a (no attention section, or prompts under the runtime minimum)' if density is None else f'{density:.1%}'}"
                     f" · chance {result['chance']:.3f} · mean prompt tokens {result['mean_prompt_tokens']:.0f}")
    return table


def _fell(config: dict) -> str:
    guard = config.get("recall_guard")
    if guard is None:
        return "-"
    share = guard["fraction_dense"]
    return f"{guard['mean_heads_dense']:.1f} ({'no sparse heads' if share is None else f'{share:.1%} of sparse'})"


def _kept(config: dict) -> str:
    kept, total = config.get("image_tokens_kept"), config.get("image_tokens_total")
    return f"{kept}/{total}" if total else "-"


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
    task: Annotated[str, typer.Option("--task", help="demo-vqa, demo-multi, demo-grid, demo-long, demo-wild, demo-wild-dark or pydoc-ppl.")] = "demo-vqa",
    n: Annotated[int, typer.Option("--n", help="Samples to evaluate (demo tasks).", min=1)] = 200,
    seed: SeedOpt = 0,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length in tokens (pydoc-ppl).", min=16)] = 512,
    profile: Annotated[Optional[Path], typer.Option(
        "--profile", help="Also answer with this profile's sparse attention and token reduction; report them "
                          "next to dense.",
        show_default=False)] = None,
    backend: BackendOpt = "auto",
    recall_guard: RecallGuardOpt = False,
    kv: Annotated[Optional[str], typer.Option(
        "--kv", help="Decode the answers with this KV cache method (fp, uniform, zipvl, snapkv) [default: "
                     "transformers' own cache].", show_default=False)] = None,
    kv_param: KVParamOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from vlsparse.errors import InputError, param
    from vlsparse.models import load
    from vlsparse.profile.kv import choose_kv, describe_kv

    if task not in DEMO_TASKS and task not in TEXT_TASKS:
        raise InputError(f"unknown task {task!r}", f"choose one of {', '.join([*DEMO_TASKS, *TEXT_TASKS])}")
    if profile is not None and task in TEXT_TASKS:
        raise InputError("--profile compares accuracy on demo-* tasks", "drop --profile, or pick a demo-* task")
    if recall_guard and profile is None:
        raise InputError(f"{param('recall_guard')} guards a profile's sparse attention",
                         f"add {param('profile', 'PROFILE.yaml')}, or drop {param('recall_guard')}")
    if kv_param and kv is None:
        raise InputError(f"{param('kv_param')} applies to {param('kv')}", f"add {param('kv', 'uniform')}")
    kv_settings = choose_kv(None, kv, parse_params(kv_param, "kv-param", "bits=2")) if kv is not None else None
    if kv_settings is not None and task in TEXT_TASKS:
        raise InputError(f"{param('kv')} changes decoding, which {task} does not do", f"drop {param('kv')}")
    err = Console(stderr=True, quiet=quiet or json_out)
    with quiet_transformers():
        loaded = load(model or "demo", device=device, dtype=dtype, allow_pickle=allow_pickle)
        if kv_settings is not None:
            from vlsparse.kernels.kv_runtime import attach_kv

            attach_kv(loaded, kv_settings)
        if task in TEXT_TASKS:
            result = _perplexity(loaded, seq_len, err)
            payload = {"model": loaded.name, "task": task, **result.__dict__}
            table = _ppl_table(result, loaded.name)
        elif profile is not None:
            result = _sparse_vs_dense(loaded, DEMO_TASKS[task], n, seed, profile, backend, err, recall_guard)
            payload = {"model": loaded.name, "task": task, "profile": str(profile), **result}
            table = _compare_table(result, loaded.name, task, profile)
        else:
            result = _demo_accuracy(loaded, DEMO_TASKS[task], n, seed, err)
            payload = {"model": loaded.name, "task": task, **result}
            table = _demo_table(result, loaded.name, task)
    from vlsparse.rss import peak_rss_mb

    payload["peak_rss_mb"] = peak_rss_mb()
    payload["kv"] = describe_kv(kv_settings)
    if json_out:
        typer.echo(json.dumps(payload, indent=2))
    else:
        Console().print(table)
        if kv_settings is not None:
            err.print(f"KV cache: {payload['kv']}", markup=False, highlight=False)
        err.print(f"peak RSS {payload['peak_rss_mb']:.0f} MiB", markup=False, highlight=False)


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


def _sparse_vs_dense(loaded, task: str, n: int, seed: int, profile: Path, backend: str, err: Console,
                     guard: bool = False) -> dict:
    """The same samples answered dense and with ``profile``, taking turns per sample.

    Configurations: ``sparse`` (its attention section), ``tokens`` (its tokens section) and,
    with both, ``combined``. The top level of the result is the profile as a whole (the
    last configuration) next to ``dense``; ``configs`` holds each one. With ``guard`` (the
    recall guard), each configuration using the attention section has ``recall_guard``:
    ``fallback_summary`` of the heads that fell back on each sample.
    """
    from vlsparse.bench.timing import Turns
    from vlsparse.demo.evaluate import evaluate_paired
    from vlsparse.errors import InputError, param
    from vlsparse.kernels.recall_guard import fallback_summary
    from vlsparse.kernels.runtime import attach, detach, set_enabled
    from vlsparse.kernels.token_runtime import attach_profile_tokens, detach_tokens
    from vlsparse.profile import check_profile_matches, load_profile

    profile_obj = load_profile(profile)
    check_profile_matches(profile_obj, loaded.adapter.fingerprint(), f"profile {profile}")
    if profile_obj.attention is None and profile_obj.tokens is None:
        raise InputError(f"profile {profile} has neither an attention nor a tokens section",
                         "make one with `vlsparse profile` or `vlsparse calibrate --tokens METHOD`")
    if guard and profile_obj.attention is None:
        raise InputError(f"{param('recall_guard')} guards sparse attention, and profile {profile} has no attention "
                         "section", f"drop {param('recall_guard')}, or make the profile with `vlsparse profile`")
    names = [name for name, present in (("sparse", profile_obj.attention is not None),
                                        ("tokens", profile_obj.tokens is not None)) if present]
    if len(names) == 2:
        names.append("combined")
    runtime = attach(loaded, profile_obj, backend=backend, guard=guard) if profile_obj.attention is not None else None
    tokens = attach_profile_tokens(loaded, profile_obj, sparse_runtime=runtime)
    densities: list[float] = []
    kept: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    fell: dict[str, list[tuple[int, int]]] = {name: [] for name in names}  # per sample: (heads dense, heads sparse)

    def answered(name: str) -> None:  # what the mode that just answered kept
        if tokens is not None and name in ("tokens", "combined"):
            st = tokens.stats()
            kept[name].append((st["image_tokens_kept"], st["image_tokens_total"]))
        if runtime is not None and name in ("sparse", "combined"):
            if runtime.mean_density() is not None:
                densities.append(runtime.mean_density())
            if guard:
                fell[name].append(runtime.fallbacks())

    def enter(name: str) -> None:
        if runtime is not None:
            set_enabled(loaded, runtime, name in ("sparse", "combined"))
        if tokens is not None:
            tokens.enabled = name in ("tokens", "combined")

    turns = Turns(loaded.model, ("dense", *names), enter, answered)
    clocks = turns.clocks
    try:
        with err.status(f"answering {n} {task} questions, dense and {', '.join(names)} in turn"):
            modes = {name: turns.switch(name) for name in ("dense", *names)}
            results = evaluate_paired(loaded.model, loaded.processor, modes, task=task, n=n, seed=seed,
                                      progress=turns.note)
    finally:
        turns.close()
        if tokens is not None:
            detach_tokens(loaded, tokens)
        if runtime is not None:
            detach(loaded, runtime)
    dense = results["dense"]
    prefill = {name: 1000 * statistics.median(c.prefill_s) for name, c in clocks.items()}
    configs = {}
    for name in names:
        same = sum(a == b for a, b in zip(dense["answers"], results[name]["answers"]))
        pairs = kept[name]
        configs[name] = {**results[name], "accuracy_delta": results[name]["accuracy"] - dense["accuracy"],
                         "agreement": same / n, "prefill_ms": prefill[name],
                         "prefill_speedup": prefill["dense"] / prefill[name],
                         "image_tokens_kept": sum(k for k, _ in pairs) if pairs else None,
                         "image_tokens_total": sum(t for _, t in pairs) if pairs else None}
        if guard and name in ("sparse", "combined"):
            configs[name]["recall_guard"] = fallback_summary(fell[name])
    whole = names[-1]
    return {**configs[whole], "dense": dense, "configs": configs,
            "attention_density": statistics.mean(densities) if densities else None,
            "prefill_ms": {"dense": prefill["dense"], "sparse": prefill[whole]},
            "prefill_speedup": prefill["dense"] / prefill[whole]}


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP)(eval_command)
