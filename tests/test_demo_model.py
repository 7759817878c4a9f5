"""The shipped demo model: stock transformers loads it, it answers held-out scenes, its answers
follow the image (and, in multi-image prompts, the asked image), and a fresh user's
`vlsparse run` (no --model, empty folder) uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.demo import build, scenes
from vlsparse.demo.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(0)
    folder = build.demo_path()
    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_weights_fit_the_package_budget_and_the_training_log_ships_beside_them():
    folder = build.demo_path()
    assert (folder / "model.safetensors").stat().st_size <= 25 * 2**20
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["stage"] == "vision" and log[0]["step"] == 0
    config = json.loads((folder / "train_config.json").read_text())
    for stage, steps in (("vision", config["vision_steps"]), (None, config["steps"])):  # one run, two stages
        assert [r["step"] for r in log if r.get("stage") == stage] == list(range(steps)), stage


def test_held_out_vqa_accuracy_is_far_above_chance(demo):
    model, processor = demo
    result = evaluate(model, processor, "vqa", n=60, seed=7)
    assert result["accuracy"] >= 0.9, result  # 500 samples: 0.986 against chance 0.229
    for qtype in ("color", "shape", "position", "count"):  # each 0.99-1.00 over 500 samples
        assert result["per_qtype"][qtype]["accuracy"] >= 0.85, (qtype, result["per_qtype"])


def test_paired_evaluation_takes_turns_per_sample_and_matches_evaluate(demo):
    from vlsparse.demo.evaluate import evaluate_paired

    model, processor = demo
    turns: list[str] = []
    results = evaluate_paired(model, processor, {"a": lambda: turns.append("a"), "b": lambda: turns.append("b")},
                              "vqa", n=4, seed=3)
    assert turns == ["a", "b"] * 4  # every sample in both modes before the next sample
    single = evaluate(model, processor, "vqa", n=4, seed=3)
    for name in ("a", "b"):  # the switches change nothing here, so each mode is plain evaluate
        assert results[name] == single


def test_answers_depend_on_the_image(demo):
    """The same question on scenes that differ only in the asked colour's shape gets each shape right."""
    model, processor = demo
    from vlsparse.demo.evaluate import answer_sample, first_word

    base = scenes.random_scene(scenes.sample_rng("probe", scenes.EVAL_SEED_BASE + 3), n_shapes=3)
    target = base[0]
    right, asked = 0, 0
    for kind in scenes.SHAPES:
        if any(s.kind == kind for s in base[1:]):
            continue
        shapes = [scenes.Shape(kind, target.color, target.rgb, target.row, target.col, target.cx, target.cy,
                               target.radius)] + base[1:]
        sample = scenes.Sample([scenes.render(shapes)], f"What shape is {target.color}?", kind, "shape", "vqa",
                               [shapes])
        asked += 1
        right += first_word(answer_sample(model, processor, sample)[0]) == kind
    assert asked == 4 and right >= 3  # a constant answer gets at most one of the four right


def test_multi_image_answers_follow_the_asked_image(demo):
    """Four scenes, each with a circle of another colour: "In image k, what color is the circle?"
    must name image k's circle (a model that ignores k gets at most one of the four)."""
    model, processor = demo
    from vlsparse.demo.evaluate import answer_sample, first_word

    colours = ["red", "green", "blue", "purple"]
    rng = scenes.sample_rng("probe-multi", scenes.EVAL_SEED_BASE + 11)
    images = []
    for colour in colours:
        others = [s for s in scenes.random_scene(rng, n_shapes=3) if s.kind != "circle" and s.color not in colours]
        circle = scenes.Shape("circle", colour, scenes.COLORS[colour], 1, 1, 32.0, 32.0, 7.0)
        images.append([circle] + [s for s in others if (s.row, s.col) != (1, 1)])
    right = 0
    for k, colour in enumerate(colours):
        sample = scenes.Sample([scenes.render(s) for s in images], f"In image {k + 1}, what color is the circle?",
                               colour, "color", "multi", images)
        right += first_word(answer_sample(model, processor, sample)[0]) == colour
    assert right >= 3


def test_fresh_user_run_in_an_empty_folder_answers_the_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(build_app(), ["run", str(REPO / "examples" / "scene.png"), "What color is the circle?"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split()[0] == "yellow"
