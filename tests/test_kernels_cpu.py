"""The CPU path (vlsparse.kernels.cpu) and the dispatcher against the reference, under the error budget."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import all_causal_index, diagonal_only_index, every_pattern_index, qkv, within_budget

from vlsparse.kernels.cpu import attention_lse, sparse_attention_cpu
from vlsparse.kernels.dispatch import choose_backend, sparse_attention
from vlsparse.kernels.indices import a_shape_index, vertical_slash_index


@pytest.mark.parametrize("n", [100, 130, 256, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_every_pattern_within_error_budget(n, dtype):
    q, k, v = qkv(n, heads=8, kv_heads=2, dtype=dtype)
    index = every_pattern_index(q, k)
    scale = 1 / math.sqrt(32)
    out = sparse_attention_cpu(q, k, v, index, scale)
    assert out.dtype == dtype and out.shape == q.shape
    err, budget = within_budget(out, q, k, v, index, scale)
    assert err <= budget, f"err {err:.3g} > budget {budget:.3g}"


@pytest.mark.parametrize("make", [diagonal_only_index, all_causal_index])
def test_cpu_density_zero_and_one(make):
    q, k, v = qkv(130, heads=4, kv_heads=2, head_dim=64)
    index = make(130, 4)
    err, budget = within_budget(sparse_attention_cpu(q, k, v, index, 0.125), q, k, v, index, 0.125)
    assert err <= budget


@pytest.mark.parametrize("knobs", [dict(workspace_mb=0.001, quantum=16), dict(min_run=1, min_group=1),
                                   dict(min_run=2, min_group=3, quantum=32), dict(min_share=1, min_batch=1, long_run=1),
                                   dict(min_share=10**9, min_batch=64)])
def test_cpu_knobs_change_the_schedule_not_the_result(knobs):
    # min_run / min_group 1: every trailing run is read in place (strided views) and the rest merged
    q, k, v = qkv(700, heads=8, kv_heads=2)
    index = every_pattern_index(q, k)
    out = sparse_attention_cpu(q, k, v, index, 0.2, **knobs)
    err, budget = within_budget(out, q, k, v, index, 0.2)
    assert err <= budget
    assert float((out - sparse_attention_cpu(q, k, v, index, 0.2)).abs().max()) < 1e-5


def test_cpu_columns_are_exact_not_rounded_to_blocks():
    # one vertical column at 3 for rows 128..: a block-rounded kernel would also attend to keys 0..63
    n = 256
    index = vertical_slash_index(torch.tensor([[[3]]]), torch.tensor([[[0]]]), n)
    q, k, v = qkv(n, heads=1, kv_heads=1)
    v[:, :, :64] = 0.0
    v[:, :, 3] = 100.0
    k[:, :, :64] = 0.0
    out = sparse_attention_cpu(q, k, v, index, 0.2)
    err, budget = within_budget(out, q, k, v, index, 0.2)
    assert err <= budget
    # with keys 0..63 all zero, only key 3 carries value: rows of block 2 see 100 * weight(3) > 0
    assert bool((out[0, 0, 128:192].abs().sum(-1) > 0).all())


def test_cpu_batch_broadcast_and_non_contiguous_layout():
    n, h, hkv, d = 200, 4, 2, 48
    gen = torch.Generator().manual_seed(5)
    # [B, N, H, D] memory viewed as [B, H, N, D] (the layout many models produce)
    q = torch.randn(2, n, h, d, generator=gen).transpose(1, 2)
    k = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    index = a_shape_index(n, [3, 0, 10, 1], [70, 1, 130, 200], heads=h)  # batch 1, broadcast to 2
    out = sparse_attention_cpu(q, k, v, index, 0.15)
    err, budget = within_budget(out, q, k, v, index.expand(2), 0.15)
    assert err <= budget


def test_cpu_inputs_that_start_inside_a_larger_tensor():
    # contiguous head slices (as from a fused QKV projection) start at a non-zero storage offset;
    # the in-place runs are strided views, whose offsets are absolute in the storage
    n = 256
    q, k, v = qkv(n, heads=8, kv_heads=8)
    index = a_shape_index(n, 4, 130, heads=8)
    in_place = dict(min_run=1, min_group=1)  # every local run read in place
    full = sparse_attention_cpu(q, k, v, index, 0.2, **in_place)
    half = type(index)(index.block_count[:, 4:], index.block_offset[:, 4:], index.column_count[:, 4:],
                       index.column_index[:, 4:], index.block_size)
    assert q[:, 4:].is_contiguous() and q[:, 4:].storage_offset() > 0
    out = sparse_attention_cpu(q[:, 4:], k[:, 4:], v[:, 4:], half, 0.2, **in_place)
    assert float((out - full[:, 4:]).abs().max()) < 1e-6


def test_dispatch_picks_the_cpu_path_and_refuses_triton_without_the_interpreter(monkeypatch):
    q, k, v = qkv(130, heads=4, kv_heads=2)
    index = a_shape_index(130, 4, 64, heads=4)
    assert choose_backend(q, "auto") == "cpu"
    assert torch.equal(sparse_attention(q, k, v, index, 0.2, backend="torch"), sparse_attention_cpu(q, k, v, index, 0.2))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError):
        choose_backend(q, "triton")
    with pytest.raises(ValueError):
        choose_backend(q, "cuda")


def test_attention_lse_fused_and_plain_agree():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 1, n, 32, generator=gen) for n in (64, 100, 100))
    mask = torch.zeros(3, 1, 1, 100).masked_fill_(torch.arange(100) >= 90, float("-inf"))
    for kwargs in (dict(mask=mask), dict(causal=True)):
        kk, vv = (k, v) if "mask" in kwargs else (k[:, :, :64], v[:, :, :64])
        o1, l1 = attention_lse(q, kk, vv, 0.3, **kwargs)
        o2, l2 = attention_lse(q, kk, vv, 0.3, fused=False, **kwargs)
        assert float((o1 - o2).abs().max()) < 1e-5 and float((l1 - l2).abs().max()) < 1e-5
    scores = (q @ k.transpose(-1, -2)) * 0.3 + mask
    _, l3 = attention_lse(q, k, v, 0.3, mask=mask)
    assert float((l3 - torch.logsumexp(scores, -1)).abs().max()) < 1e-5  # lse includes scale and mask


def test_bench_attention_rows_carry_the_measurements():
    from vlsparse.bench.attention import bench_attention, format_table

    rows = bench_attention([512], densities=[0.3], heads=2, head_dim=32, repeats=1)
    assert [r["pattern"] for r in rows] == ["vertical_slash", "block_sparse", "a_shape"]
    for row in rows:
        assert {"seq", "pattern", "density", "speedup", "efficiency", "max_abs_err"} <= set(row)
        assert row["seq"] == 512 and 0 < row["density"] < 1 and row["max_abs_err"] < 1e-5
        assert row["efficiency"] == pytest.approx(row["speedup"] * row["density"], rel=0.05, abs=1e-3)
    assert "vertical_slash" in format_table(rows)


def test_paired_times_take_turns_and_give_each_its_median(monkeypatch):
    from vlsparse.bench import attention as bench

    clock = {"t": 0.0}
    order: list[str] = []

    def step(name: str, costs: list[float]):
        def fn():
            order.append(name)
            clock["t"] += costs.pop(0)
        return fn

    monkeypatch.setitem(bench.CLOCKS, "fake", lambda: clock["t"])
    a = step("a", [100.0, 1.0, 9.0, 2.0])  # the warm-up (100) is not timed
    b = step("b", [100.0, 5.0, 4.0, 30.0])
    assert bench.paired_median_times([a, b], repeats=3, clock="fake") == [2.0, 5.0]
    assert order == ["a", "b"] * 4


@pytest.mark.parametrize("pattern", ["vertical_slash", "block_sparse", "a_shape"])
def test_bench_lists_are_at_most_the_target_density_and_close_to_it(pattern):
    from vlsparse.bench.attention import index_at_density
    from vlsparse.kernels.indices import index_density

    index, density, _ = index_at_density(pattern, 8192, 2, 0.1)
    assert density == pytest.approx(float(index_density(index, 8192).mean()))
    assert 0.09 <= density <= 0.1


def test_shared_rests_group_identical_keys_only():
    from vlsparse.kernels.cpu import _shared_rests

    # rows 0, 1, 3: columns [0, 2, 5, 7]; row 2: [0, 3, 4, 7] (same count, sum, first and last: the
    # same fingerprint, caught by the exact check); row 4: the same columns on another KV head
    cols = torch.tensor([[0, 2, 5, 7], [0, 2, 5, 7], [0, 3, 4, 7], [0, 2, 5, 7], [0, 2, 5, 7]])
    kv_base = torch.tensor([0, 0, 0, 0, 1000])
    n_cols = torch.full((5,), 4)
    no_windows = torch.zeros(5, dtype=torch.long)
    groups = _shared_rests(kv_base, torch.zeros(5, 1, dtype=torch.long), no_windows, cols, n_cols, 64, 2)
    assert [(rows.tolist(), tokens.tolist()) for rows, tokens in groups] == [([0, 1, 3], [0, 2, 5, 7])]
    # windows count too: the first window's 64 tokens, then the columns
    offsets = torch.tensor([[128], [128], [128], [64], [128]])
    groups = _shared_rests(kv_base, offsets, torch.ones(5, dtype=torch.long), cols, n_cols, 64, 2)
    assert [rows.tolist() for rows, _ in groups] == [[0, 1]]
    assert groups[0][1].tolist() == list(range(128, 192)) + [0, 2, 5, 7]


def test_a_shape_sink_shared_by_many_blocks_matches_the_reference():
    q, k, v = qkv(2048, heads=4, kv_heads=2)
    index = a_shape_index(2048, [4, 4, 1, 64], [128, 128, 64, 200], 4)
    out = sparse_attention_cpu(q, k, v, index, 0.2)
    err, budget = within_budget(out, q, k, v, index, 0.2)
    assert err <= budget
    unshared = sparse_attention_cpu(q, k, v, index, 0.2, min_share=10**9)
    assert float((out - unshared).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shared_keys_path_in_low_precision_within_budget(dtype):
    q, k, v = qkv(700, heads=8, kv_heads=2, dtype=dtype)
    index = every_pattern_index(q, k)
    out = sparse_attention_cpu(q, k, v, index, 0.2, min_share=1)
    assert out.dtype == dtype
    err, budget = within_budget(out, q, k, v, index, 0.2)
    assert err <= budget


def test_short_runs_are_read_in_place_only_when_they_are_the_whole_list():
    from vlsparse.kernels.cpu import _segments

    run = torch.tensor([2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1])  # one head, 12 query blocks
    whole = torch.tensor([True] * 4 + [False] * 4 + [True] * 4)
    head_start = torch.arange(12) == 0
    assert _segments(run, head_start, 4, 4, 16) == []  # runs under min_run: gathered
    assert _segments(run, head_start, 4, 4, 16, whole) == [(0, 4, 2), (8, 12, 1)]
    assert _segments(torch.tensor([3] * 3 + [20]), torch.arange(4) == 0, 4, 4, 16) == [(3, 4, 20)]  # a long run alone
    # a head boundary ends a range: two heads of 4 blocks with the same run are two ranges
    assert _segments(torch.full((8,), 5), torch.arange(8) % 4 == 0, 4, 4, 16) == [(0, 4, 5), (4, 8, 5)]


def test_balanced_ranges_cut_where_the_work_halves():
    from vlsparse.kernels.cpu import _balanced_ranges

    assert _balanced_ranges(torch.tensor([1, 1, 1, 1, 4]), 2) == [(0, 4), (4, 5)]  # 4 and 4
    assert _balanced_ranges(torch.tensor([5, 1, 1, 1, 1, 1]), 2) == [(0, 1), (1, 6)]  # 5 and 5
    assert _balanced_ranges(torch.ones(9, dtype=torch.long), 3) == [(0, 3), (3, 6), (6, 9)]
    assert _balanced_ranges(torch.ones(3, dtype=torch.long), 2) == [(0, 3)]  # too few blocks to split


def test_cpu_blocks_split_across_threads_give_the_same_result():
    # every pattern, GQA, a length that is not a multiple of 64; forced split into 3 threads
    q, k, v = qkv(700, heads=8, kv_heads=2)
    index = every_pattern_index(q, k)
    one = sparse_attention_cpu(q, k, v, index, 0.2, threads=1)
    before = torch.get_num_threads()
    with torch.inference_mode():  # a mode is thread-local: the threads must inherit it
        split = sparse_attention_cpu(q, k, v, index, 0.2, threads=3, parallel_min_keys=0)
    assert torch.get_num_threads() == before
    err, budget = within_budget(split, q, k, v, index, 0.2)
    assert err <= budget
    assert float((split - one).abs().max()) < 1e-6
