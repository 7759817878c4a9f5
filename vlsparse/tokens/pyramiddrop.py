"""PyramidDrop: several FastV-like drops, each keeping a fixed share of the previous stage.

Paper: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025 (arXiv 2410.17247).

Rule, in our words: split the LM's layers into ``stages`` equal stages (4 by default;
for a 32-layer LLaVA the boundaries are layers 8, 16 and 24). At the end of each stage
but the last, rank the surviving image tokens by the attention they receive from the
last instruction token (the final prompt token) and keep ``keep`` (lambda = 0.5) of
them, so the stages hold 1, lambda, lambda^2, lambda^3 of the image tokens. The score
is computed with the NEXT layer's query/key projections (with RoPE) applied to the
current hidden states, a causal softmax over all keys, averaged over heads, exactly as
the reference code "rank & drop after specific layer" does.

Runtime contract: stages ``(8s - 1, lambda^s)`` for s = 1, 2, 3 on a 32-layer LM (drop
after layer index 7, 15, 23); ``received["last"]`` with ``layer_offset=1``. The counts
are fractions of the ORIGINAL image tokens (floor), like the reference
``int(n * ratio_list[stage])``. ``layers`` (0-based "drop after" indices) overrides the
even split.
"""

from __future__ import annotations

from vlsparse.tokens._select import top_sorted
from vlsparse.tokens.context import AttentionSpec, Selection, Stage, TokenContext, check_layers, resolve

NAME = "pyramiddrop"
WHERE = "in_lm"
NEEDS = ("received",)
OPTIONAL: tuple[str, ...] = ()
PAPER = "PyramidDrop: Pyramid Visual Redundancy Reduction (Xing et al., CVPR 2025)"
DEFAULTS = {"keep": 0.5, "stages": 4, "layers": None}


def schedule(num_layers: int, keep: float | None = None, **params) -> list[Stage]:
    p = resolve(NAME, DEFAULTS, {"keep": keep, **params})
    lam = float(p["keep"])
    if p["layers"] is not None:
        layers = [int(layer) for layer in p["layers"]]
    else:
        stages = int(p["stages"])
        layers = [num_layers * s // stages - 1 for s in range(1, stages)]
    check_layers(NAME, layers, num_layers)
    return [Stage(layer, lam ** (i + 1)) for i, layer in enumerate(layers)]


def needs(stage: int = 0, **params) -> tuple[str, ...]:
    return NEEDS


def attention(stage: int = 0, **params) -> AttentionSpec:
    resolve(NAME, DEFAULTS, params)
    return AttentionSpec(rows=("last",), layer_offset=1, rope=True, keys="all", reduce="mean")


def select(ctx: TokenContext, keep_count: int, *, stage: int = 0, **params) -> Selection:
    """The ``keep_count`` surviving image tokens the last prompt token attends to most."""
    resolve(NAME, DEFAULTS, params)
    return Selection(kept=top_sorted(ctx.image_received("last"), keep_count))
