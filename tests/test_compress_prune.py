"""`prune_model` and `vlsparse prune` end to end on tiny models of each family."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlsparse.compress.api import PruneConfig, prune_model
from vlsparse.compress.checkpoint import find_newest_checkpoint
from vlsparse.errors import InputError, OutputError

FAST = dict(samples=2, ecoflap_samples=2, seq_len=16)


def tree_hash(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def checkpoint(folder) -> dict:
    out = {}
    for path in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def llava_ecoflap(llava_dir, tmp_path_factory):
    before = tree_hash(llava_dir)
    out = tmp_path_factory.mktemp("pruned") / "llava-ecoflap"
    result = prune_model(str(llava_dir), out, PruneConfig(ratio=0.5, allocation="ecoflap", **FAST))
    return result, before


def test_ecoflap_meets_ratio_groups_differ_inside_bound(llava_ecoflap):
    result, _ = llava_ecoflap
    assert abs(result.achieved - 0.5) <= 0.001
    sparsities = [g["sparsity"] for g in result.groups]
    assert len(set(sparsities)) > 1
    assert all(abs(s - 0.5) <= 0.1 + 1e-3 for s in sparsities)
    assert [g["group"] for g in result.groups] == ["vision.0", "vision.1", "projector", "lm.0", "lm.1"]


def test_checkpoint_loads_with_stock_from_pretrained_and_has_zeros_in_place(llava_ecoflap, llava_dir):
    from transformers import LlavaForConditionalGeneration

    result, before = llava_ecoflap
    assert tree_hash(llava_dir) == before  # the input is never modified
    dense, pruned = checkpoint(llava_dir), checkpoint(result.out)
    assert dense.keys() == pruned.keys()
    record = yaml.safe_load((result.out / "vlsparse.yaml").read_text())["pruning"]
    by_name = {m["name"]: m for m in record["matrices"]}
    zeros = total = 0
    for key, tensor in pruned.items():
        if key in by_name:
            frac = float((tensor == 0).float().mean())
            assert frac == pytest.approx(by_name[key]["sparsity"], abs=1e-6)
            kept = tensor != 0
            assert torch.equal(tensor[kept], dense[key][kept])  # survivors untouched
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
        else:
            assert torch.equal(tensor, dense[key]), key  # embeddings, norms, lm_head, biases, patch conv
    assert abs(zeros / total - 0.5) <= 0.001
    assert not any("embed" in k or "norm" in k or "lm_head" in k or "patch" in k for k in by_name)
    assert any("multi_modal_projector" in k for k in by_name) and any("vision_tower" in k for k in by_name)
    model = LlavaForConditionalGeneration.from_pretrained(result.out)
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert 0.3 < float((q == 0).float().mean()) < 0.7
    for name in ("config.json", "tokenizer.json", "processor_config.json"):
        assert (result.out / name).is_file()


def test_profile_records_allocation_scores_calibration(llava_ecoflap):
    result, _ = llava_ecoflap
    from vlsparse.profile import load_profile

    profile = load_profile(result.out / "vlsparse.yaml")
    rec = profile.pruning
    assert rec["allocation"] == "ecoflap" and rec["method"] == "wanda" and rec["ratio"] == 0.5
    assert rec["calibration"]["source"] == "demo:vqa" and rec["calibration"]["samples"] == 2
    assert rec["ecoflap"]["epsilon"] == 1e-3
    assert all("score" in g and g["score"] >= 0 for g in rec["groups"])
    assert profile.calibration.samples == 2


@pytest.mark.parametrize("family,structure", [("qwen2_5_vl", "2:4"), ("qwen2_vl", "4:8")])
def test_nm_every_group_of_m_valid(vlm_dirs, tmp_path, family, structure):
    n, m = map(int, structure.split(":"))
    result = prune_model(str(vlm_dirs[family]), tmp_path / "out", PruneConfig(ratio=0.5, structure=structure, **FAST))
    assert result.achieved == 0.5
    pruned = checkpoint(result.out)
    names = [x["name"] for x in yaml.safe_load((result.out / "vlsparse.yaml").read_text())["pruning"]["matrices"]]
    assert any(k.startswith("visual.") for k in names) and any(".merger." in k for k in names)
    for name in names:
        w = pruned[name]
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert torch.all(groups <= m - n), name


def test_owl_and_per_tower_scope(llama_dir, llava_dir, tmp_path):
    result = prune_model(str(llama_dir), tmp_path / "owl", PruneConfig(ratio=0.3, allocation="owl", **FAST))
    assert abs(result.achieved - 0.3) <= 0.001
    assert all(abs(g["sparsity"] - 0.3) <= 0.1 + 1e-3 for g in result.groups)
    result = prune_model(str(llava_dir), tmp_path / "tower",
                         PruneConfig(ratio=0.6, allocation="ecoflap", scope="per-tower", **FAST))
    for tower in (("vision", "projector"), ("lm",)):
        rows = [g for g in result.groups if g["tower"] in tower]
        zeros = sum(g["params"] - g["keep"] for g in rows)
        assert abs(zeros / sum(g["params"] for g in rows) - 0.6) <= 0.001


def test_sequential_loop_calibrates_on_pruned_predecessors(llama_dir, tmp_path):
    """The last layer's masks equal Wanda on inputs computed by the *pruned* earlier layer."""
    from transformers import LlamaForCausalLM

    from vlsparse.compress.calibration import text_calibration
    from vlsparse.compress.wanda import update_sq_norm, wanda_mask
    from vlsparse.models.processors import load_processor

    result = prune_model(str(llama_dir), tmp_path / "out", PruneConfig(ratio=0.5, allocation="uniform", **FAST))
    pruned = LlamaForCausalLM.from_pretrained(result.out).eval()
    dense = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    calib = text_calibration(load_processor(llama_dir, "causal_lm"), None, 2, 16, 0)
    layer = pruned.model.layers[1]
    stats = [None, 0]

    def hook(module, args):
        stats[0], stats[1] = update_sq_norm(stats[0], stats[1], args[0])

    handle = layer.self_attn.q_proj.register_forward_pre_hook(hook)
    # layer 1 must be dense while we measure its inputs: swap in the dense weights of layer 1 only
    layer.load_state_dict(dense.model.layers[1].state_dict())
    with torch.no_grad():
        for batch in calib.batches:
            pruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    handle.remove()
    weight = dense.model.layers[1].self_attn.q_proj.weight
    expected = wanda_mask(weight, stats[0], prune=weight.numel() // 2)
    got = checkpoint(result.out)["model.layers.1.self_attn.q_proj.weight"] != 0
    assert torch.equal(got, expected)


def test_profile_travels_into_checkpoint_and_is_found(llama_dir, tmp_path):
    from vlsparse.models import load
    from vlsparse.profile import AttentionProfile, HeadProfile, Profile, load_profile, save_profile

    loaded = load(str(llama_dir))
    fingerprint = loaded.adapter.fingerprint()
    heads = [[HeadProfile(pattern="a_shape", budget={"sink": 0.1, "local": 0.2})] * fingerprint.num_heads
             for _ in range(fingerprint.num_layers)]
    (tmp_path / "profiles").mkdir()
    save_profile(Profile(model=fingerprint, attention=AttentionProfile(layers=heads), tensors={"x": torch.ones(2)}),
                 tmp_path / "profiles" / "tiny.yaml")
    result = prune_model(str(llama_dir), None, PruneConfig(ratio=0.5, allocation="uniform", **FAST), cwd=tmp_path)
    assert result.out.parent == tmp_path and result.profile_source.endswith("tiny.yaml")
    merged = load_profile(result.out / "vlsparse.yaml")
    assert merged.attention.layers[0][0].pattern == "a_shape" and merged.pruning["allocation"] == "uniform"
    assert torch.equal(merged.tensors["x"], torch.ones(2))
    assert find_newest_checkpoint(tmp_path) == result.out


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(ratio=0.0), InputError, "between 0 and 1"),
    (dict(ratio=1.0), InputError, "between 0 and 1"),
    (dict(ratio=0.4, structure="2:4"), InputError, "needs ratio=0.5"),
    (dict(ratio=0.5, structure="4:8", allocation="ecoflap"), InputError, "uniform"),
    (dict(scope="tower"), InputError, "scope"),
])
def test_bad_config_is_one_typed_error(llama_dir, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        prune_model(str(llama_dir), tmp_path / "out", PruneConfig(**kwargs))
    assert not (tmp_path / "out").exists()


def test_out_inside_input_and_existing_out_refused_before_work(llama_dir, tmp_path):
    with pytest.raises(InputError, match="inside the input"):
        prune_model(str(llama_dir), llama_dir / "pruned", PruneConfig())
    assert not (llama_dir / "pruned").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        prune_model(str(llama_dir), tmp_path / "taken", PruneConfig())


def test_disk_full_while_writing_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    import vlsparse.compress.checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = tree_hash(llama_dir)
    monkeypatch.setattr(ckpt, "write_pruned_shard", full)
    with pytest.raises(OutputError, match="no space left"):
        prune_model(str(llama_dir), tmp_path / "out", PruneConfig(allocation="uniform", **FAST))
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder
    assert tree_hash(llama_dir) == before


def test_packed_checkpoint_loads_back_equal(llama_dir, tmp_path):
    from vlsparse.compress.packed import is_packed, load_packed, unpack_state_dict

    plain = prune_model(str(llama_dir), tmp_path / "plain", PruneConfig(allocation="uniform", **FAST))
    packed = prune_model(str(llama_dir), tmp_path / "packed", PruneConfig(allocation="uniform", pack=True, **FAST))
    assert is_packed(packed.out) and not is_packed(plain.out)
    assert not list(packed.out.glob("model*.safetensors"))
    dense = checkpoint(plain.out)
    restored = unpack_state_dict(packed.out)
    assert restored.keys() == dense.keys()
    assert all(torch.equal(restored[k], dense[k]) for k in dense)
    model = load_packed(packed.out)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, dense["model.layers.0.mlp.up_proj.weight"])


