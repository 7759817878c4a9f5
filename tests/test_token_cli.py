"""Token reduction through the CLI: calibrate --tokens writes the section, run/eval/bench use it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.profile import load_profile

runner = CliRunner()


def invoke(*args):
    return runner.invoke(build_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def fastv_profile(llava4_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens") / "fastv.yaml"
    result = invoke("calibrate", llava4_dir, "--tokens", "fastv", "--keep", 0.25, "--samples", 2, "--seq-len", 128,
                    "--guard-tokens", 4, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_calibrate_tokens_writes_the_section_with_its_guard(fastv_profile):
    out, report = fastv_profile
    section = load_profile(out).tokens
    assert report["out"] == str(out) and report["tokens"] == section
    assert section["method"] == "fastv" and section["keep"] == 0.25
    assert section["schedule"] == [{"layer": 1, "keep": 0.25}]  # K = 2: after layer index 1
    guard = section["guard"]
    assert guard["auto"] is False and [c["keep"] for c in guard["candidates"]] == [0.25]
    row = guard["candidates"][0]
    assert row["passed"] == (row["first_token"] == row["answer"] == 1.0)
    assert row["image_kept"] == 0.25  # 16 of 64 image tokens on every calibration prompt
    assert section["calibration"]["samples"] == 2 and section["calibration"]["max_new_tokens"] == 4


def test_run_uses_the_tokens_section_and_reports_kept_counts(fastv_profile, llava4_dir, image_file):
    out, _ = fastv_profile
    args = ("run", "--model", llava4_dir, "--profile", out, "--max-new-tokens", 2, image_file, image_file,
            "what color is this ?")
    data = json.loads(invoke(*args, "--json").stdout)
    tokens = data["tokens"]
    assert tokens["method"] == "fastv" and tokens["image_tokens_total"] == 32 == data["image_tokens"]
    assert tokens["image_tokens_kept"] == 8 and tokens["stages"][0]["drop_after"] == 1
    off = json.loads(invoke(*args, "--json", "--no-tokens").stdout)
    assert off["tokens"] == {}
    shown = invoke(*args)
    assert shown.exit_code == 0 and "8/32 (fastv, after layer 1)" in shown.stderr


def test_calibrate_auto_tries_the_smallest_keep_first(llava4_dir, tmp_path):
    out = tmp_path / "auto.yaml"
    result = invoke("calibrate", llava4_dir, "--tokens", "divprune", "--samples", 1, "--seq-len", 128,
                    "--guard-tokens", 2, "--out", out, "--json")
    if result.exit_code == 0:
        section = json.loads(result.stdout)["tokens"]
        tried = [c["keep"] for c in section["guard"]["candidates"]]
        assert tried == [0.11, 0.25, 0.5][:len(tried)] and section["keep"] == tried[-1]
        assert section["guard"]["candidates"][-1]["passed"]
        assert not any(c["passed"] for c in section["guard"]["candidates"][:-1])
    else:  # no ratio kept every answer: one line saying how close each came, nothing written
        assert "changed a calibration answer at every keep ratio" in result.stderr and not out.exists()


@pytest.mark.parametrize("args,message", [
    (("--tokens", "fastvv"), "unknown token-reduction method"),
    (("--tokens", "fastv", "--keep", "2"), "--keep must lie in (0, 1]"),
    (("--tokens", "fastv", "--keep", "most"), "neither a ratio nor auto"),
    (("--keep", "0.5"), "apply to --tokens"),
    (("--tokens", "fastv", "--token-param", "k"), "NAME=VALUE"),
    (("--tokens", "fastv", "--keep", "0.5", "--token-param", "k=9"), "would drop tokens after layer 8"),
    (("--tokens", "fastv", "--keep", "0.5", "--token-param", "rows=diagonal"), "--tokens fastv: rows should be"),
])
def test_calibrate_tokens_errors_are_one_line(llava4_dir, tmp_path, args, message):
    result = invoke("calibrate", llava4_dir, *args, "--samples", 1, "--seq-len", 128, "--out", tmp_path / "x.yaml")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_eval_profile_compares_tokens_and_combined_with_dense(fastv_profile, llava4_dir, tmp_path):
    from vlsparse.models import load
    from vlsparse.profile import AttentionProfile, HeadProfile, save_profile

    out, _ = fastv_profile
    result = json.loads(invoke("eval", "--model", llava4_dir, "--task", "demo-vqa", "--n", 2, "--profile", out,
                               "--json").stdout)
    assert list(result["configs"]) == ["tokens"]
    tokens = result["configs"]["tokens"]
    assert tokens["image_tokens_total"] > tokens["image_tokens_kept"] > 0 and tokens["n"] == 2
    assert result["attention_density"] is None and result["dense"]["n"] == 2
    both = load_profile(out)
    heads = [[HeadProfile("block_sparse", {"blocks": 1.0}) for _ in range(4)] for _ in range(4)]
    both.attention = AttentionProfile(layers=heads)
    save_profile(both, tmp_path / "both.yaml")
    result = json.loads(invoke("eval", "--model", llava4_dir, "--task", "demo-multi", "--n", 1, "--profile",
                               tmp_path / "both.yaml", "--json").stdout)
    assert list(result["configs"]) == ["sparse", "tokens", "combined"]
    assert result["configs"]["sparse"]["agreement"] == 1.0  # every causal block kept: exact
    assert result["configs"]["combined"]["image_tokens_kept"] == result["configs"]["tokens"]["image_tokens_kept"]
    assert result["accuracy"] == result["configs"]["combined"]["accuracy"]
    assert load(llava4_dir).adapter.num_layers == 4


def test_bench_e2e_runs_tokens_and_combines_them_with_everything(fastv_profile, llava4_dir, tmp_path):
    from vlsparse.bench.e2e import bench_e2e
    from vlsparse.profile import AttentionProfile, HeadProfile, save_profile

    out, _ = fastv_profile
    profile = load_profile(out)
    profile.attention = AttentionProfile(layers=[[HeadProfile("a_shape", {"sink": 0.05, "local": 0.1})] * 4] * 4)
    profile.core = {"version": 1, "neurons": {"beta": 0.4, "layers": {"first": 0, "last": 1}},
                    "tokens": {"layer": 0, "min_keep": 0.1, "max_keep": 0.5}}
    save_profile(profile, tmp_path / "all.yaml")

    def evaluate(model, processor, task, n, seed):
        from PIL import Image

        from vlsparse.models.processors import prepare_inputs

        inputs = prepare_inputs(processor, "llava", [Image.new("RGB", (16, 16), "red")] * 2, "what color ?")
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        return {"n": n, "accuracy": 1.0}

    rows = bench_e2e(llava4_dir, task="vqa", n=1, profile=tmp_path / "all.yaml", configs=["dense", "tokens",
                     "core_tokens", "combined"], speed_prompts=1, decode_tokens=2, repeats=1, evaluate=evaluate)
    by = {r["config"]: r for r in rows}
    assert by["tokens"]["token_method"] == "fastv" and by["tokens"]["image_tokens_kept"] == 8  # 25% of 32
    assert by["tokens"]["kv_cache_mib"] < by["dense"]["kv_cache_mib"]
    assert by["core_tokens"]["token_method"] is None  # CoreMatching, not the method
    combined = by["combined"]
    assert combined["token_method"] == "fastv" and combined["image_tokens_kept"] == 8  # the method, not core tokens
    assert combined["core_neurons_kept"] == 2 * 52  # core neurons still on


def test_bench_tokens_smoke_runs_table_json_and_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("bench", "tokens", "--n", 2, "--methods", "fastv", "--keep", 0.5, "--tasks", "demo-vqa")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["task", "method", "keep", "kept"]
    assert lines[1].split()[:3] == ["vqa", "dense", "1"] and lines[2].split()[:4] == ["vqa", "fastv", "0.5", "72/144"]
    figure = tmp_path / "tokens-bench.png"
    pytest.importorskip("matplotlib")
    assert figure.is_file()
    result = invoke("bench", "tokens", "--n", 2, "--methods", "fastv,todre", "--keep", 0.5, "--tasks", "demo-vqa",
                    "--json", "--png", figure, "--force")
    data = json.loads(result.stdout)
    fastv = next(r for r in data["rows"] if r["method"] == "fastv")
    assert fastv["n"] == 2 and 0 <= fastv["ci95"][0] <= fastv["accuracy"] <= fastv["ci95"][1] <= 1
    assert fastv["image_tokens_kept"] == 72 and fastv["kept_share"] == 0.5 and fastv["kv_ratio"] < 1
    assert fastv["prefill_speedup"] > 0 and fastv["decode_speedup"] > 0
    split = fastv["per_qtype"]  # position questions apart from the rest
    assert fastv["accuracy_position"] == (split["position"]["accuracy"] if "position" in split else None)
    assert fastv["accuracy_other"] is not None
    todre = next(r for r in data["rows"] if r["method"] == "todre")
    assert todre["accuracy"] is None and "4-layer" in todre["note"]  # 7L/8 is the demo LM's last layer
    result = invoke("bench", "tokens", "--n", 1, "--methods", "fastv", "--tasks", "demo-vqa", "--png", figure)
    assert result.exit_code == 1 and "--force" in result.stderr  # never replaced without --force
