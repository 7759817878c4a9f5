"""`vlsparse bench e2e`: dense vs each runtime feature vs everything combined, end to end, one run.

Configurations (``E2E_CONFIGS``), all on the same model and prompts:

- ``dense``: stock transformers (SDPA).
- ``sparse_attention``: the profile's attention patterns (``vlsparse.kernels.runtime``).
- ``core_tokens``: image tokens dropped after the profile's token layer (``core_runtime``).
- ``core_neurons``: decoding with the prompt's core neurons (``core_runtime``).
- ``tokens``: the profile's visual-token-reduction method (its ``tokens`` section, from
  ``vlsparse calibrate --tokens``; ``token_runtime``).
- ``dense_static``: stock transformers with its static cache (``cache_implementation="static"``,
  preallocated for the whole generation): the strongest dense decode baseline it offers.
- ``kv_fp``, ``kv_uniform``, ``kv_zipvl``, ``kv_snapkv``: a KV cache method (``vlsparse.kv``,
  ``vlsparse.kernels.kv_runtime``) with dense attention: the profile's ``kv`` parameters when its
  method is that one, else the method's defaults.
- ``kv_quantized``: transformers' own ``QuantizedCache`` (quanto backend, its default 4 bits; needs
  ``optimum-quanto``, else the row says so and is skipped): the peer of ``kv_uniform``.
- ``combined``: everything on the pruned checkpoint (``pruned``, e.g. ``vlsparse prune
  --ratio 0.5``; the same model when none is given, which the row's note says): sparse
  attention, core neurons, and image tokens dropped by the ``tokens`` method when there
  is one (else by core tokens; the two never run together), with the attention, core and
  tokens sections of the checkpoint's profile (found by the rule of
  ``vlsparse.profile.locate``: ``./profiles/<checkpoint>.yaml``, which ``vlsparse calibrate
  --model CHECKPOINT`` writes, else its own ``vlsparse.yaml``) where it has them, else the
  main profile's; decoding with the profile's ``kv`` method, else ``fp``.

Per configuration, timed by forward hooks on the model (``vlsparse.bench.timing.ForwardClock``:
the first forward of a generation, with an empty KV cache, is the prefill; every later
one a decode step):

- ``accuracy`` (``ci95``, ``accuracy_delta`` against dense): ``evaluate`` (default
  ``vlsparse.demo.evaluate.evaluate``) on ``n`` held-out samples of ``task`` from ``seed``;
  the dense run also keeps its first ``speed_prompts`` prompts exactly as the evaluator
  built them, for the speed pass;
- speed pass: each of those prompts generates exactly ``decode_tokens`` tokens (greedy,
  ``min_new_tokens``); the configurations take turns, one untimed round, then ``repeats``
  timed rounds, so a drifting machine load hits them alike;
- ``prefill_ms``: median prefill; ``decode_tokens_per_s``: median over generations of
  decode steps / their time; speedups against the ``dense`` row;
- ``kv_cache_mib``: keys and values held by the KV cache after the last step (what it allocated:
  codes, scales and preallocated room included), ``kv_ratio`` against dense;
- ``decode_vs_static``: decode tokens/s against the ``dense_static`` row, when it ran;
- ``decode_agreement``: over the speed prompts, the share of dense's ``decode_tokens`` greedy tokens
  the configuration repeats before its first different token (the demo's answers are a word or
  two, and the first token comes from the prefill, so accuracy alone barely sees a KV method);
- ``peak_mib``: the largest growth of resident memory during one configuration's speed
  runs over its level just before (``malloc_trim``-ed first),
  sampled every 5 ms: an estimate of the working memory beyond the weights;
- image tokens and core neurons kept, from the core/token runtime's stats on the last prompt;
- with ``recall_guard``: sparse attention runs with the recall guard (``vlsparse.kernels.recall_guard``),
  and ``heads_dense_per_prompt`` / ``heads_dense_share`` count the heads it ran dense on each prompt of
  the accuracy pass (mean, and share of the heads that could run sparse).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlsparse.bench.timing import ForwardClock
from vlsparse.rss import RssPeak

KV_CONFIGS = ("kv_fp", "kv_uniform", "kv_zipvl", "kv_snapkv")
E2E_CONFIGS = ("dense", "dense_static", "sparse_attention", "core_tokens", "core_neurons", "tokens", *KV_CONFIGS,
               "kv_quantized", "combined")
QUANTIZED_CACHE = {"backend": "quanto", "nbits": 4}  # transformers' QuantizedCache as its docs show it


def _generate(loaded, inputs: dict, new_tokens: int) -> list[int]:
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=pad)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def agreement(tokens: list[int], reference: list[int]) -> float:
    """Share of ``reference``'s tokens that ``tokens`` repeats before the first difference."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return same / len(reference) if reference else 1.0


