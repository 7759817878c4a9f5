"""The shipped demo model: stock transformers loads it, it answers held-out scenes far above
chance, its answers follow the image, and a fresh user's `vlsparse run` (no --model, empty
folder) uses it."""

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
    phases = {"vision": "train_config.json", None: "train_config.json", "phase2": "train_config_phase2.json",
              "phase3": "train_config_phase3.json"}
    for stage, name in phases.items():
        config = json.loads((folder / name).read_text())
        steps = [r["step"] for r in log if r.get("stage") == stage]
        expected = config["vision_steps"] if stage == "vision" else \
            3000 if stage is None else config["steps"]  # phase 1 stopped after 3,000 of its 6,000 steps
        assert steps == list(range(expected)), stage


def test_held_out_vqa_accuracy_is_far_above_chance(demo):
    model, processor = demo
    result = evaluate(model, processor, "vqa", n=60, seed=7)
    assert result["accuracy"] >= result["chance"] + 0.25, result  # 500 samples: 0.686 against chance 0.229
    assert result["per_qtype"]["shape"]["accuracy"] >= 0.9  # "What shape is red?": 1.000 over 500 samples
    assert result["per_qtype"]["count"]["accuracy"] >= 0.9


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


def test_fresh_user_run_in_an_empty_folder_answers_the_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(build_app(), ["run", str(REPO / "examples" / "scene.png"), "What shape is yellow?"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split()[0] == "circle"
