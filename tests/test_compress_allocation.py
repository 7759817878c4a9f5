"""Exactness of the allocations (water-filling, OWL, uniform) as property tests."""

import math
import random

import pytest

from vlsparse.compress.allocations.ecoflap import water_fill
from vlsparse.compress.allocations.fill import fill_to_total, keep_total, split_count
from vlsparse.compress.allocations.owl import owl
from vlsparse.compress.allocations.uniform import uniform


def _random_case(rng):
    sizes = [rng.choice([rng.randint(1, 50), rng.randint(100, 5000), rng.randint(10_000, 300_000)])
             for _ in range(rng.randint(1, 40))]
    ratio = rng.uniform(0.05, 0.95)
    dev = rng.choice([0.0, 0.01, 0.1, rng.uniform(0, 0.3)])
    scores = [rng.choice([0.0, rng.random(), rng.random() * 1e-6, rng.random() * 1e3]) for _ in sizes]
    return sizes, ratio, dev, scores


def _check_bounds(sizes, keeps, ratio, dev):
    assert sum(keeps) == keep_total(sizes, ratio)
    for n, k in zip(sizes, keeps):
        assert 0 <= k <= n
        # within the deviation bound up to one weight
        assert abs((n - k) / n - ratio) <= dev + 1.0 / n + 1e-9


def test_water_fill_exact_total_and_bounds_property():
    rng = random.Random(0)
    for _ in range(400):
        sizes, ratio, dev, scores = _random_case(rng)
        keeps = water_fill(sizes, scores, ratio, dev)
        _check_bounds(sizes, keeps, ratio, dev)


def test_water_fill_higher_score_keeps_more():
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(1000, 100_000)
        sizes = [n] * 12
        scores = [rng.random() for _ in sizes]
        keeps = water_fill(sizes, scores, 0.5, 0.1)
        order = sorted(range(12), key=lambda i: scores[i])
        for a, b in zip(order, order[1:]):
            assert keeps[a] <= keeps[b] + 1
        assert len(set(keeps)) > 1  # the groups differ


def test_water_fill_equal_scores_is_uniform():
    sizes = [1000, 4000, 250, 999]
    for scores in ([3.0] * 4, [0.0] * 4):
        keeps = water_fill(sizes, scores, 0.5, 0.1)
        assert sum(keeps) == sum(uniform(sizes, 0.5))
        assert all(abs(k - n * 0.5) <= 1 for k, n in zip(keeps, sizes))


def test_water_fill_saturates_and_redistributes():
    # one dominant score: that group hits its cap (60% keep) and the rest share the remainder equally
    keeps = water_fill([1000] * 4, [100.0, 1.0, 1.0, 1.0], 0.5, 0.1)
    assert keeps[0] == 600
    assert sum(keeps) == 2000
    assert max(keeps[1:]) - min(keeps[1:]) <= 1


def test_owl_exact_total_and_bounds_property():
    rng = random.Random(2)
    for _ in range(300):
        sizes, ratio, dev, scores = _random_case(rng)
        keeps = owl(sizes, scores, ratio, dev)
        _check_bounds(sizes, keeps, ratio, dev)


def test_owl_more_outliers_keeps_more_and_spans_2_lambda():
    sizes = [10_000] * 5
    keeps = owl(sizes, [0.01, 0.02, 0.03, 0.04, 0.05], 0.5, max_deviation=0.2, lam=0.08)
    fractions = [k / 10_000 for k in keeps]
    assert fractions == sorted(fractions)
    assert fractions[-1] - fractions[0] == pytest.approx(0.16, abs=1e-3)
    assert sum(keeps) == 25_000


def test_uniform_within_one_weight():
    rng = random.Random(3)
    for _ in range(200):
        sizes = [rng.randint(1, 10_000) for _ in range(rng.randint(1, 30))]
        ratio = rng.uniform(0.01, 0.99)
        keeps = uniform(sizes, ratio)
        assert sum(keeps) == keep_total(sizes, ratio)
        for n, k in zip(sizes, keeps):
            assert abs(k - n * (1 - ratio)) < 1.0 + 1e-9


def test_fill_to_total_rejects_infeasible():
    with pytest.raises(ValueError):
        fill_to_total([0.0], [1.0], [0], [5], 6)


def test_split_count_proportional_and_exact():
    parts = split_count(101, [100, 100, 50])
    assert sum(parts) == 101 and parts[2] in (20, 21)
    assert math.isclose(parts[0], 40.4, abs_tol=1)
