"""The profile's ``pruning`` section: what ``vlsparse prune`` did (schema owned here).

``vlsparse prune`` (``vlsparse.compress.api.prune_model``) writes it into the
checkpoint's ``vlsparse.yaml``; ``load_profile`` keeps it as a plain mapping
(``Profile.pruning``)::

    method: wanda                 # the fine step; compared per output row (or N:M)
    allocation: ecoflap           # a registered policy: ecoflap | owl | uniform
    structure: unstructured       # unstructured | 2:4 | 4:8
    scope: global                 # global | per-tower (budget split between vision side and LM)
    ratio: 0.5                    # asked-for sparsity over all pruned matrices
    achieved: 0.5                 # measured over the masks
    max_deviation: 0.1            # every group's sparsity within ratio +- this
    pruned_params: 123456         # weights in the pruned matrices
    packed: false
    calibration: {source: demo:vqa, samples: 32, seq_len: 61, seed: 0, tokens: 1952, target_seq_len: 256}
    ecoflap: {epsilon: 0.001, draws: 1, samples: 8, seed: 0}   # the policy's record; or owl: {m: 5.0, lam: 0.08}
    source: {model: demo, path: /abs/path}
    run: {seconds: 12.3, peak_rss_mb: 512.0, start_rss_mb: 400.0, model_mb: 80.0}
    groups:                       # one per block, execution order (score: policies with scores)
    - {group: vision.0, tower: vision, params: 8192, keep: 4100, sparsity: 0.4995, score: 1.2e-06}
    matrices:                     # one per pruned weight (checkpoint names)
    - {name: ..., group: vision.0, shape: [32, 32], sparsity: 0.5}
    attention_profile: profiles/demo.yaml   # only when an attention profile was carried along

``group_row`` and ``matrix_row`` build the rows, ``pruning_section`` the section
(``calibration`` from ``calibration_entry``, ``policy`` the allocation's own record),
``pruned_profile`` the checkpoint's whole profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlsparse.profile.schema import Calibration, ModelFingerprint, Profile


def group_row(group: str, tower: str, params: int, zeros: int, score: float | None = None) -> dict[str, Any]:
    """One block's row: its weights, how many it keeps, its sparsity (and its allocation score)."""
    row: dict[str, Any] = {"group": group, "tower": tower, "params": params, "keep": params - zeros,
                           "sparsity": round(zeros / params, 6)}
    if score is not None:
        row["score"] = float(f"{score:.6g}")
    return row


def matrix_row(name: str, group: str, shape: Sequence[int], zeros: int) -> dict[str, Any]:
    """One pruned weight's row (``name`` as in the checkpoint)."""
    return {"name": name, "group": group, "shape": list(shape), "sparsity": round(zeros / (shape[0] * shape[1]), 6)}


def achieved_sparsity(groups: Sequence[dict[str, Any]]) -> float:
    """Zeros over weights in all ``groups`` rows together."""
    params = sum(g["params"] for g in groups)
    return sum(g["params"] - g["keep"] for g in groups) / params


def calibration_entry(source: str, samples: int, seq_len: int, seed: int, tokens: int,
                      target_seq_len: int | None = None) -> dict[str, Any]:
    """``seq_len``: the longest calibration sequence; ``target_seq_len``: the ``seq_len`` asked for (text
    windows; a vision-language model's prompts are used as they are), what a recipe replays."""
    entry = {"source": source, "samples": samples, "seq_len": seq_len, "seed": seed, "tokens": tokens}
    if target_seq_len is not None:
        entry["target_seq_len"] = target_seq_len
    return entry


def pruning_section(*, method: str, allocation: str, structure: str, scope: str, ratio: float, max_deviation: float,
                    packed: bool, calibration: dict[str, Any], policy: dict[str, Any], model: str, path: str,
                    seconds: float, peak_rss_mb: float, start_rss_mb: float, model_mb: float,
                    groups: list[dict[str, Any]], matrices: list[dict[str, Any]],
                    attention_profile: str | None = None) -> dict[str, Any]:
    """The ``pruning`` section (see the module docstring); ``achieved`` and ``pruned_params`` come from ``groups``."""
    section = {
        "method": method,
        "allocation": allocation,
        "structure": structure,
        "scope": scope,
        "ratio": ratio,
        "achieved": round(achieved_sparsity(groups), 6),
        "max_deviation": max_deviation,
        "pruned_params": sum(g["params"] for g in groups),
        "packed": packed,
        "calibration": calibration,
        **policy,
        "source": {"model": model, "path": path},
        "run": {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb, 1),
                "start_rss_mb": round(start_rss_mb, 1), "model_mb": round(model_mb, 1)},
        "groups": groups,
        "matrices": matrices,
    }
    if attention_profile:
        section["attention_profile"] = attention_profile
    return section


def pruned_profile(model: ModelFingerprint, section: dict[str, Any], carried: Profile | None = None) -> Profile:
    """The pruned checkpoint's profile: ``section`` as its ``pruning``, the pruning calibration as its
    ``calibration``; with ``carried`` (the model's attention profile), that profile's calibration,
    attention, core, tokens and tensors instead."""
    c = section["calibration"]
    calibration = Calibration(source=c["source"], samples=c["samples"], seq_len=c["seq_len"], seed=c["seed"])
    if carried is None:
        return Profile(model=model, calibration=calibration, pruning=section)
    return Profile(model=model, calibration=carried.calibration or calibration, attention=carried.attention,
                   pruning=section, core=carried.core, tokens=carried.tokens, tensors=dict(carried.tensors))
