"""``modality_vertical_slash`` (MMInference, Q-boundary): as ``vertical_slash`` with separate
indices and budgets for text and image query rows, each estimated from the last 64 rows *of that
modality*; a query block holding both kinds of rows keeps the union. Without image rows every
block uses the text budgets on the text estimate. Online estimate cost: ``2 * 2 * 64 * N * d``.

Search space: ``modality_vertical`` x ``modality_slash`` per modality, only for inputs with images.
"""

from __future__ import annotations

import torch

from vlsparse.kernels import estimate
from vlsparse.kernels.indices import budget_count, modality_rows, modality_vertical_slash_index, slash_windows
from vlsparse.patterns.common import (cached, candidate, head_counts, slash_offsets, stack_starts,
                                      vertical_slash_pairs, vertical_slash_set)
from vlsparse.patterns.layout import Layout

NAME = "modality_vertical_slash"
BUDGETS = ("text_vertical", "text_slash", "image_vertical", "image_slash")  # HeadProfile fields
PARAMS, REQUIRED_PARAMS = (), ()
USES_MASK, OFFLINE, COLOR = False, False, "#ff7f0e"
BUDGET_MINIMUMS = {"text_vertical": 0, "text_slash": 1, "image_vertical": 0, "image_slash": 1}
TILE_BUDGETS: tuple[str, ...] = ()


def candidates(n0, images, strides, space):
    if not images:
        return []
    pairs = vertical_slash_pairs(n0, space.modality_vertical, space.modality_slash)
    return [candidate(NAME, {"text_vertical": tv, "text_slash": ts, "image_vertical": iv, "image_slash": is_})
            for tv, ts in pairs for iv, is_ in pairs]


def layout(cand, est, head, mask=None) -> Layout:
    b, n = cand.budgets, est.n
    if not est.images:  # text only: every block uses the text budgets on the text estimate
        cols, starts = vertical_slash_set(est, "all", head, b["text_vertical"], b["text_slash"])
        return Layout(starts=starts[None], columns=cols)
    t_cols, t_starts = vertical_slash_set(est, "text", head, b["text_vertical"], b["text_slash"])
    i_cols, i_starts = vertical_slash_set(est, "image", head, b["image_vertical"], b["image_slash"])
    ts, is_ = budget_count(b["text_slash"], n, 1), budget_count(b["image_slash"], n, 1)
    union = cached(est, ("union", head, ts, is_), lambda: slash_windows(
        torch.cat([slash_offsets(est, "text", head, ts), slash_offsets(est, "image", head, is_)]), n, est.block))
    starts = stack_starts([t_starts, i_starts, union], n + 2 * est.block)
    cols = torch.unique(torch.cat([t_cols, i_cols]))
    text_blocks, image_blocks = (est.groups != 1)[:, None], (est.groups != 0)[:, None]
    use = (torch.isin(cols, t_cols)[None, :] & text_blocks) | (torch.isin(cols, i_cols)[None, :] & image_blocks)
    return Layout(starts=starts, groups=est.groups, columns=cols, column_blocks=use)


def needed_columns(cand, est) -> dict[str, int]:
    b, n = cand.budgets, est.n
    if not est.images:
        return {"all": budget_count(b["text_vertical"], n)}
    return {"text": budget_count(b["text_vertical"], n), "image": budget_count(b["image_vertical"], n)}


def runtime_index(profiles, ids, inputs):
    q, k, n, last_q = inputs.q, inputs.k, inputs.n, inputs.last_q
    image = modality_rows(inputs.spans, n)
    sets = []
    for rows, kv, ks in ((torch.nonzero(~image).flatten()[-last_q:], "text_vertical", "text_slash"),
                         (torch.nonzero(image).flatten()[-last_q:], "image_vertical", "image_slash")):
        if len(rows) == 0:
            sets.append((torch.full((q.shape[0], len(ids), 1), n), torch.full((q.shape[0], len(ids), 1), n)))
            continue
        sets.append(estimate.estimate_vertical_slash(q, k, head_counts(profiles, kv, n),
                                                     head_counts(profiles, ks, n, 1), heads=ids,
                                                     scale=inputs.scale, rows=rows))
    (tv, ts), (iv, is_) = sets
    return [(ids, modality_vertical_slash_index(tv, ts, iv, is_, n, inputs.spans, inputs.block_size))]


def estimate_flops(n: int, d: int, last_q: int, block: int) -> float:
    return 2.0 * 2 * last_q * n * d


synthetic_index = None
synthetic_bytes = None
density_guess = None
