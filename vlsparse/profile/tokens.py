"""The profile's ``tokens`` section: a visual-token-reduction method (``vlsparse.tokens``) and its schedule.

``vlsparse calibrate --tokens METHOD --keep R`` writes it (``vlsparse.compress.token_calibrate``);
``vlsparse.kernels.token_runtime`` runs it. ``token_settings`` validates it with a one-line
``ProfileError`` on anything malformed, including a schedule that the method does not give
for this model; ``load_profile`` calls it, so a section the runtime cannot read is refused
when the profile is loaded::

    tokens:
      version: 1
      method: fastv                   # a registered method (vlsparse.tokens.METHOD_NAMES)
      keep: 0.25                      # the method's main ratio (its `keep`)
      params: {k: 2, rows: all}       # the method's other parameters (its defaults filled in)
      schedule:                       # resolved for this model: drop after LM layer (-1: before
        - {layer: 1, keep: 0.25}      # the LM), keeping this share of the original image tokens
      calibration: {source: demo:multi+grid, samples: 16, seq_len: 4096, seed: 0, max_new_tokens: 32}
      guard:                          # calibration answers against dense (greedy)
        auto: true                    # keep chosen as the smallest of `candidates` that passed
        candidates:
          - {keep: 0.11, first_token: 0.75, answer: 0.5, passed: false, image_kept: 0.11}
          - {keep: 0.25, first_token: 1.0, answer: 1.0, passed: true, image_kept: 0.25}

``first_token``/``answer``: the share of calibration prompts whose first answer token /
whole greedy answer (up to EOS) equals dense; ``passed`` = both are 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vlsparse.errors import InputError, ProfileError
from vlsparse.profile.checks import describe, method_params, optional_mappings

TOKENS_VERSION = 1
_RECALIBRATE = "recalibrate with `vlsparse calibrate --tokens METHOD`"


@dataclass(frozen=True)
class TokenSettings:
    """What the token runtime needs: the method, its ratio and parameters, and the resolved schedule."""

    method: str
    keep: float
    params: dict[str, Any] = field(default_factory=dict)
    schedule: tuple[tuple[int, float], ...] = ()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _param_ok(name: str, value: Any) -> str | None:
    """None if ``value`` suits parameter ``name``, else what it should be."""
    from vlsparse.tokens.attention import ROW_SETS

    if name in ("k", "stages", "stride"):
        low = 2 if name == "stages" else 1
        return None if _is_int(value) and low <= value <= 4096 else f"an integer in {low}..4096"
    if name == "min_keep":
        return None if _is_int(value) and 0 <= value <= 2**31 - 1 else "an integer >= 0"
    if name in ("tau", "relevance_depth"):
        return None if _is_number(value) and 0 < value <= 1 else "a number in (0, 1]"
    if name == "contextual_share":
        return None if _is_number(value) and 0 <= value <= 1 else "a number in [0, 1]"
    if name == "rows":
        return None if value in ROW_SETS else f"one of {', '.join(ROW_SETS)}"
    if name == "objective":
        return None if value in ("k_center", "max_sum") else "k_center or max_sum"
    if name == "layers":
        ok = value is None or (isinstance(value, list) and 0 < len(value) <= 4096 and all(map(_is_int, value)))
        return None if ok else "a list of layer indices, or null"
    return "a known parameter"


def _schedule_of(method, num_layers: int, keep: float, params: dict) -> tuple[tuple[int, float], ...]:
    try:
        stages = method.schedule(num_layers, keep, **params)
        for i in range(len(stages)):
            method.attention(i, **params)
            method.needs(i, **params)
    except (InputError, ValueError, TypeError) as exc:
        raise ProfileError(f"tokens: {method.NAME} cannot run on this {num_layers}-layer model: "
                           f"{getattr(exc, 'message', str(exc))}", _RECALIBRATE) from exc
    return tuple((int(s.layer), float(s.keep)) for s in stages)


def token_settings(section: Any, num_layers: int) -> TokenSettings:
    """Validate a profile's ``tokens`` section and turn it into ``TokenSettings``."""
    from vlsparse.tokens import METHOD_NAMES, method_named

    if not isinstance(section, dict):
        raise ProfileError("`tokens` should be a mapping")
    version = section.get("version", TOKENS_VERSION)
    if not _is_int(version) or version != TOKENS_VERSION:
        raise ProfileError(f"tokens version {describe(version)} is not supported (this vlsparse reads "
                           f"{TOKENS_VERSION})", _RECALIBRATE)
    name = section.get("method")
    if not isinstance(name, str) or name not in METHOD_NAMES:
        raise ProfileError(f"tokens.method {describe(name)} is unknown (known: {', '.join(METHOD_NAMES)})")
    keep = section.get("keep")
    if not _is_number(keep) or not 0 < keep <= 1:
        raise ProfileError(f"tokens.keep should be a number in (0, 1], got {describe(keep)}")
    method = method_named(name)
    params = method_params(section, "tokens", method, _param_ok, excluded=("keep",))
    schedule = _schedule_of(method, num_layers, float(keep), params)
    recorded = section.get("schedule")
    if recorded is not None:
        if not isinstance(recorded, list) or not all(isinstance(s, dict) for s in recorded):
            raise ProfileError("tokens.schedule should be a list of {layer, keep} mappings")
        pairs = [(s.get("layer"), s.get("keep")) for s in recorded]
        same = len(pairs) == len(schedule) and all(
            _is_int(layer) and _is_number(share) and layer == want_layer and abs(share - want_keep) < 1e-6
            for (layer, share), (want_layer, want_keep) in zip(pairs, schedule))
        if not same:
            raise ProfileError(f"tokens.schedule is not the one {name} gives for this model with these "
                               f"parameters ({schedule_text(schedule)})", _RECALIBRATE)
    optional_mappings(section, "tokens", ("guard", "calibration"))
    return TokenSettings(method=name, keep=float(keep), params=dict(params), schedule=schedule)


