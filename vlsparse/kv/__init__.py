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

from types import ModuleType

from vlsparse.registry import module_named, modules_of
from vlsparse.kv.plan import KVContext, KVPlan

METHOD_NAMES = ("fp", "uniform", "zipvl", "snapkv")
INTERFACE = ("NAME", "PAPER", "DEFAULTS", "OBSERVES", "plan")

__all__ = ["INTERFACE", "KVContext", "KVPlan", "METHOD_NAMES", "method_named", "methods"]


def methods() -> dict[str, ModuleType]:
    """A fresh dict ``name -> method module`` (modules are imported on first call)."""
    return modules_of("vlsparse.kv", METHOD_NAMES)


def method_named(name: str) -> ModuleType:
    """The method module called ``name`` (case-insensitive); ``InputError`` naming the known ones otherwise."""
    return module_named("vlsparse.kv", METHOD_NAMES, name, "KV cache method")
