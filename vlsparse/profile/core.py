"""The profile's ``core`` section: its schema, read into the core runtime's ``CoreSettings``.

``vlsparse calibrate`` writes the section (``vlsparse.compress.core_calibrate``, whose
docstring shows it in full); ``vlsparse.kernels.core_runtime`` runs it. ``core_settings``
validates it with a one-line ``ProfileError`` on anything malformed; ``load_profile``
calls it, so a profile the runtime cannot read is refused when it is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vlsparse.errors import ProfileError
from vlsparse.profile.checks import describe

CORE_VERSION = 1
SCORE_RULES = ("text", "all", "last")


@dataclass
class CoreSettings:
    """What the runtime needs: core-neuron and core-token parameters for one model."""

    alpha: float = 0.2
    beta: float = 0.4
    neuron_layers: tuple[int, ...] = ()
    sample_tokens: int = 1024
    thresholds: dict[int, float] = field(default_factory=dict)
    token_layer: int | None = None
    min_keep: float = 0.1
    max_keep: float = 0.5
    score: str = "text"


def _fraction(mapping: dict, key: str, where: str, default: float, low_open: bool = True) -> float:
    value = mapping.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProfileError(f"`{key}` in {where} should be a number, got {describe(value)}")
    if not (0.0 < float(value) <= 1.0 if low_open else 0.0 <= float(value) <= 1.0):
        raise ProfileError(f"`{key}` in {where} must lie in {'(0, 1]' if low_open else '[0, 1]'}, got {describe(value)}")
    return float(value)


def _layer(value: Any, where: str, num_layers: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < num_layers:
        raise ProfileError(f"{where} should be a layer index in 0..{num_layers - 1}, got {describe(value)}")
    return value


def core_settings(core: dict[str, Any], num_layers: int) -> CoreSettings:
    """Validate a profile's ``core`` section and turn it into ``CoreSettings``."""
    if not isinstance(core, dict):
        raise ProfileError("`core` should be a mapping")
    version = core.get("version", CORE_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version != CORE_VERSION:
        raise ProfileError(f"core version {describe(version)} is not supported (this vlsparse reads {CORE_VERSION})",
                           "recalibrate with `vlsparse calibrate`")
    neurons = core.get("neurons") or {}
    tokens = core.get("tokens") or {}
    for name, section in (("neurons", neurons), ("tokens", tokens)):
        if not isinstance(section, dict):
            raise ProfileError(f"`core.{name}` should be a mapping")
    span = neurons.get("layers")
    neuron_layers: tuple[int, ...] = ()
    if span is not None:
        if not isinstance(span, dict) or "first" not in span or "last" not in span:
            raise ProfileError("`core.neurons.layers` should be {first: i, last: j} or null")
        first = _layer(span["first"], "core.neurons.layers.first", num_layers)
        last = _layer(span["last"], "core.neurons.layers.last", num_layers)
        if last < first:
            raise ProfileError(f"core.neurons.layers: last {last} is before first {first}")
        neuron_layers = tuple(range(first, last + 1))
    token_layer = tokens.get("layer")
    if token_layer is not None:
        token_layer = _layer(token_layer, "core.tokens.layer", num_layers)
    score = tokens.get("score", "text")
    if not isinstance(score, str) or score not in SCORE_RULES:
        raise ProfileError(f"core.tokens.score {describe(score)} is unknown (known: {', '.join(SCORE_RULES)})")
    min_keep = _fraction(tokens, "min_keep", "core.tokens", 0.1, low_open=False)
    max_keep = _fraction(tokens, "max_keep", "core.tokens", 0.5)
    if min_keep > max_keep:
        raise ProfileError(f"core.tokens: min_keep {min_keep} is above max_keep {max_keep}")
    sample_tokens = neurons.get("sample_tokens", 1024)
    if not isinstance(sample_tokens, int) or isinstance(sample_tokens, bool) or not 0 <= sample_tokens <= 2**31 - 1:
        raise ProfileError(f"core.neurons.sample_tokens should be an integer >= 0, got {describe(sample_tokens)}")
    thresholds: dict[int, float] = {}
    rows = core.get("layers") or []
    if not isinstance(rows, list):
        raise ProfileError(f"`core.layers` should be a list of mappings, got {type(rows).__name__}")
    for i, entry in enumerate(rows):
        if not isinstance(entry, dict) or "layer" not in entry:
            raise ProfileError(f"core.layers item {i} should be a mapping with `layer`")
        index = _layer(entry["layer"], f"core.layers item {i}: layer", num_layers)
        value = entry.get("threshold", 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ProfileError(f"core.layers layer {index}: threshold should be a number >= 0, got {describe(value)}")
        thresholds[index] = float(value)
    return CoreSettings(alpha=_fraction(neurons, "alpha", "core.neurons", 0.2),
                        beta=_fraction(neurons, "beta", "core.neurons", 0.4), neuron_layers=neuron_layers,
                        sample_tokens=sample_tokens,
                        thresholds=thresholds, token_layer=token_layer, min_keep=min_keep, max_keep=max_keep,
                        score=score)
