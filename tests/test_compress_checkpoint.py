"""Checkpoint reading, streaming writing, output checks and finding the newest checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlsparse.atomic import MARKER
from vlsparse.compress.checkpoint import (CheckpointReader, check_output, find_newest_checkpoint,
                                          write_pruned_checkpoint)
from vlsparse.errors import InputError, OutputError


@pytest.fixture
def sharded(tmp_path):
    """A two-shard checkpoint with an index, mixed dtypes."""
    folder = tmp_path / "model"
    folder.mkdir()
    torch.manual_seed(0)
    a = {"a.weight": torch.randn(4, 6).to(torch.bfloat16), "a.bias": torch.randn(4)}
    b = {"b.weight": torch.randn(3, 5), "b.count": torch.arange(3)}
    save_file(a, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder, {**a, **b}


def test_reader_reads_every_tensor_exactly(sharded):
    folder, tensors = sharded
    reader = CheckpointReader(folder)
    assert sorted(reader.keys()) == sorted(tensors)
    for key, value in tensors.items():
        got = reader.tensor(key)
        assert got.dtype == value.dtype and torch.equal(got, value)


def test_writer_copies_untouched_shards_byte_for_byte_and_replaces_others(sharded, tmp_path):
    folder, tensors = sharded
    reader = CheckpointReader(folder)
    out = tmp_path / "out"
    out.mkdir()
    zeros = torch.zeros(4, 6, dtype=torch.bfloat16)
    write_pruned_checkpoint(reader, out, lambda key: zeros if key == "a.weight" else None)
    assert (out / "model-00002-of-00002.safetensors").read_bytes() == \
        (folder / "model-00002-of-00002.safetensors").read_bytes()
    first = load_file(str(out / "model-00001-of-00002.safetensors"))
    assert torch.equal(first["a.weight"], zeros) and torch.equal(first["a.bias"], tensors["a.bias"])
    assert (out / "model.safetensors.index.json").is_file()


def test_writer_rejects_a_replacement_of_another_shape(sharded, tmp_path):
    folder, _ = sharded
    with pytest.raises(ValueError):
        write_pruned_checkpoint(CheckpointReader(folder), tmp_path, lambda key: torch.zeros(2) if key == "a.bias" else None)


def test_check_output_refuses_inside_input_existing_and_holding_input(sharded, tmp_path):
    folder, _ = sharded
    with pytest.raises(InputError, match="inside the input"):
        check_output(folder / "pruned", folder, force=True)
    with pytest.raises(InputError, match="inside the input"):
        check_output(folder, folder, force=True)
    with pytest.raises(InputError, match="contains the input"):
        check_output(tmp_path, folder, force=True)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        check_output(tmp_path / "exists", folder, force=False)
    with pytest.raises(OutputError, match="did not write"):  # --force replaces only what vlsparse wrote
        check_output(tmp_path / "exists", folder, force=True)
    (tmp_path / "exists" / MARKER).write_text("{}")
    check_output(tmp_path / "exists", folder, force=True)


def test_check_output_refuses_unwritable_parent(sharded, tmp_path, monkeypatch):
    folder, _ = sharded
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="no permission"):
        check_output(tmp_path / "new" / "out", folder, force=False)


def test_find_newest_checkpoint_takes_newest_with_pruning_section(tmp_path):
    assert find_newest_checkpoint(tmp_path) is None
    for name, mtime, data in (("old", 100, {"pruning": {"ratio": 0.5}}), ("new", 200, {"pruning": {"ratio": 0.3}}),
                              ("newer-profile-only", 300, {"attention": {}})):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "vlsparse.yaml"
        path.write_text(yaml.safe_dump(data))
        os.utime(path, (mtime, mtime))
    assert find_newest_checkpoint(tmp_path) == tmp_path / "new"
