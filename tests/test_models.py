"""Model loading and adapters on tiny random models of every family (no network)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlsparse.errors import ModelLoadError, UnsupportedModelError
from vlsparse.models import load
from vlsparse.models.adapter import _token_runs, family_of


def _image(w=40, h=24, colour="red"):
    return Image.new("RGB", (w, h), colour)


@pytest.mark.parametrize("key,family", [("llava", "llava"), ("llava-full", "llava"), ("qwen2_vl", "qwen2_vl"),
                                        ("qwen2_5_vl", "qwen2_5_vl")])
def test_load_vlm_reports_family_and_head_counts(vlm_dirs, key, family):
    loaded = load(vlm_dirs[key])
    a = loaded.adapter
    assert a.family == family
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (2, 4, 2, 16)
    assert len(a.lm_layers()) == 2 and len(a.vision_layers()) == 2
    assert a.projector() is not None
    # the attention modules the adapter names really are the ones with the q/k projections
    attn = a.attention(a.lm_layers()[0])
    assert attn.q_proj.out_features == 4 * 16 and attn.k_proj.out_features == 2 * 16


def test_load_causal_lm_has_no_vision(llama_dir):
    loaded = load(llama_dir)
    assert loaded.adapter.family == "causal_lm"
    assert loaded.adapter.vision_layers() == [] and loaded.adapter.projector() is None
    assert loaded.adapter.image_spans(loaded.prepare([], "what is this ?")) == []


@pytest.mark.parametrize("key", ["llava", "llava-full"])
def test_llava_image_spans_match_processor_tokens(vlm_dirs, key):
    loaded = load(vlm_dirs[key])
    inputs = loaded.prepare([_image(), _image(colour="blue")], "what color is the circle ?")
    ids = inputs["input_ids"][0]
    spans = loaded.adapter.image_spans(inputs)
    image_id = loaded.adapter.image_token_id
    assert len(spans) == 2
    covered = torch.zeros_like(ids, dtype=torch.bool)
    for span in spans:
        covered[span.start:span.end] = True
        assert (span.rows, span.cols) == (4, 4)  # image 16, patch 4
        assert span.grid_start == span.start + (1 if key == "llava-full" else 0)
        assert span.end - span.grid_start == 16
    assert torch.equal(covered, ids == image_id)


@pytest.mark.parametrize("key", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_image_spans_follow_image_grid_thw(vlm_dirs, key):
    loaded = load(vlm_dirs[key])
    inputs = loaded.prepare([_image(40, 24), _image(24, 48)], "what color is this ?")
    spans = loaded.adapter.image_spans(inputs)
    grid = inputs["image_grid_thw"]
    assert len(spans) == 2
    for span, (t, h, w) in zip(spans, grid.tolist()):
        assert (span.rows, span.cols) == (h // 2, w // 2)
        assert span.length == t * span.rows * span.cols
    # differently shaped images give differently shaped grids (nothing hard-coded)
    assert (spans[0].rows, spans[0].cols) != (spans[1].rows, spans[1].cols)
    ids = inputs["input_ids"][0]
    assert int((ids == loaded.adapter.image_token_id).sum()) == sum(s.length for s in spans)


def test_token_runs_finds_maximal_runs():
    ids = torch.tensor([5, 9, 9, 9, 1, 9, 2, 9, 9])
    assert _token_runs(ids, 9) == [(1, 4), (5, 6), (7, 9)]


def test_fingerprint_is_stable_across_save_and_reload(llava_dir, tmp_path):
    first = load(llava_dir)
    first.model.save_pretrained(tmp_path / "copy")
    first.processor.save_pretrained(tmp_path / "copy")
    second = load(tmp_path / "copy")
    assert first.adapter.fingerprint().config_sha256 == second.adapter.fingerprint().config_sha256


def test_family_of_rejects_unknown_architectures():
    assert family_of({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}) == "llava"
    assert family_of({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "causal_lm"
    with pytest.raises(UnsupportedModelError, match="BertModel"):
        family_of({"model_type": "bert", "architectures": ["BertModel"]})


def test_missing_folder_and_missing_config_are_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path / "empty")


def test_pickle_only_checkpoint_needs_allow_pickle(llama_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    loaded = load(llama_dir)
    (folder / "config.json").write_text(json.dumps(loaded.model.config.to_dict()))
    torch.save(loaded.model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle") as info:
        load(folder)
    assert "--allow-pickle" in info.value.one_line(flags=True)  # the flag, as the CLI prints it
    assert "pickle" in info.value.message