def schedule_text(schedule) -> str:
    """``after layer 1: 50%, after layer 3: 25%`` (``before the LM`` for -1)."""
    return ", ".join(f"{'before the LM' if layer < 0 else f'after layer {layer}'}: {keep:.0%}"
                     for layer, keep in schedule) or "no stage"


def tokens_section(settings: TokenSettings, *, calibration: dict[str, Any] | None = None,
                   guard: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``tokens`` section for ``settings`` (see the module docstring)."""
    section: dict[str, Any] = {
        "version": TOKENS_VERSION,
        "method": settings.method,
        "keep": float(settings.keep),
        "params": dict(settings.params),
        "schedule": [{"layer": int(layer), "keep": round(float(keep), 6)} for layer, keep in settings.schedule],
    }
    if calibration is not None:
        section["calibration"] = calibration
    if guard is not None:
        section["guard"] = guard
    return section


def resolve_settings(method: str, keep: float | None, num_layers: int, params: dict[str, Any] | None = None
                     ) -> TokenSettings:
    """``TokenSettings`` for a method by name (its default ``keep`` when None): validated as a profile
    section would be, but errors are ``InputError`` naming the parameter."""
    from vlsparse.errors import param
    from vlsparse.tokens import method_named

    module = method_named(method)
    keep = module.DEFAULTS["keep"] if keep is None else keep
    if not _is_number(keep) or not 0 < keep <= 1:
        raise InputError(f"{param('keep')} must lie in (0, 1], got {keep!r}", f"e.g. {param('keep', 0.25)}")
    section = {"version": TOKENS_VERSION, "method": module.NAME, "keep": float(keep), "params": dict(params or {})}
    try:
        return token_settings(section, num_layers)
    except ProfileError as exc:
        if isinstance(exc.__cause__, InputError):  # the method's own words (a schedule that does not fit)
            raise exc.__cause__ from None
        message = exc.message.replace("tokens.params.", "").replace("tokens.", "")
        raise InputError(f"{param('tokens', module.NAME)}: {message}",
                         "check the keep ratio and parameters, or pick another method") from exc
