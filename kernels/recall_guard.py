"""The run-time recall guard: a head whose pattern misses too much of this prompt's attention runs dense.

The prompt's last query block is the one that predicts the answer, and its exact attention is
cheap to compute (at most ``block_size`` rows against every key). For each head, the share of
that attention the head's index lists cover (its *recall* there) is measured on the actual
prompt; a head under its target was calibrated on prompts unlike this one, and runs dense for
this prompt instead of losing the attention.

The target (``head_targets``): without a dense tail, the profile's tail target (else its recall
target), which the search required of every head's last block. With a dense tail the search
required nothing of the pattern there (that block runs dense), so the target is what the head's
own pattern kept of the calibration prompts' last blocks (``tail_recall_min``, their minimum) less
``MARGIN``: a head falls back when this prompt is clearly worse for it than calibration was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlsparse.kernels.indices import SparseIndex

MARGIN = 0.1
"""How far under its calibrated last-block recall a dense-tail head may fall before it runs dense."""
ROW_STRIDE = 4
"""The guard reads every 4th row of the last query block (16 of 64)."""


def head_targets(attention, heads) -> Tensor:
    """[H] the recall each query head of one layer must keep on the last block (see the module docstring);
    ``attention``: the profile's ``AttentionProfile``, ``heads``: that layer's ``HeadProfile`` list."""
    if attention.dense_tail:
        return torch.tensor([max(0.0, h.tail_recall_min - MARGIN) for h in heads])
    target = attention.tail_recall_target if attention.tail_recall_target is not None else attention.recall_target
    return torch.full((len(heads),), float(target))


def last_block_keys(index: SparseIndex, n: int) -> Tensor:
    """Boolean [B, H, N]: the keys the last query block's lists name (windows and columns)."""
    size = index.block_size
    device = index.block_offset.device
    counts, offsets = index.block_count[:, :, -1], index.block_offset[:, :, -1].long()  # [B, H], [B, H, W]
    listed = (torch.arange(offsets.shape[-1], device=device) < counts[..., None]).float()
    edges = torch.zeros(*counts.shape, n + 1, device=device)  # +1 where a window starts, -1 where it ends
    edges.scatter_add_(2, offsets.clamp(0, n), listed)
    edges.scatter_add_(2, (offsets + size).clamp(0, n), -listed)
    allowed = edges.cumsum(-1)[..., :n] > 0.5
    columns = index.column_index[:, :, -1].long()
    named = (torch.arange(columns.shape[-1], device=device) < index.column_count[:, :, -1, None]).float()
    hits = torch.zeros(*counts.shape, n + 1, device=device).scatter_add_(2, columns.clamp(0, n), named)
    return allowed | (hits[..., :n] > 0.5)


def last_block_recall(query: Tensor, key: Tensor, index: SparseIndex, scale: float, stride: int = ROW_STRIDE
                      ) -> Tensor:
    """[H]: each query head's causal attention mass inside its lists over the last query block's rows
    (mean over rows, lowest over the batch), from ``vlsparse.tokens.attention.attention_received`` (each
    KV head read once for its query heads). ``query`` [B, H, N, D], ``key`` [B, Hkv, N, D]. Every
    ``stride``-th row of the block is read (counted back from the last row), when that still leaves 16
    rows or more: an estimate at a quarter of the cost."""
    from vlsparse.tokens.attention import attention_received

    n = query.shape[2]
    start = (n - 1) // index.block_size * index.block_size
    step = stride if (n - start) // stride >= 16 else 1
    rows = torch.arange(n - 1, start - 1, -step, device=query.device).flip(0)
    listed = last_block_keys(index, n).float()  # [B, H, N]
    inside = torch.stack([(attention_received(query[i], key[i], scale, rows) * listed[i]).sum(-1)
                          for i in range(query.shape[0])]) / rows.numel()
    return inside.min(0).values


def heads_to_fall_back(recall: Tensor, target: float | Tensor) -> list[int]:
    """The heads whose recall on this prompt is under ``target`` (one for all, or one per head)."""
    target = torch.as_tensor(target, dtype=recall.dtype, device=recall.device)
    return [int(h) for h in (recall < target).nonzero().flatten()]


def dense_heads(query: Tensor, key: Tensor, value: Tensor, heads: list[int], scale: float,
                attention_mask: Tensor | None) -> Tensor:
    """Exact attention of query heads ``heads`` only: [B, len(heads), N, D], causal or under the model's mask."""
    group = query.shape[1] // key.shape[1]
    kv = torch.tensor([h // group for h in heads], device=key.device)
    q = query[:, heads]
    k, v = key.index_select(1, kv), value.index_select(1, kv)
    if attention_mask is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scale)


def fallback_summary(per_sample: list[tuple[int, int]]) -> dict:
    """Fallback counts over samples, from each prompt's ``SparseRuntime.fallbacks()`` (heads dense, heads checked).

    ``heads_dense`` / ``heads_checked`` list them per sample; ``mean_heads_dense`` is the mean heads
    that fell back per sample, ``fraction_dense`` their share of all heads checked (heads of layers that
    ran sparse), None when no prompt ran sparse (all shorter than the runtime's minimum, say).
    """
    dense = [d for d, _ in per_sample]
    checked = [c for _, c in per_sample]
    n = len(per_sample)
    return {"heads_dense": dense, "heads_checked": checked,
            "mean_heads_dense": sum(dense) / n if n else 0.0,
            "mean_heads_checked": sum(checked) / n if n else 0.0,
            "fraction_dense": sum(dense) / sum(checked) if sum(checked) else None}
