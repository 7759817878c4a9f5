"""The demo model's tokenizer, processor, config and prompt format, on tiny random weights."""

from __future__ import annotations

import pytest
import torch

from vlsparse.demo import build, scenes

PER_IMAGE = (build.VISION_SIZE // build.PATCH_SIZE) ** 2


@pytest.fixture(scope="module")
def processor():
    return build.build_processor()


def prompt_ids(processor, sample):
    images, _ = sample.model_images()
    inputs = processor(text=[build.build_prompt(processor, sample)], images=images, return_tensors="pt")
    return inputs, images


def test_build_every_answer_is_one_token(processor):
    tok = processor.tokenizer
    for answers in scenes.ANSWERS.values():
        for word in answers:
            ids = tok(f" {word}", add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    assert tok.decode(tok("What color is the circle?")["input_ids"]) == "what color is the circle ?"


def test_build_prompt_matches_template_layout(processor):
    s = scenes.generate("multi", 1, scenes.EVAL_SEED_BASE, n_images=2)[0]
    text = build.build_prompt(processor, s)
    assert text == f"USER: image 1 : <image> image 2 : <image> {s.question} ASSISTANT:"
    g = scenes.generate("grid", 1, scenes.EVAL_SEED_BASE, grid=(1, 2))[0]
    assert build.build_prompt(processor, g).startswith("USER: row 1 column 1 : <image> row 1 column 2 : <image>")


@pytest.mark.parametrize("task", ["multi", "grid"])
def test_build_default_long_variants_reach_4096_tokens(processor, task):
    for s in scenes.generate(task, 3, scenes.EVAL_SEED_BASE):  # the generator's default sizes
        inputs, images = prompt_ids(processor, s)
        assert inputs["input_ids"].shape[1] >= 4096
        image_id = processor.tokenizer.convert_tokens_to_ids(build.IMAGE_TOKEN)
        assert int((inputs["input_ids"] == image_id).sum()) == len(images) * PER_IMAGE


def test_build_config_matches_processor_image_tokens(processor):
    from transformers import LlavaForConditionalGeneration

    config = build.build_config(processor.tokenizer, vision_hidden=32, vision_layers=1, vision_heads=2,
                                lm_hidden=32, lm_layers=1, lm_heads=4, lm_kv_heads=2, head_dim=8,
                                lm_intermediate=64)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    s = scenes.generate("multi", 1, scenes.EVAL_SEED_BASE, n_images=2)[0]
    inputs, _ = prompt_ids(processor, s)
    with torch.inference_mode():
        logits = model(**inputs).logits  # raises "Image features and image tokens do not match" otherwise
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    bad = dict(inputs, input_ids=inputs["input_ids"][:, 1:], attention_mask=inputs["attention_mask"][:, 1:])
    bad["input_ids"] = torch.where(bad["input_ids"] == config.image_token_id, 5, bad["input_ids"])
    with pytest.raises(ValueError, match="do not match"):
        model(**bad)


def test_build_default_config_is_gqa_rope_swiglu_and_long(processor):
    config = build.build_config(processor.tokenizer)
    t = config.text_config
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (8, 2, 32)
    assert t.max_position_embeddings >= 16384 and t.rope_parameters["rope_theta"] >= 1e5
    assert t.hidden_act == "silu" and config.vision_feature_select_strategy == "default"
    assert processor.num_additional_image_tokens == 1


def test_build_saved_folder_reloads_with_auto_classes(processor, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    config = build.build_config(processor.tokenizer, vision_hidden=32, vision_layers=1, vision_heads=2,
                                lm_hidden=32, lm_layers=1, lm_heads=4, lm_kv_heads=2, head_dim=8,
                                lm_intermediate=64)
    model = LlavaForConditionalGeneration(config).eval()
    build.save_demo(model, tmp_path, processor)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float32
    s = scenes.generate("vqa", 1, scenes.EVAL_SEED_BASE)[0]
    a, _ = prompt_ids(processor, s)
    b, _ = prompt_ids(again, s)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.allclose(a["pixel_values"], b["pixel_values"])
    with torch.inference_mode():
        assert torch.allclose(model(**a).logits, loaded(**b).logits, atol=1e-5)


def test_build_demo_path_is_package_weights_folder():
    path = build.demo_path()
    assert path.name == "weights" and path.parent.name == "demo"
