"""Worked examples for the pure Wanda / N:M functions."""

import pytest
import torch

from vlsparse.compress.allocations.owl import outlier_ratio
from vlsparse.compress.wanda import (nm_mask, parse_structure, row_mask, row_prune_counts, update_sq_norm, wanda_mask,
                                     wanda_scores)
from vlsparse.errors import InputError


def test_wanda_mask_hand_computed_matrix():
    # norms [1, 4, 2, 8]: row 0 scores |W|*norm = [3, 4, 5, 2]; row 1 = [1, 8, 2, 8]
    weight = torch.tensor([[3.0, -1.0, 2.5, 0.25], [1.0, 2.0, -1.0, 1.0]])
    sq_norm = torch.tensor([1.0, 16.0, 4.0, 64.0])
    assert torch.equal(wanda_scores(weight, sq_norm), torch.tensor([[3.0, 4.0, 5.0, 2.0], [1.0, 8.0, 2.0, 8.0]]))
    mask = wanda_mask(weight, sq_norm, prune=4)
    pruned = weight * mask
    assert torch.equal(pruned, torch.tensor([[0.0, -1.0, 2.5, 0.0], [0.0, 2.0, 0.0, 1.0]]))
    # magnitude alone would have kept 3.0 in row 0: the activations changed the choice
    assert torch.equal(row_mask(weight.abs(), 2)[0], torch.tensor([True, False, True, False]))


def test_nm_mask_2_4_on_one_to_eight():
    weight = torch.arange(1.0, 9.0).unsqueeze(0)
    mask = wanda_mask(weight, torch.ones(8), structure=(2, 4))
    assert torch.equal(weight * mask, torch.tensor([[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]]))


def test_nm_mask_input_norms_change_which_weights_go():
    weight = torch.arange(1.0, 9.0).unsqueeze(0)
    norms = torch.tensor([100.0, 10.0, 1.0, 0.1] * 2)
    mask = wanda_mask(weight, norms ** 2, structure=(2, 4))
    # scores [100, 20, 3, .4, 500, 60, 7, .8]
    assert torch.equal(weight * mask, torch.tensor([[1.0, 2.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0]]))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_every_group_valid(n, m):
    torch.manual_seed(0)
    scores = torch.rand(16, 64)
    mask = nm_mask(scores, n, m)
    per_group = mask.reshape(16, 64 // m, m).sum(-1)
    assert torch.all(per_group == m - n)
    # the pruned ones are the lowest of their group
    groups = scores.reshape(16, -1, m)
    kept_min = torch.where(mask.reshape(16, -1, m), groups, torch.inf).amin(-1)
    pruned_max = torch.where(~mask.reshape(16, -1, m), groups, -torch.inf).amax(-1)
    assert torch.all(pruned_max <= kept_min)


def test_nm_mask_rejects_ragged_columns():
    with pytest.raises(ValueError):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_row_prune_counts_spread_exact_total():
    counts = row_prune_counts(7, 24)
    assert int(counts.sum()) == 24 and set(counts.tolist()) <= {3, 4}
    assert torch.equal(row_prune_counts(4, 8), torch.full((4,), 2))


def test_wanda_mask_exact_count_per_matrix():
    torch.manual_seed(1)
    weight = torch.randn(13, 29)
    mask = wanda_mask(weight, torch.rand(29), prune=190)
    assert int((~mask).sum()) == 190
    per_row = (~mask).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1


def test_update_sq_norm_accumulates_over_batches():
    x1, x2 = torch.randn(2, 5, 3), torch.randn(7, 3)
    s, n = update_sq_norm(None, 0, x1)
    s, n = update_sq_norm(s, n, x2)
    both = torch.cat([x1.reshape(-1, 3), x2])
    assert n == 17
    assert torch.allclose(s, (both ** 2).sum(0))


def test_outlier_ratio_counts_above_m_times_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 100.0])]
    # mean = 109/10 = 10.9; cut = 54.5 -> one of ten
    assert outlier_ratio(scores, m=5.0) == pytest.approx(0.1)


def test_parse_structure():
    assert parse_structure("unstructured") is None
    assert parse_structure("2:4") == (2, 4)
    with pytest.raises(InputError):
        parse_structure("4:2")
    with pytest.raises(InputError):
        parse_structure("x")
