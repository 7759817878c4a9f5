"""The runtime plugged into transformers' attention registry, on tiny models."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlsparse.errors import ProfileError
from vlsparse.kernels.runtime import attach, detach
from vlsparse.models import load
from vlsparse.profile import AttentionProfile, HeadProfile, Profile


def uniform_profile(adapter, head: HeadProfile) -> Profile:
    layers = [[head for _ in range(adapter.num_heads)] for _ in range(adapter.num_layers)]
    return Profile(model=adapter.fingerprint(), attention=AttentionProfile(layers=layers))


def _inputs(loaded, n_images=6):
    colours = ["red", "blue", "green", "white", "black", "yellow"]
    images = [Image.new("RGB", (16, 16), colours[i % len(colours)]) for i in range(n_images)]
    return loaded.prepare(images, "what color is the circle ?")


def _logits(loaded, inputs):
    with torch.inference_mode():
        return loaded.model(**inputs).logits.float()


@pytest.mark.parametrize("key", ["llava", "qwen2_vl", "qwen3_vl", "internvl", "gemma3", "paligemma", "idefics3",
                                 "smolvlm", "mllama", "llava_next", "llava_onevision"])
def test_all_covering_sparse_lists_reproduce_sdpa_logits(vlm_dirs, key):
    loaded = load(vlm_dirs[key])
    inputs = _inputs(loaded)
    dense = _logits(loaded, inputs)
    everything = HeadProfile("block_sparse", {"blocks": 1.0})  # every causal block: exact attention
    runtime = attach(loaded, uniform_profile(loaded.adapter, everything), min_len=0, dense_above=1.0)
    sparse = _logits(loaded, inputs)
    prompt_layers = [layer for layer in loaded.adapter.lm_layers() if loaded.adapter.self_attention(layer)]
    assert len(runtime.calls) == len(prompt_layers) == loaded.adapter.num_layers - (2 if key == "mllama" else 0)
    assert all(c.density == pytest.approx(1.0) for c in runtime.calls)
    assert (sparse - dense).abs().max() < 1e-4


def test_dense_profile_equals_sdpa(llava_dir):
    loaded = load(llava_dir)
    inputs = _inputs(loaded)
    dense = _logits(loaded, inputs)
    attach(loaded, uniform_profile(loaded.adapter, HeadProfile("dense")), min_len=0)
    assert (_logits(loaded, inputs) - dense).abs().max() < 1e-4


def test_a_sparse_profile_changes_attention_and_reports_density(llava_dir):
    loaded = load(llava_dir)
    inputs = _inputs(loaded, n_images=24)  # ~400 tokens: seven query blocks of 64
    dense = _logits(loaded, inputs)
    head = HeadProfile("a_shape", {"sink": 0.01, "local": 0.02}, density=0.1)
    runtime = attach(loaded, uniform_profile(loaded.adapter, head), min_len=0)
    sparse = _logits(loaded, inputs)
    assert 0 < runtime.mean_density() < 1
    assert (sparse - dense).abs().max() > 1e-3  # the runtime really changed the computation
    detach(loaded, runtime)
    assert (_logits(loaded, inputs) - dense).abs().max() < 1e-5


def test_detach_removes_the_hook_and_attaching_again_starts_clean(llava_dir):
    loaded = load(llava_dir)
    inputs = _inputs(loaded, n_images=24)
    head = HeadProfile("a_shape", {"sink": 0.01, "local": 0.02}, density=0.1)
    hooks_before = len(loaded.model._forward_pre_hooks)
    for _ in range(3):
        runtime = attach(loaded, uniform_profile(loaded.adapter, head), min_len=0)
        _logits(loaded, inputs)
        assert len(runtime.calls) == loaded.adapter.num_layers  # one call per layer: one hook, not three
        detach(loaded, runtime)
    assert len(loaded.model._forward_pre_hooks) == hooks_before


def test_layers_recorded_as_near_dense_run_sdpa(llava_dir):
    loaded = load(llava_dir)
    inputs = _inputs(loaded, n_images=24)
    dense = _logits(loaded, inputs)
    near_dense = HeadProfile("a_shape", {"sink": 0.01, "local": 0.02}, density=0.8)
    runtime = attach(loaded, uniform_profile(loaded.adapter, near_dense), min_len=0, dense_above=0.5)
    assert (_logits(loaded, inputs) - dense).abs().max() < 1e-5  # SDPA, not the thin A-shape
    assert runtime.calls and all(c.index is None for c in runtime.calls)
    runtime.dense_above = 0.9
    assert (_logits(loaded, inputs) - dense).abs().max() > 1e-3  # below the cut: the pattern runs


def test_runtime_records_image_spans_and_decode_stays_dense(qwen2_vl_dir):
    loaded = load(qwen2_vl_dir)
    inputs = _inputs(loaded, n_images=2)
    runtime = attach(loaded, uniform_profile(loaded.adapter, HeadProfile("block_sparse", {"blocks": 1.0})),
                     min_len=0, dense_above=1.0)
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    spans = loaded.adapter.image_spans(inputs)
    assert runtime.spans == [(s.start, s.end) for s in spans]
    assert len(runtime.calls) == loaded.adapter.num_layers  # prefill only; the decode steps were dense


def test_profile_for_another_model_is_refused(llava_dir, llama_dir):
    llava, llama = load(llava_dir), load(llama_dir)
    with pytest.raises(ProfileError, match="made for"):
        attach(llama, uniform_profile(llava.adapter, HeadProfile("dense")))


def test_calls_describe_the_latest_prompt_for_text_models_too(llama_dir):
    loaded = load(llama_dir)
    head = HeadProfile("a_shape", {"sink": 0.01, "local": 0.02}, density=0.1)
    runtime = attach(loaded, uniform_profile(loaded.adapter, head), min_len=0)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, 200))
    for _ in range(2):
        with torch.inference_mode():
            loaded.model(input_ids=ids)
    assert len(runtime.calls) == loaded.adapter.num_layers  # the first prompt's index lists are released