def demo_evaluate():
    """``vlsparse.demo.evaluate.evaluate`` (model, processor, task, n, seed) -> dict, or None if absent."""
    try:
        from vlsparse.demo.evaluate import evaluate
    except ImportError:
        return None
    return evaluate


class _Stats:
    """The stats of the runtimes a configuration attached: core neurons from the core runtime, image tokens
    from the token runtime when there is one."""

    def __init__(self, core, tokens, kv=None, fell: list | None = None) -> None:
        self.core, self.tokens, self.kv, self.fell = core, tokens, kv, fell

    def stats(self) -> dict[str, Any]:
        out = self.core.stats() if self.core is not None else {}
        if self.fell is not None:
            from vlsparse.kernels.recall_guard import fallback_summary

            out["recall_guard"] = fallback_summary(self.fell)
        if self.kv is not None:
            out.update(self.kv.stats())
        if self.tokens is not None:
            st = self.tokens.stats()
            out.update(image_tokens_kept=st["image_tokens_kept"], image_tokens_total=st["image_tokens_total"],
                       token_method=st["method"])
        return out


def _apply(config: str, loaded, profile, core_settings, token_settings=None, kv_section=None, guard: bool = False
           ) -> tuple[Callable[[], None], Any, str]:
    """Switch ``config`` on; returns (undo, runtime stats or None, note). ``guard``: sparse attention runs with
    the recall guard, and the stats count the heads that fell back on each prompt."""
    from vlsparse.kernels.core_runtime import attach_core, detach_core
    from vlsparse.kernels.runtime import attach, detach
    from vlsparse.kernels.token_runtime import attach_tokens, detach_tokens

    undo: list[Callable[[], None]] = []
    sparse = core = tokens = kv = fell = None
    notes = []
    if config in ("dense_static", "kv_quantized"):
        generation = loaded.model.generation_config
        saved = generation.cache_implementation, generation.cache_config
        generation.cache_implementation = "static" if config == "dense_static" else "quantized"
        generation.cache_config = dict(QUANTIZED_CACHE) if config == "kv_quantized" else None
        undo.append(lambda: setattr(generation, "cache_implementation", saved[0])
                    or setattr(generation, "cache_config", saved[1]))
    if config in ("sparse_attention", "combined"):
        if profile is not None and profile.attention is not None:
            sparse = attach(loaded, profile, guard=guard)
            undo.append(lambda: detach(loaded, sparse))
            if guard:
                fell = []

                def count(module, args, kwargs, output) -> None:  # after each prefill: its heads that fell back
                    ids = kwargs.get("input_ids")
                    if ids is not None and ids.shape[-1] > 1 and sparse.calls:
                        fell.append(sparse.fallbacks())

                handle = loaded.model.register_forward_hook(count, with_kwargs=True)
                undo.append(handle.remove)
        else:
            notes.append("no attention profile: dense attention")
    method = token_settings is not None and config in ("tokens", "combined")
    if config in ("core_tokens", "core_neurons", "combined"):
        if core_settings is not None:
            core = attach_core(loaded, core_settings, neurons=config != "core_tokens",
                               tokens=config == "core_tokens" or (config == "combined" and not method),
                               sparse_runtime=sparse)
            undo.append(lambda: detach_core(loaded, core))
        else:
            notes.append("no core calibration in the profile")
    if method:
        tokens = attach_tokens(loaded, token_settings, sparse_runtime=sparse)
        undo.append(lambda: detach_tokens(loaded, tokens))
    elif config == "tokens":
        notes.append("no tokens section in the profile")
    if config in KV_CONFIGS or config == "combined":
        from vlsparse.kernels.kv_runtime import attach_kv, detach_kv
        from vlsparse.profile.kv import choose_kv

        if config == "combined":
            settings = choose_kv(kv_section)
        else:
            method = config.removeprefix("kv_")
            ours = kv_section is not None and kv_section.get("method") == method
            settings = choose_kv(kv_section if ours else None, method if not ours else None)
        kv = attach_kv(loaded, settings, tokens)
        undo.append(lambda: detach_kv(loaded, kv))
    stats = (_Stats(core, tokens, kv, fell) if core is not None or tokens is not None or kv is not None
             or fell is not None else None)
    return (lambda: [u() for u in reversed(undo)]), stats, "; ".join(notes)


