"""VisionZip: keep the tokens the vision tower's [CLS] attends to most, merge the rest into a few.

Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025 (arXiv 2412.04467).

Rule, in our words, per image, before the LM:

1. Dominant tokens: the ``dominant`` image tokens that receive the most attention from
   the vision tower's [CLS] token at the feature layer (``ctx.vision_attention``).
2. Contextual tokens: the remaining tokens, in order, are split into ``contextual``
   targets (every ``step``-th remaining token, step = remaining // contextual) and the
   rest; each of the rest joins the target it is most cosine-similar to, and each group
   (target + members) is replaced by the mean of its embeddings.

The paper's LLaVA-1.5 settings are 54 + 10 (64 tokens), 108 + 20 (128) and 162 + 30
(192): the contextual share of the budget is 10/64. Defaults: keep = 64/576 and
contextual_share = 10/64.

Differences from the reference code, to fit this runtime: the similarity uses
``ctx.vision_keys`` when given (the reference uses the feature layer's keys), else the
embeddings themselves; the merge averages the embeddings after the projector (the
reference averages vision features and projects after; the projector is not linear);
the [CLS] token is not part of the LM input here, so all the dominant budget goes to
patch tokens.

Output: ``kept`` = dominant tokens; ``merged`` = [m, D] group means placed at
``merged_slots`` = the target tokens' positions (each mean takes its target's rotary
position). ``count`` = ``keep_count``. Several images share the budget in proportion
to their token counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlsparse.tokens._select import image_groups, split_budget, top_sorted
from vlsparse.errors import InputError
from vlsparse.tokens.context import Selection, Stage, TokenContext, no_attention, resolve, stage_before_lm

NAME = "visionzip"
WHERE = "before_lm"
NEEDS = ("vision_attention", "hidden")
OPTIONAL = ("vision_keys",)
PAPER = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (Yang et al., CVPR 2025)"
DEFAULTS = {"keep": 64 / 576, "contextual_share": 10 / 64}


def schedule(num_layers: int, keep: float | None = None, **params) -> list[Stage]:
    return stage_before_lm(NAME, DEFAULTS, keep, params)


def needs(stage: int = 0, **params) -> tuple[str, ...]:
    return NEEDS


attention = no_attention


def split(budget: int, share: float) -> tuple[int, int]:
    """(dominant, contextual) for a budget; at least one contextual token once the budget allows two."""
    contextual = int(round(budget * share))
    if share > 0 and budget >= 2:
        contextual = max(1, contextual)
    contextual = min(contextual, budget)
    return budget - contextual, contextual


def merge_groups(embeddings: torch.Tensor, metric: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merge of n tokens into ``contextual`` means: (target indices [c], means [c, D])."""
    n = embeddings.shape[0]
    step = max(1, n // contextual)
    targets = torch.arange(0, n, step)[:contextual]
    is_target = torch.zeros(n, dtype=torch.bool)
    is_target[targets] = True
    others = (~is_target).nonzero().flatten()
    unit = F.normalize(metric.float(), dim=-1, eps=1e-12)
    sums = embeddings[targets].float().clone()
    counts = torch.ones(targets.numel(), dtype=torch.float32)
    if others.numel():
        owner = (unit[others] @ unit[targets].T).argmax(dim=1)
        sums.index_add_(0, owner, embeddings[others].float())
        counts.index_add_(0, owner, torch.ones(others.numel()))
    return targets, sums / counts[:, None]


def select(ctx: TokenContext, keep_count: int, *, stage: int = 0, **params) -> Selection:
    """Dominant tokens by vision [CLS] attention plus contextual means of the rest (``count`` = keep_count)."""
    p = resolve(NAME, DEFAULTS, params)
    if ctx.vision_attention is None:
        raise InputError("VisionZip needs the vision tower's [CLS] attention",
                         "run the vision tower with attentions, or choose divprune")
    embeddings = ctx.image_hidden().cpu()
    metric = (ctx.vision_keys if ctx.vision_keys is not None else embeddings).float().cpu()
    attention_in = ctx.vision_attention.float().flatten().cpu()
    groups = image_groups(ctx.image_index, ctx.n_image)
    budgets = split_budget([g.numel() for g in groups], keep_count)
    kept, slots, means = [], [], []
    for members, budget in zip(groups, budgets):
        dominant, contextual = split(budget, float(p["contextual_share"]))
        top = members[top_sorted(attention_in[members], dominant)]
        kept.append(top)
        rest = members[~torch.isin(members, top)]
        if contextual and rest.numel():
            contextual = min(contextual, rest.numel())
            targets, group_means = merge_groups(embeddings[rest], metric[rest], contextual)
            slots.append(rest[targets])
            means.append(group_means)
    kept_all = torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long)
    if not slots:
        return Selection(kept=kept_all)
    slot_all = torch.cat(slots)
    order = torch.argsort(slot_all)
    return Selection(kept=kept_all, merged=torch.cat(means)[order], merged_slots=slot_all[order])
