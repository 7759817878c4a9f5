"""KV cache methods on every model family's tiny model: the in-place cache changes no number, an 8-bit cache
stays close, eviction runs, and only full self-attention layers are replaced (not Gemma 3's sliding layers,
not Mllama's cross-attention layers, whose cache holds the image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlsparse.kernels.kv_runtime import attach_kv, detach_kv
from vlsparse.profile.kv import resolve_kv

FAMILIES = ["qwen2_vl_dir", "gemma3_dir", "paligemma_dir", "qwen3_vl_dir", "internvl_dir", "idefics3_dir",
            "mllama_dir", "llava_next_dir"]


def generate(loaded, inputs):
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                    return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_kv_methods_on_each_family(fixture, request):
    from vlsparse.models import load

    loaded = load(str(request.getfixturevalue(fixture)))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    inputs = loaded.prepare([image], "what is it")
    sequences, logits = generate(loaded, inputs)
    adapter = loaded.adapter
    text = loaded.model.config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"] * adapter.num_layers
    want = sum(1 for kind, layer in zip(types, adapter.lm_layers())
               if kind == "full_attention" and adapter.self_attention(layer) is not None)
    for method, params in (("fp", {}), ("uniform", {"bits": 8, "group": 8, "residual": 4}),
                           ("snapkv", {"budget": 0.5, "window": 4})):
        runtime = attach_kv(loaded, resolve_kv(method, params))
        try:
            got_sequences, got = generate(loaded, inputs)
        finally:
            detach_kv(loaded, runtime)
        assert len(runtime.layers) == want, method
        if method == "fp":
            assert torch.equal(got_sequences, sequences) and torch.allclose(got, logits, atol=1e-5)
        elif method == "uniform":
            assert float((got[1] - logits[1]).abs().max()) < 0.02 * float(logits.abs().max()) + 1e-4
        else:
            assert got.shape == logits.shape and torch.isfinite(got).all()
