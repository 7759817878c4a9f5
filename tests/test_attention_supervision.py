"""Attention supervision for demo training (scripts/attention_supervision.py): targets and captured probabilities."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import attention_supervision as sup  # noqa: E402
import train_demo  # noqa: E402
from vlsparse.demo import build, scenes  # noqa: E402

QA = scenes.QA


def shape(kind, color, row, col):
    return scenes.Shape(kind, color, scenes.COLORS[color], row, col, 10.0, 10.0, 7.0)


def vqa_sample(shapes, qas):
    return scenes.Sample([scenes.render(shapes)], qas[0].question, qas[0].answer, qas[0].qtype, "vqa",
                         [shapes], followups=qas[1:])


def test_each_question_names_the_object_it_is_about():
    shapes = [shape("circle", "red", 0, 1), shape("star", "blue", 2, 2)]
    s = vqa_sample(shapes, [QA("What color is the star?", "blue", "color")])
    assert sup.turn_object(s, QA("What color is the star?", "blue", "color")) == (0, 8)
    assert sup.turn_object(s, QA("What shape is red?", "circle", "shape")) == (0, 1)
    assert sup.turn_object(s, QA("Where is the circle?", "top", "position")) == (0, 1)
    assert sup.turn_object(s, QA("Is there a blue star?", "yes", "exist")) == (0, 8)
    assert sup.turn_object(s, QA("Is there a red star?", "no", "exist")) is None
    assert sup.turn_object(s, QA("How many shapes are there?", "two", "count")) is None
    multi = scenes.Sample([], "", "", "color", "multi", [[shape("square", "green", 1, 0)], shapes])
    assert sup.turn_object(multi, QA("In image 2, what color is the star?", "blue", "color")) == (1, 8)
    assert sup.turn_object(multi, QA("In image 1, what shape is green?", "square", "shape")) == (0, 3)
    grid = scenes.Sample([], "", "", "color", "grid", [[s_] for s_ in shapes * 3], grid=(2, 3))
    assert sup.turn_object(grid, QA("In row 2, column 1, what color is the shape?", "red", "color")) == (3, None)


def test_patch_cells_split_the_patch_grid_into_the_3x3_layout():
    cells = sup.patch_cells(6).view(6, 6)
    assert cells[0, 0] == 0 and cells[1, 1] == 0 and cells[0, 2] == 1 and cells[5, 5] == 8 and cells[2, 4] == 5
    assert torch.equal(torch.bincount(cells.flatten()), torch.full((9,), 4))


def test_parse_heads_and_its_errors():
    assert sup.parse_heads("object:2:0-3, label:0:5") == [sup.HeadTarget(2, (0, 1, 2, 3), "object"),
                                                          sup.HeadTarget(0, (5,), "label")]
    with pytest.raises(ValueError, match="kind:layer:heads"):
        sup.parse_heads("object:2")
    with pytest.raises(ValueError, match="unknown attention-supervision kind"):
        sup.parse_heads("where:1:0")


def test_loss_is_minus_log_of_the_mass_on_the_targets():
    probe = sup.AttentionProbe((0,))
    probe.logp = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))[None, None, None]  # [B=1, h=1, R=1, L=4]
    targets = torch.tensor([False, True, False, True])[None, None]
    valid = torch.tensor([[True]])
    assert math.isclose(sup.supervision_loss(probe, valid, targets).item(), -math.log(0.6), rel_tol=1e-6)


def tiny_model():
    from transformers import LlavaForConditionalGeneration

    processor = build.build_processor()
    torch.manual_seed(0)
    config = build.build_config(processor.tokenizer, vision_hidden=32, vision_layers=1, vision_heads=2,
                                lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, head_dim=16,
                                lm_intermediate=96)
    return LlavaForConditionalGeneration(config).eval(), processor


def test_targets_point_from_the_answer_token_to_the_named_cell_and_probe_matches_eager_attention():
    model, processor = tiny_model()
    shapes = [shape("circle", "red", 0, 1), shape("star", "blue", 2, 2)]
    a = vqa_sample(shapes, [QA("What color is the star?", "blue", "color"), QA("How many shapes are there?",
                                                                               "two", "count")])
    b = vqa_sample(shapes[:1], [QA("Where is the circle?", "top", "position")])
    batch = train_demo.collate([a, b], processor)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    probes = sup.install(model, [sup.HeadTarget(1, (0, 3), "object")])
    armed = train_demo.arm_probes(probes, [a, b], batch, processor, model.config.image_token_index, side)
    (kind, probe, valid, targets), = armed
    ids = batch["input_ids"]
    assert valid.tolist() == [[True], [True]]  # the count turn names no object
    for row_b in range(2):
        row = int(probe.rows[row_b, 0])
        assert processor.tokenizer.convert_ids_to_tokens(ids[row_b, row - 1: row + 1].tolist()) == ["assistant", ":"]
        keys = targets[row_b, 0].nonzero()[:, 0]
        assert keys.numel() == (side // 3) ** 2 and bool((ids[row_b, keys] == model.config.image_token_index).all())
    first_patch = int((ids[0] == model.config.image_token_index).nonzero()[0])
    star_cell = sup.patch_cells(side) == 8
    assert torch.equal(targets[0, 0].nonzero()[:, 0], first_patch + star_cell.nonzero()[:, 0])
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    captured = probe.logp.exp()
    sup.uninstall(model, probes)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True)
    weights = eager.attentions[1]  # [B, H, L, L]
    for row_b in range(2):
        row = int(probe.rows[row_b, 0])
        assert torch.allclose(captured[row_b, :, 0], weights[row_b, [0, 3], row], atol=1e-5)


def test_label_targets_are_the_numerals_before_each_image():
    model, processor = tiny_model()
    scenes_ = [[shape("circle", "red", 0, 1)], [shape("star", "blue", 2, 2)]]
    multi = scenes.Sample([scenes.render(s) for s in scenes_], "In image 2, what color is the star?", "blue",
                          "color", "multi", scenes_)
    batch = train_demo.collate([multi], processor)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    found = sup.build_targets([multi], [[QA(multi.question, multi.answer, multi.qtype)]], batch["input_ids"],
                              processor.tokenizer, model.config.image_token_index, side, {"label", "image"})
    rows, valid, targets = found["label"]
    ids = batch["input_ids"][0]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    image_pos = (ids == model.config.image_token_index).nonzero()[:, 0]
    for r in range(int(valid.sum())):
        keys = targets[0, r].nonzero()[:, 0].tolist()
        image = int((image_pos == rows[0, r]).nonzero()) // (side * side)
        assert [tokens[k] for k in keys] == [str(image + 1)] and keys[0] < int(rows[0, r])
    rows, valid, targets = found["image"]
    assert int(targets[0, 0].sum()) == side * side and int(targets[0, 0].nonzero()[0]) == int(image_pos[side * side])


def test_local_targets_are_the_prompt_opening_and_the_own_image_only():
    model, processor = tiny_model()
    scenes_ = [[shape("circle", "red", 0, 1)], [shape("star", "blue", 2, 2)], [shape("square", "green", 1, 1)]]
    multi = scenes.Sample([scenes.render(s) for s in scenes_], "In image 2, what color is the star?", "blue",
                          "color", "multi", scenes_)
    batch = train_demo.collate([multi], processor)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows, valid, targets = sup.build_targets([multi], [[QA(multi.question, multi.answer, multi.qtype)]],
                                             batch["input_ids"], processor.tokenizer, model.config.image_token_index,
                                             side, {"local"})["local"]
    ids = batch["input_ids"][0]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    image_pos = (ids == model.config.image_token_index).nonzero()[:, 0].view(3, side * side)
    stride = max(1, side * side // sup.LOCAL_PATCHES)
    # per image: its 3 label tokens ("image", "k", ":") and a stride sample of its patches
    assert int(valid.sum()) == sum(3 + len(range(i % stride, side * side, stride)) for i in range(3))
    for r in range(int(valid.sum())):
        row = int(rows[0, r])
        image = next(i for i in range(3) if row <= int(image_pos[i, -1]))
        keys = targets[0, r].nonzero()[:, 0]
        begin = int(image_pos[image - 1, -1]) + 1 if image else sup.SINK_TOKENS
        assert keys[:sup.SINK_TOKENS].tolist() == list(range(sup.SINK_TOKENS))  # "user :"
        assert keys[sup.SINK_TOKENS:].tolist() == list(range(begin, int(image_pos[image, -1]) + 1))
        assert tokens[begin:begin + 2] == ["image", str(image + 1)] and begin <= row
    assert tokens[:sup.SINK_TOKENS] == ["user", ":"]


def test_word_targets_are_the_object_words_and_numerals_of_the_current_question_only():
    model, processor = tiny_model()
    scenes_ = [[shape("circle", "red", 0, 1)], [shape("star", "blue", 2, 2)]]
    qas = [QA("In image 2, what color is the star?", "blue", "color"),
           QA("In image 1, how many shapes are there?", "one", "count")]
    multi = scenes.Sample([scenes.render(s) for s in scenes_], qas[0].question, qas[0].answer, qas[0].qtype,
                          "multi", scenes_, followups=qas[1:])
    batch = train_demo.collate([multi], processor)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows, valid, targets = sup.build_targets([multi], [qas], batch["input_ids"], processor.tokenizer,
                                             model.config.image_token_index, side, {"word"})["word"]
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    words = [[tokens[k] for k in targets[0, r].nonzero()[:, 0].tolist()] for r in range(int(valid.sum()))]
    assert words == [["2", "star"], ["1"]]  # not the labels' numerals, not the earlier answer "blue"
