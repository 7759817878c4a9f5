"""A `vlsparse prune --pack` folder loads through vlsparse.models.load like its unpacked twin."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.models import load


def test_packed_checkpoint_loads_with_the_same_weights(llama_dir, tmp_path):
    runner = CliRunner()
    for name, extra in (("packed", ["--pack"]), ("plain", [])):
        result = runner.invoke(build_app(), ["prune", str(llama_dir), "--ratio", "0.5", "--allocation", "uniform",
                                             "--samples", "2", "--quiet", "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
    assert not list((tmp_path / "packed").glob("model*.safetensors"))
    packed, plain = load(tmp_path / "packed"), load(tmp_path / "plain")
    for (name, a), (_, b) in zip(packed.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.inference_mode():
        assert torch.equal(packed.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)
