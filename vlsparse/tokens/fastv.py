"""FastV: drop the image tokens that receive the least attention, once, after layer K.

Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
Inference Acceleration for Large Vision-Language Models", ECCV 2024 (arXiv 2403.06764).

Rule, in our words: let the first K layers see every token. At layer K (1-based; the
layer just run, index K-1 here) take each image token's attention received, averaged
over heads, and keep the ``keep`` fraction with the largest values; the others are
dropped for all later layers (prefill and the KV cache). The paper describes the average
attention a token receives from the other tokens (``rows="all"``); the authors' reference
code ranks by the last prompt token's row (``rows="last"``), which is the default here: it
costs one row of attention, while ``rows="all"`` is a second full attention pass at that
layer (on the demo model, 0.29x dense prefill and 0.25 accuracy on demo-multi at keep 0.25).
Defaults K = 2, R = 50% dropped (keep 0.5), as in the paper's headline setting.

Runtime contract: one stage ``(K-1, keep)``; ``received[rows]`` from layer K-1's own
attention (RoPE applied, causal softmax over all keys), averaged over the chosen rows.
"""

from __future__ import annotations

from vlsparse.tokens._select import top_sorted
from vlsparse.tokens.context import AttentionSpec, Selection, Stage, TokenContext, resolve, rows_attention, stage_after_k

NAME = "fastv"
WHERE = "in_lm"
NEEDS = ("received",)
OPTIONAL: tuple[str, ...] = ()
PAPER = "An Image is Worth 1/2 Tokens After Layer 2 (Chen et al., ECCV 2024)"
DEFAULTS = {"keep": 0.5, "k": 2, "rows": "last"}


def schedule(num_layers: int, keep: float | None = None, **params) -> list[Stage]:
    return stage_after_k(NAME, DEFAULTS, num_layers, keep, params)


def needs(stage: int = 0, **params) -> tuple[str, ...]:
    return NEEDS


def attention(stage: int = 0, **params) -> AttentionSpec:
    return rows_attention(NAME, DEFAULTS, params, reduce="mean")


def select(ctx: TokenContext, keep_count: int, *, stage: int = 0, **params) -> Selection:
    """The ``keep_count`` image tokens with the largest attention received from ``rows``."""
    p = resolve(NAME, DEFAULTS, params)
    scores = ctx.image_received(str(p["rows"]))
    return Selection(kept=top_sorted(scores, keep_count).to(ctx.image_mask.device))
