"""Index lists (vlsparse.kernels.indices) and online estimators (vlsparse.kernels.estimate)."""

from __future__ import annotations

import torch

from vlsparse.kernels import estimate
from vlsparse.kernels.indices import (
    a_shape_index,
    block_mask_index,
    check_index,
    dense_index,
    grid_index,
    grid_slashes,
    index_density,
    index_mask,
    modality_vertical_slash_index,
    resize_block_mask,
    static_index,
    vertical_slash_index,
    with_dense_tail,
)
from vlsparse.patterns.layer import layer_index
from vlsparse.profile import HeadProfile


def lists(index, b=0, h=0):
    """Per query block: (window offsets, columns) as Python lists."""
    out = []
    for i in range(index.shape[2]):
        nb, nc = int(index.block_count[b, h, i]), int(index.column_count[b, h, i])
        out.append((index.block_offset[b, h, i, :nb].tolist(), index.column_index[b, h, i, :nc].tolist()))
    return out


def brute_vertical_slash_mask(n, vertical, slash):
    """[N, N] bool: key in verticals or row - key in slashes (or 0), causal. Built with loops."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for r in range(n):
        for c in range(r + 1):
            mask[r, c] = c in vertical or (r - c) in slash or r == c
    return mask


def test_vertical_slash_index_hand_worked():
    # N=200, blocks of 64: rows 0-63, 64-127, 128-191, 192-199; verticals {0, 5, 150}; slashes {0, 70}
    index = vertical_slash_index(torch.tensor([[[0, 5, 150]]]), torch.tensor([[[0, 70]]]), 200)
    got = lists(index)
    # block 0: diagonal only (slash 70 and vertical 150 are not causal; 0 and 5 are in the diagonal)
    assert got[0] == ([0], [])
    # block 1: slash 70 gives keys -6..57 -> that window starts below key 0 so it is listed as columns 0..57
    assert got[1] == ([64], list(range(58)))
    # block 2: slash 70 gives keys 58..121 (one window at 58); verticals 0, 5 uncovered; 150 in the diagonal
    assert got[2] == ([58, 128], [0, 5])
    # block 3 (8 rows): window of the full-block layout 122..185 covers 150; 0, 5 stay columns
    assert got[3] == ([122, 192], [0, 5])
    check_index(index, 200)


def test_vertical_slash_index_keeps_every_vertical_and_slash_pair():
    gen = torch.Generator().manual_seed(1)
    for n in (100, 130, 333):
        vertical = torch.randint(0, n, (1, 3, 6), generator=gen)
        slash = torch.randint(0, n, (1, 3, 4), generator=gen)
        index = vertical_slash_index(vertical, slash, n)
        check_index(index, n)
        kept = index_mask(index, n)
        for h in range(3):
            want = brute_vertical_slash_mask(n, set(vertical[0, h].tolist()), set(slash[0, h].tolist()))
            assert bool((kept[0, h] | ~want).all()), f"n={n} head {h}: a vertical/slash pair is missing"


def test_vertical_slash_index_merges_adjacent_slashes_into_one_window():
    # slashes 64..70 for rows 192..255 touch keys 122..191 (70 keys): two windows (128 keys), not seven
    index = vertical_slash_index(torch.full((1, 1, 1), 256), torch.arange(64, 71)[None, None], 256)
    assert lists(index)[3] == ([64, 128, 192], [])
    assert lists(index)[2] == ([0, 64, 128], [])
    assert lists(index)[1] == ([0, 64], [])  # the second window would lie wholly before key 0


def test_a_shape_index_hand_worked():
    index = a_shape_index(300, sink=4, local=64)
    got = lists(index)
    assert got[0] == ([0], [])
    assert got[1] == ([0, 64], [])
    assert got[3] == ([128, 192], [0, 1, 2, 3])
    assert got[4] == ([192, 256], [0, 1, 2, 3])
    check_index(index, 300)


def test_dense_tail_makes_only_the_last_query_block_dense():
    n = 300  # 5 query blocks, the last one 44 rows
    index = a_shape_index(n, sink=4, local=64, heads=2)
    tail = with_dense_tail(index, n)
    check_index(tail, n)
    got, before = lists(tail, h=1), lists(index, h=1)
    assert got[:4] == before[:4]
    assert got[4] == ([0, 64, 128, 192, 256], [])
    mask = index_mask(tail, n)[0, 1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(mask[256:], causal[256:]) and torch.equal(mask[:256], index_mask(index, n)[0, 1, :256])
    heads = [HeadProfile("a_shape", {"sink": 4 / n, "local": 64 / n})] * 2
    q = torch.randn(1, 2, n, 8)
    built = layer_index(heads, q, q, dense_tail=True)
    assert torch.equal(index_mask(built, n), index_mask(tail, n))


def test_a_shape_density_one_key_is_the_diagonal_blocks():
    n = 128
    index = a_shape_index(n, sink=0, local=1)
    assert lists(index) == [([0], []), ([64], [])]
    pairs = 2 * (64 * 65 // 2)
    assert abs(float(index_density(index, n)) - pairs / (n * (n + 1) / 2)) < 1e-12


def test_dense_index_density_is_one_and_mask_is_causal():
    index = dense_index(200, heads=2)
    assert torch.allclose(index_density(index, 200), torch.ones(1, 2, dtype=torch.float64))
    assert torch.equal(index_mask(index, 200)[0, 0], torch.ones(200, 200, dtype=torch.bool).tril())
    assert lists(index)[3] == ([0, 64, 128, 192], [])


def test_index_density_counts_the_pairs_of_the_mask():
    gen = torch.Generator().manual_seed(4)
    for n in (100, 130, 333):
        cases = [vertical_slash_index(torch.randint(0, n, (2, 3, 9), generator=gen),
                                      torch.randint(0, n, (2, 3, 5), generator=gen), n),
                 a_shape_index(n, 5, 77, heads=3), dense_index(n, 2)]
        for index in cases:
            want = index_mask(index, n).sum((-1, -2)).double() / (n * (n + 1) / 2)
            assert torch.allclose(index_density(index, n), want)


def test_block_mask_index_drops_future_blocks_and_adds_the_diagonal():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 3] = True  # future: dropped
    mask[0, 0, 3, 0] = True
    mask[0, 0, 2, 0] = mask[0, 0, 2, 1] = True
    got = lists(block_mask_index(mask, 256))
    assert got == [([0], []), ([64], []), ([0, 64, 128], []), ([0, 192], [])]


def test_static_index_resizes_by_nearest_neighbour():
    cal = torch.zeros(4, 4, dtype=torch.bool)
    cal[3, 0] = True  # calibration block row 3 keeps key block 0
    big = resize_block_mask(cal, 8)
    assert big[6, 0] and big[7, 1] and big[7, 0] and not big[5, 0]
    index = static_index(cal, 512)  # 8 blocks: rows 6, 7 come from calibration row 3
    got = lists(index)
    assert got[7] == ([0, 64, 448], [])
    assert got[5] == ([320], [])


def test_grid_slashes_and_index():
    assert grid_slashes(50, stride=10, phase=1, local=3).tolist() == [0, 1, 2, 11, 21, 31, 41]
    index = grid_index(256, stride=128, phase=0, local=1)
    # slashes {0, 128}: block 3 keeps its diagonal and the aligned block two back
    assert lists(index)[3] == ([64, 192], [])


def test_modality_vertical_slash_index_uses_each_modality_sets():
    n = 256
    text = (torch.tensor([[[3]]]), torch.tensor([[[0]]]))
    image = (torch.tensor([[[70]]]), torch.tensor([[[0, 64]]]))
    index = modality_vertical_slash_index(*text, *image, n, spans=[(64, 192)])
    got = lists(index)
    assert got[0] == ([0], [])  # text rows; vertical 3 is inside the diagonal block
    assert got[1] == ([0, 64], [])  # image rows: slash 64 -> the block before; 70 in the diagonal
    assert got[2] == ([64, 128], [])  # image rows: 70 is inside window 64..127; text vertical 3 not used
    assert got[3] == ([192], [3])  # text rows: vertical 3, no slash 64
    mixed = lists(modality_vertical_slash_index(*text, *image, n, spans=[(64, 150)]))
    assert mixed[2] == ([64, 128], [3])  # rows 128..191 hold image and text rows: union of both sets


def test_layer_index_builds_every_pattern_per_head():
    torch.manual_seed(0)
    n, h, hkv, d = 300, 8, 2, 32
    q, k = torch.randn(1, h, n, d), torch.randn(1, hkv, n, d)
    heads = [
        HeadProfile("dense"),
        HeadProfile("a_shape", budget={"sink": 0.01, "local": 0.2}),
        HeadProfile("vertical_slash", budget={"vertical": 0.05, "slash": 0.05}),
        HeadProfile("block_sparse", budget={"blocks": 0.3}),
        HeadProfile("block_sparse", budget={"mass": 0.5}),
        HeadProfile("grid", budget={"local": 0.1}, params={"stride": 96, "phase": 1}),
        HeadProfile("modality_vertical_slash", budget={"text_vertical": 0.02, "text_slash": 0.02,
                                                       "image_vertical": 0.05, "image_slash": 0.1}),
        HeadProfile("static", budget={"select": 0.3}, mask="m"),
    ]
    static_mask = torch.eye(3, dtype=torch.bool)
    static_mask[2, 0] = True
    index = layer_index(heads, q, k, spans=[(40, 200)], masks={"m": static_mask})
    assert index.shape == (1, h, 5)
    check_index(index, n)
    assert lists(index, h=0) == lists(dense_index(n))
    assert lists(index, h=1) == lists(a_shape_index(n, 3, 60))
    assert lists(index, h=5) == lists(grid_index(n, 96, 1, 30))
    # 3x3 calibration mask -> 5 blocks, nearest: target row 4 <- row 2 = {0, 2}; columns {0,1} <- 0, {3,4} <- 2
    assert lists(index, h=7)[4] == ([0, 64, 192, 256], [])
    density = index_density(index, n)[0]
    assert density[0] == 1.0 and density[1] < 0.7 and bool((density > 0.0).all())


def test_estimate_vertical_slash_finds_planted_column_and_diagonal_per_kv_head():
    torch.manual_seed(0)
    n, d = 512, 32
    q = torch.randn(1, 4, n, d) * 0.1
    k = torch.randn(1, 2, n, d) * 0.1
    direction = torch.zeros(d)
    direction[0] = 1.0
    q[:, :, :, 0] = 3.0  # every query looks along `direction`
    k[0, 0, 300] = 8.0 * direction  # KV head 0: a heavy key column at 300
    for j in range(n - 200):  # KV head 1: key j matches query j + 200 (a slash at offset 200)
        k[0, 1, j] = 4.0 * q[0, 2, j + 200] / q[0, 2, j + 200].norm() * 2
    q[0, 3] = q[0, 2]
    vertical, slash = estimate.estimate_vertical_slash(q, k, n_vertical=40, n_slash=120)
    assert vertical.shape == (1, 4, 40) and slash.shape == (1, 4, 120)
    for head in (0, 1):
        assert 300 in vertical[0, head].tolist()
        assert vertical[0, head, :2].tolist() == [0, 1]  # forced sink columns: 30 scaled to 512 tokens = 2
    for head in (2, 3):
        assert 200 in slash[0, head].tolist()
        assert 300 not in vertical[0, head].tolist()
    assert set(range(7)) <= set(slash[0, 0].tolist())  # forced nearest diagonals: 100 scaled = 7
    only = estimate.estimate_vertical_slash(q, k, [10, 20], [30, 5], heads=[2, 0])
    assert only[0].shape == (1, 2, 20) and int((only[0][0, 0] < n).sum()) == 10
    assert 200 in only[1][0, 0].tolist() and 300 in only[0][0, 1].tolist()


def test_estimate_block_sparse_topk_and_mass():
    torch.manual_seed(0)
    n, d = 512, 16
    q = torch.randn(1, 2, n, d) * 0.01
    k = torch.randn(1, 1, n, d) * 0.01
    q[..., 0] = 1.0
    k[0, 0, 128:192, 0] = 40.0  # key block 2: pooled score 10 against ~0, softmax mass > 0.999
    top1 = estimate.estimate_block_sparse(q, k, blocks=0.01)
    assert top1.shape == (1, 2, 8, 8)
    for i in range(3, 8):
        assert top1[0, 0, i].nonzero().flatten().tolist() == [2, i]
    assert not bool(top1[0, 0].triu(1).any())  # causal
    mass = estimate.estimate_block_sparse(q, k, mass=0.9)
    assert mass[0, 1, 7].nonzero().flatten().tolist() == [2, 7]
    everything = estimate.estimate_block_sparse(q, k, mass=1.0)
    assert torch.equal(everything[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())
