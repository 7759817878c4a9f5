"""Model families: each registered family on a tiny random model, the registry, the interface.

Adding a family: its module, its entry in ``vlsparse.models.families.FAMILIES`` and its
case in ``CASES`` below (the fixture of a tiny model of that family).
"""

import inspect
import sys

import pytest
import torch
from PIL import Image

from vlsparse.errors import InputError, UnsupportedModelError
from vlsparse.models import Adapter, load
from vlsparse.models.families import (CausalLMAdapter, family_for, family_named, registry, supported_text)
from vlsparse.models.families.base import tokenizer_of

CASES = {"llava": "llava_dir", "qwen2_vl": "qwen2_vl_dir", "qwen2_5_vl": "qwen2_5_vl_dir", "causal_lm": "llama_dir",
         "gemma3": "gemma3_dir", "paligemma": "paligemma_dir", "idefics3": "idefics3_dir", "mllama": "mllama_dir",
         "qwen3_vl": "qwen3_vl_dir", "internvl": "internvl_dir"}
"""Family name -> fixture of a tiny random model of it (built with plain transformers, see tiny_models.py)."""

MORE_CASES = {"llava_next": ("llava", "llava_next_dir"), "llava_onevision": ("llava", "llava_onevision_dir"),
              "smolvlm": ("idefics3", "smolvlm_dir")}
"""Further model types of a family: case -> (family, fixture of a tiny model of that type)."""

TILED = {"idefics3", "smolvlm", "llava_next", "llava_onevision", "internvl"}
"""Cases whose images take several spans each (tiles, base + any-res grid)."""

INTERFACE = ("MODEL_TYPES", "SUPPORTED", "accepts", "auto_model_class", "required_sub_configs", "load_processor",
             "read_processor", "format_prompt", "chat_content", "plain_prompt", "prepare_inputs", "language_model",
             "lm_layers", "vision_tower", "vision_layers", "projector", "attention", "mlp", "projections_of",
             "mlp_projections", "image_spans", "image_token_id", "fingerprint", "prepare", "prepare_text")


@pytest.mark.parametrize("fixture", ["llava_dir", "qwen2_vl_dir", "llama_dir"])
def test_mlp_projections_are_the_models_own_modules(fixture, request):
    loaded = load(request.getfixturevalue(fixture))
    for layer in loaded.adapter.lm_layers():
        gate, up, down = loaded.adapter.mlp_projections(layer)
        assert (gate, up, down) == (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)


def test_every_registered_family_has_a_case():
    assert {family.family for family in registry().values()} == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES) + sorted(MORE_CASES))
