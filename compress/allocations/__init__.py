"""Layer sparsity allocation policies: an ordered registry, name -> module.

A policy decides how many weights each block keeps (its sparsity); ``prune_model``
looks it up by the ``allocation`` name and calls, for one run:

- ``scores(streamed, batches, config, progress) -> (scores, record)``: one score per
  block of ``streamed`` (in block order) from the calibration ``batches``, or None
  for a policy that needs none, and the policy's entry in the ``pruning`` section
  of ``vlsparse.yaml`` (e.g. ``{"owl": {"m": 5.0, "lam": 0.08}}``; ``{}`` for none);
- ``keep_counts(sizes, scores, config) -> list[int]``: the keep count of each block
  of one budget (all blocks, or one tower with ``scope: per-tower``), given their
  weight counts and their scores (None when ``scores`` gave None), summing to
  ``floor(sum(sizes) * (1 - config.ratio))`` exactly.

``config`` is the run's ``PruneConfig`` (``ratio``, ``max_deviation``, ``seed`` and
the policy's own knobs). The integer arithmetic the policies share is ``fill``.
Adding a policy is one module here plus its name in ``NAMES``.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from vlsparse.errors import InputError, param

NAMES = ("ecoflap", "owl", "uniform")
"""The registered policies, the default first; each is the module of the same name in this package."""

DEFAULT = NAMES[0]
"""The allocation of unstructured pruning when none is asked for."""

STRUCTURED = "uniform"
"""The one allocation N:M structure allows (it fixes every matrix at N/M)."""


def allocations() -> dict[str, ModuleType]:
    """The registered policies (a fresh table: copy it freely to add one in a test)."""
    return {name: import_module(f"{__name__}.{name}") for name in NAMES}


def allocation_named(name: str, table: dict[str, ModuleType] | None = None) -> ModuleType:
    """The policy called ``name`` (in ``table``, default the registry), or a one-line ``InputError``
    listing the registered ones."""
    known = tuple(table) if table is not None else NAMES
    if name not in known:
        raise InputError(f"unknown {param('allocation')} {name!r}", f"use one of: {', '.join(known)}")
    return table[name] if table is not None else import_module(f"{__name__}.{name}")
