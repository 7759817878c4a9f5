"""The wild demo scenes (``vlsparse.demo.wild``): answers agree with the pixels, off the training layout, by seed."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.demo import scenes, wild

BASE = scenes.EVAL_SEED_BASE + 77


def _inside(kind: str, dx: float, dy: float, h: float) -> bool:
    """Whether offset (dx, dy) from the centre lies in ``kind`` of half-side h, from the geometry in the module doc."""
    if kind == "circle":
        return dx * dx + dy * dy <= h * h
    if kind == "square":
        return max(abs(dx), abs(dy)) <= h
    if kind == "cross":
        return max(abs(dx), abs(dy)) <= h and min(abs(dx), abs(dy)) <= 0.3 * h
    if kind == "diamond":
        return abs(dx) / (0.6 * h) + abs(dy) / h <= 1
    if kind == "triangle":  # apex (0, -h), base corners (+-h, h)
        return -h <= dy <= h and abs(dx) <= (dy + h) / 2
    if kind == "star":  # fold into the half-sector between an outer point (angle 0) and an inner one (36 degrees)
        rho, theta = math.hypot(dx, dy), math.atan2(dx, -dy) % (2 * math.pi / 5)
        psi = min(theta, 2 * math.pi / 5 - theta)
        q = (rho * math.cos(psi), rho * math.sin(psi))
        p0, p1 = (h, 0.0), (0.4 * h * math.cos(math.pi / 5), 0.4 * h * math.sin(math.pi / 5))
        edge = (p1[0] - p0[0], p1[1] - p0[1])
        side = lambda p: edge[0] * (p[1] - p0[1]) - edge[1] * (p[0] - p0[0])  # noqa: E731
        return side(q) * side((0.0, 0.0)) >= 0
    raise ValueError(kind)


def _drawn(sample, background):
    """Pixels of the sample's image that are not the background: {(x, y): rgb}."""
    image = sample.images[0]
    return {(x, y): image.getpixel((x, y)) for y in range(image.height) for x in range(image.width)
            if image.getpixel((x, y)) != background}


def test_wild_answers_match_the_drawn_pixels():
    unit = scenes.IMAGE_SIZE / 3
    for task, background in (("wild", (255, 255, 255)), ("wild-dark", scenes.BACKGROUND)):
        for s in wild.generate(task, 120, BASE):
            (shape,) = s.scenes[0]
            image = s.images[0]
            assert image.getpixel((0, 0)) == background and image.getpixel((63, 63)) == background
            drawn = _drawn(s, background)
            assert set(drawn.values()) == {shape.rgb}  # one flat colour on the stated background
            named = min(scenes.COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(scenes.COLORS[c], shape.rgb)))
            xs, ys = [x for x, _ in drawn], [y for _, y in drawn]
            extent = max(max(xs) - min(xs), max(ys) - min(ys)) + 1
            assert 15 <= extent <= 41  # 16-40 px, give or take the rasteriser's pixel
            bx, by = (min(xs) + max(xs) + 1) / 2, (min(ys) + max(ys) + 1) / 2  # centre of the drawn pixels' box
            cell = scenes.POSITIONS[int(by // unit)][int(bx // unit)]
            # the kind: the drawn pixels match that kind's outline best of all six
            overlap = {}
            for kind in scenes.SHAPES:
                region = {(x, y) for y in range(64) for x in range(64)
                          if _inside(kind, x - shape.cx, y - shape.cy, shape.radius)}
                overlap[kind] = len(region & drawn.keys()) / len(region | drawn.keys())
            assert max(overlap, key=overlap.get) == shape.kind and overlap[shape.kind] > 0.6, overlap
            words = s.question.rstrip("?").split()
            assert s.qtype in wild.WILD_QTYPES and s.answer in scenes.ANSWERS[s.qtype]
            if s.qtype == "color":
                assert words[-1] == shape.kind and s.answer == named
            elif s.qtype == "shape":
                assert words[-1] == named and s.answer == shape.kind
            elif s.qtype == "position":
                assert words[-1] == shape.kind and s.answer == cell
            else:
                assert s.answer == ("yes" if (words[-2], words[-1]) == (named, shape.kind) else "no")


def test_wild_shapes_are_off_the_training_layout_and_every_question_type_occurs():
    samples = wild.generate("wild", 300, BASE)
    unit = scenes.IMAGE_SIZE / 3
    for s in samples:
        (shape,) = s.scenes[0]
        off = (abs(shape.cx - (shape.col + 0.5) * unit), abs(shape.cy - (shape.row + 0.5) * unit))
        assert max(off) > 2  # training centres lie within +-2 px of the cell centre on both axes
        assert min(abs(shape.cx - k * unit) for k in (1, 2)) >= wild.BORDER_MARGIN
    assert {s.qtype for s in samples} == set(wild.WILD_QTYPES)
    exist = [s.answer for s in samples if s.qtype == "exist"]
    assert 0.3 < exist.count("yes") / len(exist) < 0.7
    assert len({s.scenes[0][0].kind for s in samples}) == len(scenes.SHAPES)


def test_wild_is_deterministic_by_seed_and_dark_differs_only_in_background():
    a, b = wild.generate("wild", 6, BASE), wild.generate("wild", 6, BASE)
    assert [(s.question, s.answer, s.seed) for s in a] == [(s.question, s.answer, s.seed) for s in b]
    assert [s.images[0].tobytes() for s in a] == [s.images[0].tobytes() for s in b]
    later = wild.generate("wild", 6, BASE + 6)
    assert [s.images[0].tobytes() for s in a] != [s.images[0].tobytes() for s in later]
    dark = wild.generate("wild-dark", 6, BASE)
    assert [(s.question, s.answer, s.scenes) for s in a] == [(s.question, s.answer, s.scenes) for s in dark]
    for light, night in zip(a, dark):
        assert _drawn(light, (255, 255, 255)) == _drawn(night, scenes.BACKGROUND)  # same pixels, same colours
        assert light.images[0].getpixel((0, 0)) != night.images[0].getpixel((0, 0))


def test_eval_demo_wild_runs_on_the_demo_model():
    result = CliRunner().invoke(build_app(), ["eval", "--task", "demo-wild", "--n", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    questions = wild.generate("wild", 4, scenes.EVAL_SEED_BASE)
    assert data["task"] == "wild" and data["n"] == 4 and len(data["answers"]) == 4
    assert set(data["per_qtype"]) == {s.qtype for s in questions}
    correct = sum(a == s.answer for a, s in zip(data["answers"], questions))
    assert data["accuracy"] == correct / 4
    low, high = data["ci95"]
    assert low <= data["accuracy"] <= high