runner = CliRunner()


def test_cli_prune_prints_out_path_and_table(llama_dir, tmp_path):
    from vlsparse.cli.main import build_app

    out = tmp_path / "cli-out"
    result = runner.invoke(build_app(), ["prune", str(llama_dir), "--ratio", "0.5", "--allocation", "uniform",
                                         "--samples", "2", "--seq-len", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "(2/2) Calibrating lm.1" in result.stderr and "lm.0" in result.stderr
    assert (out / "vlsparse.yaml").is_file()


@pytest.mark.parametrize("args,match", [
    (["--ratio", "1.5"], "between 0 and 1"),
    (["--ratio", "0.3", "--structure", "2:4"], "needs --ratio 0.5"),
])
def test_cli_prune_bad_input_is_one_line_exit_1(llama_dir, tmp_path, args, match):
    from vlsparse.cli.main import build_app

    result = runner.invoke(build_app(), ["prune", str(llama_dir), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0]
    assert not (tmp_path / "o").exists()


def test_peak_memory_stays_well_below_model_size(tmp_path):
    """A ~200 MB model pruned in a fresh process: peak RSS grows by far less than the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import word_tokenizer

    torch.manual_seed(0)
    tok = word_tokenizer([])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "big")
    tok.save_pretrained(tmp_path / "big")
    script = textwrap.dedent(f"""
        import json
        from vlsparse.compress.api import PruneConfig, prune_model
        r = prune_model({str(tmp_path / 'big')!r}, {str(tmp_path / 'out')!r},
                        PruneConfig(allocation="uniform", samples=2, seq_len=32))
        print(json.dumps({{"peak": r.peak_rss_mb, "start": r.start_rss_mb, "model": r.model_mb}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["model"] > 190
    # the stem, one 13.6 MB block, Wanda's temporaries and the masks: under half the model (measured
    # 0.32-0.39 of it across runs, allocator-dependent; a copy of the weights would be 1.0 or more)
    assert stats["peak"] - stats["start"] < 0.5 * stats["model"], stats
