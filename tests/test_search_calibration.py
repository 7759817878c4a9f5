"""Calibration inputs: demo scenes, text windows, JSONL; every user error is one line."""

from __future__ import annotations

import json

import pytest

from vlsparse.calibration import grid_shape
from vlsparse.errors import InputError
from vlsparse.search.calibration import calibration_from, prepare_sample

TEXT = "what is this color shape circle square red blue green the a of in image picture " * 40


def test_grid_shape_is_nearly_square_and_tight():
    assert grid_shape(28) == (4, 7) and grid_shape(112) == (8, 14) and grid_shape(30) == (5, 6)
    rows, cols = grid_shape(113)
    assert rows * cols >= 113 and rows * cols - 113 < rows and cols <= 4 * rows


def test_text_windows_are_seeded_and_start_with_bos(llama, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    a = calibration_from(llama, path, samples=3, seq_len=128, seed=0)
    b = calibration_from(llama, path, samples=3, seq_len=128, seed=0)
    c = calibration_from(llama, path, samples=3, seq_len=128, seed=1)
    assert [s.name for s in a.samples] == [s.name for s in b.samples] != [s.name for s in c.samples]
    bos = llama.processor.bos_token_id
    for sample in a.samples:
        inputs = prepare_sample(llama, sample)
        assert inputs["input_ids"].shape == (1, 128) and int(inputs["input_ids"][0, 0]) == bos
    assert a.source == "text:corpus.txt"
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    assert calibration_from(llama, folder, samples=1, seq_len=128).source == "text:texts"


def test_demo_scenes_reach_the_target_length(llava):
    calibration = calibration_from(llava, None, samples=2, seq_len=300, seed=0)
    assert calibration.source == "demo:multi+grid"
    lengths = [prepare_sample(llava, s)["input_ids"].shape[1] for s in calibration.samples]
    assert all(300 <= n < 300 + 40 for n in lengths), lengths


def test_one_demo_task_is_a_calibration_source(llava, llama):
    grid = calibration_from(llava, "demo:grid", samples=3, seq_len=300, seed=0)
    assert grid.source == "demo:grid" and [s.name.split("-")[1] for s in grid.samples] == ["grid"] * 3
    both = calibration_from(llava, "demo:multi+grid", samples=2, seq_len=300, seed=0)
    default = calibration_from(llava, None, samples=2, seq_len=300, seed=0)
    assert [s.name for s in both.samples] == [s.name for s in default.samples]
    with pytest.raises(InputError, match="unknown demo calibration 'demo:vqa'"):
        calibration_from(llava, "demo:vqa", samples=1, seq_len=300)
    with pytest.raises(InputError, match="needs a vision-language model"):
        calibration_from(llama, "demo:multi", samples=1, seq_len=128)


def test_jsonl_lines_and_their_errors(llava, llama, tmp_path, image_file):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join([json.dumps({"images": [str(image_file)], "prompt": "what is this?"}),
                               "", json.dumps({"text": TEXT})]))
    calibration = calibration_from(llava, good, samples=5, seq_len=128)
    assert len(calibration.samples) == 2 and calibration.samples[1].input_ids.numel() == 128
    cases = {
        "{not json": "line 1 is not valid JSON",
        json.dumps([1, 2]): "not a JSON object",
        json.dumps({"images": [str(image_file)]}): "has images but no `prompt`",
        json.dumps({"nothing": 1}): "none of images/prompt/text/text_file",
        json.dumps({"text_file": "missing.txt"}): "missing.txt not found",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(InputError, match=message) as info:
            calibration_from(llava, bad, samples=1, seq_len=128)
        assert "\n" not in info.value.one_line()
    text_only = tmp_path / "img.jsonl"
    text_only.write_text(json.dumps({"image": str(image_file), "prompt": "what is this?"}))
    with pytest.raises(InputError, match="text-only model"):
        calibration_from(llama, text_only, samples=1, seq_len=128)


def test_bad_arguments_are_input_errors(llama, tmp_path):
    with pytest.raises(InputError, match="not found"):
        calibration_from(llama, tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="^samples must"):
        calibration_from(llama, None, samples=0)
    with pytest.raises(InputError, match="^seq_len must"):
        calibration_from(llama, None, seq_len=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .txt files"):
        calibration_from(llama, tmp_path / "empty")
