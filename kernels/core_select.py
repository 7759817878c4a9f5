"""Core neurons and core tokens: the pure tensor functions the runtime and the calibration share.

No hooks, no state. ``vlsparse.kernels.core_runtime`` runs them on every prompt, and
the offline calibration (``vlsparse calibrate``) measures with the same ones; the
runtime side holds them because the offline side may import it, never the reverse.

CoreInfer (Wang et al., 2024) and CoreMatching (Wang et al., ICML 2025) on a gated
FFN ``down(act(gate(x)) * up(x))`` with ``F`` intermediate neurons. For a token t the
*activation* is ``a_t = act(gate(x_t)) * up(x_t)`` (a vector of F values) and its
*gate* is ``g_t = act(gate(x_t))``.

- Token-wise core set ``C_t``: neuron i is *active* for t when ``|g_t,i| > tau``
  (``tau`` = the layer's CATS threshold, 0 without calibration); ``C_t`` holds the
  ``ceil(alpha * n_t)`` active neurons of largest ``|a_t,i|``, ``n_t`` = t's active
  count. Default ``alpha = 0.2``.
- Sentence-wise core set ``K``: the ``ceil(beta * F)`` neurons that occur in the
  most token-wise sets, ``f_i = #{t : i in C_t}``; ties go to the larger summed
  ``|a|``. Default ``beta = 0.4``. ``beta = 1`` keeps every neuron. The runtime
  counts over at most ``sample_tokens`` evenly spaced prompt tokens (default 1024;
  a per-row top-k costs ~12 ns per activation on one core, so 8k tokens would add
  ~70 ms per layer to the prefill for a frequency that 1024 tokens estimate well).
- Core-token score (CoreMatching): the cosine between token t's core indicator
  ``1[C_t]`` and the core indicator ``1[K]`` of a reference set of tokens,
  ``|C_t ∩ K| / sqrt(|C_t| |K|)``, in [0, 1].
- Elbow cut: sort the scores in descending order, scale index and value to [0, 1],
  and take the point farthest from the chord joining the first and last points.
  A point below the chord (a convex knee) is the first of the low tail and is
  dropped; a point above it (a concave shoulder) is the last of the high head and
  is kept. The count is then clamped to ``[ceil(min_keep n), floor(max_keep n)]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mlp_activations(mlp, x: Tensor) -> tuple[Tensor, Tensor]:
    """(gate ``g = act(gate(x))``, activation ``a = g * up(x)``) of a gated MLP; x: [..., H] -> [..., F] each."""
    gate = mlp.act_fn(mlp.gate_proj(x))
    return gate, gate * mlp.up_proj(x)


def core_count(fraction: float, total: int) -> int:
    """``ceil(fraction * total)`` clamped to [1, total] (0 when total is 0)."""
    if total <= 0:
        return 0
    return max(1, min(total, math.ceil(fraction * total - 1e-9)))


def evenly_spaced(n: int, k: int) -> Tensor:
    """Indices of at most ``k`` evenly spaced items of ``n`` (all of them when ``k`` <= 0 or ``k`` >= n)."""
    if k <= 0 or k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long().unique()


def token_core_mask(act: Tensor, alpha: float = 0.2, gate: Tensor | None = None, threshold: float = 0.0) -> Tensor:
    """Token-wise core sets as a boolean [T, F] mask.

    act: [T, F] activations; gate: [T, F] gate activations deciding which neurons are
    active (``|gate| > threshold``; without ``gate``, ``|act| > threshold``). Each row
    keeps its ``ceil(alpha * n_t)`` active neurons of largest ``|act|`` (none if n_t = 0).
    """
    magnitude = act.detach().abs().float()
    active = (gate.detach().abs().float() if gate is not None else magnitude) > threshold
    counts = active.sum(-1)
    k = torch.ceil(alpha * counts.float() - 1e-6).clamp(min=0).long()
    k = torch.where(counts > 0, k.clamp(min=1), k)
    k_max = int(k.max()) if k.numel() else 0
    mask = torch.zeros_like(active)
    if k_max == 0:
        return mask
    ranked = magnitude.masked_fill(~active, -1.0)
    top = ranked.topk(k_max, dim=-1).indices
    within = torch.arange(k_max, device=act.device)[None, :] < k[:, None]
    mask.scatter_(-1, top, within)
    return mask


def sentence_core(token_mask: Tensor, beta: float = 0.4, act: Tensor | None = None) -> Tensor:
    """Sentence-wise core neurons: sorted indices of the ``ceil(beta * F)`` most frequent ones.

    token_mask: [T, F] boolean token-wise sets; act: [T, F] activations for tie-breaking
    (larger summed ``|act|`` first). Returns a LongTensor [ceil(beta * F)], ascending.
    """
    total = token_mask.shape[-1]
    k = core_count(beta, total)
    if k >= total:
        return torch.arange(total, device=token_mask.device)
    score = token_mask.float().sum(0)
    if act is not None:
        mass = act.detach().abs().float().sum(0)
        score = score + 0.5 * mass / (mass.max() + 1e-12)  # < 0.5: only breaks ties between counts
    return score.topk(k).indices.sort().values


def core_match_scores(token_mask: Tensor, core: Tensor) -> Tensor:
    """Cosine between each token's core indicator and the core set's: [T] in [0, 1].

    token_mask: [T, F] boolean; core: LongTensor of neuron indices (the reference set K).
    ``|C_t ∩ K| / sqrt(|C_t| |K|)``; a token with an empty set scores 0.
    """
    overlap = token_mask[:, core].float().sum(-1)
    size = token_mask.float().sum(-1)
    return overlap / torch.sqrt(size.clamp(min=1.0) * max(int(core.numel()), 1))


def elbow_keep_count(scores_desc: Tensor) -> int:
    """How many of the descending ``scores_desc`` lie before the elbow (see the module docstring).

    Scores and indices are scaled to [0, 1]; the signed distance of point i below the
    chord from (0, 1) to (1, 0) is ``1 - x_i - y_i``. The farthest point e counts as the
    first dropped one when below the chord (keep e) and as the last kept one when above
    it (keep e + 1). A flat curve keeps everything.
    """
    n = int(scores_desc.numel())
    if n <= 2:
        return n
    y = scores_desc.double()
    span = float(y[0] - y[-1])
    if span <= 0:
        return n
    y = (y - y[-1]) / span
    x = torch.arange(n, dtype=torch.float64) / (n - 1)
    signed = 1.0 - x - y
    e = int(signed.abs().argmax())
    return e if signed[e] > 0 else e + 1


def keep_bounds(n: int, min_keep: float, max_keep: float) -> tuple[int, int]:
    """(lowest, highest) number of the n tokens the guards allow; at least one kept when n > 0."""
    if n <= 0:
        return 0, 0
    high = max(1, min(n, math.floor(max_keep * n + 1e-9)))
    low = max(1, min(high, math.ceil(min_keep * n - 1e-9)))
    return low, high


def select_core_tokens(scores: Tensor, min_keep: float = 0.1, max_keep: float = 0.5) -> Tensor:
    """Indices (ascending) of the tokens to keep: the top ones up to the elbow, within the guards.

    scores: [n] one score per candidate token. Ties at the cut keep the earlier token.
    """
    n = int(scores.numel())
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    low, high = keep_bounds(n, min_keep, max_keep)
    keep = min(max(elbow_keep_count(scores.float()[order]), low), high)
    return order[:keep].sort().values
