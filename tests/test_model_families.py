"""Per-family adapter access: MLP projections are the model's own modules."""

import pytest

from vlsparse.models import load


@pytest.mark.parametrize("fixture", ["llava_dir", "qwen2_vl_dir", "llama_dir"])
def test_mlp_projections_are_the_models_own_modules(fixture, request):
    loaded = load(request.getfixturevalue(fixture))
    for layer in loaded.adapter.lm_layers():
        gate, up, down = loaded.adapter.mlp_projections(layer)
        assert (gate, up, down) == (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
