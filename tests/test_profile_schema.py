"""The profile contract: round trip, validation, one-line errors."""

from __future__ import annotations

import pytest
import torch
import yaml

from vlsparse.errors import ProfileError
from vlsparse.profile import (AttentionProfile, Calibration, HeadProfile, ModelFingerprint, Profile,
                              check_profile_matches, config_sha256, load_profile, save_profile)


def _fingerprint(**over):
    base = dict(architecture="LlavaForConditionalGeneration", name="demo", num_layers=2, num_heads=2,
                num_kv_heads=1, head_dim=32, config_sha256="abc")
    base.update(over)
    return ModelFingerprint(**base)


def _profile():
    heads = [
        [HeadProfile("vertical_slash", {"vertical": 0.01, "slash": 0.05}, {"vertical": 41, "slash": 205},
                     recall_min=0.96, recall_mean=0.97, density=0.08),
         HeadProfile("static", {"select": 0.3}, {"select": 19}, mask="layer0.head1", density=0.3)],
        [HeadProfile("grid", {"local": 0.02}, {"local": 82}, params={"stride": 8, "phase": 0}, density=0.2),
         HeadProfile("dense")],
    ]
    return Profile(model=_fingerprint(), calibration=Calibration("demo-multi", 2, 4096, 0),
                   attention=AttentionProfile(layers=heads),
                   tensors={"layer0.head1": torch.eye(4, dtype=torch.bool)})


def test_profile_round_trips_through_yaml_and_sidecar(tmp_path):
    path = save_profile(_profile(), tmp_path / "p.yaml")
    assert (tmp_path / "p.safetensors").is_file()
    loaded = load_profile(path)
    assert loaded.attention.layers == _profile().attention.layers
    assert loaded.calibration == _profile().calibration
    assert torch.equal(loaded.tensors["layer0.head1"], torch.eye(4, dtype=torch.bool))
    save_profile(loaded, tmp_path / "q.yaml")
    assert (tmp_path / "q.yaml").read_text() == path.read_text()


def test_tail_settings_round_trip_and_default_off_for_older_profiles(tmp_path):
    profile = _profile()
    profile.attention.layers[0][0].tail_recall_min = 0.97
    profile.attention.tail_recall_target, profile.attention.dense_tail = 0.9, True
    loaded = load_profile(save_profile(profile, tmp_path / "p.yaml"))
    assert loaded.attention.dense_tail is True and loaded.attention.tail_recall_target == 0.9
    assert loaded.attention.layers[0][0].tail_recall_min == 0.97
    data = yaml.safe_load((tmp_path / "p.yaml").read_text())
    del data["attention"]["dense_tail"], data["attention"]["tail_recall_target"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "old.safetensors").write_bytes((tmp_path / "p.safetensors").read_bytes())
    old = load_profile(tmp_path / "old.yaml")
    assert old.attention.dense_tail is False and old.attention.tail_recall_target is None


def test_yaml_uses_named_fields(tmp_path):
    data = yaml.safe_load(save_profile(_profile(), tmp_path / "p.yaml").read_text())
    head = data["attention"]["layers"][0]["heads"][0]
    assert head["pattern"] == "vertical_slash" and head["budget"] == {"vertical": 0.01, "slash": 0.05}


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["attention"]["layers"][0]["heads"][0].update(pattern="zigzag"), "unknown pattern"),
    (lambda d: d["attention"]["layers"][0]["heads"][0]["budget"].update(vertical=3.0), "fraction"),
    (lambda d: d["attention"]["layers"][0]["heads"][0]["budget"].update(blocks=0.1), "does not apply"),
    (lambda d: d["attention"]["layers"].pop(), "layers"),
    (lambda d: d["model"].pop("num_heads"), "num_heads"),
    (lambda d: d["attention"]["layers"][1]["heads"][0].pop("params"), "stride"),
])
def test_malformed_profiles_are_rejected_with_a_reason(tmp_path, mutate, message):
    path = save_profile(_profile(), tmp_path / "p.yaml")
    data = yaml.safe_load(path.read_text())
    mutate(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_invalid_yaml_is_a_profile_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nmodel: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(path)


def test_missing_sidecar_mask_is_reported(tmp_path):
    path = save_profile(_profile(), tmp_path / "p.yaml")
    (tmp_path / "p.safetensors").unlink()
    with pytest.raises(ProfileError, match="layer0.head1"):
        load_profile(path)


def test_profile_for_another_model_is_rejected():
    profile = _profile()
    check_profile_matches(profile, _fingerprint())
    with pytest.raises(ProfileError, match="made for demo"):
        check_profile_matches(profile, _fingerprint(num_layers=30, name="smollm2"))
    with pytest.raises(ProfileError, match="config differs"):
        check_profile_matches(profile, _fingerprint(config_sha256="other"))


def test_config_hash_ignores_version_keys_but_not_sizes():
    base = {"hidden_size": 64, "transformers_version": "5.0", "text_config": {"num_hidden_layers": 2}}
    assert config_sha256(base) == config_sha256({**base, "transformers_version": "5.9"})
    assert config_sha256(base) != config_sha256({**base, "text_config": {"num_hidden_layers": 3}})
