"""KV cache methods: what a layer's cache keeps after prefill, and at which precision. One module per method.

- ``fp``: every token at full precision, in a preallocated buffer written in place (no copy per
  decode step); the baseline every other method builds on.
- ``uniform``: every token at ``bits`` (KIVI-style: keys per channel, values per token).
- ``zipvl``: ZipVL's mixed precision: the tokens holding ``tau`` of the normalised attention at
  ``high_bits``, the rest at ``low_bits``.
- ``snapkv``: SnapKV-style eviction: an observation window's attention keeps ``budget`` of the
  image tokens (or of all tokens), the rest leave the cache.

Every method keeps the prompt's last ``residual`` tokens (SnapKV: its observation window) and the
decoded tokens at full precision until a group of them is quantised (``vlsparse.kv.store``).

Module interface
----------------
``NAME``, ``PAPER``, ``DEFAULTS`` (every parameter with its default), ``OBSERVES`` (whether
``plan`` needs the observation window's attention), and
``plan(ctx: KVContext, **params) -> KVPlan``: a pure rule on tensors; it never touches a model.
The runtime (``vlsparse.kernels.kv_runtime``) builds the context at each layer's prefill and
the store from the plan (``vlsparse.kv.plan.build_store``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vlsparse.errors import InputError
from vlsparse.kv.plan import KVContext, KVPlan

METHOD_NAMES = ("fp", "uniform", "zipvl", "snapkv")
INTERFACE = ("NAME", "PAPER", "DEFAULTS", "OBSERVES", "plan")

__all__ = ["INTERFACE", "KVContext", "KVPlan", "METHOD_NAMES", "method_named", "methods"]


def methods() -> dict[str, ModuleType]:
    """A fresh dict ``name -> method module``."""
    return {name: importlib.import_module(f"vlsparse.kv.{name}") for name in METHOD_NAMES}


def method_named(name: str) -> ModuleType:
    """The KV method module called ``name`` (case-insensitive); ``InputError`` naming the known ones otherwise."""
    key = str(name).strip().lower()
    if key not in METHOD_NAMES:
        raise InputError(f"unknown KV cache method {name!r}", f"choose one of: {', '.join(METHOD_NAMES)}")
    return importlib.import_module(f"vlsparse.kv.{key}")
