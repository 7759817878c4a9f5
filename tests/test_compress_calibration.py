"""Calibration data: demo pairs, JSONL of images + prompts, text windows; bad files are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from vlsparse.compress.api import default_model
from vlsparse.compress.calibration import build_calibration, take_samples
from vlsparse.errors import InputError
from vlsparse.models import load


def test_jsonl_pairs_with_answer_and_labels(qwen2_vl_dir, image_file, tmp_path):
    loaded = load(str(qwen2_vl_dir))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps(r) for r in [
        {"image": str(image_file), "prompt": "what color is this ?", "answer": "red"},
        {"images": [str(image_file), str(image_file)], "prompt": "how many circle ?"},
    ]))
    cs = build_calibration(loaded.adapter, loaded.processor, calib, samples=5, seq_len=64, seed=0)
    assert cs.samples == 2 and cs.source.startswith("jsonl:")
    first = cs.batches[0]
    image_id = loaded.adapter.image_token_id
    assert (first["labels"][first["input_ids"] == image_id] == -100).all()
    assert first["input_ids"].shape == first["attention_mask"].shape == first["labels"].shape
    # the answer was appended after the prompt
    red = loaded.processor.tokenizer.convert_tokens_to_ids("red")
    assert int(first["input_ids"][0, -1]) == red
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**first).loss)


@pytest.mark.parametrize("content,match", [
    ("not json", "line 1 is not valid JSON"),
    ('{"prompt": "x"}\n[1]', "not a JSON object"),
    ('{"image": "missing.png", "prompt": "x"}', "not found"),
    ('{"text": 3}', "none of images/prompt/text/text_file"),
    ('{"image": "a.png", "prompt": "x"}\n{"image": "b.png"}', "line 2 has images but no `prompt`"),
])
def test_bad_jsonl_is_one_input_error(qwen2_vl_dir, tmp_path, content, match):
    loaded = load(str(qwen2_vl_dir))
    calib = tmp_path / "bad.jsonl"
    calib.write_text(content)
    with pytest.raises(InputError, match=match):
        build_calibration(loaded.adapter, loaded.processor, calib, samples=4, seq_len=64, seed=0)


def test_text_windows_from_calibration_split_and_take_samples(llama_dir):
    loaded = load(str(llama_dir))
    cs = build_calibration(loaded.adapter, loaded.processor, None, samples=10, seq_len=12, seed=3)
    assert [b["input_ids"].shape for b in cs.batches] == [(8, 12), (2, 12)]
    again = build_calibration(loaded.adapter, loaded.processor, None, samples=10, seq_len=12, seed=3)
    assert torch.equal(cs.batches[0]["input_ids"], again.batches[0]["input_ids"])
    taken = take_samples(cs.batches, 9)
    assert [b["input_ids"].shape for b in taken] == [(1, 12)] * 9
    assert torch.equal(taken[8]["labels"][0], cs.batches[1]["labels"][0])


def test_default_model_is_demo_without_profiles(tmp_path):
    model, why = default_model(tmp_path)
    assert model == "demo" and "no usable profile" in why


def test_default_model_follows_newest_profile(llama_dir, tmp_path):
    import os

    from vlsparse.profile import Profile, save_profile

    fingerprint = load(str(llama_dir)).adapter.fingerprint()
    (tmp_path / "profiles").mkdir()
    save_profile(Profile(model=fingerprint), tmp_path / "profiles" / "old.yaml")
    os.utime(tmp_path / "profiles" / "old.yaml", (1, 1))
    fingerprint.name = str(llama_dir)
    save_profile(Profile(model=fingerprint), tmp_path / "profiles" / "new.yaml")
    model, why = default_model(tmp_path)
    assert model == str(llama_dir) and "new.yaml" in why


def test_a_demo_calibration_name_is_refused_with_a_pointer(qwen2_vl_dir):
    loaded = load(str(qwen2_vl_dir))
    with pytest.raises(InputError, match="for profile and calibrate") as info:
        build_calibration(loaded.adapter, loaded.processor, "demo:multi", samples=4, seq_len=64, seed=0)
    assert "\n" not in info.value.one_line()
