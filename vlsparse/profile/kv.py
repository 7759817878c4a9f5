"""The profile's ``kv`` section: the KV cache method ``run``, ``eval`` and ``bench`` decode with.

``vlsparse calibrate --kv METHOD`` writes it (``vlsparse.compress.kv_calibrate``), with what the
method did to the calibration answers; ``vlsparse.kernels.kv_runtime`` runs it. ``kv_settings``
validates it with a one-line ``ProfileError``; ``load_profile`` calls it::

    kv:
      version: 1
      method: zipvl                 # a registered method (vlsparse.kv.METHOD_NAMES)
      params: {tau: 0.975, high_bits: 8, low_bits: 4, group: 32, residual: 32, window: 32}
      guard: {first_token: 1.0, answer: 0.94, kv_ratio: 0.21, samples: 16}

Without a ``kv`` section the runtime uses ``fp`` (full precision, written in place).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlsparse.errors import InputError, ProfileError
from vlsparse.profile.checks import describe, method_params, optional_mappings

KV_VERSION = 1


@dataclass(frozen=True)
class KVSettings:
    """A KV method and its parameters (every default filled in)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)


def _param_ok(name: str, value: Any) -> str | None:
    """None if ``value`` suits parameter ``name``, else what it should be."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in ("bits", "low_bits", "high_bits"):
        return None if value in (2, 4, 8, 16) else "2, 4, 8 or 16 (16: full precision)"
    if name in ("group", "window", "residual", "pool"):
        low = 0 if name == "residual" else 1
        return None if integer and low <= value <= 65536 else f"an integer in {low}..65536"
    if name == "tau":
        return None if number and 0 < value <= 1 else "a number in (0, 1]"
    if name == "budget":
        return None if number and value > 0 else "a share in (0, 1] or a token count above 1"
    if name == "scope":
        return None if value in ("image", "all") else "image or all"
    return "a known parameter"


def kv_settings(section: Any) -> KVSettings:
    """Validate a profile's ``kv`` section and turn it into ``KVSettings``."""
    from vlsparse.kv import METHOD_NAMES, method_named

    if not isinstance(section, dict):
        raise ProfileError("`kv` should be a mapping")
    version = section.get("version", KV_VERSION)
    if version != KV_VERSION:
        raise ProfileError(f"kv version {describe(version)} is not supported (this vlsparse reads {KV_VERSION})",
                           "rewrite it with `vlsparse calibrate --kv METHOD`")
    name = section.get("method")
    if not isinstance(name, str) or name not in METHOD_NAMES:
        raise ProfileError(f"kv.method {describe(name)} is unknown (known: {', '.join(METHOD_NAMES)})")
    method = method_named(name)
    params = method_params(section, "kv", method, _param_ok)
    optional_mappings(section, "kv", ("guard", "calibration"))
    return KVSettings(method=name, params={**method.DEFAULTS, **params})


def kv_section(settings: KVSettings, guard: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``kv`` section for ``settings`` (see the module docstring)."""
    section: dict[str, Any] = {"version": KV_VERSION, "method": settings.method, "params": dict(settings.params)}
    if guard is not None:
        section["guard"] = guard
    return section


def resolve_kv(method: str, params: dict[str, Any] | None = None) -> KVSettings:
    """``KVSettings`` for a method by name, validated as a profile section would be, but errors are
    ``InputError`` naming the parameter."""
    from vlsparse.errors import param
    from vlsparse.kv import method_named

    module = method_named(method)
    try:
        return kv_settings({"version": KV_VERSION, "method": module.NAME, "params": dict(params or {})})
    except ProfileError as exc:
        message = exc.message.replace("kv.params.", "").replace("kv.params: ", "").replace("kv.", "")
        raise InputError(f"{param('kv', module.NAME)}: {message}", "check the method's parameters") from exc


def choose_kv(section: dict[str, Any] | None, method: str | None = None,
              params: dict[str, Any] | None = None) -> KVSettings | None:
    """The KV settings a command decodes with: ``method`` (``"off"``: None, transformers' own cache) with
    ``params``; without ``method``, the profile's ``section`` (``params`` overriding its parameters), else ``fp``."""
    if method is not None and method.strip().lower() == "off":
        if params:
            from vlsparse.errors import param

            raise InputError(f"{param('kv_param')} does not apply to {param('kv', 'off')}", "drop it")
        return None
    if method is None and section is not None:
        chosen = kv_settings(section)
        return resolve_kv(chosen.method, {**chosen.params, **(params or {})}) if params else chosen
    return resolve_kv(method or "fp", params)


def describe_kv(settings: KVSettings | None) -> str:
    """``zipvl (tau=0.975, ...)``, ``fp``, or ``transformers' cache`` for None."""
    if settings is None:
        return "transformers' cache"
    params = ", ".join(f"{k}={v}" for k, v in settings.params.items())
    return f"{settings.method} ({params})" if params else settings.method


__all__ = ["KVSettings", "KV_VERSION", "choose_kv", "describe_kv", "kv_section", "kv_settings", "resolve_kv"]
