"""The run-time recall guard: a head whose pattern misses too much of this prompt's attention runs dense.

The prompt's last query block is the one that predicts the answer, and its exact attention is
cheap to compute (at most ``block_size`` rows against every key). For each head, the share of
that attention the head's index lists cover (its *recall* there) is measured on the actual
prompt; a head under the profile's tail target (else its recall target) was calibrated on
prompts unlike this one, and runs dense for this prompt instead of losing the attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlsparse.kernels.indices import SparseIndex


def last_block_keys(index: SparseIndex, n: int) -> Tensor:
    """Boolean [B, H, N]: the keys the last query block's lists name (windows and columns)."""
    b, h, _ = index.block_count.shape
    keys = torch.arange(n, device=index.block_offset.device)
    allowed = torch.zeros(b, h, n, dtype=torch.bool, device=keys.device)
    for bi in range(b):
        for hi in range(h):
            offsets = index.block_offset[bi, hi, -1, : int(index.block_count[bi, hi, -1])].long()
            if offsets.numel():
                inside = (keys[None, :] >= offsets[:, None]) & (keys[None, :] < offsets[:, None] + index.block_size)
                allowed[bi, hi] |= inside.any(0)
            columns = index.column_index[bi, hi, -1, : int(index.column_count[bi, hi, -1])].long()
            allowed[bi, hi, columns] = True
    return allowed


def last_block_recall(query: Tensor, key: Tensor, index: SparseIndex, scale: float) -> Tensor:
    """[H]: each query head's causal attention mass inside its lists over the last query block's rows
    (mean over rows, lowest over the batch). ``query`` [B, H, N, D], ``key`` [B, Hkv, N, D]."""
    b, h, n, _ = query.shape
    start = (n - 1) // index.block_size * index.block_size
    keys = key.repeat_interleave(h // key.shape[1], dim=1).float()
    scores = query[:, :, start:].float() @ keys.transpose(-1, -2) * scale  # [B, H, R, N]
    rows = torch.arange(start, n, device=query.device)[:, None]
    scores = scores.masked_fill(torch.arange(n, device=query.device)[None, :] > rows, float("-inf"))
    probs = scores.softmax(-1)
    inside = (probs * last_block_keys(index, n)[:, :, None, :]).sum(-1)  # [B, H, R]
    return inside.mean(-1).min(0).values


def heads_to_fall_back(recall: Tensor, target: float) -> list[int]:
    """The heads whose recall on this prompt is under ``target``."""
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
