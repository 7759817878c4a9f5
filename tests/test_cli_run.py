"""`vlsparse run` through Typer's CliRunner: each family answers; each bad input is one line, exit 1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlsparse.cli.main import build_app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(build_app(), [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("key", ["llava", "llava-full", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3",
                                 "paligemma", "idefics3", "smolvlm", "mllama", "llava_next", "llava_onevision"])
def test_run_answers_with_summary_for_each_vlm_family(vlm_dirs, image_file, key):
    result = invoke("run", "--model", vlm_dirs[key], "--max-new-tokens", 4, image_file, "what color is this ?")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # the answer
    assert "prompt tokens" in result.stderr and "image tokens" in result.stderr and "prefill" in result.stderr


def test_run_json_reports_image_tokens_of_two_images(llava_dir, image_file):
    result = invoke("run", "--model", llava_dir, "--json", "--max-new-tokens", 3, image_file, image_file, "what ?")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["image_tokens"] == 2 * 16
    assert 1 <= data["new_tokens"] <= 3
    assert data["prompt_tokens"] > data["image_tokens"]


def test_run_text_only_lm(llama_dir):
    result = invoke("run", "--model", llama_dir, "--max-new-tokens", 2, "what is this ?")
    assert result.exit_code == 0, result.output
    assert "image tokens" in result.stderr


def _truncated_png(image_file, tmp_path):
    data = image_file.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture")
    return path


def _bin_only(llama_dir, tmp_path):
    import torch

    from vlsparse.models import load

    folder = tmp_path / "bin-only"
    folder.mkdir()
    loaded = load(llama_dir)
    (folder / "config.json").write_text(json.dumps(loaded.model.config.to_dict()))
    torch.save(loaded.model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _unsupported(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize("case,expect", [
    ("missing image", "not found"),
    ("not an image", "not an image"),
    ("truncated png", "damaged"),
    ("missing model folder", "not found"),
    ("folder without config", "no config.json"),
    ("unsupported architecture", "not supported"),
    ("bin only", "--allow-pickle"),
    ("empty question", "question is empty"),
])
def test_run_bad_input_is_one_line_exit_1(case, expect, llava_dir, llama_dir, image_file, tmp_path):
    model, image, question = llava_dir, image_file, "what ?"
    if case == "missing image":
        image = tmp_path / "absent.png"
    elif case == "not an image":
        image = _not_an_image(tmp_path)
    elif case == "truncated png":
        image = _truncated_png(image_file, tmp_path)
    elif case == "missing model folder":
        model = tmp_path / "no-such-model"
    elif case == "folder without config":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "unsupported architecture":
        model = _unsupported(tmp_path)
    elif case == "bin only":
        model, image = _bin_only(llama_dir, tmp_path), None
    elif case == "empty question":
        question = "   "
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["run", "--model", model] + ([image] if image is not None else []) + [question]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert expect in one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch, image_file):
    monkeypatch.setenv("VLSPARSE_DEBUG", "1")
    result = invoke("run", "--model", tmp_path / "absent", image_file, "what ?")
    assert result.exit_code != 0
    assert result.exception is not None and "not found" in str(result.exception)


def test_every_command_has_help_with_examples():
    for command in ["run"]:
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Examples" in result.stdout


def test_a_question_word_the_tokenizer_does_not_know_is_one_line_on_stderr(image_file):
    from vlsparse.models import load
    from vlsparse.models.processors import unknown_words

    demo = load("demo")
    assert unknown_words(demo.processor, "What shape is the red object?") == ["object"]
    assert unknown_words(demo.processor, "What shape is the red circle?") == []
    result = invoke("run", "--model", "demo", "--max-new-tokens", 2, image_file, "What shape is the red object?")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "does not know" in line]
    assert notes == ["Note: the tokenizer does not know 'object': the model reads an unknown token there, so the "
                     "answer may ignore it"]
    plain = invoke("run", "--model", "demo", "--max-new-tokens", 2, image_file, "What shape is the red circle?")
    assert "does not know" not in plain.stderr
