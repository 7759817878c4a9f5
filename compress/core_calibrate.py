"""Offline calibration of core neurons and core tokens -> the profile's ``core`` section.

Three passes over the calibration samples (``vlsparse.search.calibration``: demo
long-context scenes for VLMs, pydoc text for LMs, or a JSONL file):

1. Dense prefill with a hook on every language-model MLP: a histogram of the gate
   activations ``|act(gate(x))|`` per layer (log-spaced bins), from which the CATS
   threshold at ``cats_sparsity`` is read; and the dense next-token logits.
2. Dense greedy decoding of ``decode_tokens`` tokens: per layer, the prompt's core
   neurons K (alpha, beta, the layer's threshold; ``vlsparse.kernels.core_select``) and the
   relative error of each decode token's FFN output restricted to K,
   ``||down(a ⊙ 1[K]) - down(a)|| / ||down(a)||``. The neuron layers are the longest
   run of consecutive layers whose mean error is at most ``max_error`` (or given).
   Then the answer guard: greedy answers up to ``guard_tokens`` (end-of-sequence included)
   with core neurons must equal the dense ones, on the calibration prompts plus short ones
   (one-image demo questions when calibrating on demo scenes). While one answer differs,
   the run loses its end layer with the larger decode error. (Without the guard, on the
   demo model, a one-image question lost its end-of-sequence token and repeated its answer.)
3. Core tokens (VLMs): for each candidate token layer, scoring rule and upper keep
   guard, a prefill with image tokens really dropped (``vlsparse.kernels.core_runtime``); KL divergence
   of the next-token distribution from the dense one, top-1 agreement, kept share of
   image tokens, and the estimated language-model prefill cost
   ``((L + 1) + (N - L - 1) r) / N`` (r = kept share of the prompt). The chosen
   candidate is the cheapest whose mean KL is within ``kl_budget`` and whose top-1
   agreement is at least ``min_top1`` (default 1: no calibration sample's next token
   changes); none -> no dropping. KL alone was not enough: on the trained demo model a
   candidate at KL 0.053 changed half the calibration answers and cost 46 points of
   demo-multi accuracy.

The ``core`` section (YAML; every list item is a mapping with named fields)::

    core:
      version: 1
      calibration: {source: demo:multi+grid, samples: 4, seq_len: 4096, seed: 0, decode_tokens: 4}
      neurons:                      # core-neuron decoding (CoreInfer)
        alpha: 0.2                  # token-wise: top alpha of each token's active neurons
        beta: 0.4                   # sentence-wise: the ceil(beta * d_ff) most frequent
        layers: {first: 2, last: 9} # inclusive range of LM layers; null = none
        sample_tokens: 1024         # count frequencies over at most this many prompt tokens (0 = all)
        max_error: 0.5              # the selection rule's bound on mean decode error
        guard: {prompts: 20, new_tokens: 16, matched: 20, prompt_tokens: {least: 153, most: 4189},
                dropped_layers: [1]}     # the answer guard: whole greedy answers equal dense
      tokens:                       # core-token dropping (CoreMatching); layer null = off
        layer: 2                    # image tokens are dropped after this LM layer
        min_keep: 0.1               # guards on the kept share of image tokens
        max_keep: 0.5               # (the chosen one of the candidate upper guards)
        score: text                 # reference set: text | all | last (see core_runtime)
        kl_budget: 0.1              # nats, the selection rule's bounds:
        min_top1: 1.0               # and the least share of unchanged next tokens
        candidates:                 # what pass 3 measured (means over samples)
          - {layer: 1, score: text, max_keep: 0.5, kept: 0.31, kl: 0.021, top1: 1.0, cost: 0.46}
      thresholds: {of: abs_act_gate, sparsity: 0.5}   # CATS, values per layer below
      layers:                       # per LM layer, from passes 1-2
        - {layer: 0, neurons: 1536, threshold: 0.0123, decode_error: 0.31, core_mass: 0.62}
      options:                      # the options as given, where the rest keeps only what they chose
        neuron_layers: null         # (what a recipe replays; older profiles lack it)
        token_layers: null
        score: [text]
        max_keep: [0.25, 0.5]
        guard_tokens: 32

``neurons`` is the layer's d_ff, ``core_mass`` the share of the prompt's summed
``|a|`` that falls on K. The section's schema lives in ``vlsparse.profile.core``, whose
``core_settings`` turns it into the runtime's ``CoreSettings`` (one-line ``ProfileError``
on anything malformed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlsparse.errors import InputError, param
from vlsparse.profile.core import CORE_VERSION, SCORE_RULES, CoreSettings


def parse_layers(text: str | None, num_layers: int, what: str) -> list[int] | None:
    """``"2-9"``, ``"1,2,5"`` or ``"none"`` -> layer indices (None for no text); ``what`` names the
    parameter in errors (``neuron_layers``)."""
    if text is None:
        return None
    if text.strip().lower() in ("none", ""):
        return []
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(p) for p in part.split("-", 1))
                if b < a:
                    raise InputError(f"{param(what)} {text!r}: the range {part} runs backwards",
                                     f"write it low to high, e.g. {b}-{a}")
                out.extend(range(a, b + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise InputError(f"{param(what)} {text!r} is not a list of layers", "e.g. 2-9 or 1,2,3 or none") from None
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise InputError(f"{param(what)}: layer {bad[0]} does not exist (the model has {num_layers})",
                         f"use layers 0..{num_layers - 1}")
    return sorted(set(out))


# ----------------------------------------------------------------------------- selection rules


def longest_run(ok: Sequence[bool]) -> tuple[int, int] | None:
    """(first, last) of the longest run of consecutive True (the earliest on ties), or None."""
    best, start = None, None
    for i, flag in enumerate(list(ok) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or (i - 1 - start) > (best[1] - best[0]):
                best = (start, i - 1)
            start = None
    return best


def prefill_cost(layer: int, num_layers: int, kept_share: float) -> float:
    """Language-model prefill cost relative to dense when tokens drop after ``layer``: ((L+1) + (N-L-1) r) / N."""
    return ((layer + 1) + (num_layers - layer - 1) * kept_share) / num_layers


def default_token_layers(num_layers: int) -> list[int]:
    """Token-layer candidates: 0 .. N // 2, never the last layer (dropping after it saves nothing)."""
    return [layer for layer in range(0, num_layers // 2 + 1) if layer < num_layers - 1] or [0]


def choose_token_candidate(candidates: list[dict], kl_budget: float, min_top1: float = 1.0) -> dict | None:
    """The cheapest candidate that saves something, whose mean KL is within the budget and whose top-1
    agreement with dense is at least ``min_top1`` (lower KL on ties)."""
    eligible = [c for c in candidates if c["kl"] <= kl_budget and c.get("top1", 1.0) >= min_top1 and c["cost"] < 1.0]
    return min(eligible, key=lambda c: (round(c["cost"], 6), c["kl"])) if eligible else None


# ----------------------------------------------------------------------------- calibration passes


def _generate(loaded, inputs, new_tokens: int):
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        return loaded.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=pad, return_dict_in_generate=True,
                                     output_logits=True)


def _mlp_hooks(loaded, fn: Callable) -> list:
    handles = []
    for index, layer in enumerate(loaded.adapter.lm_layers()):
        mlp = loaded.adapter.mlp(layer)
        handles.append(mlp.register_forward_hook(lambda m, args, out, i=index: fn(i, m, args[0])))
    return handles


@dataclass
class _LayerRecord:
    histogram: torch.Tensor
    neurons: int = 0
    errors: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)


