"""The search scores what the runtime computes: same kept query-key pairs and same cost for every candidate.

Builds each candidate's layout in ``vlsparse.search.candidates`` and the runtime's
index lists (``vlsparse.patterns.layer.layer_index``) for the same ``HeadProfile``
on the same q/k, and compares the dense masks they imply and their block-layout cost.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vlsparse.models.adapter import ImageSpan
from vlsparse.patterns.layer import layer_index
from vlsparse.profile import HeadProfile
from vlsparse.search.candidates import build_layout, catalogue, estimate, resize_tile_mask, static_tiles
from vlsparse.search.recall import Layout, layout_density, layout_token_mask

indices = pytest.importorskip("vlsparse.kernels.indices")

N, HEADS, KV_HEADS, DIM, SCALE = 521, 4, 2, 16, 0.25  # ragged: 9 query blocks, the last one row
SPANS = [ImageSpan(0, 70, 70 + 8 * 16, 8, 16, 70), ImageSpan(1, 300, 300 + 8 * 16, 8, 16, 300)]


@pytest.fixture(scope="module")
def qk():
    g = torch.Generator().manual_seed(0)
    return torch.randn(HEADS, N, DIM, generator=g) * 2, torch.randn(KV_HEADS, N, DIM, generator=g) * 2


def _runtime(cands, q, k, masks=None, dense_tail=False):
    nb = -(-N // 64)
    for cand in cands:
        head = HeadProfile(pattern=cand.pattern, budget=cand.budgets, params=cand.parameters,
                           mask="m" if cand.pattern == "static" else None)
        index = layer_index([head] * HEADS, q[None], k[None], scale=SCALE,
                                    spans=[(s.start, s.end) for s in SPANS], masks=masks, dense_tail=dense_tail)
        cost = (index.block_count[0].sum(-1).double() + index.column_count[0].sum(-1).double() / 64)
        yield cand, indices.index_mask(index, N)[0], cost / (nb * (nb + 1) / 2)


@pytest.mark.parametrize("dense_tail", [False, True])
def test_every_online_candidate_keeps_the_runtimes_pairs_at_its_cost(qk, dense_tail):
    q, k = qk
    est = estimate(q, k, SCALE, SPANS)
    everything = [c for c in catalogue(N, images=True, strides=(16, 230)) if c.pattern != "static"]
    assert {c.pattern for c in everything} == {"a_shape", "grid", "block_sparse", "vertical_slash",
                                               "modality_vertical_slash", "dense"}
    cands = everything[::3] + [c for c in everything if c.pattern == "block_sparse"][1::3]  # ~30 of ~75
    rows = torch.arange(N)
    for cand, masks, costs in _runtime(cands, q, k, dense_tail=dense_tail):
        for h in range(HEADS):
            layout = replace(build_layout(cand, est, h), dense_tail=dense_tail)
            assert torch.equal(layout_token_mask(layout, N, rows), masks[h]), f"{cand.key} head {h}"
            assert layout_density(layout, N) == pytest.approx(float(costs[h]), abs=1e-12), f"{cand.key} head {h}"


def test_static_mask_is_applied_like_the_runtime(qk):
    q, k = qk
    for size in (13, 9, 20):  # the calibration length's grid, shorter and longer
        mask = static_tiles(torch.rand(size, size, generator=torch.Generator().manual_seed(size)), 0.3)
        cand = [c for c in catalogue(N) if c.pattern == "static"][0]
        _, masks, costs = next(_runtime([cand], q, k, masks={"m": mask}))
        layout = Layout(tiles=resize_tile_mask(mask, 9))
        assert torch.equal(layout_token_mask(layout, N, torch.arange(N)), masks[0])
        assert layout_density(layout, N) == pytest.approx(float(costs[0]))
