"""KV cache methods in a real generate loop (vlsparse.kernels.kv_runtime) on tiny models built in the tests:
the in-place cache changes no number, quantised caches stay within their error and hold fewer bytes, the
eviction budget is met exactly and positions stay right, and the command line uses it all."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.compat import cache_length
from vlsparse.kernels.kv_runtime import attach_kv, detach_kv
from vlsparse.kv.cache import CompressedLayer, InPlaceLayer
from vlsparse.profile.kv import resolve_kv

STEPS = 6


def images(count: int) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(count)]


def generate(loaded, inputs, steps=STEPS):
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                    return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def with_kv(loaded, inputs, method, **params):
    runtime = attach_kv(loaded, resolve_kv(method, params))
    try:
        sequences, logits = generate(loaded, inputs)
        return sequences, logits, runtime
    finally:
        detach_kv(loaded, runtime)


@pytest.fixture(scope="module")
def prompt(llava):
    # 8 images of 16 image tokens each: enough image tokens to evict and a prefix longer than the window
    return llava.prepare(images(8), "what is in the pictures and which one is the brightest of them all")


@pytest.fixture(scope="module")
def dense(llava, prompt):
    return generate(llava, prompt)


def test_in_place_cache_changes_no_number(llava, prompt, dense):
    sequences, logits, runtime = with_kv(llava, prompt, "fp")
    assert runtime.layers and all(isinstance(layer, InPlaceLayer) for layer in runtime.layers)
    assert torch.equal(sequences, dense[0])
    assert torch.allclose(logits, dense[1], atol=1e-5)
    assert llava.model.config._attn_implementation == "sdpa"  # detached: back to stock attention


def test_text_model_in_place_cache(llama):
    inputs = llama.prepare([], "a b c d e f g")
    reference = generate(llama, inputs)
    sequences, logits, _ = with_kv(llama, inputs, "fp")
    assert torch.equal(sequences, reference[0]) and torch.allclose(logits, reference[1], atol=1e-5)


def test_eight_bit_cache_matches_dense_logits_and_two_bits_errs_more(llava, prompt, dense):
    errors = {}
    for bits in (8, 4, 2):
        _, logits, runtime = with_kv(llava, prompt, "uniform", bits=bits, group=16, residual=8)
        assert all(isinstance(layer, CompressedLayer) for layer in runtime.layers)
        errors[bits] = float((logits[1:2] - dense[1][1:2]).abs().max())  # the first decode step's logits
    # prefill logits are computed before compression: identical
    assert errors[8] < 0.01 * float(dense[1].abs().max()) + 1e-4
    assert errors[2] > errors[4] > errors[8]


def test_quantised_cache_holds_fewer_bytes(llava, prompt):
    held = {}
    for method, params in (("fp", {}), ("uniform", {"bits": 4, "group": 16, "residual": 8}),
                           ("uniform", {"bits": 2, "group": 16, "residual": 8})):
        _, _, runtime = with_kv(llava, prompt, method, **params)
        held[(method, params.get("bits"))] = runtime.stats()["kv_held_bytes"]
    assert held[("uniform", 4)] < 0.35 * held[("fp", None)]
    assert held[("uniform", 2)] < held[("uniform", 4)]


def test_eviction_budget_is_met_exactly_and_positions_stay(llava, prompt, dense):
    n = prompt["input_ids"].shape[1]
    image = int((prompt["input_ids"][0] == llava.adapter.image_token_id).sum())
    window = 8
    prefix_image = int((prompt["input_ids"][0, : n - window] == llava.adapter.image_token_id).sum())
    assert prefix_image == image  # the question follows the images
    _, logits, runtime = with_kv(llava, prompt, "snapkv", budget=0.25, window=window)
    want = (n - window - image) + round(0.25 * image) + window
    for layer in runtime.layers:
        assert layer.plan_summary["kept"] == want
        assert all(t.keys.shape[1] == t.length for t in layer.store.tiers)  # every head holds the same count
        assert layer.store.length == want + STEPS - 1  # decoded tokens join the cache
        assert layer.get_seq_length() == n + STEPS - 1  # positions count every token seen
    # nothing evicted: exactly dense, so positions and masks after the prefill are right
    sequences, logits, _ = with_kv(llava, prompt, "snapkv", budget=1.0, window=window)
    assert torch.equal(sequences, dense[0]) and torch.allclose(logits, dense[1], atol=1e-5)


def test_zipvl_holds_important_tokens_at_high_bits(llava, prompt, dense):
    _, logits, runtime = with_kv(llava, prompt, "zipvl", tau=0.9, high_bits=16, low_bits=2, group=16, residual=8,
                                 window=8)
    stats = runtime.stats()
    assert 0 < stats["kv_high_tokens"] < stats["kv_prompt_tokens"]
    _, all_high, _ = with_kv(llava, prompt, "zipvl", tau=1.0, high_bits=16, low_bits=2, group=16, residual=8,
                             window=8)
    assert torch.allclose(all_high, dense[1], atol=1e-4)  # tau 1: every token at full precision


def test_compressed_cache_refuses_another_attention_function(llava, prompt):
    runtime = attach_kv(llava, resolve_kv("uniform"))
    try:
        llava.model.set_attn_implementation("sdpa")
        with pytest.raises(Exception):
            generate(llava, prompt, steps=2)
    finally:
        detach_kv(llava, runtime)
        llava.model.set_attn_implementation("sdpa")


def test_cache_length_reads_our_layers(llava, prompt):
    seen = []
    runtime = attach_kv(llava, resolve_kv("snapkv", {"budget": 0.25, "window": 8}))
    handle = llava.model.register_forward_hook(lambda m, a, kw, out: seen.append(cache_length(out.past_key_values)),
                                               with_kwargs=True)
    try:
        generate(llava, prompt, steps=3)
    finally:
        handle.remove()
        detach_kv(llava, runtime)
    n = prompt["input_ids"].shape[1]
    assert seen == [n, n + 1, n + 2]


def test_cli_run_and_calibrate_with_kv(llava_dir, image_file, tmp_path):
    runner = CliRunner()
    result = runner.invoke(build_app(), ["run", "--model", str(llava_dir), "--kv", "snapkv", "--kv-param", "budget=0.5",
                                 "--json", str(image_file), "what is it"])
    assert result.exit_code == 0, result.output
    kv = json.loads(result.stdout)["kv"]
    assert kv["kv_method"] == "snapkv" and kv["kv_held_bytes"] > 0
    out = tmp_path / "kv.yaml"
    result = runner.invoke(build_app(), ["calibrate", "--model", str(llava_dir), "--kv", "uniform", "--kv-param", "bits=8",
                                 "--samples", "2", "--seq-len", "128", "--guard-tokens", "4", "--out", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    section = json.loads(result.stdout)["kv"]
    assert section["method"] == "uniform" and section["params"]["bits"] == 8
    assert 0 < section["guard"]["kv_ratio"] < 1
    result = runner.invoke(build_app(), ["run", "--model", str(llava_dir), "--profile", str(out), "--json", str(image_file),
                                 "what is it"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kv"]["kv_method"] == "uniform"  # the profile's section is used


@pytest.mark.parametrize("args, words", [(["--kv", "kivi"], "unknown KV cache method"),
                                         (["--kv", "uniform", "--kv-param", "bits=3"], "--kv uniform: bits")])
def test_cli_bad_kv_is_one_line(llava_dir, image_file, args, words):
    result = CliRunner().invoke(build_app(), ["run", "--model", str(llava_dir), *args, str(image_file), "what"])
    assert result.exit_code == 1
    assert words in result.output and "Traceback" not in result.output


def test_decode_perplexity_reads_the_cache(llama):
    from vlsparse.perplexity import decode_perplexity

    tokenizer = llama.processor
    text = " ".join(["a b c d e f g h"] * 12)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:48]
    with torch.inference_mode():
        logits = llama.model(input_ids=ids[None]).logits[0].float()
    full = torch.nn.functional.cross_entropy(logits[31:47], ids[32:48])  # the last 16 tokens' predictions
    plain = decode_perplexity(llama.model, tokenizer, text, seq_len=48, decoded=16, max_windows=1)
    assert plain.tokens == 16 and abs(plain.nll - float(full)) < 1e-4
    runtime = attach_kv(llama, resolve_kv("uniform", {"bits": 2, "group": 8, "residual": 4}))
    try:
        two_bits = decode_perplexity(llama.model, tokenizer, text, seq_len=48, decoded=16, max_windows=1)
    finally:
        detach_kv(llama, runtime)
    assert abs(two_bits.nll - plain.nll) > 1e-4  # the compressed cache is what the decode steps read


def test_calibrate_says_replacing_only_when_the_section_was_there(llava_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "p.yaml"
    common = ["calibrate", "--model", str(llava_dir), "--samples", "1", "--seq-len", "128", "--guard-tokens", "2"]
    first = runner.invoke(build_app(), [*common, "--kv", "uniform", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "Note: replacing" not in first.output
    tokens = runner.invoke(build_app(), [*common, "--tokens", "fastv", "--keep", "0.5", "--token-param", "k=1", "--profile", str(out),
                                         "--out", str(out), "--force"])
    assert tokens.exit_code == 0, tokens.output
    assert "Note: replacing" not in tokens.output  # the profile had no tokens section to replace
    second = runner.invoke(build_app(), [*common, "--kv", "fp", "--profile", str(out), "--out", str(out), "--force"])
    assert second.exit_code == 0, second.output
    assert "replacing the kv section" in second.output


def test_kv_after_token_reduction_sees_the_survivors(llava, prompt):
    from vlsparse.kernels.token_runtime import attach_tokens, detach_tokens
    from vlsparse.profile.tokens import resolve_settings

    tokens = attach_tokens(llava, resolve_settings("fastv", 0.5, llava.adapter.num_layers, {"k": 1}))
    runtime = attach_kv(llava, resolve_kv("snapkv", {"budget": 0.5, "window": 8}), tokens)
    try:
        sequences, logits = generate(llava, prompt)
    finally:
        detach_kv(llava, runtime)
        detach_tokens(llava, tokens)
    n = prompt["input_ids"].shape[1]
    image = int((prompt["input_ids"][0] == llava.adapter.image_token_id).sum())
    first, second = (layer.plan_summary for layer in runtime.layers)
    assert first["prompt"] == n  # layer 0 holds the whole prompt; fastv drops half the image tokens after it
    assert second["prompt"] == n - image + round(0.5 * image)
    # each layer keeps half of the image tokens it holds, and all its text
    assert first["kept"] == n - image + round(0.5 * image)
    assert second["kept"] == (n - image) + round(0.5 * round(0.5 * image))
    assert torch.isfinite(logits).all()


def test_beam_search_through_vlsparse_layers_equals_stock(llava, prompt):
    def beams():
        with torch.inference_mode():
            return llava.model.generate(**prompt, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)

    reference = beams()
    for method in ("fp", "uniform"):  # a beam batch is held in place: uniform falls back to fp for it
        runtime = attach_kv(llava, resolve_kv(method))
        try:
            assert torch.equal(beams(), reference), method
        finally:
            detach_kv(llava, runtime)


def test_in_place_layer_crop_and_batch_edits():
    from vlsparse.kv.cache import InPlaceLayer

    layer = InPlaceLayer(chunk=4)
    keys, values = torch.arange(24.0).view(2, 1, 6, 2), -torch.arange(24.0).view(2, 1, 6, 2)
    layer.update(keys, values)
    layer.crop(-2)
    assert layer.get_seq_length() == 4 and torch.equal(layer.keys, keys[:, :, :4])
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, keys[[1, 0], :, :4]) and torch.equal(layer.values, values[[1, 0], :, :4])
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, keys[:1, :, :4])
    layer.update(keys[:1, :, :1], values[:1, :, :1])  # appending after the edits still works in place
    assert torch.equal(layer.keys, torch.cat([keys[:1, :, :4], keys[:1, :, :1]], 2))