def calibrate_core(loaded, calibration, *, alpha: float = 0.2, beta: float = 0.4, max_error: float = 0.5,
                   neuron_layers: list[int] | None = None, token_layers: list[int] | None = None,
                   scores: Sequence[str] = ("text",), min_keep: float = 0.1,
                   max_keep: Sequence[float] = (0.25, 0.5),
                   kl_budget: float = 0.1, min_top1: float = 1.0, cats_sparsity: float = 0.5, decode_tokens: int = 4,
                   sample_tokens: int = 1024, guard_tokens: int = 16, guard_inputs: Sequence[dict] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``loaded`` on ``calibration`` (a ``search.calibration.CalibrationSet``) -> the ``core`` section.

    ``neuron_layers`` / ``token_layers`` fix the neuron layers / the token-layer
    candidates (default: chosen by error / layers 0..N//2 but not the last). ``guard_inputs``:
    extra prepared prompts for the answer guard (default: short demo questions when the
    calibration is demo scenes). See the module docstring.
    """
    from vlsparse.compress.core import (histogram_quantile, log_bin_edges, magnitude_histogram, next_token_kl,
                                        sliced_output_error)
    from vlsparse.kernels.core_select import evenly_spaced, mlp_activations, sentence_core, token_core_mask
    from vlsparse.memory import calibration_tokens, check_sequence_fits
    from vlsparse.search.calibration import prepare_sample

    max_keep = sorted(set(max_keep))
    for name, value in (("alpha", alpha), ("beta", beta), *(("max_keep", v) for v in max_keep)):
        if not 0.0 < value <= 1.0:
            raise InputError(f"{param(name)} must lie in (0, 1], got {value}",
                             f"e.g. {param('alpha', 0.2)} {param('beta', 0.4)}")
    if not max_keep or not 0.0 <= min_keep <= max_keep[0]:
        raise InputError(f"{param('min_keep', min_keep)} must lie in [0, {param('max_keep', max_keep[:1])}]",
                         "e.g. 0.1 and 0.5")
    if not 0.0 < cats_sparsity < 1.0:
        raise InputError(f"{param('cats_sparsity')} must lie in (0, 1), got {cats_sparsity}", "e.g. 0.5")
    unknown = [s for s in scores if s not in SCORE_RULES]
    if unknown or not scores:
        raise InputError(f"unknown scoring rule {unknown[0] if unknown else scores!r}",
                         f"choose from {', '.join(SCORE_RULES)}")
    if neuron_layers and sorted(neuron_layers) != list(range(min(neuron_layers), max(neuron_layers) + 1)):
        raise InputError(f"{param('neuron_layers', neuron_layers)} are not consecutive", "give a range such as 2-9")
    check_sequence_fits(loaded, calibration_tokens(calibration) + decode_tokens + 1, option=param("seq_len"),
                        kv_cache=True)
    say = progress or (lambda message: None)
    n_layers = loaded.adapter.num_layers
    samples = calibration.samples
    edges = log_bin_edges()
    records = [_LayerRecord(histogram=torch.zeros(len(edges), dtype=torch.long)) for _ in range(n_layers)]
    inputs = [prepare_sample(loaded, s) for s in samples]

    # pass 1: dense prefill -> gate histograms and reference logits
    reference = []

    def histogram(i, mlp, x):
        gate, _ = mlp_activations(mlp, x[0])
        records[i].histogram += magnitude_histogram(gate, edges)
        records[i].neurons = gate.shape[-1]

    handles = _mlp_hooks(loaded, histogram)
    try:
        for k, batch in enumerate(inputs, start=1):
            say(f"({k}/{len(inputs)}) dense prefill: activation histograms")
            reference.append(_generate(loaded, batch, 1).logits[0][0].float())
    finally:
        for h in handles:
            h.remove()
    thresholds = [histogram_quantile(r.histogram, edges, cats_sparsity) for r in records]

    # pass 2: dense decoding -> per-layer decode error of the prompt's core neurons
    cores: dict[int, torch.Tensor] = {}

    def decode_error(i, mlp, x):
        x = x[0]
        if x.shape[0] > 1 or i not in cores:  # the prompt: its core neurons, as the runtime counts them
            gate, act = mlp_activations(mlp, x)
            rows = evenly_spaced(x.shape[0], sample_tokens)
            mask = token_core_mask(act[rows], alpha, gate[rows], thresholds[i])
            core = sentence_core(mask, beta, act[rows])
            cores[i] = core
            mass = act.abs().sum(0)
            records[i].mass.append(float(mass[core].sum() / mass.sum().clamp(min=1e-12)))
            return
        records[i].errors.extend(sliced_output_error(mlp, x, cores[i], adapter=loaded.adapter).tolist())

    handles = _mlp_hooks(loaded, decode_error)
    try:
        for k, batch in enumerate(inputs, start=1):
            say(f"({k}/{len(inputs)}) dense decoding of {decode_tokens} tokens: core-neuron error per layer")
            cores.clear()
            _generate(loaded, batch, decode_tokens + 1)
    finally:
        for h in handles:
            h.remove()
    layer_rows = [{"layer": i, "neurons": r.neurons, "threshold": float(f"{thresholds[i]:.6g}"),
                   "decode_error": round(_mean(r.errors), 4), "core_mass": round(_mean(r.mass), 4)}
                  for i, r in enumerate(records)]
    if neuron_layers is None:
        run = longest_run([row["decode_error"] <= max_error for row in layer_rows])
    else:
        run = (min(neuron_layers), max(neuron_layers)) if neuron_layers else None
    guard = None
    if run is not None and guard_tokens > 0:
        from vlsparse.compress.core_guard import answer_guard, short_demo_inputs

        extra = list(guard_inputs) if guard_inputs is not None else short_demo_inputs(loaded, calibration)
        run, guard = answer_guard(loaded, [*inputs, *extra], run, layer_rows, CoreSettings(
            alpha=alpha, beta=beta, sample_tokens=sample_tokens, thresholds=dict(enumerate(thresholds))),
            guard_tokens, automatic=neuron_layers is None, say=say)

    # pass 3: core-token candidates
    tokens: dict[str, Any] = {"layer": None, "min_keep": min_keep, "max_keep": max_keep[-1], "score": scores[0],
                              "kl_budget": kl_budget, "min_top1": min_top1, "candidates": []}
    if loaded.adapter.is_vlm and not loaded.adapter.image_tokens:
        say("core tokens: not applicable (the images enter through cross-attention layers, not as prompt tokens)")
    if loaded.adapter.image_tokens:
        candidates = token_layers if token_layers is not None else default_token_layers(n_layers)
        rows = _token_candidates(loaded, inputs, reference, candidates, scores, thresholds, alpha, beta,
                                 sample_tokens, min_keep, max_keep, next_token_kl, say)
        tokens["candidates"] = rows
        chosen = choose_token_candidate(rows, kl_budget, min_top1)
        if chosen is not None:
            tokens.update(layer=chosen["layer"], score=chosen["score"], max_keep=chosen["max_keep"])
    return {
        "version": CORE_VERSION,
        "calibration": {"source": calibration.source, "samples": len(samples), "seq_len": calibration.seq_len,
                        "seed": calibration.seed, "decode_tokens": decode_tokens},
        "neurons": {"alpha": alpha, "beta": beta, "layers": {"first": run[0], "last": run[1]} if run else None,
                    "sample_tokens": sample_tokens, "max_error": max_error,
                    **({"guard": guard} if guard else {})},
        "tokens": tokens,
        "thresholds": {"of": "abs_act_gate", "sparsity": cats_sparsity},
        "layers": layer_rows,
        "options": {"neuron_layers": None if neuron_layers is None else sorted(neuron_layers),
                    "token_layers": None if token_layers is None else sorted(token_layers),
                    "score": list(scores), "max_keep": max_keep, "guard_tokens": guard_tokens},
    }


def _token_candidates(loaded, inputs, reference, candidates, scores, thresholds, alpha, beta, sample_tokens,
                      min_keep, max_keeps, kl_fn, say) -> list[dict]:
    from vlsparse.kernels.core_runtime import attach_core, detach_core

    n_layers = loaded.adapter.num_layers
    grid = [(layer, rule, top) for layer in candidates for rule in scores for top in max_keeps]
    rows = []
    for step, (layer, rule, top) in enumerate(grid, start=1):
        say(f"({step}/{len(grid)}) core tokens after layer {layer}, score {rule}, max keep {top:g}: "
            f"{len(inputs)} prefills")
        settings = CoreSettings(alpha=alpha, beta=beta, sample_tokens=sample_tokens,
                                thresholds=dict(enumerate(thresholds)), token_layer=layer, min_keep=min_keep,
                                max_keep=top, score=rule)
        kls, agree, kept, cost = [], [], [], []
        runtime = attach_core(loaded, settings, neurons=False, tokens=True)
        try:
            for batch, ref in zip(inputs, reference):
                logits = _generate(loaded, batch, 1).logits[0][0].float()
                st = runtime.stats()
                kls.append(kl_fn(ref, logits))
                agree.append(float(int(logits.argmax()) == int(ref.argmax())))
                share = st["image_tokens_kept"] / max(st["image_tokens_total"], 1)
                prompt = batch["input_ids"].shape[1]
                kept_prompt = (prompt - st["image_tokens_total"] + st["image_tokens_kept"]) / prompt
                kept.append(share)
                cost.append(prefill_cost(layer, n_layers, kept_prompt))
        finally:
            detach_core(loaded, runtime)
        rows.append({"layer": layer, "score": rule, "max_keep": top, "kept": round(_mean(kept), 4),
                     "kl": round(_mean(kls), 5), "top1": round(_mean(agree), 4), "cost": round(_mean(cost), 4)})
    return rows


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


# ----------------------------------------------------------------------------- profile


def core_profile(loaded, core: dict[str, Any], base=None):
    """A ``Profile`` holding ``core``: ``base`` with its core section replaced, or a new one."""
    from vlsparse.profile import with_section

    return with_section(loaded.adapter.fingerprint(), "core", core, base)
