"""The core runtime on tiny LLaVA and Qwen2-VL models: smaller FFN matmuls, really dropped tokens."""

from __future__ import annotations

import pytest
import torch

from vlsparse.compat import cache_layer_keys, cache_length, cache_of_call, cache_of_output
from vlsparse.kernels.core_runtime import CoreMLP, attach_core, detach_core
from vlsparse.kernels.core_select import mlp_activations
from vlsparse.models import load
from vlsparse.profile.core import CoreSettings
from prompts import generate_with_logits, textured_inputs



def _inputs(loaded, n_images=4):
    return textured_inputs(loaded, n_images, second_pixel=False)


def _generate(loaded, inputs, n=4):
    return generate_with_logits(loaded, inputs, n)


@pytest.mark.parametrize("key", ["llava", "qwen2_vl", "gemma3", "paligemma"])
def test_core_neurons_with_beta_one_decode_exactly_like_dense(vlm_dirs, key):
    loaded = load(vlm_dirs[key])
    inputs = _inputs(loaded)
    dense_ids, dense_logits = _generate(loaded, inputs)
    runtime = attach_core(loaded, CoreSettings(beta=1.0, neuron_layers=(0, 1)), tokens=False)
    ids, logits = _generate(loaded, inputs)
    assert torch.equal(ids, dense_ids)
    assert (logits - dense_logits).abs().max() < 1e-5
    st = runtime.stats()
    assert st["core_neurons_kept"] == st["core_neurons_total"] == 2 * 128


def test_core_neurons_decode_with_a_smaller_matmul(llava_dir):
    loaded = load(llava_dir)
    inputs = _inputs(loaded)
    keys = set(loaded.model.state_dict())
    runtime = attach_core(loaded, CoreSettings(beta=0.4, neuron_layers=(1,)), tokens=False)
    assert set(loaded.model.state_dict()) == keys  # the swap shares the projections under their names
    _generate(loaded, inputs, n=2)
    mlp = loaded.adapter.lm_layers()[1].mlp
    assert isinstance(mlp, CoreMLP) and not isinstance(loaded.adapter.lm_layers()[0].mlp, CoreMLP)
    assert mlp._gate_up.shape == (2 * 52, 64) and mlp._down.shape == (64, 52)  # ceil(0.4 * 128) = 52
    assert runtime.stats()["core_neurons_kept"] == 52
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        _, act = mlp_activations(mlp, x)
        masked = torch.zeros_like(act)
        masked[..., mlp.core] = act[..., mlp.core]
        assert torch.allclose(mlp(x), mlp.down_proj(masked), atol=1e-5)  # decode = FFN restricted to K
    detach_core(loaded, runtime)
    assert not isinstance(loaded.adapter.lm_layers()[1].mlp, CoreMLP)


