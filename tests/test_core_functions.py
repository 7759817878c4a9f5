"""Core neurons and core tokens: the pure tensor functions, with worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from vlsparse.compress.core import histogram_quantile, log_bin_edges, magnitude_histogram
from vlsparse.compress.core_calibrate import (choose_token_candidate, default_token_layers, longest_run, parse_layers,
                                              prefill_cost)
from vlsparse.errors import InputError, ProfileError
from vlsparse.kernels.core_select import (core_match_scores, elbow_keep_count, keep_bounds, select_core_tokens,
                                          sentence_core, token_core_mask)
from vlsparse.profile.core import core_settings

CONVEX = [0.9, 0.85, 0.8, 0.75, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03]  # four high scores, then a flat tail
CONCAVE = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.2, 0.1, 0.0]  # a high shoulder of seven, then a cliff


def test_elbow_keep_count_on_hand_made_curves():
    assert elbow_keep_count(torch.tensor(CONVEX)) == 4  # the knee (0.1) is the first dropped point
    assert elbow_keep_count(torch.tensor(CONCAVE)) == 7  # the shoulder (0.9) is the last kept point
    assert elbow_keep_count(torch.tensor([0.5] * 6)) == 6  # flat: nothing to cut


def test_select_core_tokens_cuts_at_the_elbow_in_any_order():
    perm = torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    scores = torch.tensor(CONVEX)[perm]
    kept = select_core_tokens(scores, min_keep=0.0, max_keep=1.0)
    assert kept.tolist() == sorted((perm < 4).nonzero().flatten().tolist())  # positions of the four high scores


def test_select_core_tokens_guards_clamp_the_elbow():
    scores = torch.tensor(CONCAVE)
    assert len(select_core_tokens(scores, 0.0, 0.3)) == 3  # elbow says 7, max guard allows 3
    assert len(select_core_tokens(torch.tensor(CONVEX), 0.6, 1.0)) == 6  # elbow says 4, min guard wants 6
    assert select_core_tokens(scores, 0.0, 0.3).tolist() == [0, 1, 2]  # ties keep the earlier tokens
    assert keep_bounds(10, 0.0, 0.01) == (1, 1)  # never empty


def test_token_core_mask_takes_top_alpha_of_active_neurons():
    act = torch.tensor([[5.0, -4.0, 3.0, 0.1, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    mask = token_core_mask(act, alpha=0.5, threshold=0.5)
    assert mask[0].nonzero().flatten().tolist() == [0, 1]  # 3 active -> ceil(1.5) = 2 by |a|
    assert not mask[1].any()  # no active neuron, no core
    assert mask[2].nonzero().flatten().tolist() == [3, 4, 5]  # 6 active -> 3
    gate = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]] * 3)  # the gate decides who is active
    assert token_core_mask(act, alpha=0.5, gate=gate, threshold=0.5)[2].nonzero().flatten().tolist() == [2, 3]


def test_sentence_core_counts_frequency_then_breaks_ties_by_mass():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 0, 1, 0]], dtype=torch.bool)
    act = torch.tensor([[1.0, 1.0, 0, 0, 0], [1.0, 0, 3.0, 0, 0], [1.0, 0, 0, 2.0, 0]])
    assert sentence_core(mask, beta=0.4, act=act).tolist() == [0, 2]  # 0 occurs 3x; 2 wins the tie on mass
    assert sentence_core(mask, beta=1.0).tolist() == [0, 1, 2, 3, 4]


def test_core_match_scores_are_cosines_of_indicators():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    scores = core_match_scores(mask, torch.tensor([0, 1]))
    assert scores.tolist() == pytest.approx([1.0, 0.0, 0.5, 0.0])


def test_histogram_quantile_reads_the_cats_threshold():
    edges = log_bin_edges()
    values = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * torch.tensor(-1.0) ** torch.arange(
        200_000)  # uniform magnitudes in [0, 1), both signs
    counts = magnitude_histogram(values, edges)
    assert int(counts.sum()) == 200_000
    for q in (0.1, 0.5, 0.9):
        assert histogram_quantile(counts, edges, q) == pytest.approx(q, rel=0.02)
    assert histogram_quantile(torch.zeros(len(edges)), edges, 0.5) == 0.0


def test_selection_rules():
    assert longest_run([False, True, True, False, True, True, True, False]) == (4, 6)
    assert longest_run([False, False]) is None
    assert prefill_cost(1, 4, 0.5) == pytest.approx((2 + 2 * 0.5) / 4)
    rows = [{"layer": 1, "kl": 0.3, "cost": 0.4}, {"layer": 2, "kl": 0.05, "cost": 0.6},
            {"layer": 3, "kl": 0.01, "cost": 0.7}]
    assert choose_token_candidate(rows, 0.1)["layer"] == 2  # the cheapest within budget
    assert choose_token_candidate(rows, 0.001) is None
    assert choose_token_candidate([{"layer": 3, "kl": 0.0, "cost": 1.0}], 0.1) is None  # saves nothing
    # low KL but a changed answer: refused unless the top-1 guard is relaxed
    changed = [{"layer": 0, "kl": 0.05, "top1": 0.5, "cost": 0.4}, {"layer": 1, "kl": 0.02, "top1": 1.0, "cost": 0.6}]
    assert choose_token_candidate(changed, 0.1)["layer"] == 1
    assert choose_token_candidate(changed, 0.1, min_top1=0.5)["layer"] == 0
    assert choose_token_candidate(changed[:1], 0.1) is None
    assert default_token_layers(2) == [0] and default_token_layers(12) == [0, 1, 2, 3, 4, 5, 6]


def test_core_settings_validate_the_profile_section():
    core = {"version": 1, "neurons": {"alpha": 0.2, "beta": 0.4, "layers": {"first": 1, "last": 2}},
            "tokens": {"layer": 1, "min_keep": 0.1, "max_keep": 0.5, "score": "text"},
            "layers": [{"layer": 0, "threshold": 0.5}, {"layer": 1, "threshold": 0.25}]}
    settings = core_settings(core, num_layers=4)
    assert settings.neuron_layers == (1, 2) and settings.token_layer == 1
    assert settings.thresholds == {0: 0.5, 1: 0.25}
    with pytest.raises(ProfileError, match="layer index"):
        core_settings({**core, "tokens": {"layer": 7}}, num_layers=4)
    with pytest.raises(ProfileError, match="score"):
        core_settings({**core, "tokens": {"layer": 1, "score": "attention"}}, num_layers=4)
    with pytest.raises(ProfileError, match="beta"):
        core_settings({**core, "neurons": {"beta": 1.5}}, num_layers=4)
    assert parse_layers("1-3,5", 8, "x") == [1, 2, 3, 5]
    assert parse_layers("none", 8, "x") == []
    with pytest.raises(InputError, match="does not exist"):
        parse_layers("9", 8, "x")
    assert math.isclose(core_settings({}, 2).beta, 0.4)
