"""Each shim of vlsparse.compat against the installed transformers: these fail when a release moves a name."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from vlsparse import compat


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_cache_of_call_sees_the_growing_cache_on_every_decode_step(llama):
    seen: list[int] = []
    found: list[bool] = []

    def hook(module, args, kwargs):
        cache = compat.cache_of_call(kwargs)
        found.append(cache is not None)
        seen.append(compat.cache_length(cache))

    handle = llama.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ids = torch.tensor([[1, 5, 6, 7, 8]])
        llama.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    # prefill sees an empty cache, then each decode step sees one more token than the last
    assert seen == [0, 5, 6, 7]
    assert all(found[1:])


def test_cache_of_output_and_its_bytes_match_the_tensors(llama):
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        out = llama(ids, use_cache=True)
    cache = compat.cache_of_output(out)
    assert compat.cache_length(cache) == 7
    keys = compat.cache_layer_keys(cache, 1)
    assert tuple(keys.shape) == (1, 2, 7, 8)  # [B, Hkv, T, head dim 32/4]
    # 2 layers x (keys + values) x 1 x 2 x 7 x 8 floats of 4 bytes
    assert compat.cache_nbytes(cache) == 2 * 2 * 2 * 7 * 8 * 4
    assert compat.cache_of_output(object()) is None
    assert compat.cache_length(None) == 0


def test_registered_attention_gets_the_documented_signature_and_replaces_sdpa(llama):
    calls = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, tuple(query.shape), tuple(key.shape), attention_mask, module.is_causal))
        return compat.sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        reference = llama(ids).logits
    compat.register_attention("vlsparse-compat-test", attention)
    llama.set_attn_implementation("vlsparse-compat-test")
    try:
        with torch.no_grad():
            logits = llama(ids).logits
    finally:
        llama.set_attn_implementation("sdpa")
    assert [c[0] for c in calls] == [0, 1]
    for _, q_shape, k_shape, mask, causal in calls:
        assert q_shape == (1, 4, 6, 8) and k_shape == (1, 2, 6, 8)  # GQA: key/value not repeated
        assert mask is None and causal  # no padding: causality is the module's, as with SDPA
    assert torch.allclose(logits, reference, atol=1e-6)


def test_attn_implementation_reads_what_set_attn_implementation_set(llama):
    assert compat.attn_implementation(llama) == "sdpa"
    llama.set_attn_implementation("eager")
    try:
        assert compat.attn_implementation(llama) == "eager"
    finally:
        llama.set_attn_implementation("sdpa")
    assert compat.attn_implementation(llama) == "sdpa"


def test_registered_attention_gets_a_padding_mask_when_there_is_padding(llama):
    masks = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return compat.sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    compat.register_attention("vlsparse-compat-pad", attention)
    llama.set_attn_implementation("vlsparse-compat-pad")
    try:
        with torch.no_grad():
            llama(torch.tensor([[0, 0, 5, 6]]), attention_mask=torch.tensor([[0, 0, 1, 1]]))
    finally:
        llama.set_attn_implementation("sdpa")
    mask = masks[0]
    assert mask is not None and mask.shape[-2:] == (4, 4)
    keep = mask if mask.dtype == torch.bool else mask == 0
    assert not bool(keep[0, 0, 3, 0]) and bool(keep[0, 0, 3, 2])  # padded keys are masked, real ones kept


def test_pil_image_processors_work_without_torchvision():
    clip = compat.pil_image_processor_class("CLIP")(size={"shortest_edge": 16},
                                                    crop_size={"height": 16, "width": 16})
    out = clip(images=[Image.new("RGB", (40, 24), (255, 0, 0))], return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, 16, 16)
    qwen = compat.pil_image_processor_class("Qwen2VL")(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=4,
                                                      merge_size=2, temporal_patch_size=2)
    grid = qwen(images=[Image.new("RGB", (32, 16))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 8]]  # 16 x 32 pixels in patches of 4


def test_image_only_qwen2_vl_processor_expands_image_pads(qwen2_vl_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_vl_dir)
    images = compat.pil_image_processor_class("Qwen2VL").from_pretrained(qwen2_vl_dir)
    processor = compat.image_only_qwen2_vl_processor_class()(images, tokenizer)
    prompt = "<|vision_start|><|image_pad|><|vision_end|> what is this ?"
    out = processor(text=[prompt], images=[Image.new("RGB", (32, 16))], return_tensors="pt")
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # grid 1 x 4 x 8 patches, merged 2 x 2 -> 8 image tokens
    assert int((out["input_ids"] == pad).sum()) == 8


def test_image_only_processors_expand_image_tokens_without_a_video_processor(qwen3_vl_dir, internvl_dir):
    from transformers import AutoTokenizer

    qwen3 = compat.image_only_processor_class("Qwen3VLProcessor")(
        compat.pil_image_processor_class("Qwen2VL").from_pretrained(qwen3_vl_dir),
        AutoTokenizer.from_pretrained(qwen3_vl_dir))
    out = qwen3(text=["<|vision_start|><|image_pad|><|vision_end|> what ?"], images=[Image.new("RGB", (32, 16))],
                return_tensors="pt")
    assert int((out["input_ids"] == qwen3.image_token_id).sum()) == 8  # 4 x 8 patches merged 2 x 2
    assert out["mm_token_type_ids"].sum() == 8  # what Qwen3-VL's multimodal RoPE reads
    internvl = compat.image_only_processor_class("InternVLProcessor")(
        compat.pil_image_processor_class("GotOcr2").from_pretrained(internvl_dir),
        AutoTokenizer.from_pretrained(internvl_dir), image_seq_length=16)
    out = internvl(text=["<IMG_CONTEXT> what ?"], images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    assert int((out["input_ids"] == internvl.image_token_id).sum()) == 16 and out["pixel_values"].shape[0] == 1


def test_take_deepstack_takes_what_the_qwen3_vl_stack_would_add(qwen3_vl_dir):
    from vlsparse.models import load

    loaded = load(qwen3_vl_dir)
    inputs = loaded.prepare([Image.new("RGB", (40, 24), "red")], "what color is this ?")
    stack, layers = loaded.adapter.language_model(), loaded.adapter.lm_layers()
    with torch.no_grad():
        reference = loaded.model(**inputs).logits
    taken = []

    def take(module, args, kwargs):
        taken.append(compat.take_deepstack(kwargs))
        return args, kwargs

    def add_back(index):
        def hook(module, args, output):
            if taken and taken[-1] is not None and index < len(taken[-1][1]):
                mask, features = taken[-1]
                output = output.clone()
                output[mask] = output[mask] + features[index]
                return output
        return hook

    handles = [stack.register_forward_pre_hook(take, with_kwargs=True)]
    try:
        with torch.no_grad():
            without = loaded.model(**inputs).logits
        handles += [layer.register_forward_hook(add_back(i)) for i, layer in enumerate(layers)]
        with torch.no_grad():
            added_back = loaded.model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    mask, features = taken[0]
    assert mask.shape == inputs["input_ids"].shape and int(mask.sum()) == 15  # 3 x 5 merged tokens of 6 x 10
    assert len(features) == 2 and features[0].shape == (15, 64)
    assert not torch.allclose(without, reference, atol=1e-4)  # taken out: the stack really added nothing
    assert torch.equal(added_back, reference)
    assert compat.take_deepstack({"visual_pos_masks": None, "deepstack_visual_embeds": None}) is None


def test_checkpoint_key_map_follows_llava_renaming():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=8, patch_size=4),
                         text_config=LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2),
                         image_token_index=3)
    model = LlavaForConditionalGeneration(config)
    legacy = ["language_model.model.layers.0.self_attn.q_proj.weight", "multi_modal_projector.linear_1.weight"]
    mapped = compat.checkpoint_key_map(model, legacy)
    assert mapped["model.language_model.layers.0.self_attn.q_proj.weight"] == legacy[0]
    assert mapped["model.multi_modal_projector.linear_1.weight"] == legacy[1]
    params = dict(model.named_parameters())
    assert all(name in params for name in mapped)


def test_transformers_logging_switches_verbosity_and_bars():
    hf_logging = compat.transformers_logging()
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    assert hf_logging.get_verbosity() == logging.ERROR
    hf_logging.set_verbosity(before)
    assert isinstance(hf_logging.is_progress_bar_enabled(), bool)


def test_image_only_smolvlm_processor_expands_images_without_torchvision_or_num2words(smolvlm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smolvlm_dir)
    images = compat.pil_image_processor_class("SmolVLM").from_pretrained(smolvlm_dir)
    processor = compat.image_only_smolvlm_processor_class()(images, tokenizer, image_seq_len=4)
    out = processor(text=["<image> what is this ?"], images=[Image.new("RGB", (40, 24))], return_tensors="pt")
    ids = out["input_ids"][0]
    # 2 x 2 tiles + the global image, 4 image tokens each, each after its own marker
    assert int((ids == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 5 * 4
    assert int((ids == tokenizer.convert_tokens_to_ids("<global-img>")).sum()) == 1
    assert tuple(out["pixel_values"].shape[:2]) == (1, 5)


def test_cache_layer_base_and_full_attention_layers_replaced_in_generate(llama):
    from transformers import DynamicCache, Gemma3TextConfig

    from vlsparse.kv.cache import InPlaceLayer

    base = compat.cache_layer_base()
    stock = type(DynamicCache(config=llama.config).layers[0])
    assert issubclass(base, stock.__base__)  # the same base class as transformers' own layers
    mine = InPlaceLayer()
    assert mine.get_max_length() == -1 and mine.get_max_cache_shape() == -1  # the method under both names
    updates: list[int] = []

    class Counting(InPlaceLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            updates.append(key_states.shape[2])
            return super().update(key_states, value_states, *args, **kwargs)

    def hook(module, args, kwargs):
        cache = compat.cache_of_call(kwargs)
        compat.replace_full_attention_layers(cache, lambda i: Counting(), 2)

    ids = torch.tensor([[1, 5, 6, 7, 8]])
    reference = llama.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    handle = llama.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = llama.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    # our layers are installed at the prefill and kept by generate for every decode step, in both layers
    assert updates == [5, 5, 1, 1, 1, 1]
    assert torch.equal(out, reference)
    # sliding-window layers stay transformers' own; a cache holding tokens is left alone
    gemma = Gemma3TextConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cache = DynamicCache(config=gemma)
    assert compat.replace_full_attention_layers(cache, lambda i: Counting(), 3) == [1]
    assert type(cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"
    lazy = DynamicCache()
    assert compat.replace_full_attention_layers(lazy, lambda i: Counting(), 2) == [0, 1]
    lazy.update(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), 0)
    assert compat.replace_full_attention_layers(lazy, lambda i: Counting(), 2) == []


def test_cache_nbytes_counts_quantised_layers_inner_tensors():
    class Layer:
        keys = torch.zeros(1, 2, 3, 4)  # 96 bytes of full-precision residual
        values = None
        _quantized_keys = (torch.zeros(10, dtype=torch.uint8), torch.zeros(2))  # HQQ-like tuple: 10 + 8 bytes
        _quantized_values = None

    class Cache:
        layers = [Layer()]

    assert compat.cache_nbytes(Cache()) == 96 + 18


def test_attention_scale_reads_the_scale_transformers_hands_over(llama):
    seen: list[float] = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append(compat.attention_scale(module, query, kwargs))
        return compat.sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    compat.register_attention("vlsparse_test_scale", recording)
    before = compat.attn_implementation(llama)
    llama.set_attn_implementation("vlsparse_test_scale")
    try:
        with torch.inference_mode():
            llama(torch.tensor([[1, 5, 6]]))
    finally:
        llama.set_attn_implementation(before)
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    assert seen == [head_dim ** -0.5] * llama.config.num_hidden_layers
    assert compat.attention_scale(None, torch.zeros(1, 1, 1, 16), {"scaling": 0.5}) == 0.5
    assert compat.attention_scale(None, torch.zeros(1, 1, 1, 16), {}) == 0.25  # no scale given: 1/sqrt(16)
