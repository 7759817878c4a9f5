"""Candidate layouts: budgets -> windows, columns and tiles; online estimates; catalogue."""

from __future__ import annotations

import pytest
import torch

from vlsparse.models.adapter import ImageSpan
from vlsparse.search.candidates import (block_groups, block_mass_tiles, block_topk_tiles, budget_counts,
                                        build_layout, budget_count, candidate, catalogue, estimate, grid_slashes,
                                        priority_order, resize_tile_mask, scaled_minimum, slash_windows,
                                        vertical_slash_scores)


def test_slash_windows_cover_merged_diagonal_ranges_greedily():
    assert slash_windows([], 1000).tolist() == [0]  # the diagonal is always there
    assert slash_windows([64, 300], 1000).tolist() == [0, 64, 300]  # diagonal 64 needs distances 64..127
    assert slash_windows([5, 300], 1000).tolist() == [0, 64, 300]  # 5 needs 5..68: [0, 64) leaves 64..68
    # diagonals 0 and 10 need distances 0..73: windows at 0 and 64; 75 needs 75..138 -> next start 128
    assert slash_windows([10, 75], 1000).tolist() == [0, 64, 128]
    assert slash_windows(range(128), 1000).tolist() == [0, 64, 128]  # a 128-wide band: 3 windows
    assert slash_windows([2000], 1000).tolist() == [0]  # offsets past N are ignored


def test_counts_follow_the_runtime_rules():
    assert budget_count(0.1, 1000) == 100 and budget_count(0.0, 1000, 1) == 1 and budget_count(2.0, 10) == 10
    assert scaled_minimum(30, 4096) == 15 and scaled_minimum(100, 16384) == 100 and scaled_minimum(30, 10) == 1
    vs = candidate("vertical_slash", {"vertical": 30 / 4096, "slash": 0.2})
    assert budget_counts(vs, 4096) == {"vertical": 30, "slash": 819}
    assert budget_counts(candidate("a_shape", {"sink": 0.0, "local": 0.0}), 4096) == {"sink": 0, "local": 1}
    assert budget_counts(candidate("block_sparse", {"blocks": 0.1}), 4096) == {"blocks": 7}


def test_priority_order_puts_forced_first_then_scores():
    scores = torch.tensor([[0.0, 0.1, 5.0, 0.2, 9.0]])
    assert priority_order(scores, 2).tolist() == [[0, 1, 4, 2, 3]]


def test_vertical_slash_scores_find_planted_column_and_diagonal():
    n, big = 256, 10.0
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    logits = ((j == 77) | (i - j == 40)).float() * big
    vertical, slash = vertical_slash_scores(logits[None], torch.eye(n)[None], 1.0, torch.arange(n - 64, n))
    assert int(vertical[0].argmax()) == 77 and int(slash[0].argmax()) == 40
    assert float(slash[0].sum()) == pytest.approx(64.0, rel=1e-4)


def test_vertical_slash_layout_uses_its_budgets():
    n = 1024
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, n, 8, generator=g), torch.randn(1, n, 8, generator=g)
    est = estimate(q, k, 0.3)
    small = build_layout(candidate("vertical_slash", {"vertical": 30 / n, "slash": 100 / n}), est, 0)
    assert small.columns.numel() == 30 and small.columns[:scaled_minimum(30, n)].tolist() == [0, 1, 2, 3]
    assert small.starts[0, 0] == 0
    wide = build_layout(candidate("vertical_slash", {"vertical": 0.1, "slash": 0.2}), est, 1)
    assert wide.columns.numel() == round(0.1 * n)
    a_shape = build_layout(candidate("a_shape", {"sink": 4 / n, "local": 128 / n}), est, 0)
    assert a_shape.columns.tolist() == [0, 1, 2, 3] and a_shape.starts.tolist() == [[0, 64, 128]]


def test_block_topk_and_mass_keep_the_diagonal():
    scores = torch.where(torch.ones(4, 4, dtype=torch.bool).tril(), torch.tensor(0.0), torch.tensor(float("-inf")))
    scores[3, 1] = 10.0
    top = block_topk_tiles(scores, 0.25)  # ceil(0.25 * 4) = 1 tile at qb = 3 -> tile 1, plus the diagonal
    assert top[3].tolist() == [False, True, False, True] and top[0].tolist() == [True, False, False, False]
    assert block_mass_tiles(scores, 0.5)[3].tolist() == [False, True, False, True]
    assert block_mass_tiles(scores, 1.0)[3].all()
    assert not (top & ~torch.ones(4, 4, dtype=torch.bool).tril()).any()


def test_grid_slashes_are_periodic_plus_local():
    assert grid_slashes(50, 16, 0, 3).tolist() == [0, 1, 2, 16, 32, 48]
    assert grid_slashes(50, 16, -1, 1).tolist() == [0, 15, 31, 47]


def test_block_groups_mark_text_image_and_mixed_blocks():
    span = ImageSpan(0, 64, 320, 16, 16, 64)
    assert block_groups(512, [span]).tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert block_groups(512, [ImageSpan(0, 70, 100, 0, 0, 70)]).tolist()[:3] == [0, 2, 0]


def test_modality_layout_uses_each_modalitys_indices_per_query_block():
    n = 512
    span = ImageSpan(0, 64, 320, 16, 16, 64)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, n, 8, generator=g), torch.randn(2, n, 8, generator=g)
    est = estimate(q, k, 0.3, [span])
    cand = candidate("modality_vertical_slash", {"text_vertical": 30 / n, "text_slash": 100 / n,
                                                 "image_vertical": 0.1, "image_slash": 100 / n})
    layout = build_layout(cand, est, 0)
    per_block = layout.column_blocks.sum(1)
    assert per_block[0] == 30 and per_block[2] == round(0.1 * n)
    assert layout.starts.shape[0] == 3 and torch.equal(layout.groups, est.groups)


def test_resize_tile_mask_uses_nearest_tile_centres():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[3, 1] = True
    big = resize_tile_mask(mask, 8)
    assert big[7, 2] and big[6, 3] and big[7, 7] and not big[7, 0]
    assert not (big & ~torch.ones(8, 8, dtype=torch.bool).tril()).any()


def test_catalogue_orders_patterns_and_skips_image_ones_without_images():
    text = catalogue(4096)
    patterns = [c.pattern for c in text]
    assert "grid" not in patterns and "modality_vertical_slash" not in patterns
    assert patterns[0] == "a_shape" and patterns[-1] == "dense"
    assert len({c.key for c in text}) == len(text)
    vlm = catalogue(4096, images=True, strides=(24, 600))
    assert {"grid", "modality_vertical_slash"} <= {c.pattern for c in vlm}
    assert {c.parameters["stride"] for c in vlm if c.pattern == "grid"} == {24, 600}
    for cand in vlm:
        assert all(0.0 <= v <= 1.0 for v in cand.budgets.values())
