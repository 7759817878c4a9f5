"""Choosing a head's candidate: cheapest passing, MMInference tie-break, dense fallback; static masks."""

from __future__ import annotations

import pytest
import torch

from vlsparse.search.candidates import candidate
from vlsparse.search.choose import Scored, choose, head_profile
from vlsparse.search.evaluate import evaluate_static

A = candidate("a_shape", {"sink": 0.01, "local": 0.1})
VS = candidate("vertical_slash", {"vertical": 0.02, "slash": 0.1})
BS = candidate("block_sparse", {"mass": 0.9})
DENSE = candidate("dense")


def test_choose_takes_cheapest_that_passes_on_every_sample():
    scored = [Scored(A, 0.90, 0.99, 0.1), Scored(VS, 0.96, 0.97, 0.3), Scored(BS, 0.97, 0.98, 0.2),
              Scored(DENSE, 1.0, 1.0, 1.0)]
    assert choose(scored, 0.95).candidate == BS  # A is cheaper but fails on one sample


def test_choose_tie_break_keeps_earlier_unless_gain_over_one_percent():
    base = [Scored(A, 0.955, 0.96, 0.200), Scored(VS, 0.960, 0.97, 0.205), Scored(DENSE, 1.0, 1.0, 1.0)]
    assert choose(base, 0.95).candidate == A  # +0.5% recall: keep the earlier one
    better = [Scored(A, 0.955, 0.96, 0.200), Scored(VS, 0.970, 0.97, 0.205), Scored(DENSE, 1.0, 1.0, 1.0)]
    assert choose(better, 0.95).candidate == VS  # +1.5% at (almost) the same cost
    far = [Scored(A, 0.955, 0.96, 0.200), Scored(VS, 0.990, 0.99, 0.300), Scored(DENSE, 1.0, 1.0, 1.0)]
    assert choose(far, 0.95).candidate == A  # outside the cost tie window


def test_choose_falls_back_to_dense():
    scored = [Scored(A, 0.5, 0.6, 0.1), Scored(DENSE, 1.0, 1.0, 1.0)]
    assert choose(scored, 0.95).candidate == DENSE
    assert choose(scored, 1.0).candidate == DENSE


def test_head_profile_records_relative_and_absolute_budgets():
    grid = candidate("grid", {"local": 128 / 4096}, {"stride": 24, "phase": -1})
    head = head_profile(Scored(grid, 0.96123456789, 0.97, 0.25), n_cal=4096)
    assert head.pattern == "grid" and head.params == {"stride": 24, "phase": -1}
    assert head.budget == {"local": 128 / 4096} and head.budget_abs == {"local": 128}
    assert head.recall_min == 0.961235
    vs = head_profile(Scored(VS, 0.96, 0.97, 0.3), n_cal=4096)
    assert vs.budget_abs == {"vertical": 82, "slash": 410} and vs.mask is None
    static = head_profile(Scored(candidate("static", {"select": 0.1}), 0.96, 0.97, 0.3), n_cal=4096, mask="m")
    assert static.mask == "m" and static.budget_abs == {"select": 7}


def test_static_mask_is_scored_leave_one_out():
    nb, n = 4, 256  # 64 rows per query block: each row of a tile-mass matrix sums to 64
    one = torch.zeros(nb, nb)
    one[0, 0], one[1, 1], one[2, 1], one[3, 1] = 64.0, 64.0, 64.0, 64.0  # blocks 2, 3 look back at tile 1
    other = torch.eye(nb) * 64.0  # all mass on the diagonal
    mask, recalls, densities, tails = evaluate_static([one, one.clone()], [n, n], select=0.25, nb=nb)
    assert mask[2, 1] and mask[3, 1] and recalls == [pytest.approx(1.0), pytest.approx(1.0)]
    assert densities[0] == pytest.approx(float(mask.sum()) / 10)
    assert tails == [pytest.approx(1.0), pytest.approx(1.0)]
    # each sample is scored with the mask chosen from the *other* sample: not in-sample
    _, held_out, _, held_tails = evaluate_static([one, other], [n, n], select=0.25, nb=nb)
    assert held_out[0] == pytest.approx(0.5) and held_out[1] == pytest.approx(1.0)
    # sample 0's last block looks back at tile 1, which the diagonal-only mask of sample 1 drops
    assert held_tails == [pytest.approx(0.0), pytest.approx(1.0)]


def test_tail_guard_rejects_a_layout_that_cuts_off_the_last_rows():
    cheap = Scored(candidate("a_shape", {"sink": 0.01, "local": 0.05}), 0.97, 0.98, 0.06, tail_min=0.40)
    blocks = Scored(candidate("block_sparse", {"mass": 0.95}), 0.96, 0.97, 0.12, tail_min=0.96)
    dense = Scored(candidate("dense"), 1.0, 1.0, 1.0)
    assert choose([cheap, blocks, dense], 0.95).candidate.pattern == "block_sparse"
    assert choose([cheap, blocks, dense], 0.95, tail_target=0.0).candidate.pattern == "a_shape"
    assert choose([cheap, blocks, dense], 0.95, tail_target=0.99).candidate.pattern == "dense"
    assert head_profile(blocks, n_cal=4096).tail_recall_min == 0.96
