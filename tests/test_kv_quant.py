"""KV quantisation (vlsparse.kv.quant) and the stores built on it (vlsparse.kv.store): worked numbers,
round trips within the stated bound, and block-wise attention against plain softmax attention."""

from __future__ import annotations

import math

import pytest
import torch

from vlsparse.kv.quant import dequantize, error_bound, held_bytes, pack, quantize, unpack
from vlsparse.kv.store import CompressedStore, GrowingBuffer, Tier, make_tier


def test_worked_example_two_bits_per_channel():
    # one head, 4 tokens, 4 channels; channel c holds c * [0, 1, 2, 3]: min 0, scale c, codes 0..3
    x = (torch.arange(4.0)[:, None] * torch.arange(4.0)[None, :]).unsqueeze(0)
    q = quantize(x, bits=2, axis="channel", group=4)
    assert q.codes.shape == (1, 4, 1)  # four 2-bit codes in one byte per token
    codes = unpack(q.codes, 2, 4)
    assert codes[0, :, 1].tolist() == [0, 1, 2, 3]  # channel 1: 0, 1, 2, 3 exactly
    assert q.scale[0, 0, 0].tolist() == pytest.approx([1e-8, 1, 2, 3])  # channel 0 is constant: the clamp
    assert torch.allclose(dequantize(q), x)


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (3, 5, 16), generator=g, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.shape[-1] == 16 * bits // 8
        assert torch.equal(unpack(packed, bits, 16), codes.float())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_round_trip_within_half_a_step(bits, axis):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 37, 32, generator=g) * 3 + torch.linspace(-5, 5, 32)  # 37: a ragged last group
    q = quantize(x, bits, axis, group=16 if axis == "token" else 8)
    err = (dequantize(q) - x).abs()
    assert err.shape == x.shape
    assert bool((err <= error_bound(q) * (1 + 1e-4) + 1e-6).all())
    # the bound is the real step: the largest error is more than a quarter step (random data fills the bins)
    assert float(err.max()) > 0.25 * float(error_bound(q).max())
    # fewer bits, larger errors
    if bits < 8:
        finer = quantize(x, 8, axis, group=16 if axis == "token" else 8)
        assert float(err.mean()) > 4 * float((dequantize(finer) - x).abs().mean())


def test_dequantize_slices_match_the_whole():
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(1))
    q = quantize(x, 4, "channel", 16)
    whole = dequantize(q)
    assert torch.equal(dequantize(q, 16, 48), whole[:, 16:48])
    assert torch.equal(dequantize(q, 64), whole[:, 64:])
    with pytest.raises(ValueError):
        dequantize(q, 5, 20)  # not a group boundary


def test_quantised_bytes_are_fewer_measured_from_storage():
    x = torch.randn(2, 1024, 64)
    full = held_bytes([x, x.clone()])
    for bits in (8, 4, 2):
        tier = make_tier(x, x.clone(), bits, 32, 32)
        # codes at bits/32 of fp32, plus an fp32 scale and zero per group of 32 values (2/32)
        assert held_bytes(tier.tensors()) <= (bits / 32 + 2 / 32) * full * 1.001


def test_growing_buffer_writes_in_place_and_grows_by_chunks():
    buf = GrowingBuffer(chunk=8)
    first = torch.randn(1, 2, 5, 4)
    buf.append(first)
    ptr = buf.data.data_ptr()
    steps = [torch.randn(1, 2, 1, 4) for _ in range(8)]
    for step in steps:
        view = buf.append(step)
    assert buf.data.data_ptr() == ptr  # 5 + 8 tokens fit the first allocation: nothing moved
    assert torch.equal(view, torch.cat([first, *steps], 2))
    buf.append(torch.randn(1, 2, 3, 4))  # past the capacity: one reallocation, contents kept
    assert buf.data.data_ptr() != ptr and buf.length == 16
    assert torch.equal(buf.view()[:, :, :13], torch.cat([first, *steps], 2))


def reference_attention(q, k, v, scale, causal_tail=0):
    """Plain softmax attention: q [Hq, m, D], k/v [Hkv, n, D]; the last m keys causal for the m queries."""
    heads_q, m, _ = q.shape
    group = heads_q // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    logits = q @ k.transpose(1, 2) * scale
    if causal_tail:
        n = k.shape[1]
        rows = torch.arange(m)[:, None] + n - m
        logits = logits.masked_fill(torch.arange(n)[None, :] > rows, -math.inf)
    return torch.softmax(logits, -1) @ v


@pytest.mark.parametrize("m", [1, 3])
def test_store_attention_equals_softmax_attention(m):
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 2300, 16, generator=g), torch.randn(2, 2300, 16, generator=g)
    q = torch.randn(6, m, 16, generator=g)
    order = torch.randperm(2300 - 40, generator=g)  # tiers may hold tokens in any order
    store = CompressedStore(low_bits=16, block=512)  # tiers read in several blocks
    store.tiers = [Tier(k[:, order[:1000]], v[:, order[:1000]]), Tier(k[:, order[1000:]], v[:, order[1000:]])]
    store.recent_keys.append(k[:, -40:])
    store.recent_values.append(v[:, -40:])
    out = store.attend(q, 0.25)
    assert torch.allclose(out, reference_attention(q, k, v, 0.25, causal_tail=m), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_store_attention_reads_quantised_tiers_block_by_block(bits):
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2200, 16, generator=g), torch.randn(2, 2200, 16, generator=g)
    q = torch.randn(4, 1, 16, generator=g)
    tier = make_tier(k[:, :2176], v[:, :2176], bits, 32, 8)
    store = CompressedStore(low_bits=bits, value_group=8, block=512, tiers=[tier])
    store.recent_keys.append(k[:, 2176:])
    store.recent_values.append(v[:, 2176:])
    kq = torch.cat([dequantize(tier.keys), k[:, 2176:]], 1)
    vq = torch.cat([dequantize(tier.values), v[:, 2176:]], 1)
    assert torch.allclose(store.attend(q, 0.25), reference_attention(q, kq, vq, 0.25), atol=1e-5)


def test_decoded_tokens_are_quantised_a_group_at_a_time():
    g = torch.Generator().manual_seed(4)
    store = CompressedStore(low_bits=8, key_group=8, value_group=8, residual=4)
    prompt_k, prompt_v = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    store.recent_keys.append(prompt_k)  # the prompt's full-precision tail
    store.recent_values.append(prompt_v)
    ks, vs = [prompt_k], [prompt_v]
    for step in range(11):
        k, v = torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 16, generator=g)
        store.append(k, v)
        ks.append(k)
        vs.append(v)
        if step == 10:  # 11 decoded >= residual 4 + group 8 only after the 12th; none yet
            assert store.decoded is None
    store.append(*(torch.randn(2, 1, 16, generator=g) for _ in range(2)))
    assert store.decoded is not None and store.decoded.length == 8  # one group of decoded tokens
    assert store.tiers[0].length == 6  # the prompt's tail went first, into its own tier
    assert store.length == 6 + 12 and store.recent_keys.length == 4
