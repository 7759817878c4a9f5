"""Audit reproductions: every bad input is one line on stderr and exit 1, refused before expensive work.

Tiny models from ``tests/tiny_models.py`` are copied to ``tmp_path`` and broken there.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib

import pytest
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.errors import ModelLoadError
from vlsparse.safetensors_header import read_header, read_tensors

runner = CliRunner()
SMALL_MACHINE = 8 << 30


def invoke(*args):
    return runner.invoke(build_app(), [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and " — " in lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def copy_model(source, tmp_path, name="model"):
    return shutil.copytree(source, tmp_path / name)


def edit_config(folder, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(change(config)))


@pytest.fixture
def small_machine(monkeypatch):
    """Pretend 8 GiB are available, so refusals do not depend on this machine."""
    monkeypatch.delenv("VLSPARSE_SKIP_MEMORY_CHECK", raising=False)
    monkeypatch.setattr("vlsparse.memory.available_bytes", lambda: SMALL_MACHINE)


# ----------------------------------------------------------------------------- 1. memory


def test_run_llava_config_without_text_config_is_refused_before_building(llava_dir, tmp_path):
    folder = copy_model(llava_dir, tmp_path)
    edit_config(folder, lambda c: {k: v for k, v in c.items() if k != "text_config"})
    line = one_error_line(invoke("run", "--model", folder, "what ?"))
    assert "no text_config" in line and "default language model" in line


def test_missing_text_config_is_what_makes_transformers_build_a_7b_model(llava_dir, tmp_path):
    from vlsparse.memory import parameter_count
    from vlsparse.models.source import resolved_config

    folder = copy_model(llava_dir, tmp_path)
    edit_config(folder, lambda c: {k: v for k, v in c.items() if k != "text_config"})
    assert parameter_count(resolved_config(folder)) > 6e9  # Llama-7B defaults (+ the tiny CLIP tower)


def test_run_model_larger_than_memory_is_refused_with_sizes(llava_dir, tmp_path, small_machine):
    folder = copy_model(llava_dir, tmp_path)
    edit_config(folder, lambda c: {**c, "text_config": {**c["text_config"], "hidden_size": 8192,
                                                         "num_hidden_layers": 80, "intermediate_size": 29568}})
    line = one_error_line(invoke("run", "--model", folder, "what ?"))
    assert "billion parameters as float32" in line and "8.0 GiB available" in line and "--dtype bfloat16" in line


def test_prune_huge_seq_len_is_refused_before_any_work(llama_dir, tmp_path, small_machine):
    out = tmp_path / "pruned"
    line = one_error_line(invoke("prune", "--model", llama_dir, "--seq-len", 100_000_000, "--out", out))
    assert "--seq-len 100,000,000" in line and "needs about" in line and "8.0 GiB available" in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["profile", "calibrate"])
def test_profile_and_calibrate_huge_seq_len_is_refused(command, llama_dir, tmp_path, small_machine):
    out = tmp_path / "p.yaml"
    line = one_error_line(invoke(command, "--model", llama_dir, "--seq-len", 100_000_000, "--out", out))
    assert "100,000,0" in line and "tokens" in line and "shorter --seq-len" in line
    assert not out.exists()


def test_bench_attention_huge_seq_is_refused_before_allocating(small_machine):
    line = one_error_line(invoke("bench", "attention", "--seq", 100_000_000))
    assert "--seq 100,000,000" in line and "needs about" in line and "8.0 GiB available" in line


# ----------------------------------------------------------------------------- 2. images


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_run_png_whose_header_claims_100000_squared_pixels_is_refused(tmp_path):
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path = tmp_path / "forged.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                     + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))
    line = one_error_line(invoke("run", path, "what ?"))
    assert "10,000 megapixels" in line and "limit of 64 megapixels" in line


def test_run_decompression_bomb_is_refused_before_decoding(tmp_path):
    from PIL import Image

    path = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(path)  # 400 megapixels in a few KB
    assert path.stat().st_size < 1 << 20
    line = one_error_line(invoke("run", path, "what ?"))
    assert "400 megapixels" in line and "limit of 64 megapixels" in line


def test_image_just_over_the_limit_is_refused_with_its_size(tmp_path):
    from PIL import Image

    from vlsparse.errors import InputError
    from vlsparse.images import load_image

    path = tmp_path / "big.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 MP: below Pillow's own bomb warning
    with pytest.raises(InputError, match="9000 x 8000 pixels"):
        load_image(path)


# ----------------------------------------------------------------------------- 3. config.json


@pytest.mark.parametrize("content,expect", [
    ("[1, 2]", "holds a list, not a JSON object"),
    ('"llama"', "holds a string, not a JSON object"),
    (None, "num_hidden_layers should be a positive integer, got 'four'"),
])
def test_run_config_of_the_wrong_shape_names_file_and_field(content, expect, llama_dir, tmp_path):
    folder = copy_model(llama_dir, tmp_path)
    if content is None:
        edit_config(folder, lambda c: {**c, "num_hidden_layers": "four"})
    else:
        (folder / "config.json").write_text(content)
    line = one_error_line(invoke("run", "--model", folder, "what ?"))
    assert str(folder / "config.json") in line and expect in line


def test_sub_config_field_of_the_wrong_type_is_named_with_its_section(llava_dir, tmp_path):
    folder = copy_model(llava_dir, tmp_path)
    edit_config(folder, lambda c: {**c, "vision_config": {**c["vision_config"], "patch_size": 4.5}})
    line = one_error_line(invoke("run", "--model", folder, "what ?"))
    assert "vision_config.patch_size should be a positive integer, got 4.5" in line


# ----------------------------------------------------------------------------- 4. safetensors headers


def _break(path, how: str) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "huge header":
        path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    elif how == "header past the end":
        path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    elif how == "bad json":
        path.write_bytes(data[:8] + b"{" * length + data[8 + length:])


@pytest.mark.parametrize("command", ["run", "profile"])
@pytest.mark.parametrize("how,expect", [
    ("truncated", "is truncated"),
    ("empty", "is empty"),
    ("huge header", "implausible safetensors header length"),
    ("header past the end", "is truncated: its header claims"),
    ("bad json", "not valid JSON"),
])
def test_damaged_safetensors_is_one_line_in_run_and_profile(command, how, expect, llama_dir, tmp_path):
    folder = copy_model(llama_dir, tmp_path)
    _break(folder / "model.safetensors", how)
    args = ["run", "--model", folder, "what ?"] if command == "run" else \
        ["profile", "--model", folder, "--out", tmp_path / "p.yaml"]
    line = one_error_line(invoke(*args))
    assert "model.safetensors" in line and expect in line


def _write_raw(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_read_header_accepts_a_real_file_and_checks_shapes(llama_dir):
    tensors = read_tensors(llama_dir / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].shape[1] == 64
    assert set(read_header(llama_dir / "model.safetensors")) >= set(tensors)


@pytest.mark.parametrize("header,expect", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, "takes 8 bytes, its offsets span 12"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "has shape"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "is truncated"),
    ({"__metadata__": [1]}, "__metadata__"),
])
def test_read_header_rejects_inconsistent_entries(header, expect, tmp_path):
    path = tmp_path / "x.safetensors"
    _write_raw(path, header, b"\0" * 12)
    with pytest.raises(ModelLoadError, match=expect):
        read_header(path)


# ----------------------------------------------------------------------------- 5.-7.


def test_allow_pickle_with_a_file_weights_only_loading_refuses(llama_dir, tmp_path):
    import pickle

    folder = copy_model(llama_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weight": shutil.copytree}, handle)  # a global reference: not weights-only
    line = one_error_line(invoke("run", "--allow-pickle", "--model", folder, "what ?"))
    assert "weights-only" in line and "safetensors" in line


def test_run_config_for_more_layers_than_the_weights_is_refused(llama_dir, tmp_path):
    folder = copy_model(llama_dir, tmp_path)
    edit_config(folder, lambda c: {**c, "num_hidden_layers": 4})  # the checkpoint has 2
    line = one_error_line(invoke("run", "--model", folder, "what ?"))
    assert "lacks 18 of the weights" in line and "first: model.layers.2." in line


def test_bench_e2e_unknown_task_lists_the_valid_ones():
    line = one_error_line(invoke("bench", "e2e", "--task", "bogus"))
    assert "unknown task 'bogus'" in line and "vqa, multi, grid, long" in line