def test_family_on_a_tiny_model(case, request):
    family, fixture = MORE_CASES.get(case, (case, CASES.get(case)))
    loaded = load(request.getfixturevalue(fixture))
    adapter, model = loaded.adapter, loaded.model
    assert type(adapter) is family_named(family) and adapter.family == family
    assert type(Adapter(model, family)) is type(adapter) and type(Adapter(model)) is type(adapter)
    names = {module: name for name, module in model.named_modules()}

    layers = adapter.lm_layers()
    assert len(layers) == adapter.num_layers == model.config.get_text_config().num_hidden_layers
    assert all(names[layer].startswith(names[adapter.language_model()] + ".layers.") for layer in layers)
    crossing = set(adapter.cross_attention_layers()) if family == "mllama" else set()
    assert len(crossing) == (2 if family == "mllama" else 0)
    for index, layer in enumerate(layers):
        attn = adapter.attention(layer)
        if index in crossing:  # Mllama: attends to the image features, not to the prompt
            assert names[attn] == names[layer] + ".cross_attn" and adapter.self_attention(layer) is None
        else:
            assert names[attn] == names[layer] + ".self_attn" and adapter.self_attention(layer) is attn
        assert attn.q_proj.out_features == adapter.num_heads * adapter.head_dim
        assert attn.k_proj.out_features == adapter.num_kv_heads * adapter.head_dim
        projections = [names[p] for p in adapter.mlp_projections(layer)]
        assert projections == [f"{names[layer]}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]

    if not adapter.is_vlm:
        assert adapter.vision_tower() is None and adapter.vision_layers() == [] and adapter.projector() is None
        assert adapter.image_spans(loaded.prepare([], "what is this ?")) == []
        with pytest.raises(InputError, match="cannot take images"):
            loaded.prepare([Image.new("RGB", (32, 32))], "what is this ?")
        return
    assert len(adapter.vision_layers()) == 2 and adapter.projector() is not None
    assert all(names[block].startswith(names[adapter.vision_tower()] + ".") for block in adapter.vision_layers())
    inputs = loaded.prepare([Image.new("RGB", (40, 24), "red"), Image.new("RGB", (24, 48), "blue")],
                            "what color is this ?")
    ids = inputs["input_ids"][0]
    tokenizer = tokenizer_of(loaded.processor)
    # the token each image's features replace: the tokenizer's named image token where it has one (Gemma 3's
    # processor.image_token is <start_of_image>, which it expands to <image_soft_token> x mm_tokens_per_image)
    image_token = (getattr(tokenizer, "image_token_id", None)
                   or tokenizer.convert_tokens_to_ids(loaded.processor.image_token))
    assert image_token == adapter.image_token_id
    spans = adapter.image_spans(inputs)
    if not adapter.image_tokens:  # Mllama: one marker token per image, the features enter by cross-attention
        assert family == "mllama" and spans == [] and int((ids == image_token).sum()) == 2
        return
    assert [s.image_index for s in spans] == sorted(s.image_index for s in spans)
    assert {s.image_index for s in spans} == {0, 1} and all(span.rows * span.cols > 0 for span in spans)
    assert len(spans) > 2 if case in TILED else len(spans) == 2
    covered = torch.zeros_like(ids, dtype=torch.bool)
    for span in spans:
        covered[span.start:span.end] = True
    assert torch.equal(covered, ids == image_token)


class ToyAdapter(CausalLMAdapter):
    """A made-up family: a Llama-style LM under its own model_type."""

    family = "toy"
    MODEL_TYPES = ("toy_lm",)
    SUPPORTED = "Toy LM"


def test_a_family_registered_in_a_copy_of_the_table_is_picked(llama_dir):
    table = registry()
    table.update({model_type: ToyAdapter for model_type in ToyAdapter.MODEL_TYPES})
    assert family_for({"model_type": "toy_lm", "architectures": ["ToyForCausalLM"]}, table) is ToyAdapter
    assert family_named("toy", table) is ToyAdapter
    assert supported_text(table).endswith(", Toy LM")
    assert family_for({"model_type": "llama"}, table) is CausalLMAdapter
    # the table given was a copy: the default registry is unchanged
    assert "toy_lm" not in registry()
    with pytest.raises(UnsupportedModelError, match="toy_lm"):
        family_for({"model_type": "toy_lm"})
    with pytest.raises(ValueError, match="toy"):
        family_named("toy")
    adapter = ToyAdapter(load(llama_dir).model, name="toy")
    assert adapter.family == "toy" and len(adapter.lm_layers()) == 2


def test_unknown_model_types_and_heads_are_refused_with_the_supported_list():
    with pytest.raises(UnsupportedModelError, match="BertModel") as info:
        family_for({"model_type": "bert", "architectures": ["BertModel"]})
    assert info.value.hint == ("supported: LLaVA (llava, llava_next, llava_onevision), Qwen2-VL, Qwen2.5-VL, "
                               "Gemma 3, PaliGemma, Idefics3 / SmolVLM (idefics3, smolvlm), Mllama (Llama 3.2 Vision), "
                               "Qwen3-VL, InternVL, Llama-style *ForCausalLM")
    with pytest.raises(UnsupportedModelError, match="LlamaModel"):
        family_for({"model_type": "llama", "architectures": ["LlamaModel"]})


@pytest.mark.parametrize("model_type", sorted(registry()))
def test_every_model_type_maps_to_a_whole_family_class(model_type):
    family = registry()[model_type]
    assert issubclass(family, Adapter) and not inspect.isabstract(family)
    assert model_type in family.MODEL_TYPES
    assert isinstance(family.family, str) and family.family and family.SUPPORTED
    assert isinstance(family.is_vlm, bool)
    assert family_named(family.family) is family
    assert family_for({"model_type": model_type}) is family
    for name in INTERFACE:
        assert hasattr(family, name), f"{family.__name__} lacks {name}"
    auto = family.auto_model_class()
    assert hasattr(auto, "from_pretrained") and hasattr(auto, "from_config")
    assert family.__doc__ and sys.modules[family.__module__].__doc__
    assert ("vision_config" in family.required_sub_configs({})) == family.is_vlm
