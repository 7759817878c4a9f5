"""Exact blockwise recall against a dense softmax, at small N."""

from __future__ import annotations

import pytest
import torch

from vlsparse.search.recall import (Layout, causal_probs_blocks, dense_recall_check, kept_row_mass, layout_density,
                                    layout_recall, layout_score, layout_scores, layout_token_mask, num_blocks, row_logsumexp,
                                    tile_stats, window_coverage)


def _qk(n: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, n, dim, generator=g), torch.randn(kv_heads, n, dim, generator=g)


def _layouts(n: int, seed: int) -> list[Layout]:
    """A tile layout with per-block columns, a single window set, and grouped window sets."""
    g = torch.Generator().manual_seed(seed)
    nb = num_blocks(n)
    tiles = (torch.rand(nb, nb, generator=g) < 0.4) | torch.eye(nb, dtype=torch.bool)
    cols = torch.unique(torch.randint(0, n, (9,), generator=g))
    use = torch.rand(nb, cols.numel(), generator=g) < 0.7
    big = n + 128
    windows = torch.tensor([[0, 70, 150, 300]])
    grouped = torch.tensor([[0, 64, big], [0, 200, 264], [0, 64, 200]])
    groups = torch.randint(0, 3, (nb,), generator=g)
    return [Layout(tiles=tiles, columns=cols, column_blocks=use),
            Layout(starts=windows, columns=cols),
            Layout(starts=grouped, groups=groups, columns=cols, column_blocks=use)]


def _columns(layouts, heads, n):
    cols = torch.unique(torch.cat([lay.columns for lay in layouts]))
    return torch.cat([cols, torch.tensor([n])]).expand(heads, -1).contiguous(), cols


