"""Memory estimates (``vlsparse.memory``) against hand-computed numbers, and the fit check."""

from __future__ import annotations

import pytest

from vlsparse import memory
from vlsparse.errors import InputError, ModelLoadError
from vlsparse.bench.attention import bench_bytes

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
            "vocab_size": 32000, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
            "tie_word_embeddings": False}
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "num_channels": 3}


def test_parameter_count_llama_7b_matches_the_published_count():
    # 2 x 32000 x 4096 embeddings + 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 4096 = 6,738,415,616
    assert memory.parameter_count(LLAMA_7B) == pytest.approx(6_738_415_616, rel=0.01)


def test_parameter_count_llava_1_5_7b_adds_clip_tower_and_projector():
    config = {"model_type": "llava", "text_config": {**LLAMA_7B, "vocab_size": 32064}, "vision_config": CLIP_L_336}
    assert memory.parameter_count(config) == pytest.approx(7_063_427_072, rel=0.01)


def test_parameter_count_qwen_flat_config_reads_the_top_level():
    flat = {**LLAMA_7B, "model_type": "qwen2_vl"}
    assert memory.text_dims(flat).layers == 32
    assert memory.parameter_count(flat) == memory.parameter_count(LLAMA_7B)


@pytest.mark.parametrize("key", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_parameter_count_matches_each_tiny_checkpoint(vlm_dirs, key):
    from vlsparse.models.source import check_weight_files, resolved_config

    folder = vlm_dirs[key]
    stored = sum(t.numel for t in check_weight_files(folder).values())
    assert memory.parameter_count(resolved_config(folder)) == pytest.approx(stored, rel=0.1)


def test_forward_bytes_is_the_documented_per_token_sum():
    dims = memory.TextDims(hidden=64, layers=2, intermediate=128, vocab=100, heads=4, kv_heads=2, head_dim=16)
    per_token = 4 * 64 + 2 * (4 + 2) * 16 + 5 * 128  # 1088
    assert memory.forward_bytes(dims, 1000, logits_tokens=1) == 4 * (1000 * per_token + 2 * 100)
    assert memory.forward_bytes(dims, 1000, rows=3, logits_tokens=0, dtype_bytes=2) == 2 * 3 * 1000 * per_token


def test_kv_cache_bytes_of_llama_7b_is_half_a_mebibyte_per_fp16_token():
    dims = memory.text_dims(LLAMA_7B)
    assert memory.kv_cache_bytes(dims, 4096, dtype_bytes=2) == 2 * 2**30


def test_streamed_prune_bytes_grows_with_samples_times_tokens():
    dims = memory.text_dims(LLAMA_7B)
    small = memory.streamed_prune_bytes(dims, samples=32, tokens=256, batch=8)
    large = memory.streamed_prune_bytes(dims, samples=32, tokens=100_000_000, batch=8)
    assert small < 4 * 2**30  # a 7B model's stem and one block (fp32) plus small activations
    assert large > 1000 * 2**30


def test_bench_bytes_fits_the_default_lengths_and_not_a_hundred_million():
    patterns, densities = ("vertical_slash", "block_sparse", "a_shape"), (0.05, 0.1, 0.25)
    assert bench_bytes(32768, 8, 8, 64, patterns, densities) < 3 * 2**30
    # q, k, v and two outputs alone: 4 bytes x 64 x 1e8 x (4 x 8 + 2 x 8) = 1.2 TB
    assert bench_bytes(100_000_000, 8, 8, 64, patterns, densities) > 4 * 64 * 100_000_000 * 48


def test_meminfo_available_reads_kibibytes():
    text = "MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:   23906276 kB\n"
    assert memory.meminfo_available(text) == 23906276 * 1024
    assert memory.meminfo_available("MemTotal: 1 kB\n") is None


def test_cgroup_available_is_limit_minus_usage(tmp_path):
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert memory.cgroup_available(tmp_path) == 7 * 2**30
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.cgroup_available(tmp_path) is None
    assert memory.cgroup_available(tmp_path / "absent") is None


def test_available_bytes_on_this_machine_is_positive():
    found = memory.available_bytes()
    assert found is None or found > 0


def test_check_fits_names_needed_and_available_memory(monkeypatch):
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)
    with pytest.raises(ModelLoadError) as caught:
        memory.check_fits(3 * 2**30, "loading x", "use a smaller model", error=ModelLoadError)
    assert "needs about 3.0 GiB of memory, 1.0 GiB available" in caught.value.message
    assert caught.value.hint.startswith("use a smaller model")
    memory.check_fits(2**29, "loading x", "hint")  # fits: no error


def test_check_fits_is_skipped_when_asked_or_when_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    memory.check_fits(2**40, "x", "y")
    monkeypatch.delenv(memory.SKIP_ENV)
    with pytest.raises(InputError):
        memory.check_fits(2**40, "x", "y")
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    memory.check_fits(2**40, "x", "y")
