"""KV methods as pure rules (vlsparse.kv.*), the observation window, stores built from plans, and the
profile's kv section."""

from __future__ import annotations

import math

import pytest
import torch

from vlsparse.errors import InputError, ProfileError
from vlsparse.kv import METHOD_NAMES, INTERFACE, KVContext, method_named, methods
from vlsparse.kv.plan import KVPlan, build_store, window_attention
from vlsparse.kv.snapkv import budget_count
from vlsparse.kv.zipvl import important_count
from vlsparse.profile.kv import choose_kv, kv_section, kv_settings, resolve_kv


def test_every_method_has_the_interface():
    for name, module in methods().items():
        assert module.NAME == name
        for attr in INTERFACE:
            assert hasattr(module, attr), (name, attr)
    with pytest.raises(InputError, match="unknown KV cache method"):
        method_named("kivi9")


def test_window_attention_against_brute_force():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    received, visible = window_attention(q, k, window=3, scale=0.5)
    expected = torch.zeros(2, 10)
    for h in range(4):
        for row in range(7, 10):
            w = torch.softmax((q[h, row] @ k[h // 2, : row + 1].T) * 0.5, -1)
            expected[h // 2, : row + 1] += w
    assert torch.allclose(received, expected, atol=1e-6)
    assert visible.tolist() == [3.0] * 8 + [2.0, 1.0]  # key 8 is seen by rows 8 and 9, key 9 by row 9


def test_zipvl_count_worked_example():
    assert important_count(torch.tensor([0.05, 0.5, 0.15, 0.3]), tau=0.9) == 3  # 0.5+0.3 < 0.9 <= +0.15
    assert important_count(torch.tensor([0.05, 0.5, 0.15, 0.3]), tau=0.5) == 1
    assert important_count(torch.zeros(4), tau=0.9) == 0


def test_zipvl_marks_each_heads_own_top_tokens():
    received = torch.tensor([[8.0, 1, 1, 1, 0.5, 0.5], [1.0, 1, 8, 1, 0.5, 0.5]])
    ctx = KVContext(length=8, heads=2, residual=2, received=torch.cat([received, torch.ones(2, 2)], 1),
                    visible=torch.ones(8))
    plan = method_named("zipvl").plan(ctx, tau=0.5)
    # the layer's summed importance [9, 2, 9, 2, 1, 1] reaches half of 24 with 2 tokens: p = 2 per head
    assert plan.high.sum(1).tolist() == [2, 2]
    assert plan.high[0, 0] and plan.high[1, 2]  # each head's own strongest token is high precision


def test_snapkv_budget_is_exact_and_follows_the_votes():
    n, residual = 60, 8
    image = torch.zeros(n, dtype=torch.bool)
    image[10:50] = True  # 40 image tokens in the prefix
    received = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) * 0.01
    received[0, 20] = received[1, 45] = 5.0  # each head's planted favourite
    ctx = KVContext(length=n, heads=2, residual=residual, image_mask=image, received=received,
                    visible=torch.ones(n))
    for budget, want in ((0.25, 10), (0.5, 20), (7, 7), (1.0, 40)):
        plan = method_named("snapkv").plan(ctx, budget=budget, pool=1)
        kept_image = image[:n - residual][plan.keep]
        assert kept_image.sum(1).tolist() == [want, want]  # exactly the budget, in every head
        assert (~kept_image).sum(1).tolist() == [12, 12]  # every text token of the prefix stays
    plan = method_named("snapkv").plan(ctx, budget=1, pool=1)
    assert plan.keep[0].tolist().count(20) == 1 and 45 in plan.keep[1].tolist()
    assert budget_count(0.25, 41) == 10 and budget_count(100, 41) == 41


def test_snapkv_scope_all_lets_text_compete():
    ctx = KVContext(length=30, heads=1, residual=4, image_mask=torch.zeros(30, dtype=torch.bool),
                    received=torch.arange(30.0)[None], visible=torch.ones(30))
    plan = method_named("snapkv").plan(ctx, budget=0.5, scope="all", pool=1)
    assert plan.keep[0].tolist() == list(range(13, 26))  # the 13 most attended of 26


def test_build_store_splits_tiers_by_plan():
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    keep = torch.stack([torch.arange(0, 32, 2), torch.arange(1, 32, 2)])  # 16 of the 32-token prefix per head
    high = torch.zeros(2, 16, dtype=torch.bool)
    high[:, :4] = True
    store = build_store(k, v, KVPlan(low_bits=4, high_bits=16, keep=keep, high=high, key_group=8, value_group=8),
                        residual=8)
    assert [t.length for t in store.tiers] == [4, 12] and store.recent_keys.length == 8 and store.length == 24
    assert torch.equal(store.tiers[0].keys[1], k[1, [1, 3, 5, 7]])  # high tier: full precision, head's own tokens


def test_profile_section_round_trip_and_errors():
    settings = resolve_kv("snapkv", {"budget": 0.5})
    assert settings.params["budget"] == 0.5 and settings.params["window"] == 32  # defaults filled in
    assert kv_settings(kv_section(settings)) == settings
    with pytest.raises(InputError, match="budget"):
        resolve_kv("snapkv", {"budget": -1})
    with pytest.raises(InputError, match="no parameter"):
        resolve_kv("uniform", {"budget": 0.5})
    with pytest.raises(ProfileError, match="kv.params.bits"):
        kv_settings({"method": "uniform", "params": {"bits": 3}})
    assert choose_kv(None) == resolve_kv("fp")  # the runtime default
    assert choose_kv(kv_section(settings)) == settings
    assert choose_kv(kv_section(settings), params={"budget": 0.75}).params["budget"] == 0.75
    assert choose_kv(kv_section(settings), "off") is None
    assert set(METHOD_NAMES) == {"fp", "uniform", "zipvl", "snapkv"}
    assert math.isclose(choose_kv(None, "uniform", {"bits": 2}).params["bits"], 2)
