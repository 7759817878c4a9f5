"""The whole CLI pipeline on each family's tiny model: profile -> prune (unstructured and 2:4) -> calibrate
(core neurons, then a token method) -> run the pruned checkpoint with the resulting profile.

One module-scoped pipeline per family (small calibration: 1 sample, 128 tokens); the tests read its results.
Mllama's images enter through cross-attention: its token method is refused in one line and its run uses
the core profile.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlsparse.cli.main import build_app
from vlsparse.profile import load_profile

FAMILIES = ["llava_next", "llava_onevision", "qwen3_vl", "internvl", "gemma3", "paligemma", "idefics3", "smolvlm",
            "mllama"]
SMALL = ("--samples", 1, "--seq-len", 128)


def invoke(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module", params=FAMILIES)
def pipeline(request, tmp_path_factory, image_file):
    key = request.param
    model = request.getfixturevalue(f"{key}_dir")
    work = tmp_path_factory.mktemp(f"pipeline-{key}")
    p = SimpleNamespace(key=key, model=model, profile=work / "attention.yaml", pruned=work / "pruned",
                        pruned_24=work / "pruned-24", core=work / "core.yaml", tokens=work / "tokens.yaml")
    p.profiled = _ok(invoke("profile", "--model", model, *SMALL, "--no-png", "--out", p.profile))
    p.prune = json.loads(_ok(invoke("prune", model, "--ratio", 0.5, "--samples", 2, "--ecoflap-samples", 1,
                                    "--profile", p.profile, "--out", p.pruned, "--json")).stdout)
    p.prune_24 = _ok(invoke("prune", model, "--ratio", 0.5, "--structure", "2:4", "--samples", 2,
                            "--out", p.pruned_24, "--quiet"))
    p.calibrated = json.loads(_ok(invoke("calibrate", p.pruned, *SMALL, "--decode-tokens", 1, "--guard-tokens", 0,
                                         "--max-error", 10, "--profile", p.profile, "--out", p.core,
                                         "--json")).stdout)
    p.token_result = invoke("calibrate", p.pruned, "--tokens", "fastv", "--keep", 0.5, "--token-param", "k=1",
                            *SMALL, "--guard-tokens", 2, "--profile", p.core, "--out", p.tokens, "--json")
    final = p.core if key == "mllama" else p.tokens
    p.ran = json.loads(_ok(invoke("run", "--model", p.pruned, "--profile", final, "--max-new-tokens", 2, "--json",
                                  image_file, "what color is this ?")).stdout)
    p.final = final
    return p


def _lm_mlp_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The pruned checkpoint's language-model MLP matrices, as written on disk."""
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    found = {name: t for name, t in tensors.items() if "vision" not in name and ".mlp." in name
             and name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))}
    assert found, sorted(tensors)[:20]
    return found


def test_pipeline_profile_covers_every_self_attention_layer(pipeline):
    stderr = " ".join(pipeline.profiled.stderr.split())  # rich wraps long progress lines
    profile = load_profile(pipeline.profile)
    layers = profile.attention.layers
    assert len(layers) == profile.model.num_layers and all(len(heads) == profile.model.num_heads for heads in layers)
    assert pipeline.profiled.stdout.strip() == str(pipeline.profile)
    if pipeline.key == "mllama":  # images are given, but reach the LM through cross-attention
        assert "(4 images through cross-attention, no image tokens)" in stderr and "0 images" not in stderr
        assert all(h.pattern == "dense" for i in (1, 3) for h in layers[i])  # no self-attention: kept dense
        assert profile.calibration.seq_len < 128  # a few marker tokens: the prompt stays short
    else:
        counts = [int(n) for n in re.findall(r"tokens \((\d+) image tokens, \d+ images\)", stderr)]
        assert counts and all(n > 0 for n in counts)


def test_pipeline_prune_reaches_the_ratio_on_disk(pipeline):
    assert abs(pipeline.prune["achieved"] - 0.5) < 0.01
    towers = {g["tower"] for g in pipeline.prune["groups"]}
    # Gemma 3's projector is a bare weight matrix (a Parameter, no nn.Linear): it stays dense
    assert towers == ({"vision", "lm"} if pipeline.key == "gemma3" else {"vision", "projector", "lm"})
    zeros = [float((w == 0).float().mean()) for w in _lm_mlp_weights(pipeline.pruned).values()]
    assert all(0.39 < z < 0.61 for z in zeros)  # each block's share within --max-deviation 0.1 of the ratio
    assert load_profile(pipeline.pruned / "vlsparse.yaml").attention is not None  # the profile was carried


def test_pipeline_prune_2_4_zeroes_two_of_every_four(pipeline):
    assert pipeline.prune_24.stdout.strip() == str(pipeline.pruned_24)
    for name, weight in _lm_mlp_weights(pipeline.pruned_24).items():
        groups = (weight.reshape(-1, 4) == 0).sum(dim=1)
        assert bool((groups >= 2).all()), name


def test_pipeline_calibrate_records_core_neurons_and_keeps_the_attention(pipeline):
    core = pipeline.calibrated["core"]
    num_layers = load_profile(pipeline.profile).model.num_layers
    assert core["neurons"]["layers"] == {"first": 0, "last": num_layers - 1}  # every layer within --max-error 10
    if pipeline.key == "mllama":
        assert core["tokens"]["candidates"] == [] and core["tokens"]["layer"] is None  # no image tokens to drop
    else:
        assert core["tokens"]["candidates"]
    saved = load_profile(pipeline.core)
    assert saved.core == core and saved.attention is not None


def test_pipeline_calibrate_tokens_or_its_one_line_refusal(pipeline):
    if pipeline.key == "mllama":
        assert "cross-attention" in one_error_line(pipeline.token_result)
        assert not pipeline.tokens.exists()
        return
    section = json.loads(_ok(pipeline.token_result).stdout)["tokens"]
    assert section["method"] == "fastv" and section["schedule"] == [{"layer": 0, "keep": 0.5}]
    saved = load_profile(pipeline.tokens)
    assert saved.tokens == section and saved.core is not None and saved.attention is not None


def test_pipeline_run_uses_every_section_of_the_profile(pipeline):
    ran = pipeline.ran
    assert ran["profile"] == str(pipeline.final) and ran["new_tokens"] >= 1
    assert ran["attention"].startswith("sparse")  # attached (the tiny prompt is below its length cut: dense)
    assert ran["core"]["core_neurons"] and ran["core"]["core_neurons_kept"] > 0
    if pipeline.key == "mllama":
        assert ran["tokens"] == {} and not ran["core"]["core_tokens"]
        return
    tokens = ran["tokens"]
    assert tokens["method"] == "fastv" and tokens["image_tokens_total"] == ran["image_tokens"] > 0
    assert 0 < tokens["image_tokens_kept"] < tokens["image_tokens_total"]
    assert not ran["core"]["core_tokens"]  # the token method replaces core tokens