def _dense_lse(q, k, scale):
    n = q.shape[1]
    s = torch.einsum("hid,hjd->hij", q, k.repeat_interleave(q.shape[0] // k.shape[0], 0)) * scale
    return torch.logsumexp(s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1)


@pytest.mark.parametrize("n", [1, 63, 64, 300])
def test_row_logsumexp_matches_dense(n):
    q, k = _qk(n)
    assert torch.allclose(row_logsumexp(q, k, 0.7, key_chunk=50), _dense_lse(q, k, 0.7), atol=1e-4)


@pytest.mark.parametrize("n,max_elements", [(300, 4 * 64 * 320), (300, 1 << 23), (200, 1)])
def test_layout_recall_matches_dense_softmax(n, max_elements):
    q, k = _qk(n)
    scale = 0.6
    layouts = _layouts(n, seed=1)
    columns, _ = _columns(layouts, 4, n)
    groups = layouts[2].groups
    stats = tile_stats(q, k, scale, columns, groups=groups, max_elements=max_elements)
    for layout in layouts:
        keep = layout_token_mask(layout, n, torch.arange(n))
        reference = dense_recall_check(q, k, scale, keep[None])
        for h in range(4):
            assert layout_recall(stats, h, layout) == pytest.approx(float(reference[h].mean()), abs=1e-5)
    assert torch.allclose(kept_row_mass(q, k, scale, [layouts[2]] * 4), reference, atol=1e-5)
    assert torch.allclose(stats.tile_mass.sum((1, 2)), torch.full((4,), float(n)), rtol=1e-5)
    assert torch.allclose(stats.window_mass.sum((1, 2)), torch.full((4,), float(n)), rtol=1e-5)


def test_layout_recall_refuses_uncollected_columns():
    q, k = _qk(128)
    stats = tile_stats(q, k, 0.5, torch.tensor([[0, 5]] * 4))
    with pytest.raises(ValueError, match="not collected"):
        layout_recall(stats, 0, Layout(tiles=torch.eye(2, dtype=torch.bool), columns=torch.tensor([7])))


def test_layout_cost_counts_tiles_windows_and_columns():
    # 3 query blocks, diagonal tiles only, columns 10 (tile 0) and 130 (tile 2)
    tiles = Layout(tiles=torch.eye(3, dtype=torch.bool), columns=torch.tensor([10, 130]))
    # column 10 is before r0 for blocks 1 and 2; column 130 is never before its block's r0 in a free tile
    assert layout_density(tiles, 192) == pytest.approx((3 + 2 / 64) / 6)
    # windows at distances 0 and 100: block 0 has the diagonal window, and window 100 reaches only keys
    # 0..27 of it (r0 - 100 + 63 < 0 -> not at all for block 0: 100 > 0 + 63); block 1 (r0 = 64): window 100
    # starts below key 0 -> 64 - 100 + 64 = 28 single columns; block 2 (r0 = 128): a full window
    windows = Layout(starts=torch.tensor([[0, 100]]))
    assert layout_density(windows, 192) == pytest.approx((3 + 1 + 28 / 64) / 6)
    assert window_coverage(torch.tensor([[0, 100]]), 200)[0].nonzero().flatten().tolist() == \
        list(range(64)) + list(range(100, 164))
    dense = Layout(tiles=torch.ones(3, 3, dtype=torch.bool).tril())
    assert layout_density(dense, 192) == 1.0


def test_layout_score_matches_separate_recall_and_density():
    n = 300
    q, k = _qk(n)
    layouts = _layouts(n, seed=2)
    columns, _ = _columns(layouts, 4, n)
    stats = tile_stats(q, k, 0.3, columns, groups=layouts[2].groups)
    for layout in layouts:
        assert layout_score(stats, 1, layout) == pytest.approx((layout_recall(stats, 1, layout),
                                                                layout_density(layout, n)))


def test_row_blocks_never_hold_more_than_the_step():
    """No N x N tensor: each row block's probabilities are at most max(step, one 64-row block) floats."""
    n, heads = 2048, 2
    q, k = _qk(n, heads=heads, kv_heads=1, dim=8)
    limit = heads * 64 * n
    sizes = [p.numel() for _, p in causal_probs_blocks(q, k, 0.5, max_elements=limit)]
    assert max(sizes) <= limit < n * n
    assert len(sizes) == n // 64


@pytest.mark.parametrize("n", [256, 300])
def test_tail_recall_is_the_last_query_blocks_kept_mass(n):
    # n = 300: the last block holds rows 256..299 only (44 rows), so the mean is over those
    q, k = _qk(n, seed=3)
    scale = 0.8
    layouts = _layouts(n, seed=4)
    columns, _ = _columns(layouts, 4, n)
    stats = tile_stats(q, k, scale, columns, groups=layouts[2].groups)
    last = (num_blocks(n) - 1) * 64
    for layout in layouts:
        keep = layout_token_mask(layout, n, torch.arange(n))
        reference = dense_recall_check(q, k, scale, keep[None])
        for h in range(4):
            _, _, tail = layout_scores(stats, h, layout)
            assert tail == pytest.approx(float(reference[h, last:].mean()), abs=1e-5)
            # and it is not the all-rows mean (which the tail guard exists to look past)
            assert abs(tail - float(reference[h].mean())) > 1e-4


def test_dense_tail_keeps_the_last_blocks_rows_whole():
    n = 300
    q, k = _qk(n, seed=5)
    layouts = _layouts(n, seed=6)
    columns, _ = _columns(layouts, 4, n)
    stats = tile_stats(q, k, 0.8, columns, groups=layouts[2].groups)
    for layout in layouts:
        tail = Layout(tiles=layout.tiles, starts=layout.starts, groups=layout.groups, columns=layout.columns,
                      column_blocks=layout.column_blocks, dense_tail=True)
        keep = layout_token_mask(tail, n, torch.arange(n))
        assert bool(keep[256:].equal(torch.ones(44, n, dtype=torch.bool).tril(256)))
        reference = dense_recall_check(q, k, 0.8, keep[None])
        for h in range(4):
            recall, density, tail_recall = layout_scores(stats, h, tail)
            assert recall == pytest.approx(float(reference[h].mean()), abs=1e-5)
            # the tail recall stays the pattern's own, what it keeps of the last block without the dense tail
            assert tail_recall == pytest.approx(layout_scores(stats, h, layout)[2])
            assert density == pytest.approx(layout_density(tail, n))
