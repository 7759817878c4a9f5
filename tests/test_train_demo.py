"""The demo training recipe's data rules (scripts/train_demo.py) and the log check, on worked examples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import check_train_log  # noqa: E402
import train_demo  # noqa: E402
from vlsparse.demo import scenes  # noqa: E402

QA = scenes.QA


def shape(kind, color, row, col):
    return scenes.Shape(kind, color, scenes.COLORS[color], row, col, 10.0, 10.0, 7.0)


def test_follow_ups_that_the_conversation_gives_away_are_dropped():
    first = QA("What shape is red?", "triangle", "shape")
    followups = [
        QA("What color is the triangle?", "red", "color"),      # named in turn 1: answered by the text
        QA("Where is the circle?", "top", "position"),          # new object: kept
        QA("Is there a red circle?", "no", "exist"),            # red and circle named already
        QA("How many shapes are there?", "three", "count"),     # names nothing: kept
        QA("How many shapes are there?", "three", "count"),     # repeats a question
        QA("What shape is blue?", "square", "shape"),           # new: kept
    ]
    kept = train_demo.without_leaks(first, followups)
    assert [qa.question for qa in kept] == ["Where is the circle?", "How many shapes are there?", "What shape is blue?"]


def test_leak_rule_is_scoped_to_one_image_or_grid_cell():
    first = QA("In image 2, what color is the square?", "red", "color")
    followups = [QA("In image 3, what color is the square?", "blue", "color"),   # another image: kept
                 QA("In image 2, where is the square?", "top", "position"),     # same image: dropped
                 QA("In row 1, column 2, what color is the shape?", "red", "color")]
    kept = train_demo.without_leaks(first, followups)
    assert [qa.question for qa in kept] == ["In image 3, what color is the square?",
                                            "In row 1, column 2, what color is the shape?"]


def test_kind_ordered_listing_and_scene_slots():
    shapes = [shape("star", "blue", 2, 0), shape("circle", "yellow", 0, 1)]
    qa = scenes.list_by_kind(shapes)
    assert qa.answer == "circle yellow top , star blue bottomleft"
    slots = train_demo.slot_targets(shapes)
    colors = list(scenes.COLORS)
    expected = {"circle": (1 + colors.index("yellow"), 1 + 1), "star": (1 + colors.index("blue"), 1 + 6)}
    for k, kind in enumerate(scenes.SHAPES):
        assert tuple(slots[2 * k: 2 * k + 2].tolist()) == expected.get(kind, (0, 0))


def test_patch_targets_label_each_patch_with_its_cell():
    targets = train_demo.patch_targets([shape("square", "green", 1, 2)], side=6)  # 2x2 patches per cell
    grid = targets.view(6, 6, 3)
    assert torch.equal(grid[2:4, 4:6, 0], torch.full((2, 2), 1 + scenes.SHAPES.index("square")))
    assert int(grid[..., 0].count_nonzero()) == 4  # only the square's cell has a kind
    assert grid[0, 0, 2] == 0 and grid[5, 5, 2] == 8 and grid[2, 4, 2] == 5


def test_log_check_matches_steps_and_measures_the_largest_relative_difference(tmp_path):
    reference, rerun = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    reference.write_text("\n".join(json.dumps(r) for r in [
        {"stage": "vision", "step": 0, "loss": 2.0}, {"stage": "vision", "step": 1, "loss": 1.0},
        {"step": 0, "loss": 4.0}]))
    rerun.write_text("\n".join(json.dumps(r) for r in [
        {"stage": "vision", "step": 0, "loss": 2.0}, {"stage": "vision", "step": 1, "loss": 1.01}]))
    matched, worst, where = check_train_log.compare(check_train_log.read_losses(reference),
                                                    check_train_log.read_losses(rerun))
    assert matched == 2 and abs(worst - 0.01) < 1e-9 and where == ("vision", 1)


def test_tile_targets_label_every_patch_with_the_tiles_one_shape():
    tile = scenes.Shape("star", "purple", scenes.COLORS["purple"], 1, 1, 32.0, 30.0, 15.0)
    targets = train_demo.tile_targets(tile, side=6)
    assert set(targets[:, 0].tolist()) == {1 + scenes.SHAPES.index("star")}
    assert set(targets[:, 1].tolist()) == {1 + list(scenes.COLORS).index("purple")}
    assert torch.equal(targets[:, 2], train_demo.patch_targets([], side=6)[:, 2])  # cells as for scenes


def test_long_images_raises_the_scene_count_of_full_size_multi_steps():
    def counts(cfg):
        out = []
        for step in range(int(cfg.full_from * cfg.steps), cfg.steps):
            if step % cfg.long_every != cfg.long_every - 1:
                continue
            s = train_demo.step_samples(step, cfg)[0]
            if s.task == "multi" and len(s.images) > 8:
                out.append(len(s.images))
            if len(out) == 40:
                break
        return out

    base = counts(train_demo.TrainConfig())
    longer = counts(train_demo.TrainConfig(long_images=64))
    assert max(base) <= 32 and min(base) >= 16
    assert max(longer) > 32 and max(longer) <= 64
