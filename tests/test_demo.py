"""The demo benchmark and model parts: deterministic scenes, right answers, token budgets."""

from __future__ import annotations

import pytest
import torch

from vlsparse.demo import build, scenes
from vlsparse.demo.evaluate import first_word, wilson_interval


def test_generation_is_deterministic_by_seed():
    a = scenes.generate("vqa", 3, scenes.EVAL_SEED_BASE + 7)
    b = scenes.generate("vqa", 3, scenes.EVAL_SEED_BASE + 7)
    for x, y in zip(a, b):
        assert (x.question, x.answer) == (y.question, y.answer)
        assert x.images[0].tobytes() == y.images[0].tobytes()
    c = scenes.generate("vqa", 3, scenes.EVAL_SEED_BASE + 8)
    assert [s.images[0].tobytes() for s in a] != [s.images[0].tobytes() for s in c]


def test_answers_agree_with_what_is_drawn():
    for s in scenes.generate("vqa", 60, scenes.EVAL_SEED_BASE):
        shapes = s.scenes[0]
        image = s.images[0]
        for shape in shapes:  # the centre pixel has the shape's colour
            assert image.getpixel((int(shape.cx), int(shape.cy))) == shape.rgb
        if s.qtype == "count":
            assert s.answer == scenes.COUNT_WORDS[len(shapes) - 1]
        if s.qtype == "color":
            kind = s.question.split()[-1].rstrip("?")
            assert [sh.color for sh in shapes if sh.kind == kind] == [s.answer]
        if s.qtype == "position":
            kind = s.question.split()[-1].rstrip("?")
            assert [sh.position for sh in shapes if sh.kind == kind] == [s.answer]


def test_train_and_eval_seeds_are_disjoint():
    train, held_out = scenes.TRAIN_SEEDS, scenes.EVAL_SEEDS
    assert train.stop <= held_out.start or held_out.stop <= train.start
    assert scenes.split_of(scenes.EVAL_SEED_BASE - 1) == "train" and scenes.split_of(scenes.EVAL_SEED_BASE) == "eval"
    with pytest.raises(ValueError, match="one split"):
        scenes.generate("vqa", 10, scenes.EVAL_SEED_BASE - 5)


@pytest.fixture(scope="module")
def processor():
    return build.build_processor()


def test_tokenizer_knows_every_word_of_every_task(processor):
    unk = processor.tokenizer.unk_token_id
    for task in scenes.TASKS:
        for s in scenes.generate(task, 5, scenes.EVAL_SEED_BASE, n_questions=3, **(
                {"n_images": 3} if task == "multi" else {"grid": (2, 2)} if task == "grid" else {})):
            text = processor.apply_chat_template(build.sample_messages(s, with_answers=True), tokenize=False)
            ids = processor.tokenizer(text)["input_ids"]
            assert unk not in ids, text


@pytest.mark.parametrize("task,kwargs", [("multi", {"n_images": 32}), ("grid", {"grid": (6, 6)})])
def test_long_variants_reach_4096_prompt_tokens(processor, task, kwargs):
    s = scenes.generate(task, 1, scenes.EVAL_SEED_BASE, **kwargs)[0]
    images, _ = s.model_images()
    inputs = processor(text=[build.build_prompt(processor, s)], images=images, return_tensors="pt")
    assert inputs["input_ids"].shape[1] >= 4096
    image_id = processor.tokenizer.convert_tokens_to_ids(build.IMAGE_TOKEN)
    per_image = (build.VISION_SIZE // build.PATCH_SIZE) ** 2
    assert int((inputs["input_ids"] == image_id).sum()) == len(images) * per_image


def test_processor_and_config_agree_on_image_tokens(processor):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build.build_config(processor.tokenizer, vision_layers=1, lm_layers=1,
                                                             lm_hidden=64)).eval()
    s = scenes.generate("multi", 1, scenes.EVAL_SEED_BASE, n_images=3)[0]
    inputs = processor(text=[build.build_prompt(processor, s)], images=s.model_images()[0], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits  # raises if image features and image tokens disagree
    assert logits.shape[:2] == inputs["input_ids"].shape


def test_chat_template_labels_several_images_unless_labelled(processor):
    unlabeled = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                              {"type": "text", "text": "In image 2, what color is the circle?"}]}]
    text = processor.apply_chat_template(unlabeled, add_generation_prompt=True, tokenize=False)
    assert "image 1 : <image> image 2 : <image>" in text and text.endswith("ASSISTANT:")
    single = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    assert "image 1" not in processor.apply_chat_template(single, add_generation_prompt=True, tokenize=False)


def test_wilson_interval_worked_example():
    low, high = wilson_interval(95, 100)
    assert low == pytest.approx(0.8882, abs=1e-3) and high == pytest.approx(0.9785, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_first_word_normalises_answers():
    assert first_word(" Red. ") == "red" and first_word("") == "" and first_word("yes, it is") == "yes"
