"""Models larger than memory in `run`: accelerate keeps at most --max-memory-mb of weights resident."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.errors import InputError
from vlsparse.models import load

pytest.importorskip("accelerate")


def test_offloaded_model_gives_the_resident_models_logits(llama_dir, tmp_path):
    resident = load(str(llama_dir))
    offloaded = load(str(llama_dir), max_memory_mb=0.1, offload_folder=tmp_path / "offload")
    assert offloaded.offload["disk"] > 0 and offloaded.offload["max_memory_mb"] == 0.1
    # not resident: read from disk (the checkpoint's own safetensors, or copies in the folder) while they run
    assert sum(p.device.type == "meta" for p in offloaded.model.parameters()) > 0
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(offloaded.model(ids).logits, resident.model(ids).logits, atol=1e-6)


def test_offload_needs_a_folder_and_an_unpacked_checkpoint(llama_dir, tmp_path):
    from vlsparse.compress.api import PruneConfig, prune_model

    with pytest.raises(InputError, match="offload_folder"):
        load(str(llama_dir), max_memory_mb=1)
    packed = prune_model(str(llama_dir), tmp_path / "packed",
                         PruneConfig(allocation="uniform", samples=2, seq_len=16, pack=True))
    with pytest.raises(InputError, match="packed checkpoint"):
        load(str(packed.out), max_memory_mb=1, offload_folder=tmp_path / "o")


def test_run_with_max_memory_answers_as_resident_and_says_so(llava_dir, image_file):
    runner = CliRunner()
    args = ["run", "--model", str(llava_dir), "--max-new-tokens", "4", "--json", str(image_file), "what color ?"]
    resident = json.loads(runner.invoke(build_app(), args).stdout)
    result = runner.invoke(build_app(), [*args[:-2], "--max-memory-mb", "0.1", *args[-2:]])
    assert result.exit_code == 0, result.output
    offloaded = json.loads(result.stdout)
    assert offloaded["text"] == resident["text"] and offloaded["offload"]["disk"] > 0
    assert resident["offload"] is None


def test_run_without_accelerate_is_one_line(llama_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    result = CliRunner().invoke(build_app(), ["run", "--model", str(llama_dir), "--max-memory-mb", "1", "hello"])
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "Error: --max-memory-mb offloads weights with accelerate, which is not installed — "
        "pip install 'vlsparse[offload]'"]
