"""Checking a KV cache method on calibration prompts -> the profile's ``kv`` section.

``calibrate_kv(loaded, calibration, method, params)`` answers every calibration prompt greedily
(up to EOS, at most ``max_new_tokens``) with the full-precision in-place cache (``fp``, identical
to transformers' own) and then with the method (``vlsparse.kernels.kv_runtime``), and records in
the section's ``guard``: the share of prompts whose first answer token and whose whole answer match,
and ``kv_ratio``, the bytes the method's cache held after the prompt against ``fp``'s (mean over
prompts). The section is written whatever the guard says: the user chose the method; the summary
shows the guard. The section's schema is ``vlsparse.profile.kv``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlsparse.compress.core_guard import greedy_answer
from vlsparse.errors import InputError, param
from vlsparse.profile.kv import KVSettings, kv_section, resolve_kv


def answers_with(loaded, prepared: list[dict], settings: KVSettings, max_new_tokens: int
                 ) -> tuple[list[list[int]], list[int]]:
    """Greedy answers to ``prepared`` with ``settings``' KV method, and the bytes its cache held after each."""
    from vlsparse.kernels.kv_runtime import attach_kv, detach_kv

    runtime = attach_kv(loaded, settings)
    answers, held = [], []
    try:
        for inputs in prepared:
            answers.append(greedy_answer(loaded, inputs, max_new_tokens))
            held.append(runtime.stats()["kv_held_bytes"])
    finally:
        detach_kv(loaded, runtime)
    return answers, held


def calibrate_kv(loaded, calibration, method: str, params: dict | None = None, max_new_tokens: int = 32,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``kv`` section for ``method`` on ``loaded`` (see the module docstring)."""
    from vlsparse.search.calibration import prepare_sample

    say = progress or (lambda message: None)
    settings = resolve_kv(method, params)
    if max_new_tokens < 1:
        raise InputError(f"{param('max_new_tokens')} must be at least 1", f"e.g. {param('max_new_tokens', 32)}")
    prepared = [prepare_sample(loaded, sample) for sample in calibration.samples]
    say(f"full-precision answers to {len(prepared)} calibration prompts")
    reference, full = answers_with(loaded, prepared, resolve_kv("fp"), max_new_tokens)
    say(f"{settings.method} answers ({', '.join(f'{k}={v}' for k, v in settings.params.items()) or 'no parameters'})")
    answers, held = answers_with(loaded, prepared, settings, max_new_tokens)
    n = len(prepared)
    ratios = [h / f for h, f in zip(held, full) if f]
    guard = {"first_token": round(sum(a[:1] == r[:1] for a, r in zip(answers, reference)) / n, 4),
             "answer": round(sum(a == r for a, r in zip(answers, reference)) / n, 4),
             "kv_ratio": round(sum(ratios) / len(ratios), 4) if ratios else None, "samples": n}
    section = kv_section(settings, guard=guard)
    section["calibration"] = {"source": calibration.source, "samples": n, "seq_len": calibration.seq_len,
                              "seed": calibration.seed, "max_new_tokens": max_new_tokens}
    return section


def kv_profile(loaded, section: dict[str, Any], base=None):
    """A ``Profile`` holding ``section``: ``base`` with its kv section replaced, or a new one."""
    from vlsparse.profile import with_section

    return with_section(loaded.adapter.fingerprint(), "kv", section, base)


__all__ = ["answers_with", "calibrate_kv", "kv_profile"]
