"""ZipVL: keep as many image tokens as it takes to hold a fraction tau of the attention mass.

Paper: He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
Sparsification", arXiv 2410.08584 (2024).

Rule, in our words: instead of a fixed keep ratio, the number of important tokens p
adapts to how concentrated the attention is: sort the tokens' accumulated attention
scores in decreasing order and take the smallest p whose top-p sum reaches tau of the
total; the p tokens kept are the ones with the largest attention score normalised for
the causal mask (each key's accumulated attention divided by the number of queries that
can see it). Defaults tau = 0.975 (the paper's main setting; 0.96 is its cheaper one).

Adaptations here (the paper uses the set for sparse attention and KV eviction at every
layer; this package drops tokens for real once):
- only the image tokens compete: p is the smallest count whose top normalised scores
  hold ``tau`` of the image tokens' total normalised score, and those p are kept;
- one drop after layer ``k - 1`` (default k = 2, FastV's position; our choice);
- the scoring rows default to the instruction after the images (``rows="text"``): the
  paper samples probe queries (recent and random rows) to save a full attention pass; the
  recent rows are the instruction. ``rows="all"`` scores every row, at the price of a
  second full attention pass at that layer. Scores are normalised with ``reduce="visible"``.

ADAPTIVE: ``select`` ignores ``keep_count`` (only ``min_keep`` bounds it below); the
schedule's keep fraction (1.0) is nominal.
"""

from __future__ import annotations

import torch

from vlsparse.tokens._select import top_sorted
from vlsparse.tokens.context import AttentionSpec, Selection, Stage, TokenContext, resolve, rows_attention, stage_after_k

NAME = "zipvl"
WHERE = "in_lm"
NEEDS = ("received",)
OPTIONAL: tuple[str, ...] = ()
PAPER = "ZipVL: Efficient LVLMs with Dynamic Token Sparsification (He et al., 2024)"
DEFAULTS = {"keep": 1.0, "tau": 0.975, "k": 2, "rows": "text", "min_keep": 1}


def schedule(num_layers: int, keep: float | None = None, **params) -> list[Stage]:
    return stage_after_k(NAME, DEFAULTS, num_layers, keep, params)


def needs(stage: int = 0, **params) -> tuple[str, ...]:
    return NEEDS


def attention(stage: int = 0, **params) -> AttentionSpec:
    return rows_attention(NAME, DEFAULTS, params, reduce="visible")


def adaptive_count(scores: torch.Tensor, tau: float) -> int:
    """Smallest p such that the p largest scores sum to at least ``tau`` of all scores."""
    if scores.numel() == 0:
        return 0
    ordered = torch.sort(scores.float().clamp(min=0), descending=True).values
    total = float(ordered.sum())
    if total <= 0:
        return scores.numel()
    cumulative = torch.cumsum(ordered, 0)
    reached = (cumulative >= tau * total - 1e-12 * total).nonzero()
    return int(reached[0]) + 1 if reached.numel() else scores.numel()


def select(ctx: TokenContext, keep_count: int, *, stage: int = 0, **params) -> Selection:
    """Keep the smallest top set of image tokens holding ``tau`` of their normalised attention (ADAPTIVE count)."""
    p = resolve(NAME, DEFAULTS, params)
    tau = float(p["tau"])
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    scores = ctx.image_received(str(p["rows"]))
    count = max(min(int(p["min_keep"]), scores.numel()), adaptive_count(scores, tau))
    return Selection(kept=top_sorted(scores, count), note=f"adaptive: {count} of {scores.numel()} (tau={tau})")
