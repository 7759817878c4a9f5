"""Recipes (`vlsparse recipe export / apply`, ``vlsparse.recipe``) on tiny LLaVA models.

The source compression is made with the real commands (profile, prune carrying the profile,
calibrate core, calibrate --tokens); its recipe must name exactly the options those commands
were given, and replaying it must record the same options again and prune to the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.errors import InputError, OutputError
from vlsparse.profile import load_profile, profile_from_dict, profile_to_dict
from vlsparse.recipe import load_recipe, recipe_from_profile, save_recipe
from vlsparse.recipe_apply import apply_recipe

runner = CliRunner()

PROFILE = {"calib": None, "samples": 2, "seq_len": 128, "seed": 0, "recall": 0.9, "tail_recall": 0.8,
           "dense_tail": True}
PRUNE = {"ratio": 0.4, "method": "wanda", "allocation": "ecoflap", "structure": "unstructured", "scope": "global",
         "max_deviation": 0.15, "calib": None, "samples": 2, "seq_len": 16, "seed": 3, "pack": False,
         "ecoflap_samples": 2, "epsilon": 0.002, "draws": 1}
CORE = {"calib": None, "samples": 1, "seq_len": 128, "seed": 1, "alpha": 0.3, "beta": 0.5, "max_error": 10.0,
        "neuron_layers": None, "token_layers": "0", "score": "auto", "min_keep": 0.1, "max_keep": [0.5],
        "kl_budget": 0.2, "min_top1": 1.0, "cats_sparsity": 0.4, "decode_tokens": 2, "guard_tokens": 0}
TOKENS = {"tokens": "fastv", "keep": 0.5, "token_param": {"k": 1}, "calib": None, "samples": 1, "seq_len": 128,
          "seed": 2, "guard_tokens": 4}
RECIPE = {"vlsparse_recipe": 1, "steps": [{"profile": PROFILE}, {"prune": PRUNE}, {"calibrate": CORE},
                                          {"calibrate": TOKENS}]}


def invoke(*args):
    return runner.invoke(build_app(), [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and " — " in lines[0] and "Traceback" not in result.output
    return lines[0]


def weights(folder) -> dict:
    out = {}
    for path in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(path)))
    return out


def tree_hash(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def made(llava_dir, tmp_path_factory):
    """A compression of the 2-layer tiny LLaVA made with the commands themselves, flags as in ``RECIPE``."""
    tmp = tmp_path_factory.mktemp("recipe-source")
    p, c, t = PROFILE, CORE, TOKENS
    ok(invoke("profile", llava_dir, "--samples", p["samples"], "--seq-len", p["seq_len"], "--seed", p["seed"],
              "--recall", p["recall"], "--tail-recall", p["tail_recall"], "--out", tmp / "p.yaml", "--no-png", "-q"))
    ok(invoke("prune", llava_dir, "--ratio", 0.4, "--allocation", "ecoflap", "--max-deviation", 0.15, "--samples", 2,
              "--ecoflap-samples", 2, "--seq-len", 16, "--seed", 3, "--epsilon", 0.002, "--profile", tmp / "p.yaml",
              "--out", tmp / "ckpt", "-q"))
    ok(invoke("calibrate", tmp / "ckpt", "--samples", c["samples"], "--seq-len", c["seq_len"], "--seed", c["seed"],
              "--alpha", c["alpha"], "--beta", c["beta"], "--max-error", c["max_error"], "--token-layers", "0",
              "--score", "auto", "--max-keep", "0.5", "--kl-budget", c["kl_budget"], "--cats-sparsity",
              c["cats_sparsity"], "--decode-tokens", c["decode_tokens"], "--guard-tokens", 0,
              "--profile", tmp / "ckpt" / "vlsparse.yaml", "--out", tmp / "core.yaml", "-q"))
    ok(invoke("calibrate", tmp / "ckpt", "--tokens", "fastv", "--keep", 0.5, "--token-param", "k=1", "--samples", 1,
              "--seq-len", 128, "--seed", t["seed"], "--guard-tokens", t["guard_tokens"], "--profile",
              tmp / "core.yaml", "--out", tmp / "full.yaml", "-q"))
    return tmp


def test_recipe_export_names_every_option_the_commands_were_given(made):
    exported = yaml.safe_load(ok(invoke("recipe", "export", made / "full.yaml")).stdout)
    assert exported == RECIPE
    as_json = json.loads(ok(invoke("recipe", "export", made / "full.yaml", "--json")).stdout)
    assert as_json == RECIPE
    # the checkpoint's own vlsparse.yaml holds the profile and prune steps (calibrate wrote elsewhere)
    from_checkpoint = yaml.safe_load(ok(invoke("recipe", "export", made / "ckpt")).stdout)
    assert from_checkpoint == {"vlsparse_recipe": 1, "steps": [{"profile": PROFILE}, {"prune": PRUNE}]}


def test_recipe_apply_on_another_model_records_the_recipe(made, llava4_dir, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    assert ok(invoke("recipe", "export", made / "full.yaml", "--out", recipe_file)).stdout.strip() == str(recipe_file)
    result = ok(invoke("recipe", "apply", recipe_file, llava4_dir, "--workdir", tmp_path / "w", "--json"))
    report = json.loads(result.stdout)
    checkpoint = tmp_path / "w" / "checkpoint"
    assert report["checkpoint"] == str(checkpoint)
    assert [s["step"] for s in report["steps"]] == ["profile", "prune", "calibrate", "calibrate --tokens fastv"]
    assert report["steps"][0]["wrote"] == str(tmp_path / "w" / "profile.yaml")
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 50 for s in report["steps"])
    profile = load_profile(checkpoint / "vlsparse.yaml")
    assert profile.model.num_layers == 4 and profile.attention is not None  # made on the 4-layer model
    assert profile.core["layers"][-1]["layer"] == 3 and profile.tokens["method"] == "fastv"
    assert recipe_from_profile(profile) == load_recipe(recipe_file) == RECIPE
    refused = invoke("recipe", "apply", recipe_file, llava4_dir, "--workdir", tmp_path / "w")
    assert "already exists" in one_error_line(refused)


def test_recipe_replay_on_the_same_model_prunes_to_the_same_weights(made, llava_dir, tmp_path):
    recipe = recipe_from_profile(load_profile(made / "ckpt" / "vlsparse.yaml"))
    lines = []
    result = apply_recipe(recipe, str(llava_dir), tmp_path / "same", progress=lines.append)
    assert any(line.startswith("[2/2] prune") for line in lines)
    original, replayed = weights(made / "ckpt"), weights(result.checkpoint)
    assert original.keys() == replayed.keys()
    assert all(torch.equal(original[k], replayed[k]) for k in original)
    pruned = load_profile(result.checkpoint / "vlsparse.yaml").pruning
    assert abs(pruned["achieved"] - 0.4) < 0.02  # really pruned, so equal weights say something
    other = copy.deepcopy(recipe)
    other["steps"][1]["prune"]["seed"] = 4  # another seed: other ECoFLaP noise and calibration samples
    changed = weights(apply_recipe(other, str(llava_dir), tmp_path / "seed4").checkpoint)
    assert not all(torch.equal(original[k], changed[k]) for k in original)


def test_recipe_export_never_writes_into_the_checkpoint(made):
    before = tree_hash(made / "ckpt")
    ok(invoke("recipe", "export", made / "ckpt"))
    line = one_error_line(invoke("recipe", "export", made / "ckpt", "--out", made / "ckpt" / "recipe.yaml"))
    assert "inside the input" in line
    assert tree_hash(made / "ckpt") == before and not (made / "ckpt" / "recipe.yaml").exists()


@pytest.mark.parametrize("text, says", [
    ("vlsparse_recipe: 1\nsteps: [{prune: {ratoi: 0.5}}]\n", "unknown option 'ratoi'"),
    ("vlsparse_recipe: 1\nsteps: [{quantize: {bits: 4}}]\n", "'quantize', not a known step"),
    ("vlsparse_recipe: 1\nsteps: [{prune: {ratio: half}}]\n", "`ratio` should be a number"),
    ("vlsparse_recipe: 1\nsteps: [{prune: {ratio: 1.5}}]\n", "ratio must be between 0 and 1"),
    ("vlsparse_recipe: 1\nsteps: [{prune: {}}, {profile: {}}]\n", "comes after a later step"),
    ("vlsparse_recipe: 1\nsteps: [{calibrate: {tokens: nosuch}}]\n", "nosuch"),
    ("vlsparse_recipe: 1\nsteps: [{profile: {seq_len: 16}}]\n", "`seq_len` should be at least 128"),
    ("vlsparse_recipe: 2\nsteps: [{prune: {}}]\n", "should be 1, got 2"),
    ("vlsparse_recipe: 1\nrecipe: x\nsteps: [{prune: {}}]\n", "unknown key 'recipe'"),
    ("steps: [prune: {ratio: 0.5\n", "not valid YAML"),
])
def test_recipe_bad_recipe_is_one_error_line(llava_dir, tmp_path, text, says):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = one_error_line(invoke("recipe", "apply", bad, llava_dir, "--workdir", tmp_path / "w"))
    assert says in line and str(bad) in line
    assert not (tmp_path / "w").exists()


def test_save_recipe_replaces_only_its_own_files_with_force(tmp_path):
    path = tmp_path / "r.yaml"
    save_recipe(RECIPE, path)
    assert load_recipe(path) == RECIPE
    with pytest.raises(OutputError, match="already exists"):
        save_recipe(RECIPE, path)
    save_recipe({"vlsparse_recipe": 1, "steps": [{"prune": {"ratio": 0.3}}]}, path, force=True)
    assert load_recipe(path)["steps"] == [{"prune": {"ratio": 0.3}}]
    foreign = tmp_path / "notes.yaml"
    foreign.write_text("shopping: [milk]\n")
    with pytest.raises(OutputError, match="did not write"):
        save_recipe(RECIPE, foreign, force=True)
    assert foreign.read_text() == "shopping: [milk]\n"
    with pytest.raises(InputError, match="unknown option"):
        save_recipe({"vlsparse_recipe": 1, "steps": [{"prune": {"bits": 4}}]}, tmp_path / "x.yaml")


def test_recipe_from_profiles_written_before_the_options_were_recorded(made):
    data = profile_to_dict(load_profile(made / "full.yaml"))
    assert data["calibration"]["target_seq_len"] == 128 and data["calibration"]["seq_len"] != 128
    del data["calibration"]["target_seq_len"], data["pruning"]["calibration"]["target_seq_len"], data["core"]["options"]
    old = profile_from_dict(data)  # an older profile still loads ...
    assert old.calibration.target_seq_len is None and "target_seq_len" not in profile_to_dict(old)["calibration"]
    steps = [next(iter(s.values())) for s in recipe_from_profile(old)["steps"]]
    assert steps[0]["seq_len"] == data["calibration"]["seq_len"]  # ... and replays what it recorded
    assert steps[1]["seq_len"] == data["pruning"]["calibration"]["seq_len"]
    assert steps[2]["score"] == data["core"]["tokens"]["score"] and steps[2]["neuron_layers"] is None
