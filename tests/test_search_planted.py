"""Planted patterns: synthetic q/k whose attention is known are classified as such, with the expected budgets.

With ``k = I`` and ``q = L`` (head dim = N) the attention logits are exactly ``L``,
so any pattern can be planted: planted entries get a large logit, the rest 0.
N = 1024 (16 tiles of 64); the search runs the real catalogue for that length.
"""

from __future__ import annotations

import pytest
import torch

from vlsparse.search.candidates import catalogue
from vlsparse.search.pattern_search import PatternSearch

N = 1024
BIG = 12.0


def _offsets():
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    return i, j, i - j


def _search(logits: list[torch.Tensor], spans=(), samples: int = 1, strides=()):
    q = torch.stack(logits)
    cands = catalogue(N, images=bool(spans), strides=strides)
    search = PatternSearch(cands, num_layers=1, num_heads=q.shape[0])
    for _ in range(samples):
        search.add(0, q, torch.eye(N)[None], 1.0, list(spans))
    chosen, masks = search.choose(0.95, N)
    return chosen[0], masks


@pytest.fixture(scope="module")
def text_heads():
    i, j, d = _offsets()
    a_shape = ((j < 64) | ((d >= 0) & (d < 64))).float() * BIG  # sink tile + 64-token window
    columns = torch.randperm(800, generator=torch.Generator().manual_seed(0))[:20] + 100
    vs = torch.zeros(N, N)
    vs[(d >= 0) & (d < 64)] = BIG
    vs[:, :30] = BIG
    vs[:, columns] = BIG  # 50 vertical lines in all
    vs[(d == 300) | (d == 600)] = BIG + 3  # two strong far diagonals
    block_diagonal = ((i // 256) == (j // 256)).float() * BIG  # 256-token segments
    chosen, _ = _search([a_shape, vs, block_diagonal])
    return chosen


def test_planted_a_shape(text_heads):
    head = text_heads[0]
    assert head.candidate.pattern == "a_shape"
    assert head.candidate.budgets == {"sink": 64 / N, "local": 64 / N}  # 64 sink columns, 64 diagonals
    assert head.recall_min > 0.99


def test_planted_vertical_slash(text_heads):
    head = text_heads[1]
    assert head.candidate.pattern == "vertical_slash"
    # 50 columns -> the smallest vertical step >= 50 (5% = 51 columns); 64 + 2 diagonals fit the smallest
    # slash step (100)
    assert head.candidate.budgets == {"vertical": 0.05, "slash": 100 / N}
    assert head.recall_min > 0.99


def test_planted_block_diagonal(text_heads):
    head = text_heads[2]
    assert head.candidate.pattern == "block_sparse"
    # 4 equally strong tiles per segment: mass 0.7 keeps 3 of them plus the (always kept) diagonal
    assert head.candidate.budgets == {"mass": 0.7}
    assert head.density < 0.45 and head.recall_min > 0.99


def test_planted_grid():
    # frames of 200 tokens (e.g. video frames or equal images): every token attends to a 64-token window and
    # to the same position in every earlier frame: diagonals at multiples of the frame stride
    _, _, d = _offsets()
    grid = torch.zeros(N, N)
    grid[(d >= 0) & (d < 64)] = BIG
    grid[(d > 0) & (d % 200 == 0)] = BIG + 6
    chosen, _ = _search([grid], strides=(200,))
    head = chosen[0]
    assert head.candidate.pattern == "grid"
    assert head.candidate.parameters == {"stride": 200, "phase": 0} and head.candidate.budgets == {"local": 64 / N}
    assert head.recall_min > 0.99


def _static_pattern():
    g = torch.Generator().manual_seed(3)
    nb = N // 64
    _, _, d = _offsets()
    logits = ((d >= 0) & (d < 8)).float() * BIG
    hot = torch.zeros(nb, nb, dtype=torch.bool)
    for qb in range(2, nb):
        earlier = torch.randperm(qb - 1, generator=g) + 1  # tiles 1 .. qb-1
        chosen_tiles = earlier[: -(-(qb + 1) // 5) - 1]
        hot[qb, chosen_tiles] = True
        rows = slice(qb * 64, (qb + 1) * 64)
        for t in chosen_tiles.tolist():
            logits[rows, t * 64 + int(torch.randint(64, (1,), generator=g))] = BIG
        for t in earlier[-(-(qb + 1) // 5) - 1:][:2].tolist():  # distractors
            logits[rows, t * 64:(t + 1) * 64] = 3.0
    return logits, hot


def test_planted_static_block_mask_across_samples():
    # A fixed, irregular tile pattern the online estimators cannot see: query block qb attends to single hot
    # keys in ceil(0.2 (qb + 1)) - 1 earlier tiles (plus a short diagonal band), while other "distractor"
    # tiles hold many moderate logits: high pooled block scores, little softmax mass. SparseD's static mask,
    # chosen from the true mass on the calibration samples, keeps exactly the hot tiles.
    logits, hot = _static_pattern()
    nb = N // 64
    chosen, masks = _search([logits], samples=2)
    head = chosen[0]
    assert head.candidate.pattern == "static"
    assert head.candidate.budgets == {"select": 0.2}
    assert head.recall_min > 0.97  # the distractors' and the band's spill into untouched tiles is all it misses
    mask = masks[(0, 0)]
    assert torch.equal(mask & hot, hot)  # every hot tile kept
    assert int((mask & ~hot).sum()) <= 2 * nb  # beyond them about the diagonal (always kept) only


def test_static_needs_two_samples_for_a_held_out_recall():
    logits, _ = _static_pattern()
    chosen, masks = _search([logits], samples=1)
    assert chosen[0].candidate.pattern != "static" and not masks