def _oracle_hooks(loaded, after: int, keep: torch.Tensor, prompt_len: int):
    """Dense model whose layers after ``after`` cannot see the dropped prompt tokens (additive 4-D masks)."""
    dropped = torch.ones(prompt_len, dtype=torch.bool)
    dropped[keep] = False

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        past = cache_of_call(kwargs)
        k = cache_length(past, 0) if past is not None else q  # layer 0 already holds this step's token
        q_pos = torch.arange(k - q, k)[:, None]
        k_pos = torch.arange(k)[None, :]
        blocked = torch.nn.functional.pad(dropped, (0, k - prompt_len))[None, :] & (k_pos != q_pos)
        allowed = (k_pos <= q_pos) & ~blocked
        mask = torch.zeros(1, 1, q, k, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        kwargs["attention_mask"] = mask
        return args, kwargs

    return [layer.register_forward_pre_hook(hook, with_kwargs=True)
            for layer in loaded.adapter.lm_layers()[after + 1:]]


def _capture_positions(loaded, layer_index: int, store: list):
    layer = loaded.adapter.lm_layers()[layer_index]
    return layer.register_forward_pre_hook(
        lambda m, args, kwargs: store.append([t.clone() for t in kwargs["position_embeddings"]]), with_kwargs=True)


@pytest.mark.parametrize("key", ["llava", "qwen2_vl", "qwen3_vl", "internvl", "idefics3", "llava_next"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dropped_tokens_survivors_keep_positions_and_shapes(vlm_dirs, key, attn):
    loaded = load(vlm_dirs[key], attn_implementation=attn)
    inputs = _inputs(loaded)
    n = inputs["input_ids"].shape[1]
    spans = loaded.adapter.image_spans(inputs)
    n_image = sum(s.length for s in spans)
    dense_pe: list = []
    handle = _capture_positions(loaded, 1, dense_pe)
    with torch.inference_mode():
        loaded.model(**inputs, use_cache=False)
    handle.remove()

    settings = CoreSettings(token_layer=0, min_keep=0.25, max_keep=0.5, score="text")
    runtime = attach_core(loaded, settings, neurons=False)
    sparse_pe: list = []
    handle = _capture_positions(loaded, 1, sparse_pe)
    with torch.inference_mode():
        out = loaded.model(**inputs, use_cache=True)
    handle.remove()
    keep = runtime.keep.clone()
    st = runtime.stats()
    assert st["image_tokens_total"] == n_image
    assert n_image // 4 <= st["image_tokens_kept"] <= n_image // 2 < n_image  # the guards hold
    assert len(keep) == n - n_image + st["image_tokens_kept"]
    image = torch.zeros(n, dtype=torch.bool)
    for s in spans:
        image[s.start:s.end] = True
    assert int(image[keep].sum()) == st["image_tokens_kept"]
    assert set((~image).nonzero().flatten().tolist()) <= set(keep.tolist())  # every text token survives
    # survivors reach layer 1 with their original rotary positions (multimodal RoPE for Qwen2-VL)
    for full, short in zip(dense_pe[0], sparse_pe[0]):
        assert short.shape[-2] == len(keep)
        assert torch.equal(short, full.index_select(-2, keep))
    # shorter outputs, and a shorter KV cache after the token layer
    assert out.logits.shape[:2] == (1, len(keep))
    assert cache_layer_keys(cache_of_output(out), 0).shape[-2] == n
    assert cache_layer_keys(cache_of_output(out), 1).shape[-2] == len(keep)
    ids, logits = _generate(loaded, inputs, n=4)
    detach_core(loaded, runtime)

    # every survivor's output, and decoding, match a dense model whose later layers cannot see the dropped tokens
    handles = _oracle_hooks(loaded, 0, keep, n)
    with torch.inference_mode():
        oracle = loaded.model(**inputs, use_cache=False).logits
    oracle_ids, oracle_logits = _generate(loaded, inputs, n=4)
    for h in handles:
        h.remove()
    assert (out.logits - oracle.index_select(1, keep)).abs().max() < 1e-4
    assert torch.equal(ids, oracle_ids)
    assert (logits - oracle_logits).abs().max() < 1e-4


def test_everything_together_and_detach_restores_dense(llava_dir):
    loaded = load(llava_dir)
    inputs = _inputs(loaded, n_images=6)
    dense_ids, dense_logits = _generate(loaded, inputs)
    settings = CoreSettings(beta=0.4, neuron_layers=(0, 1), token_layer=0, min_keep=0.1, max_keep=0.5)
    runtime = attach_core(loaded, settings)
    ids, _ = _generate(loaded, inputs)
    st = runtime.stats()
    assert ids.shape == dense_ids.shape
    assert st["image_tokens_kept"] < st["image_tokens_total"] == 96
    assert st["core_neurons_kept"] == 2 * 52 and "image tokens" in runtime.describe()
    detach_core(loaded, runtime)
    ids, logits = _generate(loaded, inputs)
    assert torch.equal(ids, dense_ids) and (logits - dense_logits).abs().max() < 1e-6
