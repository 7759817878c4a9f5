"""DivPrune: keep a maximally diverse subset of the image tokens (greedy max-min on cosine distance).

Paper: Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for
Large Multimodal Models", CVPR 2025 (arXiv 2503.02175).

Rule, in our words: treat token selection as a Max-Min Diversity Problem over the image
tokens' embeddings (after the projector, before the LM) with cosine distance
1 - cos(x_i, x_j). Solve it greedily: start from the token whose nearest neighbour is
farthest away, then repeatedly add the token whose distance to its nearest already-kept
token is largest, until the budget is reached. Near-duplicates are never both kept and
every cluster of similar tokens is represented early. Default keep = 0.098 (the
reference scripts' SUBSET_RATIO; about 56 of LLaVA-1.5's 576 tokens). All images of a
prompt are pooled into one selection (our choice).
"""

from __future__ import annotations

import torch

from vlsparse.tokens._select import greedy_diverse
from vlsparse.tokens.context import Selection, Stage, TokenContext, no_attention, resolve, stage_before_lm

NAME = "divprune"
WHERE = "before_lm"
NEEDS = ("hidden",)
OPTIONAL: tuple[str, ...] = ()
PAPER = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (Alvar et al., CVPR 2025)"
DEFAULTS = {"keep": 0.098}


def schedule(num_layers: int, keep: float | None = None, **params) -> list[Stage]:
    return stage_before_lm(NAME, DEFAULTS, keep, params)


def needs(stage: int = 0, **params) -> tuple[str, ...]:
    return NEEDS


attention = no_attention


def select(ctx: TokenContext, keep_count: int, *, stage: int = 0, **params) -> Selection:
    """Greedy max-min diverse ``keep_count`` image tokens (cosine distance on ``ctx.hidden``)."""
    resolve(NAME, DEFAULTS, params)
    picks = greedy_diverse(ctx.image_hidden(), keep_count, objective="k_center")
    return Selection(kept=torch.sort(picks).values)
