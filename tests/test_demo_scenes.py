"""The demo scene generator: deterministic by seed, answers agree with the pixels drawn."""

from __future__ import annotations

import random

import pytest

from vlsparse.demo import scenes

BASE = scenes.EVAL_SEED_BASE + 123


def test_scenes_generate_is_deterministic_by_seed():
    for task, kw in (("vqa", {}), ("multi", {"n_images": 3}), ("grid", {"grid": (2, 3)})):
        a = scenes.generate(task, 4, BASE, **kw)
        b = scenes.generate(task, 4, BASE, **kw)
        assert [(s.question, s.answer, s.qtype) for s in a] == [(s.question, s.answer, s.qtype) for s in b]
        assert [im.tobytes() for s in a for im in s.images] == [im.tobytes() for s in b for im in s.images]
        c = scenes.generate(task, 4, BASE + 4, **kw)
        assert [im.tobytes() for s in a for im in s.images] != [im.tobytes() for s in c for im in s.images]


def test_scenes_same_seed_differs_across_tasks():
    vqa = scenes.generate("vqa", 1, BASE)[0]
    multi = scenes.generate("multi", 1, BASE, n_images=1)[0]
    assert vqa.images[0].tobytes() != multi.images[0].tobytes()


def test_scenes_shapes_colours_cells_are_unique_per_scene():
    for s in scenes.generate("vqa", 200, BASE):
        shapes = s.scenes[0]
        assert 1 <= len(shapes) <= scenes.MAX_SHAPES
        for key in ("kind", "color", "position"):
            values = [getattr(sh, key) for sh in shapes]
            assert len(set(values)) == len(values)


def test_scenes_answers_match_drawn_pixels_and_description():
    for s in scenes.generate("vqa", 300, BASE):
        shapes, image = s.scenes[0], s.images[0]
        for sh in shapes:  # each shape's centre pixel is exactly its (jittered) colour
            assert image.getpixel((int(sh.cx), int(sh.cy))) == sh.rgb
            assert sh.position == scenes.POSITIONS[int(sh.cy // (scenes.IMAGE_SIZE / 3))][
                int(sh.cx // (scenes.IMAGE_SIZE / 3))]
        assert s.answer in scenes.ANSWERS[s.qtype]
        words = s.question.rstrip("?").split()
        if s.qtype == "count":
            assert scenes.COUNT_WORDS.index(s.answer) + 1 == len(shapes)
        elif s.qtype == "color":
            (target,) = [sh for sh in shapes if sh.kind == words[-1]]
            assert s.answer == target.color
            nearest = min(scenes.COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(scenes.COLORS[c],
                          image.getpixel((int(target.cx), int(target.cy))))))
            assert nearest == s.answer
        elif s.qtype == "shape":
            assert [sh.kind for sh in shapes if sh.color == words[-1]] == [s.answer]
        elif s.qtype == "position":
            assert [sh.position for sh in shapes if sh.kind == words[-1]] == [s.answer]
        elif s.qtype == "exist":
            present = any((sh.color, sh.kind) == (words[-2], words[-1]) for sh in shapes)
            assert s.answer == ("yes" if present else "no")


def test_scenes_exist_questions_are_balanced():
    answers = [s.answer for s in scenes.generate("vqa", 400, BASE, qtype="exist")]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_scenes_multi_question_refers_to_the_named_image():
    for s in scenes.generate("multi", 30, BASE, n_images=5, qtype="color"):
        k = int(s.question.split()[2].rstrip(","))  # "In image k, what color is the X?"
        kind = s.question.rstrip("?").split()[-1]
        assert [sh.color for sh in s.scenes[k - 1] if sh.kind == kind] == [s.answer]
        images, labels = s.model_images()
        assert len(images) == 5 and labels[k - 1] == f"image {k} :"


def test_scenes_long_is_multi_with_more_scenes():
    s = scenes.generate("long", 1, BASE)[0]
    images, labels = s.model_images()
    assert scenes.LONG_IMAGES[0] <= len(images) <= scenes.LONG_IMAGES[1] and labels[-1] == f"image {len(images)} :"
    k = int(s.question.split()[2].rstrip(","))
    assert s.question.startswith(f"In image {k}, ") and 1 <= k <= len(images)


def test_scenes_grid_tiles_hold_the_asked_cell():
    for s in scenes.generate("grid", 20, BASE, grid=(3, 4)):
        tiles, labels = s.model_images()
        assert len(tiles) == 12 and all(t.size == (scenes.IMAGE_SIZE,) * 2 for t in tiles)
        words = s.question.replace(",", "").split()  # "In row r column c ..."
        r, c = int(words[2]), int(words[4])
        k = (r - 1) * 4 + (c - 1)
        assert labels[k] == f"row {r} column {c} :"
        (cell,) = s.scenes[k]
        assert tiles[k].getpixel((int(cell.cx), int(cell.cy))) == cell.rgb
        if s.qtype == "color":
            assert s.answer == cell.color
        elif s.qtype == "shape":
            assert s.answer == cell.kind


def test_scenes_tile_grid_inverts_pasting():
    s = scenes.generate("grid", 1, BASE, grid=(2, 3))[0]
    big = s.images[0]
    assert big.size == (3 * scenes.IMAGE_SIZE, 2 * scenes.IMAGE_SIZE)
    tiles = scenes.tile_grid(big, 2, 3)
    assert tiles[4].tobytes() == big.crop((64, 64, 128, 128)).tobytes()


def test_scenes_train_and_eval_seed_ranges_are_disjoint():
    train, evaluation = scenes.TRAIN_SEEDS, scenes.EVAL_SEEDS
    assert train.stop <= evaluation.start or evaluation.stop <= train.start
    assert scenes.TRAIN_SEED_BASE in train and scenes.EVAL_SEED_BASE in evaluation
    assert scenes.split_of(scenes.EVAL_SEED_BASE - 1) == "train"
    assert scenes.split_of(scenes.EVAL_SEED_BASE) == "eval"
    with pytest.raises(ValueError, match="one split"):
        scenes.generate("vqa", 10, scenes.EVAL_SEED_BASE - 5)


def test_scenes_followups_and_max_shapes():
    s = scenes.sample("vqa", random.Random(0), n_questions=5, max_shapes=2)
    assert len(s.followups) == 4 and len(s.scenes[0]) <= 2
    with pytest.raises(ValueError, match="unknown task"):
        scenes.sample("nope", random.Random(0))
