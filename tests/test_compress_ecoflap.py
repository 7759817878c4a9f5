"""ECoFLaP's zeroth-order scores: the finite difference matches the true directional derivative."""

from __future__ import annotations

import pytest
import torch

from vlsparse.compress.allocations.ecoflap import noise, zeroth_order_scores
from vlsparse.compress.calibration import take_samples, text_calibration
from vlsparse.compress.checkpoint import CheckpointReader
from vlsparse.compress.sequential import StreamedModel, build_skeleton, find_blocks
from vlsparse.models.adapter import Adapter
from vlsparse.models.processors import load_processor


def test_noise_is_regenerated_identically_and_differs_by_group():
    a = noise(0, 3, 0, 1, (4, 5))
    assert torch.equal(a, noise(0, 3, 0, 1, (4, 5)))
    assert a.dtype == torch.float32
    assert not torch.equal(a, noise(0, 4, 0, 1, (4, 5)))
    assert not torch.equal(a, noise(1, 3, 0, 1, (4, 5)))


def test_zeroth_order_score_matches_autograd_directional_derivative(llama_dir):
    from transformers import LlamaForCausalLM

    skeleton = build_skeleton(llama_dir, "causal_lm")
    blocks = find_blocks(skeleton, Adapter(skeleton, "causal_lm"))
    streamed = StreamedModel(skeleton, CheckpointReader(llama_dir), blocks)
    streamed.load_stem()
    batch = take_samples(text_calibration(load_processor(llama_dir, "causal_lm"), None, 2, 16, 0).batches, 1)
    # a small epsilon: with the default 1e-3, |eps z| is ~5% of these tiny weights and the O(eps^2) term shows
    scores = zeroth_order_scores(streamed, batch, epsilon=1e-4, draws=1, seed=7)
    assert scores.names == ["lm.0", "lm.1"]

    model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    model.zero_grad()
    model(**batch[0], use_cache=False).loss.backward()
    for g, block in enumerate(blocks):
        directional = 0.0
        for i, name in enumerate(block.weight_names()):
            param = model.get_parameter(name)
            directional += float((noise(7, g, 0, i, tuple(param.shape)) * param.grad).sum())
        assert abs(scores.raw[g] - abs(directional)) <= 0.02 * abs(directional) + 1e-4
        assert abs(scores.per_weight[g] - scores.raw[g] / block.size()) < 1e-12


def streamed_with_samples(folder, family: str, samples: int):
    """(streamed model with its stem, its blocks, ``samples`` one-sample calibration batches) of a tiny model."""
    from vlsparse.compress.calibration import build_calibration

    skeleton = build_skeleton(folder, family)
    adapter = Adapter(skeleton, family)
    blocks = find_blocks(skeleton, adapter)
    streamed = StreamedModel(skeleton, CheckpointReader(folder), blocks)
    streamed.load_stem()
    calib = build_calibration(adapter, load_processor(folder, family), None, samples, 16, 0)
    return streamed, blocks, take_samples(calib.batches, samples)


@pytest.mark.parametrize("fixture,family", [("llama_dir", "causal_lm"), ("llava_dir", "llava"),
                                            ("qwen3_vl_dir", "qwen3_vl")])
def test_replaying_the_unperturbed_prefix_gives_the_same_scores_as_full_forwards(fixture, family, request):
    folder = request.getfixturevalue(fixture)
    streamed, blocks, batches = streamed_with_samples(folder, family, 2)
    full = zeroth_order_scores(streamed, batches, draws=2, seed=3, reuse_prefix=False)
    runs = []  # blocks read and run in the replaying run (replayed ones are neither)
    materialise = streamed.materialise

    def counted(block):
        runs.append(block.name)
        materialise(block)

    streamed.materialise = counted
    replay = zeroth_order_scores(streamed, batches, draws=2, seed=3)
    assert replay.raw == pytest.approx(full.raw, rel=1e-5, abs=1e-9) and max(full.raw) > 0
    g = len(blocks)
    # per batch: one unperturbed forward of every block, then for block k two draws x two signs of blocks k..end
    assert len(runs) == 2 * (g + 4 * sum(g - k for k in range(g)))


@pytest.mark.parametrize("fixture,family", [("llama_dir", "causal_lm"), ("llava_dir", "llava"),
                                            ("qwen3_vl_dir", "qwen3_vl")])
def test_gradient_scores_equal_full_model_autograd(fixture, family, request):
    """Block-by-block gradients (one block resident) equal autograd through the whole model, glue included
    (LLaVA reads its second-last vision layer, Qwen3-VL adds DeepStack features from vision layers)."""
    import math

    from transformers import AutoModelForImageTextToText, LlamaForCausalLM

    from vlsparse.compress.allocations.ecoflap import gradient_scores
    folder = request.getfixturevalue(fixture)
    streamed, blocks, batches = streamed_with_samples(folder, family, 2)
    scores = gradient_scores(streamed, batches)

    auto = LlamaForCausalLM if family == "causal_lm" else AutoModelForImageTextToText
    model = auto.from_pretrained(folder, dtype=torch.float32).eval()
    expected = [0.0] * len(blocks)
    for batch in batches:
        model.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        for g, block in enumerate(blocks):
            norm = math.sqrt(sum(float(model.get_parameter(n).grad.double().square().sum())
                                 for n in block.weight_names()))
            expected[g] += math.sqrt(2 / math.pi) * norm / len(batches)
    assert scores.raw == pytest.approx(expected, rel=1e-4) and min(expected) > 0


def test_prune_with_gradient_scores_records_them_and_a_bad_name_is_one_line(llama_dir, tmp_path, capsys):
    from vlsparse.cli.main import main
    from vlsparse.compress.api import PruneConfig, prune_model
    from vlsparse.profile import load_profile
    from vlsparse.recipe import recipe_from_profile

    config = PruneConfig(ratio=0.5, allocation="ecoflap", ecoflap_scores="gradient", samples=2, ecoflap_samples=2,
                         seq_len=16)
    result = prune_model(str(llama_dir), tmp_path / "out", config)
    assert result.achieved == 0.5
    profile = load_profile(result.out / "vlsparse.yaml")
    assert profile.pruning["ecoflap"] == {"scores": "gradient", "samples": 2}
    assert recipe_from_profile(profile)["steps"][0]["prune"]["ecoflap_scores"] == "gradient"
    assert main(["prune", str(llama_dir), "--ecoflap-scores", "first-order", "--quiet"]) == 1
    assert [line for line in capsys.readouterr().err.splitlines() if line.strip()] == [
        "Error: unknown --ecoflap-scores first-order — use zeroth-order or gradient"]
