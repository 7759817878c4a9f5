"""`vlsparse eval --profile P --recall-guard`: heads that fell back to dense, counted per sample."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.kernels.recall_guard import fallback_summary
from vlsparse.models import load
from vlsparse.profile import HeadProfile, save_profile

from test_kernels_runtime import uniform_profile

runner = CliRunner()


def test_fallback_summary_counts_per_sample_worked_by_hand():
    # three prompts: 3 of 8 sparse heads fell back, none of 8, and one too short to run sparse
    summary = fallback_summary([(3, 8), (0, 8), (0, 0)])
    assert summary["heads_dense"] == [3, 0, 0] and summary["heads_checked"] == [8, 8, 0]
    assert summary["mean_heads_dense"] == 1.0 and summary["mean_heads_checked"] == 16 / 3
    assert summary["fraction_dense"] == 3 / 16
    assert fallback_summary([(0, 0)])["fraction_dense"] is None  # nothing ran sparse: no share


def _profile(loaded, tmp_path, name, local):
    head = HeadProfile("a_shape", {"sink": 0.01, "local": local}, density=0.1)
    path = tmp_path / f"{name}.yaml"
    save_profile(uniform_profile(loaded.adapter, head), path)
    return path


def test_eval_recall_guard_counts_the_heads_that_fell_back_on_each_sample(llava_dir, tmp_path):
    loaded = load(llava_dir)
    heads = loaded.adapter.num_heads * loaded.adapter.num_layers
    thin = _profile(loaded, tmp_path, "thin", 0.02)  # misses most of a random model's attention
    wide = _profile(loaded, tmp_path, "wide", 1.0)  # its window covers every key
    args = ["eval", "--model", str(llava_dir), "--task", "demo-multi", "--n", "2", "--json"]

    guarded = runner.invoke(build_app(), [*args, "--profile", str(thin), "--recall-guard"])
    assert guarded.exit_code == 0, guarded.output
    report = json.loads(guarded.stdout)
    assert report["mean_prompt_tokens"] >= 512  # past the runtime's minimum: every head was checked
    guard = report["recall_guard"]
    assert guard["heads_dense"] == [heads, heads] and guard["heads_checked"] == [heads, heads]
    assert guard["mean_heads_dense"] == heads and guard["fraction_dense"] == 1.0
    assert report["configs"]["sparse"]["recall_guard"] == guard
    assert report["attention_density"] == 1.0  # every head ran dense

    unguarded = json.loads(runner.invoke(build_app(), [*args, "--profile", str(thin)]).stdout)
    assert "recall_guard" not in unguarded and unguarded["attention_density"] < 0.5  # the guard changed the run

    kept = json.loads(runner.invoke(build_app(), [*args, "--profile", str(wide), "--recall-guard"]).stdout)
    assert kept["recall_guard"]["heads_dense"] == [0, 0] and kept["recall_guard"]["heads_checked"] == [heads, heads]

    table = runner.invoke(build_app(), [*args[:-1], "--profile", str(thin), "--recall-guard"])
    assert table.exit_code == 0 and f"{heads:.1f} (100.0% of sparse)" in table.stdout


def test_eval_recall_guard_needs_a_profile_with_attention(llava_dir, tmp_path):
    result = runner.invoke(build_app(), ["eval", "--model", str(llava_dir), "--task", "demo-vqa", "--recall-guard"])
    assert result.exit_code == 1 and "--recall-guard" in result.stderr and "--profile" in result.stderr


def test_bench_e2e_counts_the_heads_that_fell_back(llava_dir, tmp_path):
    from vlsparse.bench.e2e import bench_e2e, format_table

    loaded = load(llava_dir)
    heads = loaded.adapter.num_heads * loaded.adapter.num_layers
    common = dict(task="multi", n=2, configs=["dense", "sparse_attention"], speed_prompts=1, decode_tokens=2,
                  repeats=1)
    thin = _profile(loaded, tmp_path, "thin", 0.02)
    rows = bench_e2e(llava_dir, profile=thin, recall_guard=True, **common)
    sparse = rows[1]
    assert sparse["heads_dense_per_prompt"] == heads and sparse["heads_dense_share"] == 1.0
    assert "heads_dense_per_prompt" in format_table(rows)
    wide = bench_e2e(llava_dir, profile=_profile(loaded, tmp_path, "wide", 1.0), recall_guard=True, **common)[1]
    assert wide["heads_dense_per_prompt"] == 0 and wide["heads_dense_share"] == 0.0
    plain = bench_e2e(llava_dir, profile=thin, **common)[1]
    assert "heads_dense_per_prompt" not in plain
