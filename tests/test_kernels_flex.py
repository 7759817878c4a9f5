"""The flex backend (vlsparse.kernels.flex) against the reference, under the error budget; its compile cache.

Every new input shape compiles flex_attention (seconds on CPU), so the cases share a few shapes:
8 query heads, 2 KV heads, head dim 32, lengths 256, 320 (300 rounds up to it) and 512.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import all_causal_index, diagonal_only_index, every_pattern_index, qkv, within_budget

from vlsparse.kernels import dispatch
from vlsparse.kernels.dispatch import choose_backend, flex_rule, sparse_attention
from vlsparse.kernels.flex import RecompileLimit, flex_attention_sparse, flex_length, flex_mask, pad_index
from vlsparse.kernels.indices import a_shape_index, kept_keys, vertical_slash_index

SCALE = 1 / math.sqrt(32)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("n", [256, 300, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_every_pattern_within_error_budget(n, dtype):
    q, k, v = qkv(n, heads=8, kv_heads=2, dtype=dtype)  # GQA: 4 query heads per KV head
    index = every_pattern_index(q, k)
    out = flex_attention_sparse(q, k, v, index, SCALE)
    assert out.dtype == dtype and out.shape == q.shape
    err, budget = within_budget(out, q, k, v, index, SCALE)
    assert err <= budget, f"err {err:.3g} > budget {budget:.3g}"


def test_flex_without_gqa_within_error_budget():
    q, k, v = qkv(256, heads=8, kv_heads=8)
    index = every_pattern_index(q, k)
    err, budget = within_budget(flex_attention_sparse(q, k, v, index, SCALE), q, k, v, index, SCALE)
    assert err <= budget


@pytest.mark.parametrize("make", [diagonal_only_index, all_causal_index])
def test_flex_density_zero_and_one(make):
    q, k, v = qkv(300, heads=8, kv_heads=2)
    index = make(300, 8)
    err, budget = within_budget(flex_attention_sparse(q, k, v, index, SCALE), q, k, v, index, SCALE)
    assert err <= budget


def test_flex_columns_are_exact_not_rounded_to_blocks():
    # one vertical column at 3 for rows 128..: a block-rounded mask would also attend to keys 0..63
    n = 256
    index = vertical_slash_index(torch.full((1, 8, 1), 3), torch.zeros(1, 8, 1, dtype=torch.long), n)
    q, k, v = qkv(n, heads=8, kv_heads=2)
    k[:, :, :64] = 0.0
    v[:, :, :64] = 0.0
    v[:, :, 3] = 10.0  # with keys 0..63 of a block-rounded mask in the softmax, rows 128.. would differ by ~1
    out = flex_attention_sparse(q, k, v, index, SCALE)
    err, budget = within_budget(out, q, k, v, index, SCALE)
    assert err <= budget
    assert bool((out[0, :, 128:192].abs().sum(-1) > 0).all())  # key 3 reached: its value shows


def test_flex_batch_broadcast_and_non_contiguous_layout():
    n, h, hkv, d = 256, 8, 2, 32
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, n, h, d, generator=gen).transpose(1, 2)  # [B, N, H, D] memory seen as [B, H, N, D]
    k = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(2, n, hkv, d, generator=gen).transpose(1, 2)
    index = a_shape_index(n, [3, 0, 10, 1, 3, 0, 10, 1], [70, 1, 130, 200, 64, 64, 5, 256], heads=h)  # batch 1
    out = flex_attention_sparse(q, k, v, index, SCALE)
    err, budget = within_budget(out, q, k, v, index.expand(2), SCALE)
    assert err <= budget


def test_flex_length_rounds_up_by_at_most_a_quarter_in_block_multiples():
    assert [flex_length(n) for n in (256, 300, 512, 8192, 8193, 32768)] == [256, 320, 512, 8192, 10240, 32768]
    for n in range(65, 5000, 37):
        assert n <= flex_length(n) <= max(1.25 * n, n + 63) and flex_length(n) % 64 == 0
    assert len({flex_length(n) for n in range(1025, 2049)}) == 4  # four compiled lengths per octave


def test_padded_index_lists_nothing_in_the_new_blocks():
    q, k, _ = qkv(300, heads=8, kv_heads=2)
    index = every_pattern_index(q, k)
    padded = pad_index(index, 7)
    kept = kept_keys(padded, 448)
    assert torch.equal(kept[:, :, :5, :300], kept_keys(index, 300)) and not bool(kept[:, :, 5:].any())


def test_layers_of_one_shape_compile_once():
    # a prefill's layers: the same shapes, other lists; a ragged length in the same bucket reuses the kernel
    q, k, v = qkv(300, heads=8, kv_heads=2)
    flex_attention_sparse(q, k, v, diagonal_only_index(300, 8), SCALE)
    before = compiled_graphs()
    for index in (every_pattern_index(q, k), all_causal_index(300, 8), a_shape_index(300, 4, 100, heads=8)):
        out = flex_attention_sparse(q, k, v, index, SCALE)
        err, budget = within_budget(out, q, k, v, index, SCALE)
        assert err <= budget
    q2, k2, v2 = qkv(310, heads=8, kv_heads=2, seed=1)
    index = every_pattern_index(q2, k2)
    err, budget = within_budget(flex_attention_sparse(q2, k2, v2, index, SCALE, block_mask=flex_mask(index, q2)),
                                q2, k2, v2, index, SCALE)
    assert err <= budget
    assert compiled_graphs() == before


def test_flex_refuses_a_shape_past_the_limit_instead_of_running_eagerly():
    q, k, v = qkv(256, heads=8, kv_heads=2)
    flex_attention_sparse(q, k, v, diagonal_only_index(256, 8), SCALE)  # at least one shape compiled
    q, k, v = qkv(1024, heads=8, kv_heads=2)  # a length no other test uses
    with pytest.raises(RecompileLimit):
        flex_attention_sparse(q, k, v, diagonal_only_index(1024, 8), SCALE, max_shapes=1)


def test_dispatch_runs_flex_and_auto_stays_on_the_cpu_path(monkeypatch):
    q, k, v = qkv(256, heads=8, kv_heads=2)
    index = every_pattern_index(q, k)
    assert choose_backend(q, "flex") == "flex"
    assert torch.equal(sparse_attention(q, k, v, index, SCALE, backend="flex"), flex_attention_sparse(q, k, v, index, SCALE))
    long_q = torch.empty(1, 1, 16384, 8)
    assert flex_rule(long_q) and not flex_rule(q)
    assert choose_backend(long_q, "auto") == "cpu"  # the rule is off until measured
    monkeypatch.setattr(dispatch, "AUTO_USES_FLEX_RULE", True)
    assert choose_backend(long_q, "auto") == "flex" and choose_backend(q, "auto") == "cpu"


def test_runtime_with_the_flex_backend_matches_the_torch_backend(llava_dir):
    from PIL import Image

    from vlsparse.kernels.runtime import attach, detach
    from vlsparse.models import load
    from vlsparse.profile import AttentionProfile, HeadProfile, Profile

    loaded = load(llava_dir)
    images = [Image.new("RGB", (16, 16), c) for c in ["red", "blue", "green", "white"] * 6]
    inputs = loaded.prepare(images, "what color is the circle ?")  # ~400 tokens
    head = HeadProfile("a_shape", {"sink": 0.01, "local": 0.02}, density=0.1)
    layers = [[head] * loaded.adapter.num_heads for _ in range(loaded.adapter.num_layers)]
    profile = Profile(model=loaded.adapter.fingerprint(), attention=AttentionProfile(layers=layers))
    logits = {}
    for backend in ("torch", "flex"):
        runtime = attach(loaded, profile, backend=backend, min_len=0)
        before = compiled_graphs()
        with torch.inference_mode():
            logits[backend] = loaded.model(**inputs).logits.float()
        assert all(c.index is not None for c in runtime.calls) and len(runtime.calls) == loaded.adapter.num_layers
        detach(loaded, runtime)
    assert compiled_graphs() - before <= 1  # every layer of the prefill ran the same compiled kernel
    dense = loaded.model(**inputs).logits.float()
    assert (logits["flex"] - logits["torch"]).abs().max() < 1e-4
    assert (logits["flex"] - dense).abs().max() > 1e-3  # the sparse lists really applied
