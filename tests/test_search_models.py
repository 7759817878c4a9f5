"""The search on tiny random models of every family: capture, profile, round trip, validation, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vlsparse.errors import ProfileError
from vlsparse.profile import check_profile_matches, load_profile, profile_to_dict, save_profile

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "llama"]


@pytest.fixture(scope="module")
def model_dirs(llava_dir, qwen2_vl_dir, qwen2_5_vl_dir, llama_dir):
    return {"llava": llava_dir, "qwen2_vl": qwen2_vl_dir, "qwen2_5_vl": qwen2_5_vl_dir, "llama": llama_dir}


@pytest.fixture(scope="module")
def loaded_models(model_dirs):
    from vlsparse.models import load

    return {name: load(str(path)) for name, path in model_dirs.items()}


def _small_calibration(loaded, seed: int = 0):
    from vlsparse.search.calibration import calibration_from

    return calibration_from(loaded, None, samples=2, seq_len=256, seed=seed)


@pytest.fixture(scope="module")
def profiles(loaded_models):
    from vlsparse.search.api import profile_model

    return {name: profile_model(lm, _small_calibration(lm), threads=1) for name, lm in loaded_models.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_sees_every_layer_and_leaves_the_forward_unchanged(loaded_models, family):
    from vlsparse.search.calibration import prepare_sample
    from vlsparse.search.capture import capture_attention

    lm = loaded_models[family]
    inputs = prepare_sample(lm, _small_calibration(lm).samples[0])
    with torch.inference_mode():
        reference = lm.model(**inputs, use_cache=False).logits
    seen = []
    modules = [lm.adapter.attention(layer) for layer in lm.adapter.lm_layers()]
    with torch.inference_mode(), capture_attention(lm.model, modules, lambda *a: seen.append(a)):
        captured = lm.model(**inputs, use_cache=False).logits
    assert torch.equal(reference, captured)
    n = inputs["input_ids"].shape[1]
    assert [s[0] for s in seen] == [0, 1]
    layer, query, key, scale = seen[0]
    assert query.shape == (1, 4, n, 16) and key.shape == (1, 2, n, 16)  # GQA: K not repeated
    assert scale == pytest.approx(16 ** -0.5)
    assert lm.model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_on_every_family_round_trips(profiles, loaded_models, family, tmp_path):
    profile = profiles[family]
    fingerprint = loaded_models[family].adapter.fingerprint()
    assert profile.model == fingerprint
    assert len(profile.attention.layers) == 2 and all(len(layer) == 4 for layer in profile.attention.layers)
    for head in (h for layer in profile.attention.layers for h in layer):
        assert head.recall_min >= 0.95 and 0.0 < head.density <= 1.0
    path = save_profile(profile, tmp_path / f"{family}.yaml")
    again = load_profile(path)
    assert profile_to_dict(again) == profile_to_dict(profile)
    assert again.tensors.keys() == profile.tensors.keys()
    assert all(torch.equal(again.tensors[k], profile.tensors[k]) for k in profile.tensors)
    assert save_profile(again, tmp_path / "again.yaml").read_text() == path.read_text()
    check_profile_matches(again, fingerprint)


def test_vlm_calibration_has_image_spans_and_image_candidates(loaded_models):
    from vlsparse.search.calibration import prepare_sample
    from vlsparse.search.candidates import catalogue

    lm = loaded_models["qwen2_vl"]
    calibration = _small_calibration(lm)
    spans = lm.adapter.image_spans(prepare_sample(lm, calibration.samples[0]))
    assert len(spans) > 1 and all(s.cols == 8 and s.rows == 8 for s in spans)  # 64 px / patch 4 / merge 2
    patterns = {c.pattern for c in catalogue(256, images=True, strides=(8,))}
    assert {"grid", "modality_vertical_slash"} <= patterns


def test_same_seed_same_profile_other_seed_other_data(loaded_models, profiles):
    from vlsparse.search.api import profile_model

    lm = loaded_models["llava"]
    again = profile_model(lm, _small_calibration(lm), threads=1)
    assert profile_to_dict(again) == profile_to_dict(profiles["llava"])
    names = [s.name for s in _small_calibration(lm, seed=1).samples]
    assert names != [s.name for s in _small_calibration(lm).samples]


def test_profile_for_another_model_is_rejected_in_one_line(profiles, loaded_models):
    with pytest.raises(ProfileError) as info:
        check_profile_matches(profiles["llama"], loaded_models["llava"].adapter.fingerprint())
    assert "\n" not in info.value.one_line() and "LlamaForCausalLM" in info.value.one_line()


# ----------------------------------------------------------------------------- CLI


def _cli(args, cwd=None):
    from vlsparse.cli.main import build_app

    return CliRunner().invoke(build_app(), args, catch_exceptions=False)


def test_cli_profile_writes_profile_and_figure_then_inspect_reads_it(model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "calib.txt"
    text.write_text("what is this color shape circle square red blue green " * 80)
    result = _cli(["profile", "--model", str(model_dirs["llama"]), "--calib", str(text), "--samples", "2",
                   "--seq-len", "128", "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "profiles" / "tiny-llama.yaml"
    assert result.stdout.strip() == "profiles/tiny-llama.yaml" and out.is_file()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    inspected = _cli(["inspect", str(out), "--json", "--heads", "--model", str(model_dirs["llama"])])
    data = json.loads(inspected.stdout)
    assert data["heads"] == 8 and sum(data["patterns"].values()) == 8 and len(data["per_head"]) == 8
    assert data["calibration"]["source"] == "text:calib.txt"
    redrawn = _cli(["inspect", str(out), "--png", str(tmp_path / "again.png")])
    assert redrawn.exit_code == 0 and (tmp_path / "again.png").is_file() and "mean density" in redrawn.stdout


def test_cli_profile_jsonl_with_images(model_dirs, tmp_path, image_file):
    lines = [{"images": [str(image_file), str(image_file)], "prompt": "what is in the image?"},
             {"image": str(image_file), "question": "describe the picture"}]
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "llava.yaml"
    result = _cli(["profile", "--model", str(model_dirs["llava"]), "--calib", str(calib), "--out", str(out),
                   "--no-png", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["calibration"]["samples"] == 2 and data["png"] is None and not out.with_suffix(".png").exists()


def test_cli_errors_are_one_line(model_dirs, profiles, tmp_path):
    path = save_profile(profiles["llama"], tmp_path / "llama.yaml")
    wrong = _cli(["inspect", str(path), "--model", str(model_dirs["qwen2_vl"])])
    assert wrong.exit_code == 1 and len(wrong.stderr.strip().splitlines()) == 1
    assert wrong.stderr.startswith("Error: profile") and "not this model" in wrong.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmodel: [unclosed\n")
    bad = _cli(["inspect", str(broken)])
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1 and "not valid YAML" in bad.stderr
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"images": ["missing.png"], "prompt": "x"}\n')
    missing = _cli(["profile", "--model", str(model_dirs["llava"]), "--calib", str(bad_jsonl), "--no-png",
                    "--out", str(tmp_path / "x.yaml")])
    assert missing.exit_code == 1 and "missing.png" in missing.stderr and len(missing.stderr.splitlines()) == 1
