"""ZipVL's mixed-precision KV cache: important tokens at high bits, the rest at low bits.

Paper: He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
Sparsification and KV Cache Compression", arXiv 2410.08584 (2024).

Rule, in our words: a token's importance is the attention it receives from probe queries,
normalised by how many of them can see it (the causal mask hides a late token from early rows).
The count of important tokens adapts per layer: sort the layer's importances (summed over its
KV heads) and take the smallest count ``p`` whose top-``p`` sum reaches ``tau`` of the total.
Each KV head then holds its own top-``p`` at ``high_bits``, every other token at ``low_bits``.

Adaptations: the probe queries are the prompt's last ``window`` rows (the instruction after the
images; the paper mixes recent and random rows); keys are quantised per channel and values per
token as in ``uniform``; the last ``residual`` tokens stay at full precision.
"""

from __future__ import annotations

import torch

from vlsparse.kv.plan import KVContext, KVPlan, top_per_head

NAME = "zipvl"
PAPER = "ZipVL: Efficient LVLMs with Dynamic Token Sparsification and KV Cache Compression (He et al., 2024)"
DEFAULTS = {"tau": 0.975, "high_bits": 8, "low_bits": 4, "group": 32, "residual": 32, "window": 32}
OBSERVES = True


def important_count(importance: torch.Tensor, tau: float) -> int:
    """The smallest ``p`` whose ``p`` largest entries of ``importance`` [n] (>= 0) hold ``tau`` of its sum."""
    ordered = importance.sort(descending=True).values
    total = float(ordered.sum())
    if total <= 0:
        return 0
    reached = (ordered.cumsum(0) >= tau * total).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(ordered)


def plan(ctx: KVContext, tau: float = 0.975, high_bits: int = 8, low_bits: int = 4, group: int = 32,
         residual: int = 32, window: int = 32) -> KVPlan:
    prefix = ctx.prefix
    if not prefix:
        return KVPlan(low_bits=low_bits, high_bits=high_bits, key_group=group, value_group=group)
    normalised = ctx.received[:, :prefix] / ctx.visible[:prefix]
    count = important_count(normalised.sum(0), tau)
    high = torch.zeros(ctx.heads, prefix, dtype=torch.bool)
    if count:
        high.scatter_(1, top_per_head(normalised, count), True)
    return KVPlan(low_bits=low_bits, high_bits=high_bits, high=high, key_group=group, value_group=group)
