"""SnapKV-style eviction: the prompt's last queries vote, and only the tokens they attend to stay.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.

Rule, in our words: the prompt's last ``window`` queries (the observation window, which holds the
question) attend over the prompt; each key's received attention, summed over the window and the
query heads sharing its KV head, is smoothed by a max-pool of width ``pool`` (so neighbours of a
chosen token come along, keeping features whole), and each KV head keeps its own top tokens.

Here eviction targets the image tokens (``scope="image"``): a head keeps exactly
``round(budget * image tokens)`` of them (``budget`` in (0, 1]; a number above 1 is a token count)
and every text token; ``scope="all"`` (and a model without image tokens) lets all prompt tokens
compete, as the paper does. The observation window is always kept at full precision; ``bits`` below
16 also quantises the kept tokens (as ``uniform``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlsparse.kv.plan import KVContext, KVPlan, top_per_head

NAME = "snapkv"
PAPER = "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., NeurIPS 2024)"
DEFAULTS = {"budget": 0.25, "window": 32, "pool": 7, "scope": "image", "bits": 16, "group": 32}
OBSERVES = True


def budget_count(budget: float, candidates: int) -> int:
    """Tokens kept of ``candidates``: ``round(budget * candidates)`` for a share, ``budget`` itself above 1."""
    count = round(budget) if budget > 1 else round(budget * candidates)
    return max(0, min(int(count), candidates))


def plan(ctx: KVContext, budget: float = 0.25, window: int = 32, pool: int = 7, scope: str = "image",
         bits: int = 16, group: int = 32) -> KVPlan:
    prefix = ctx.prefix
    if not prefix:
        return KVPlan(low_bits=bits, key_group=group, value_group=group)
    scores = ctx.received[:, :prefix]
    if pool > 1 and prefix:
        scores = F.max_pool1d(scores[None], pool, stride=1, padding=pool // 2)[0, :, :prefix]
    candidate = torch.ones(prefix, dtype=torch.bool)
    if scope == "image" and ctx.image_mask is not None:
        candidate = ctx.image_mask[:prefix].bool().cpu()
    chosen = top_per_head(scores[:, candidate], budget_count(budget, int(candidate.sum())))
    others = (~candidate).nonzero().flatten()
    keep = torch.cat([others.expand(ctx.heads, -1), candidate.nonzero().flatten()[chosen]], 1).sort(1).values
    return KVPlan(low_bits=bits, keep=keep, key_group=group, value_group=group)
