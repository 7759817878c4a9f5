"""`bench_e2e` on a tiny LLaVA with a stand-in evaluator: every configuration, one run."""

from __future__ import annotations

import shutil

from PIL import Image

from vlsparse.bench.e2e import E2E_CONFIGS, bench_e2e, format_table
from vlsparse.models import load
from vlsparse.profile import AttentionProfile, HeadProfile, Profile, save_profile

CORE = {"version": 1, "neurons": {"alpha": 0.2, "beta": 0.4, "layers": {"first": 0, "last": 1}},
        "tokens": {"layer": 0, "min_keep": 0.1, "max_keep": 0.5, "score": "text"}}


def fake_evaluate(model, processor, task, n, seed):
    """Greedy answers about 2, 3, ... tiny images; 'accuracy' = share of first answer tokens equal to id 11."""
    from vlsparse.models.processors import prepare_inputs

    hits = 0
    for i in range(n):
        images = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green", "white")[: 2 + i]]
        inputs = prepare_inputs(processor, "llava", images, "what color is the circle ?")
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        hits += int(out[0, inputs["input_ids"].shape[1]] == 11)
    return {"n": n, "accuracy": hits / n, "ci95": [0.0, 1.0]}


def test_bench_e2e_runs_every_configuration(llava_dir, tmp_path):
    loaded = load(llava_dir)
    heads = [[HeadProfile("a_shape", {"sink": 0.05, "local": 0.1}) for _ in range(4)] for _ in range(2)]
    profile = tmp_path / "tiny.yaml"
    save_profile(Profile(model=loaded.adapter.fingerprint(), attention=AttentionProfile(layers=heads), core=CORE),
                 profile)
    pruned = tmp_path / "pruned"  # stands in for a pruned checkpoint carrying its own core calibration
    shutil.copytree(llava_dir, pruned)
    own = {**CORE, "neurons": {**CORE["neurons"], "beta": 1.0}}
    save_profile(Profile(model=loaded.adapter.fingerprint(), core=own), pruned / "vlsparse.yaml")
    rows = bench_e2e(llava_dir, task="vqa", n=1, profile=profile, pruned=pruned, speed_prompts=1, decode_tokens=2,
                     repeats=1, evaluate=fake_evaluate)
    by = {r["config"]: r for r in rows}
    assert list(by) == list(E2E_CONFIGS)
    ran = [r for r in rows if not (r["config"] == "kv_quantized" and "not installed" in r["note"])]
    assert all(r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["n"] == 1 for r in ran)
    assert by["dense_static"]["kv_cache_mib"] >= by["dense"]["kv_cache_mib"]  # allocated for the whole generation
    assert by["kv_fp"]["accuracy"] == by["dense"]["accuracy"]
    assert by["kv_fp"]["decode_agreement"] == by["dense"]["decode_agreement"] == 1.0  # the same numbers as dense
    from vlsparse.bench.e2e import agreement

    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5 and agreement([5], [6]) == 0.0
    assert by["dense"]["image_tokens_total"] is None and by["dense"]["prefill_speedup"] == 1.0
    tokens = by["core_tokens"]
    assert tokens["image_tokens_kept"] < tokens["image_tokens_total"] == 32  # the first captured prompt: 2 images
    assert tokens["kv_cache_mib"] < by["dense"]["kv_cache_mib"]  # a shorter cache after the token layer
    neurons = by["core_neurons"]  # no token layer: every image token counted and kept
    assert neurons["core_neurons_kept"] == 2 * 52 and neurons["image_tokens_kept"] == neurons["image_tokens_total"] == 32
    combined = by["combined"]
    assert combined["model"] == "pruned" and combined["image_tokens_kept"] < 32
    assert combined["core_neurons_kept"] == combined["core_neurons_total"] == 256  # the checkpoint's own beta = 1
    assert "core_tokens" in format_table(rows)
