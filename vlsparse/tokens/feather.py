"""FEATHER: RoPE-free last-token attention plus uniform spatial sampling, in two stages.

Paper: Endo, Wang, Yeung-Levy, "Feather the Throttle: Revisiting Visual Token Pruning
for Vision-Language Model Acceleration", ICCV 2025 (arXiv 2412.13180); recipe as in the
authors' evaluation script (``--fastv_k "[8, 16]" --fastv_ratio 0.7 no_rope_s=3``).

Why: FastV's criterion, computed in early layers with RoPE, favours the image tokens
nearest the text (the bottom rows of a raster-ordered image), so whole regions vanish
and localisation fails. FEATHER (Fast and Effective Acceleration wiTH Ensemble
cRiteria) fixes this three ways:

1. the score is the last prompt token's attention to the image tokens computed
   WITHOUT rotary embeddings, softmax over the image keys only, averaged over heads;
2. at the first drop (before layer 8 of 32, i.e. after layer index 7) it keeps the
   union of the top ``keep`` (= 1 - R = 0.3) of the image tokens by that score and a
   uniform grid of every ``stride``-th (3rd) row and column of each image, so every
   part of the image keeps some tokens;
3. at the second drop (before layer 16, after index 15) it keeps the top
   ``keep**2`` (0.09) of the tokens that survived the first drop, by score alone.

Runtime contract: stages at ``(L/4 - 1, keep)`` and ``(L/2 - 1, keep**2 * (keep +
1/stride**2))``; ``received["last"]`` with ``layer_offset=1``, ``rope=False``,
``keys="image"``. Counts are decided here, not by ``keep_count``: stage 0 returns the
union (at least ``keep_count``, usually more); stage 1 keeps ``floor(keep**2 x the
current image-token count)`` as the reference code does, so the stage-1 fraction in the
schedule is only a nominal estimate (it assumes no overlap between the two criteria).
``ctx.grid`` gives each image's layout (a square is assumed when it is missing; without
a 2-D layout every ``stride**2``-th token is sampled).
"""

from __future__ import annotations

import torch

from vlsparse.tokens._select import image_groups, strided_grid, top_sorted
from vlsparse.tokens.context import (AttentionSpec, Selection, Stage, TokenContext, check_layers, count_for,
                                     resolve)

NAME = "feather"
WHERE = "in_lm"
NEEDS = ("received",)
OPTIONAL = ("grid",)
PAPER = "Feather the Throttle: Revisiting Visual Token Pruning for VLM Acceleration (Endo et al., ICCV 2025)"
DEFAULTS = {"keep": 0.3, "stride": 3, "layers": None}


def _layers(num_layers: int, p: dict) -> list[int]:
    if p["layers"] is not None:
        return [int(layer) for layer in p["layers"]]
    return [num_layers // 4 - 1, num_layers // 2 - 1]


def schedule(num_layers: int, keep: float | None = None, **params) -> list[Stage]:
    p = resolve(NAME, DEFAULTS, {"keep": keep, **params})
    layers = _layers(num_layers, p)
    if len(layers) != 2:
        raise ValueError("FEATHER has exactly two stages")
    check_layers(NAME, layers, num_layers)
    keep = float(p["keep"])
    second = min(keep, keep * keep * (keep + 1.0 / int(p["stride"]) ** 2))
    return [Stage(layers[0], keep), Stage(layers[1], second)]


def needs(stage: int = 0, **params) -> tuple[str, ...]:
    return NEEDS


def attention(stage: int = 0, **params) -> AttentionSpec:
    resolve(NAME, DEFAULTS, params)
    return AttentionSpec(rows=("last",), layer_offset=1, rope=False, keys="image", reduce="mean")


def uniform_tokens(ctx: TokenContext, stride: int) -> torch.Tensor:
    """Indices (into the image tokens) of the strided grid of every image, sorted."""
    groups = image_groups(ctx.image_index, ctx.n_image)
    picks = []
    for i, members in enumerate(groups):
        grid = ctx.grid[i] if ctx.grid is not None and i < len(ctx.grid) else None
        picks.append(members[strided_grid(members.numel(), grid, stride)])
    return torch.sort(torch.cat(picks)).values if picks else torch.zeros(0, dtype=torch.long)


def select(ctx: TokenContext, keep_count: int, *, stage: int = 0, **params) -> Selection:
    """Stage 0: top ``keep_count`` by score UNION the uniform grid. Stage 1: top keep**2 of the survivors."""
    p = resolve(NAME, DEFAULTS, params)
    scores = ctx.image_received("last")
    if stage == 0:
        attended = top_sorted(scores, keep_count).cpu()
        kept = torch.unique(torch.cat([attended, uniform_tokens(ctx, int(p["stride"]))]))
        return Selection(kept=kept, note=f"{attended.numel()} by attention + uniform grid")
    count = count_for(float(p["keep"]) ** 2, ctx.n_image)
    return Selection(kept=top_sorted(scores, count))
