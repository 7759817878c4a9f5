"""The run-time recall guard: heads whose lists miss this prompt's last-block attention run dense."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.kernels.indices import block_mask_index
from vlsparse.kernels.recall_guard import heads_to_fall_back, last_block_recall
from vlsparse.kernels.runtime import attach
from vlsparse.models import load
from vlsparse.profile import HeadProfile, save_profile

from test_kernels_runtime import _inputs, _logits, uniform_profile


def test_last_block_recall_is_the_attention_mass_inside_the_lists_worked_by_hand():
    # 1 head, 130 tokens, blocks of 64: the last query block holds rows 128 and 129
    n, d = 130, 4
    q, k = torch.zeros(1, 1, n, d), torch.zeros(1, 1, n, d)
    q[0, 0, 128:, 0] = 1.0
    k[0, 0, 5, 0] = math.log(9.0)  # key 5 scores log 9, every other key 0 (scale 1)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 2, 2] = True  # the last query block lists only its own (diagonal) key block
    index = block_mask_index(mask | torch.eye(3, dtype=torch.bool), n)
    recall = last_block_recall(q, k, index, scale=1.0)
    # row 128 sees keys 0..128: weights 9 (key 5) + 128 ones; its list holds keys 128 only -> 1 / 137
    # row 129 sees keys 0..129: 9 + 129 ones; its list holds 128 and 129 -> 2 / 138
    assert torch.allclose(recall, torch.tensor([(1 / 137 + 2 / 138) / 2]), atol=1e-6)
    full = block_mask_index(torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(), n)
    assert torch.allclose(last_block_recall(q, k, full, scale=1.0), torch.ones(1))
    assert heads_to_fall_back(torch.tensor([0.5, 0.97, 0.94]), 0.95) == [0, 2]


def test_a_head_under_target_runs_dense_and_one_above_stays_sparse(llava_dir):
    loaded = load(llava_dir)
    inputs = _inputs(loaded, n_images=24)  # ~400 tokens: seven query blocks of 64
    dense = _logits(loaded, inputs)
    thin = HeadProfile("a_shape", {"sink": 0.01, "local": 0.02}, density=0.1)  # misses most of a random model
    runtime = attach(loaded, uniform_profile(loaded.adapter, thin), min_len=0, guard=True)
    guarded = _logits(loaded, inputs)
    heads = loaded.adapter.num_heads * loaded.adapter.num_layers
    assert runtime.fallbacks() == (heads, heads)
    assert (guarded - dense).abs().max() < 1e-4  # every head fell back: the model's own attention
    runtime.guard = False
    assert (_logits(loaded, inputs) - dense).abs().max() > 1e-3  # unguarded, the thin pattern runs

    loaded = load(llava_dir)
    wide = HeadProfile("a_shape", {"sink": 0.01, "local": 1.0}, density=0.1)  # its window covers every key
    runtime = attach(loaded, uniform_profile(loaded.adapter, wide), min_len=0, guard=True)
    _logits(loaded, inputs)
    assert runtime.fallbacks() == (0, heads) and all(c.index is not None for c in runtime.calls)


def test_run_reports_the_heads_the_guard_sent_dense(llava_dir, image_file, tmp_path):
    loaded = load(llava_dir)
    thin = HeadProfile("a_shape", {"sink": 0.01, "local": 0.02}, density=0.1)
    save_profile(uniform_profile(loaded.adapter, thin), tmp_path / "thin.yaml")
    args = ["run", "--model", str(llava_dir), "--profile", str(tmp_path / "thin.yaml"), "--max-new-tokens", "2",
            "--json", *[str(image_file)] * 40, "what color ?"]  # 40 images: past run's 512-token minimum
    guarded = CliRunner().invoke(build_app(), [*args[:-2], "--recall-guard", *args[-2:]])
    assert guarded.exit_code == 0, guarded.output
    report = json.loads(guarded.stdout)
    heads = loaded.adapter.num_heads * loaded.adapter.num_layers
    assert report["recall_guard"] == {"heads_dense": heads, "heads_checked": heads}
    assert "recall guard: " in report["attention"]


def test_dense_tail_heads_are_held_to_their_own_calibrated_tail_recall():
    from types import SimpleNamespace

    from vlsparse.kernels.recall_guard import MARGIN, head_targets

    heads = [HeadProfile("a_shape", {"sink": 0.05, "local": 0.1}, tail_recall_min=0.8),
             HeadProfile("a_shape", {"sink": 0.05, "local": 0.1}, tail_recall_min=0.3)]
    dense_tail = SimpleNamespace(dense_tail=True, tail_recall_target=0.95, recall_target=0.95)
    targets = head_targets(dense_tail, heads)
    assert torch.allclose(targets, torch.tensor([0.8 - MARGIN, 0.3 - MARGIN]))
    # this prompt: head 0 keeps 0.65 of its last block (under 0.7: worse than calibration), head 1 keeps 0.25
    # (as poor as calibration already was: the dense tail covers it)
    assert heads_to_fall_back(torch.tensor([0.65, 0.25]), targets) == [0]
    plain = SimpleNamespace(dense_tail=False, tail_recall_target=0.9, recall_target=0.95)
    assert torch.allclose(head_targets(plain, heads), torch.tensor([0.9, 0.9]))  # without a dense tail: its tail target


def test_the_search_records_each_heads_own_tail_recall_under_a_dense_tail(llava):
    from vlsparse.search.api import profile_model
    from vlsparse.search.calibration import calibration_from

    calibration = calibration_from(llava, None, samples=2, seq_len=256)
    with_tail = profile_model(llava, calibration, threads=1, dense_tail=True)
    without = profile_model(llava, calibration, threads=1, dense_tail=False, tail_recall=0.0)
    own = [h.tail_recall_min for layer in with_tail.attention.layers for h in layer]
    assert min(own) < 1.0  # the pattern's own, not the dense block's 1.0
    for a, b in zip((h for layer in with_tail.attention.layers for h in layer),
                    (h for layer in without.attention.layers for h in layer)):
        if (a.pattern, a.budget) == (b.pattern, b.budget) and a.mask is None:
            assert a.tail_recall_min == pytest.approx(b.tail_recall_min, abs=1e-6)  # the same pattern, the same tail


def test_every_fourth_row_estimates_the_whole_blocks_recall():
    g = torch.Generator().manual_seed(0)
    n = 1000  # the last block holds rows 960..999: 40 rows, too few to thin out; 1024 + 40 rows: 64
    for length, thinned in ((n, False), (1024 + 64, True)):
        q, k = torch.randn(1, 4, length, 16, generator=g), torch.randn(1, 2, length, 16, generator=g)
        nb = -(-length // 64)
        mask = (torch.rand(1, 4, nb, nb, generator=g) < 0.3) | torch.eye(nb, dtype=torch.bool)
        index = block_mask_index(mask.tril(), length)
        whole = last_block_recall(q, k, index, 0.25, stride=1)
        estimate = last_block_recall(q, k, index, 0.25)
        if thinned:
            assert not torch.equal(whole, estimate) and torch.allclose(whole, estimate, atol=0.05)
        else:
            assert torch.equal(whole, estimate)
