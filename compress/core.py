"""Core neurons offline: CATS thresholds and the calibration's measures (pure tensor functions).

The core-neuron and core-token functions the runtime shares live in
``vlsparse.kernels.core_select`` (its docstring defines the sets and scores).

- CATS thresholds (Lee et al., 2024): per layer, the ``|g|`` value below which a
  target fraction (default 0.5) of gate activations ``g = act(gate(x))`` fall, read
  off a histogram with log-spaced bins (``log_bin_edges``) filled over the
  calibration data.
- ``sliced_output_error``: how far the FFN restricted to the core neurons K lands
  from the dense one; ``next_token_kl``: how far a next-token distribution moved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vlsparse.kernels.core_select import mlp_activations


# ----------------------------------------------------------------------------- CATS thresholds


def log_bin_edges(low: float = 1e-6, high: float = 1e4, bins: int = 1000) -> Tensor:
    """Histogram edges: 0, then ``bins`` log-spaced edges from ``low`` to ``high`` (float64).

    Bin 0 is [0, low), bin i (1..bins-1) is [edges[i], edges[i+1]), the last bin also
    takes everything >= high.
    """
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.logspace(math.log10(low), math.log10(high), bins, dtype=torch.float64)])


def magnitude_histogram(values: Tensor, edges: Tensor) -> Tensor:
    """Counts of ``|values|`` per bin of ``edges`` (see ``log_bin_edges``): int64 [len(edges)]."""
    flat = values.detach().abs().flatten().double().cpu()
    index = torch.bucketize(flat, edges, right=True) - 1
    return torch.bincount(index.clamp(0, len(edges) - 1), minlength=len(edges))


def histogram_quantile(counts: Tensor, edges: Tensor, q: float) -> float:
    """The value below which a fraction ``q`` of the histogrammed magnitudes fall.

    Interpolates linearly inside bin 0 and geometrically inside the log-spaced bins.
    """
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    target = min(max(q, 0.0), 1.0) * total
    cumulative = torch.cumsum(counts.double(), 0)
    b = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).clamp(max=len(counts) - 1))
    before = float(cumulative[b - 1]) if b > 0 else 0.0
    inside = float(counts[b])
    frac = 0.0 if inside <= 0 else min(max((target - before) / inside, 0.0), 1.0)
    lo = float(edges[b])
    hi = float(edges[b + 1]) if b + 1 < len(edges) else lo
    if b == 0 or lo <= 0:
        return lo + frac * (hi - lo)
    return lo * (hi / lo) ** frac


# ----------------------------------------------------------------------------- calibration measures


def sliced_output_error(mlp, x: Tensor, core: Tensor, adapter=None) -> Tensor:
    """Relative error of the core-neuron FFN against the dense one, per token: [T].

    ``||down(a ⊙ 1[K]) - down(a)|| / ||down(a)||`` for x: [T, H] and core K (indices).
    ``adapter`` (the model's adapter; default the base ``Adapter``) names the MLP's projections.
    """
    from vlsparse.models.adapter import Adapter

    _, _, down = (adapter or Adapter).projections_of(mlp)
    _, act = mlp_activations(mlp, x)
    dense = down(act)
    kept = torch.zeros_like(act)
    kept[..., core] = act[..., core]
    sliced = down(kept)
    return (sliced - dense).norm(dim=-1) / dense.norm(dim=-1).clamp(min=1e-12)


def next_token_kl(reference_logits: Tensor, logits: Tensor) -> float:
    """KL(p_ref || p) in nats between two next-token distributions given as logits [V]."""
    ref = torch.log_softmax(reference_logits.double(), -1)
    other = torch.log_softmax(logits.double(), -1)
    return float((ref.exp() * (ref - other)).sum())
