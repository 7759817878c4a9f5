"""Pruning methods: an ordered registry, name -> module.

A method module defines two things:

- ``new_stats(linear) -> stats``: a collector the sequential loop creates per
  ``nn.Linear`` of a block; the loop calls ``stats.add(x)`` with that layer's
  input for every calibration batch, and ``stats.tokens`` counts what it saw
  (0 means the layer never ran);
- ``prune_layer(weight, stats, prune, structure) -> LayerUpdate``: the keep-mask
  for one weight (``prune`` weights to zero, or ``structure`` = (N, M)) and,
  for methods that reconstruct the rest (SparseGPT), the new weight.

Adding a method is one module here plus its entry in ``methods()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from vlsparse.errors import InputError, param


@dataclass
class LayerUpdate:
    """What pruning one weight gives: the keep-mask (``True`` = keep), and a new weight or None."""

    mask: torch.Tensor
    weight: torch.Tensor | None = None


def methods() -> dict[str, ModuleType]:
    """The registered methods, default first (a fresh table: copy it freely to add one in a test)."""
    from vlsparse.compress.methods import sparsegpt, wanda

    return {"wanda": wanda, "sparsegpt": sparsegpt}


def method_named(name: str, table: dict[str, ModuleType] | None = None) -> ModuleType:
    """The method module called ``name``, or a one-line ``InputError`` listing the registered ones."""
    table = methods() if table is None else table
    if name not in table:
        raise InputError(f"unknown {param('method')} {name!r}", f"use one of: {', '.join(table)}")
    return table[name]
