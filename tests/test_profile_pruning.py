"""The ``pruning`` section's schema (``vlsparse.profile.pruning``): rows, derived fields, the checkpoint profile."""

from __future__ import annotations

import torch

from vlsparse.profile import AttentionProfile, Calibration, HeadProfile, ModelFingerprint, Profile
from vlsparse.profile.pruning import (achieved_sparsity, calibration_entry, group_row, matrix_row, pruned_profile,
                                      pruning_section)

FINGERPRINT = ModelFingerprint(architecture="LlamaForCausalLM", name="tiny", num_layers=1, num_heads=2,
                               num_kv_heads=1, head_dim=8, config_sha256="0" * 64)


def _section(**extra):
    groups = [group_row("lm.0", "lm", 100, 40, score=1.23456789e-6), group_row("lm.1", "lm", 300, 160)]
    matrices = [matrix_row("model.layers.0.mlp.up_proj.weight", "lm.0", (10, 10), 40)]
    return pruning_section(method="wanda", allocation="owl", structure="unstructured", scope="global", ratio=0.5,
                           max_deviation=0.1, packed=False, calibration=calibration_entry("pydoc", 4, 16, 0, 64),
                           policy={"owl": {"m": 5.0, "lam": 0.08}}, model="tiny", path="/models/tiny", seconds=1.234,
                           peak_rss_mb=512.04, start_rss_mb=400.06, model_mb=1.0, groups=groups, matrices=matrices,
                           **extra)


def test_section_fields_in_order_with_derived_totals():
    section = _section()
    assert list(section) == ["method", "allocation", "structure", "scope", "ratio", "achieved", "max_deviation",
                             "pruned_params", "packed", "calibration", "owl", "source", "run", "groups", "matrices"]
    assert section["pruned_params"] == 400 and section["achieved"] == 0.5 == achieved_sparsity(section["groups"])
    assert section["groups"][0] == {"group": "lm.0", "tower": "lm", "params": 100, "keep": 60, "sparsity": 0.4,
                                    "score": 1.23457e-06}
    assert "score" not in section["groups"][1]
    assert section["matrices"][0]["shape"] == [10, 10] and section["matrices"][0]["sparsity"] == 0.4
    assert section["run"] == {"seconds": 1.23, "peak_rss_mb": 512.0, "start_rss_mb": 400.1, "model_mb": 1.0}
    assert _section(attention_profile="profiles/tiny.yaml")["attention_profile"] == "profiles/tiny.yaml"


def test_checkpoint_profile_carries_an_attention_profile(tmp_path):
    from vlsparse.profile import load_profile, save_profile

    alone = pruned_profile(FINGERPRINT, _section())
    assert alone.calibration == Calibration("pydoc", 4, 16, 0) and alone.attention is None
    heads = [[HeadProfile(pattern="dense")] * 2]
    carried = Profile(model=FINGERPRINT, calibration=Calibration("demo:multi+grid", 2, 4096, 0),
                      attention=AttentionProfile(layers=heads), tensors={"x": torch.ones(2)})
    merged = pruned_profile(FINGERPRINT, _section(), carried)
    assert merged.calibration.source == "demo:multi+grid" and merged.attention is carried.attention
    save_profile(merged, tmp_path / "vlsparse.yaml")
    loaded = load_profile(tmp_path / "vlsparse.yaml")
    assert loaded.pruning == _section() and torch.equal(loaded.tensors["x"], torch.ones(2))
