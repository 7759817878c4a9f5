"""ToDRE: a diverse subset before the LM, then every image token dropped once the LM stops using them.

Paper: Li, Yang, Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for
Efficient Large Vision-Language Models", arXiv 2505.18757 (v1, May 2025); v2 (Nov 2025)
is titled "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance".

One module, two stages (``stage`` argument of ``select``/``attention``/``needs``):

Stage 0, before the LM (diversity). Start from a pivot image token (the one the vision
tower's [CLS] attends to most; without ``vision_attention`` the token nearest the mean
embedding, which the paper's ablation finds about as good) and grow the kept set
greedily. ``objective="k_center"`` (v1, default): add the token farthest from its
nearest kept token (greedy k-center on cosine distance). ``objective="max_sum"`` (v2):
add the token with the smallest summed cosine similarity to the kept set. Default keep
0.1 (the paper keeps 10% (288 of 2880) or 25%).

Stage 1, inside the LM (task relevance, "information migration"). At the layer at
fractional depth ``relevance_depth`` = 7/8 (layer index 7L/8), measure two cross-modal
shares of the head-averaged attention of that layer: text->image = the share of the
instruction tokens' attention that lands on image tokens, image->text = the share of
the image tokens' attention that lands on instruction tokens. If both are below
``tau`` = 0.10 every remaining image token is dropped after that layer; otherwise none.
(With the usual [system | image | instruction] layout the causal mask already keeps image
rows from seeing the instruction, so image->text is 0 and text->image decides. A prompt
with no instruction after its image keeps everything.)

ADAPTIVE: stage 1 returns either no image token or all of them; its ``keep_count`` (and
the schedule's 0.0) are nominal. Runtime contract for stage 1: ``received["text"]`` and
``received["image"]`` from that layer's own attention (RoPE, causal softmax over all
keys), ``reduce="mean"``; "text" = non-image tokens after the first image token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlsparse.tokens._select import greedy_diverse
from vlsparse.tokens.attention import query_rows
from vlsparse.tokens.context import AttentionSpec, Selection, Stage, TokenContext, check_layers, resolve

NAME = "todre"
WHERE = "before_lm"
NEEDS = ("hidden",)
OPTIONAL = ("vision_attention",)
PAPER = "ToDRE: Visual Token Pruning via Diversity and Task Awareness (Li et al., 2025)"
DEFAULTS = {"keep": 0.1, "objective": "k_center", "relevance_depth": 7 / 8, "tau": 0.10, "layers": None}


def schedule(num_layers: int, keep: float | None = None, **params) -> list[Stage]:
    p = resolve(NAME, DEFAULTS, {"keep": keep, **params})
    if p["layers"] is not None:
        relevance_layer = int(p["layers"][0])
    else:
        relevance_layer = int(num_layers * float(p["relevance_depth"]))
    check_layers(NAME, [-1, relevance_layer], num_layers, before_lm=True)
    return [Stage(-1, float(p["keep"])), Stage(relevance_layer, 0.0)]


def needs(stage: int = 0, **params) -> tuple[str, ...]:
    return ("hidden",) if stage == 0 else ("received",)


def attention(stage: int = 0, **params) -> AttentionSpec | None:
    resolve(NAME, DEFAULTS, params)
    if stage == 0:
        return None
    return AttentionSpec(rows=("text", "image"), layer_offset=0, rope=True, keys="all", reduce="mean")


def pivot(features: torch.Tensor, vision_attention: torch.Tensor | None) -> int:
    """The [CLS]-favoured token, else the token nearest the mean embedding."""
    if vision_attention is not None:
        return int(torch.argmax(vision_attention.float().flatten()))
    unit = F.normalize(features.float(), dim=-1, eps=1e-12)
    centre = F.normalize(unit.mean(0), dim=0, eps=1e-12)
    return int(torch.argmax(unit @ centre))


def cross_modal_shares(ctx: TokenContext) -> tuple[float, float]:
    """(text->image, image->text): shares of the instruction's / image tokens' attention crossing modality."""
    for rows in ("text", "image"):
        ctx.image_received(rows)  # raises a clear error when missing
    image_mask = ctx.image_mask
    text_keys = torch.zeros_like(image_mask)
    text_keys[query_rows("text", image_mask.cpu()).to(image_mask.device)] = True
    text_to_image = float(ctx.received["text"][image_mask].sum())
    image_to_text = float(ctx.received["image"][text_keys].sum())
    return text_to_image, image_to_text


def select(ctx: TokenContext, keep_count: int, *, stage: int = 0, **params) -> Selection:
    """Stage 0: ``keep_count`` diverse tokens. Stage 1 (ADAPTIVE): all image tokens or none."""
    p = resolve(NAME, DEFAULTS, params)
    if stage == 0:
        features = ctx.image_hidden()
        first = pivot(features, ctx.vision_attention) if keep_count > 0 else None
        picks = greedy_diverse(features, keep_count, first=first, objective=str(p["objective"]))
        return Selection(kept=torch.sort(picks).values)
    text_to_image, image_to_text = cross_modal_shares(ctx)
    tau = float(p["tau"])
    has_text = query_rows("text", ctx.image_mask.cpu()).numel() > 0
    drop = has_text and text_to_image < tau and image_to_text < tau
    kept = torch.zeros(0, dtype=torch.long) if drop else torch.arange(ctx.n_image)
    return Selection(kept=kept, note=f"text->image {text_to_image:.3f}, image->text {image_to_text:.3f}, "
                                     f"tau {tau}: {'drop all' if drop else 'keep all'}")
