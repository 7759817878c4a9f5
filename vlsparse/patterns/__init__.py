"""One home for each attention pattern: the table search, runtime, report, bench and profile read.

Each pattern is one module (``dense``, ``a_shape``, ``grid``, ``static``, ``block_sparse``,
``vertical_slash``, ``modality_vertical_slash``) that defines everything about it
(``INTERFACE``):

- ``NAME``; ``BUDGETS`` (budget names, fractions of N) and ``PARAMS`` (integer params) of its
  ``HeadProfile``; ``REQUIRED_PARAMS``; ``USES_MASK`` (reads a sidecar block mask);
- ``BUDGET_MINIMUMS`` (token budgets -> minimum count) and ``TILE_BUDGETS`` (budgets counted in
  tiles per query block row);
- ``OFFLINE``: scored after all calibration samples (``static``) rather than per input;
- ``candidates(n0, images, strides, space)``: its part of the search catalogue;
- ``layout(cand, est, head, mask=None)``: the search-side ``Layout`` of one head on one input;
- ``needed_columns(cand, est)``: ``{kind: width}`` of key columns the layout may keep
  (``sink``: the first ``width`` columns; ``all`` / ``text`` / ``image``: the best of that estimate);
- ``runtime_index(profiles, ids, inputs)``: ``[(head ids, SparseIndex), ...]`` for the heads
  ``ids`` with ``HeadProfile`` s ``profiles`` on ``inputs`` (``vlsparse.patterns.layer.IndexInputs``);
- ``estimate_flops(n, d, last_q, block)``: FLOPs of its online estimate (0.0 without one);
- ``synthetic_index(n, heads, budget, generator, block_size)``, ``synthetic_bytes(n, heads,
  block_size)`` (its working memory) and ``density_guess(density)`` for ``bench attention``, or ``None``;
- ``COLOR``: its colour in the profile figure.

Shared machinery is in ``vlsparse.patterns.common`` and ``vlsparse.kernels.indices``. The table
is read-only; to try another pattern, pass a copy with it added (``registry=``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from vlsparse.patterns import (a_shape, block_sparse, dense, grid, modality_vertical_slash, static,
                               vertical_slash)

INTERFACE = ("NAME", "BUDGETS", "PARAMS", "REQUIRED_PARAMS", "USES_MASK", "OFFLINE", "BUDGET_MINIMUMS",
             "TILE_BUDGETS", "COLOR", "candidates", "layout", "needed_columns", "runtime_index",
             "estimate_flops", "synthetic_index", "synthetic_bytes", "density_guess")
"""What every pattern module defines (see the module docstring)."""

PATTERNS: Mapping = MappingProxyType({module.NAME: module for module in (
    dense, a_shape, vertical_slash, block_sparse, grid, modality_vertical_slash, static)})
"""Every pattern, in the profile's order."""

SEARCH_ORDER = ("a_shape", "grid", "static", "block_sparse", "vertical_slash", "modality_vertical_slash", "dense")
"""Catalogue order: patterns needing no online estimate first (the search's tie-break prefers earlier ones)."""

BENCH_ORDER = ("vertical_slash", "block_sparse", "a_shape")
"""Patterns ``bench attention`` runs by default (the ones with a ``synthetic_index``)."""


def lookup(name: str, registry: Mapping = PATTERNS):
    """The module of pattern ``name``; ``ValueError`` for an unknown one."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown attention pattern {name!r}") from None


__all__ = ["BENCH_ORDER", "INTERFACE", "PATTERNS", "SEARCH_ORDER", "lookup"]
