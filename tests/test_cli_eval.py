"""`vlsparse eval` on tiny models."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vlsparse.cli.main import build_app

runner = CliRunner()


def test_eval_pydoc_perplexity_json(llama_dir):
    result = runner.invoke(build_app(), ["eval", "--model", str(llama_dir), "--task", "pydoc-ppl", "--json",
                                         "--seq-len", "256"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == "pydoc-ppl" and data["perplexity"] > 1.0 and data["windows"] >= 1
    assert data["peak_rss_mb"] > 50  # this process's peak resident memory: python, torch and the model


def test_eval_rejects_unknown_task_and_ppl_on_vlm(llava_dir):
    result = runner.invoke(build_app(), ["eval", "--model", str(llava_dir), "--task", "imagenet"])
    assert result.exit_code == 1 and "unknown task" in result.stderr
    result = runner.invoke(build_app(), ["eval", "--model", str(llava_dir), "--task", "pydoc-ppl"])
    assert result.exit_code == 1 and "language models" in result.stderr


def _profile_file(folder, loaded, head, name):
    from vlsparse.profile import AttentionProfile, Profile, save_profile

    layers = [[head for _ in range(loaded.adapter.num_heads)] for _ in range(loaded.adapter.num_layers)]
    path = folder / name
    save_profile(Profile(model=loaded.adapter.fingerprint(), attention=AttentionProfile(layers=layers)), path)
    return path


def test_eval_with_profile_sets_sparse_next_to_dense_on_the_same_samples(llava_dir, tmp_path):
    from vlsparse.models import load
    from vlsparse.profile import HeadProfile

    loaded = load(str(llava_dir))
    exact = _profile_file(tmp_path, loaded, HeadProfile("block_sparse", {"blocks": 1.0}), "exact.yaml")
    thin = _profile_file(tmp_path, loaded, HeadProfile("a_shape", {"sink": 0.01, "local": 0.02}, density=0.05),
                         "thin.yaml")
    args = ["eval", "--model", str(llava_dir), "--task", "demo-multi", "--n", "2", "--json"]
    same = json.loads(runner.invoke(build_app(), [*args, "--profile", str(exact)]).stdout)
    assert same["mean_prompt_tokens"] >= 512  # long enough for the sparse runtime
    assert same["attention_density"] == 1.0 and same["agreement"] == 1.0  # every causal block kept: exact
    assert same["accuracy"] == same["dense"]["accuracy"] and same["accuracy_delta"] == 0.0
    assert same["prefill_speedup"] > 0
    thin_result = json.loads(runner.invoke(build_app(), [*args, "--profile", str(thin)]).stdout)
    assert 0 < thin_result["attention_density"] < 0.5
    assert thin_result["dense"]["answers"] == same["dense"]["answers"]  # the dense pass is the same samples


def test_eval_profile_on_perplexity_is_refused(llama_dir, tmp_path):
    result = runner.invoke(build_app(), ["eval", "--model", str(llama_dir), "--task", "pydoc-ppl", "--profile",
                                         str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and "--profile" in result.stderr
