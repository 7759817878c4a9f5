"""Calibrating a visual-token-reduction method -> the profile's ``tokens`` section.

``calibrate_tokens(loaded, calibration, method, keep)`` answers every calibration prompt
greedily, dense and then with the method attached (``vlsparse.kernels.token_runtime``),
each up to EOS (at most ``max_new_tokens``), and compares two things per prompt: the
first answer token (top-1 of the first generated position) and the whole greedy answer.

- ``keep`` a number: that keep ratio; the guard's result is recorded (and reported),
  the section is written whatever it says (the user asked for that ratio).
- ``keep="auto"``: the smallest of ``AUTO_KEEPS`` (0.11, 0.25, 0.5) whose answers match
  dense on EVERY calibration prompt (first token and full answer); the ratios are tried
  from the smallest up and the first that passes wins. None passing is an ``InputError``
  that lists how close each came.

Adaptive methods (ZipVL, FEATHER's second stage, ToDRE's relevance stage) choose their own
counts; the guard still measures what they kept (``image_kept``: mean share of the image
tokens left after the last stage). The section's schema is ``vlsparse.profile.tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


from vlsparse.compress.core_guard import greedy_answer
from vlsparse.errors import InputError, param
from vlsparse.profile.tokens import TokenSettings, resolve_settings, schedule_text, tokens_section

AUTO_KEEPS = (0.11, 0.25, 0.5)


def guard_candidate(loaded, prepared: list[dict], dense: list[list[int]], settings: TokenSettings,
                    max_new_tokens: int) -> dict[str, Any]:
    """One keep ratio against dense: shares of prompts with the same first token / same answer."""
    from vlsparse.kernels.token_runtime import attach_tokens, detach_tokens

    runtime = attach_tokens(loaded, settings)
    first = same = 0
    kept: list[float] = []
    try:
        for inputs, reference in zip(prepared, dense):
            answer = greedy_answer(loaded, inputs, max_new_tokens)
            first += bool(answer[:1] == reference[:1])
            same += bool(answer == reference)
            st = runtime.stats()
            if st["image_tokens_total"]:
                kept.append(st["image_tokens_kept"] / st["image_tokens_total"])
    finally:
        detach_tokens(loaded, runtime)
    n = len(prepared)
    return {"keep": settings.keep, "first_token": round(first / n, 4), "answer": round(same / n, 4),
            "passed": first == n and same == n,
            "image_kept": round(sum(kept) / len(kept), 4) if kept else None}


def calibrate_tokens(loaded, calibration, method: str, keep: float | str = "auto", params: dict | None = None,
                     max_new_tokens: int = 32, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The ``tokens`` section for ``method`` on ``loaded`` (see the module docstring)."""
    from vlsparse.search.calibration import prepare_sample

    say = progress or (lambda message: None)
    num_layers = loaded.adapter.num_layers
    auto = isinstance(keep, str)
    if auto and keep != "auto":
        raise InputError(f"{param('keep')} {keep!r} is neither a ratio nor auto", f"e.g. {param('keep', 0.25)}")
    candidates = [resolve_settings(method, k, num_layers, params) for k in (AUTO_KEEPS if auto else (keep,))]
    if not loaded.adapter.is_vlm:
        raise InputError(f"token reduction needs a vision-language model; {loaded.name} takes no images",
                         "calibrate core neurons instead (without tokens)")
    if not loaded.adapter.image_tokens:
        raise InputError(f"token reduction does not apply to {loaded.name}: its images enter through "
                         "cross-attention layers, not as tokens of the prompt",
                         "calibrate core neurons instead (without tokens)")
    if max_new_tokens < 1:
        raise InputError(f"{param('max_new_tokens')} must be at least 1", f"e.g. {param('max_new_tokens', 32)}")
    prepared = [prepare_sample(loaded, sample) for sample in calibration.samples]
    say(f"dense answers to {len(prepared)} calibration prompts")
    dense = [greedy_answer(loaded, inputs, max_new_tokens) for inputs in prepared]
    rows, chosen = [], None
    for settings in candidates:
        say(f"{settings.method} keep {settings.keep:g} ({schedule_text(settings.schedule)})")
        row = guard_candidate(loaded, prepared, dense, settings, max_new_tokens)
        rows.append(row)
        if row["passed"] or not auto:
            chosen = settings
            break
    if chosen is None:
        tried = ", ".join(f"{r['keep']:g}: {r['answer']:.0%} same answers" for r in rows)
        raise InputError(f"{candidates[0].method} changed a calibration answer at every keep ratio ({tried})",
                         f"pass {param('keep', 0.5)} to accept the change, or choose another method")
    entry = {"source": calibration.source, "samples": len(prepared), "seq_len": calibration.seq_len,
             "seed": calibration.seed, "max_new_tokens": max_new_tokens}
    return tokens_section(chosen, calibration=entry, guard={"auto": auto, "candidates": rows})


def tokens_profile(loaded, section: dict[str, Any], base=None):
    """A ``Profile`` holding ``section``: ``base`` with its tokens section replaced, or a new one."""
    from vlsparse.profile import with_section

    return with_section(loaded.adapter.fingerprint(), "tokens", section, base)


__all__ = ["AUTO_KEEPS", "calibrate_tokens", "guard_candidate", "tokens_profile"]