def bench_e2e(model: str | Path = "demo", *, task: str = "multi", n: int = 20, seed: int = 0,
              profile: str | Path | None = None, pruned: str | Path | None = None,
              configs: Sequence[str] = E2E_CONFIGS, speed_prompts: int = 2, decode_tokens: int = 16,
              repeats: int = 3, device: str = "cpu", evaluate: Callable[..., dict] | None = None,
              progress: Callable[[str], None] | None = None, recall_guard: bool = False) -> list[dict[str, Any]]:
    """One row per configuration (see the module docstring); ``dense`` always runs, first.

    ``evaluate(model, processor, task=, n=, seed=) -> {"n", "accuracy", "ci95"?}`` defaults
    to the demo benchmark's (``demo_evaluate``). The speed pass visits the configurations
    round-robin ``repeats`` times after one untimed round, so a drifting machine load hits
    them alike.
    """
    from vlsparse.errors import InputError
    from vlsparse.models import load
    from vlsparse.profile.core import core_settings as parse_core
    from vlsparse.profile.locate import locate_profile
    from vlsparse.profile.tokens import token_settings as parse_tokens

    unknown = [c for c in configs if c not in E2E_CONFIGS]
    if unknown:
        raise InputError(f"unknown configuration {unknown[0]!r}", f"choose from {', '.join(E2E_CONFIGS)}")
    if evaluate is None:  # the demo evaluator's tasks; a caller's own evaluator judges its own
        from vlsparse.demo.scenes import TASKS

        if task not in TASKS:
            raise InputError(f"unknown task {task!r}", f"choose from {', '.join(TASKS)}")
    say = progress or (lambda message: None)
    evaluate = evaluate or demo_evaluate()
    base = load(model, device=device)
    _, prof = locate_profile(base.path, base.name, base.adapter.fingerprint(), profile, note=say)
    core = parse_core(prof.core, base.adapter.num_layers) if prof is not None and prof.core else None
    tokens = parse_tokens(prof.tokens, base.adapter.num_layers) if prof is not None and prof.tokens else None
    order = ["dense"] + [c for c in E2E_CONFIGS if c in configs and c != "dense"]
    skipped: dict[str, str] = {}
    if "kv_quantized" in order and not _quanto_available():
        order.remove("kv_quantized")
        skipped["kv_quantized"] = "optimum-quanto is not installed (pip install optimum-quanto): not run"
    combined_model = load(pruned, device=device) if pruned and "combined" in order else base
    kv = prof.kv if prof is not None else None
    profiles = {config: (prof, core, tokens, kv) for config in order}
    _, pruned_prof = (locate_profile(combined_model.path, combined_model.name,
                                     combined_model.adapter.fingerprint(), note=say)
                      if combined_model is not base else (None, None))
    if pruned_prof is not None:  # the pruned checkpoint's own profile, where it has the parts
        pruned_core = parse_core(pruned_prof.core, combined_model.adapter.num_layers) if pruned_prof.core else None
        pruned_tokens = (parse_tokens(pruned_prof.tokens, combined_model.adapter.num_layers) if pruned_prof.tokens
                         else None)
        profiles["combined"] = (pruned_prof if pruned_prof.attention is not None else prof, pruned_core or core,
                                pruned_tokens or tokens, pruned_prof.kv or kv)
    rows: dict[str, dict[str, Any]] = {}
    prompts: list[dict] = []
    for config in order:  # accuracy, on the prompts the evaluator builds (the dense run keeps the first ones)
        loaded = combined_model if config == "combined" else base
        say(f"{config}: accuracy on {n} {task} samples")
        clock = ForwardClock(keep_prompts=0 if prompts else speed_prompts)
        undo, runtime, note = _apply(config, loaded, *profiles[config], guard=recall_guard)
        handles = clock.attach(loaded.model)
        try:
            with torch.inference_mode():
                result = evaluate(loaded.model, loaded.processor, task=task, n=n, seed=seed) if evaluate else None
        finally:
            for h in handles:
                h.remove()
            undo()
        guarded = runtime.stats().get("recall_guard") if runtime is not None else None
        prompts.extend(clock.prompts)
        notes = [note] if note else []
        if config == "combined" and loaded is base:
            notes.insert(0, "no pruned checkpoint given: the same weights")
        if result is None:
            notes.append("no evaluator (vlsparse.demo.evaluate): no accuracy")
        rows[config] = {"config": config, "model": loaded.name, "task": task, "n": result["n"] if result else 0,
                        "accuracy": round(float(result["accuracy"]), 4) if result else None,
                        "ci95": [round(float(x), 4) for x in result["ci95"]] if result and "ci95" in result
                        else None, "note": "; ".join(notes)}
        if guarded is not None:  # the accuracy pass's prompts: heads the guard ran dense, per prompt
            rows[config]["heads_dense_per_prompt"] = round(guarded["mean_heads_dense"], 3)
            rows[config]["heads_dense_share"] = (round(guarded["fraction_dense"], 4)
                                                 if guarded["fraction_dense"] is not None else None)
    speed = {config: {"prefill": [], "decode": [], "kv": 0, "peak": 0.0, "stats": {}, "tokens": []} for config in order}
    for rep in range(repeats + 1):  # round 0 warms up and is not counted
        for config in order:
            loaded = combined_model if config == "combined" else base
            say(f"speed {'warm-up' if rep == 0 else f'{rep}/{repeats}'}: {config}, {len(prompts[:speed_prompts])} "
                f"prompts x {decode_tokens} tokens")
            undo, runtime, _ = _apply(config, loaded, *profiles[config], guard=recall_guard)
            clock = ForwardClock()
            handles = clock.attach(loaded.model)
            try:
                _release_memory()
                with RssPeak() as rss:
                    for inputs in prompts[:speed_prompts]:
                        before = len(clock.decode_s)
                        tokens = _generate(loaded, inputs, decode_tokens)
                        if rep == 0:
                            speed[config]["tokens"].append(tokens)
                        steps = clock.decode_s[before:]
                        if rep and steps:
                            speed[config]["decode"].append(len(steps) / sum(steps))
            finally:
                for h in handles:
                    h.remove()
                stats = runtime.stats() if runtime is not None else {}
                undo()
            if rep:
                entry = speed[config]
                entry["prefill"].extend(clock.prefill_s)
                entry["kv"], entry["stats"] = clock.kv_bytes, stats
                entry["peak"] = max(entry["peak"], rss.peak_mib)
    out = []
    for config in order:
        row, entry, stats = rows[config], speed[config], speed[config]["stats"]
        row.update({
            "prefill_ms": round(statistics.median(entry["prefill"]) * 1000, 1) if entry["prefill"] else None,
            "decode_tokens_per_s": round(statistics.median(entry["decode"]), 2) if entry["decode"] else None,
            "kv_cache_mib": round(entry["kv"] / 2**20, 3), "peak_mib": round(entry["peak"], 1),
            "image_tokens_kept": stats.get("image_tokens_kept"), "image_tokens_total": stats.get("image_tokens_total"),
            "token_method": stats.get("token_method"),
            "core_neurons_kept": stats.get("core_neurons_kept"), "core_neurons_total": stats.get("core_neurons_total"),
        })
        if not prompts:
            row["note"] = "; ".join(x for x in (row["note"], "no prompts captured: no speed") if x)
        out.append(row)
    dense = out[0]
    static = next((row for row in out if row["config"] == "dense_static"), None)
    for row in out:
        row["prefill_speedup"] = _ratio(dense["prefill_ms"], row["prefill_ms"])
        row["decode_speedup"] = _ratio(row["decode_tokens_per_s"], dense["decode_tokens_per_s"])
        row["decode_vs_static"] = _ratio(row["decode_tokens_per_s"], static["decode_tokens_per_s"]) if static else None
        row["kv_ratio"] = _ratio(row["kv_cache_mib"], dense["kv_cache_mib"])
        pairs = list(zip(speed[row["config"]]["tokens"], speed["dense"]["tokens"])) if row["config"] in speed else []
        row["decode_agreement"] = round(statistics.mean(agreement(a, b) for a, b in pairs), 4) if pairs else None
        row["accuracy_delta"] = (round(row["accuracy"] - dense["accuracy"], 4)
                                 if row["accuracy"] is not None and dense["accuracy"] is not None else None)
    out += [{"config": config, "model": base.name, "task": task, "n": 0, "accuracy": None, "note": note}
            for config, note in skipped.items()]
    out.sort(key=lambda row: E2E_CONFIGS.index(row["config"]))
    return [row for row in out if row["config"] in configs]


def _quanto_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def _release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so RSS growth is comparable.

    No ``gc.collect()``: the KV cache and activations are freed by reference counting, and a
    full collection of the transformers-sized heap takes about a second.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`bench_e2e` rows."""
    cols = ["config", "accuracy", "prefill_ms", "prefill_speedup", "decode_tokens_per_s", "decode_speedup",
            "decode_vs_static", "decode_agreement", "kv_cache_mib", "kv_ratio", "peak_mib", "image_tokens",
            "core_neurons", "heads_dense_per_prompt"]
    if not any(r.get("heads_dense_per_prompt") is not None for r in rows):
        cols.remove("heads_dense_per_prompt")
    if not any(r.get("decode_vs_static") for r in rows):
        cols.remove("decode_vs_static")

    def cell(row, col):
        if col == "image_tokens":
            return f"{row['image_tokens_kept']}/{row['image_tokens_total']}" if row.get("image_tokens_total") else "-"
        if col == "core_neurons":
            return f"{row['core_neurons_kept']}/{row['core_neurons_total']}" if row.get("core_neurons_total") else "-"
        value = row.get(col)
        return "-" if value is None else str(value)

    cells = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    notes = [f"{r['config']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))
