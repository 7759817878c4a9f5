"""The profile contract: round trip, validation, one-line errors."""

from __future__ import annotations

from pathlib import Path

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


# ----------------------------------------------------------------------------- audit cases: one ProfileError each


def _write(tmp_path, mutate=None, tensors=None, name="p"):
    """Save ``_profile()``, apply ``mutate`` to its YAML data (sidecar hash kept valid), return the path."""
    profile = _profile()
    if tensors is not None:
        profile.tensors = tensors
    path = save_profile(profile, tmp_path / f"{name}.yaml")
    data = yaml.safe_load(path.read_text())
    if mutate is not None:
        mutate(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _head(data, layer=0, head=0):
    return data["attention"]["layers"][layer]["heads"][head]


@pytest.mark.parametrize("value", [0, -64, 48, 8192, "64", 64.0, True, None, [64]])
def test_load_profile_refuses_a_bad_block_size(tmp_path, value):
    path = _write(tmp_path, lambda d: d["attention"].__setitem__("block_size", value))
    if value is None:  # null: the default, 64
        assert load_profile(path).attention.block_size == 64
        return
    with pytest.raises(ProfileError, match=r"block_size.*(integer|power of two)") as info:
        load_profile(path)
    assert str(path) in info.value.one_line() and "\n" not in info.value.one_line()


@pytest.mark.parametrize("value", [16, 32, 128, 256])
def test_load_profile_accepts_power_of_two_block_sizes(tmp_path, value):
    path = _write(tmp_path, lambda d: d["attention"].__setitem__("block_size", value))
    assert load_profile(path).attention.block_size == value


@pytest.mark.parametrize("mask,problem", [
    (torch.ones(2, 4, 4, dtype=torch.bool), "shape"),
    (torch.ones(4, dtype=torch.bool), "shape"),
    (torch.ones(3, 4, dtype=torch.bool), "shape"),
    (torch.ones(0, 0, dtype=torch.bool), "1 to"),
    (torch.rand(4, 4), "float32"),
    (torch.ones(4, 4, dtype=torch.float16), "float16"),
    (torch.full((4, 4), 2, dtype=torch.uint8), "other than 0 and 1"),
    (-torch.ones(4, 4, dtype=torch.int64), "other than 0 and 1"),
])
def test_load_profile_refuses_a_static_mask_the_runtime_cannot_use(tmp_path, mask, problem):
    path = _write(tmp_path, tensors={"layer0.head1": mask})
    with pytest.raises(ProfileError, match=problem) as info:
        load_profile(path)
    assert "'layer0.head1'" in info.value.one_line() and "attention.layers[0].heads[1]" in info.value.one_line()


@pytest.mark.parametrize("mask", [torch.eye(7, dtype=torch.uint8), torch.ones(1, 1, dtype=torch.int32),
                                  torch.zeros(64, 64, dtype=torch.bool)])
def test_load_profile_accepts_square_zero_one_masks_of_any_grid(tmp_path, mask):
    path = _write(tmp_path, tensors={"layer0.head1": mask})
    assert torch.equal(load_profile(path).tensors["layer0.head1"], mask)


@pytest.mark.parametrize("value", [7.5, -3, float("nan"), float("inf"), "0.5", True, [0.5], {"x": 1}])
def test_load_profile_refuses_a_density_outside_zero_one(tmp_path, value):
    path = _write(tmp_path, lambda d: _head(d).__setitem__("density", value))
    with pytest.raises(ProfileError, match=r"`density` in attention.layers\[0\].heads\[0\] should be a number"):
        load_profile(path)


@pytest.mark.parametrize("value", [["layer0.head1"], {"name": "layer0.head1"}, 3, ""])
def test_load_profile_refuses_a_mask_that_is_not_a_tensor_name(tmp_path, value):
    path = _write(tmp_path, lambda d: _head(d, 0, 1).__setitem__("mask", value))
    with pytest.raises(ProfileError, match="static pattern needs `mask`"):
        load_profile(path)


def test_load_profile_refuses_a_mask_on_a_head_that_is_not_static(tmp_path):
    path = _write(tmp_path, lambda d: _head(d).__setitem__("mask", "layer0.head1"))
    with pytest.raises(ProfileError, match="applies only to static heads"):
        load_profile(path)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["model"].update(num_layers="2"), "`num_layers` in model should be an integer"),
    (lambda d: d["model"].update(num_heads=0), "`num_heads` in model"),
    (lambda d: d["model"].update(head_dim=10**30), "`head_dim` in model"),
    (lambda d: d["calibration"].update(seq_len="4096"), "`seq_len` in calibration"),
    (lambda d: d["calibration"].update(samples=-1), "`samples` in calibration"),
    (lambda d: d["attention"].update(recall_target="0.95"), "`recall_target` in attention"),
    (lambda d: d["attention"].update(tail_recall_target=float("nan")), "`tail_recall_target` in attention"),
    (lambda d: d["attention"].update(last_q=0), "`last_q` in attention"),
    (lambda d: d["attention"].update(dense_tail="false"), "`dense_tail` in attention should be true or false"),
    (lambda d: d["attention"].update(layers={"0": []}), "`layers` in attention should be a list"),
    (lambda d: d["attention"]["layers"][0].update(layer="0"), r"`layer` in attention.layers\[0\]"),
    (lambda d: _head(d).update(head=1), "listed as head 1"),
    (lambda d: _head(d).update(pattern=["dense"]), "`pattern`"),
    (lambda d: _head(d).update(recall_min=1.5), "`recall_min`"),
    (lambda d: _head(d)["budget"].update(slash="0.05"), "fraction"),
    (lambda d: _head(d)["budget_abs"].update(slash=-1), r"`slash` in attention\.layers\[0\]\.heads\[0\]\.budget_abs"),
    (lambda d: _head(d)["budget_abs"].update(sink=3), r"budget_abs \['sink'\] does not apply"),
    (lambda d: _head(d, 1, 0)["params"].update(stride=0), "`stride`"),
    (lambda d: _head(d, 1, 0)["params"].update(phase=2.5), "`phase`"),
    (lambda d: _head(d, 1, 0)["params"].update(zoom=2), "does not apply to pattern grid"),
    (lambda d: d.update(version=True), "version True"),
    (lambda d: d.update(pruning=[1, 2]), "`pruning` in the profile should be a mapping"),
    (lambda d: d.update(sidecar_sha256="abc"), "sidecar_sha256"),
])
def test_load_profile_names_the_malformed_field(tmp_path, mutate, message):
    path = _write(tmp_path, mutate)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert info.value.one_line().startswith(f"profile {path}") and "\n" not in info.value.one_line()


@pytest.mark.parametrize("core,message", [
    ({"layers": 5}, "`core.layers` should be a list"),
    ({"neurons": {"alpha": "0.2"}}, "`alpha` in core.neurons should be a number"),
    ({"tokens": {"layer": 9}}, "core.tokens.layer should be a layer index"),
    ({"tokens": {"score": ["text"]}}, "core.tokens.score"),
    ({"layers": [{"layer": 0, "threshold": float("inf")}]}, "threshold"),
    ({"version": True}, "core version True"),
    ({"neurons": {"sample_tokens": 2**40}}, "sample_tokens"),
])
def test_load_profile_refuses_a_core_section_the_core_runtime_cannot_read(tmp_path, core, message):
    path = _write(tmp_path, lambda d: d.update(core=core))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert "vlsparse calibrate" in info.value.one_line()


def test_load_profile_keeps_a_valid_core_and_pruning_section(tmp_path):
    core = {"version": 1, "neurons": {"alpha": 0.2, "beta": 0.4, "layers": {"first": 0, "last": 1}},
            "tokens": {"layer": 0, "min_keep": 0.1, "max_keep": 0.5, "score": "text", "candidates": []},
            "layers": [{"layer": 0, "threshold": 0.5, "decode_error": float("nan")}]}
    path = _write(tmp_path, lambda d: d.update(core=core, pruning={"ratio": 0.5, "groups": [{"group": "a"}]}))
    loaded = load_profile(path)
    assert loaded.core["neurons"] == core["neurons"] and loaded.pruning["groups"] == [{"group": "a"}]


def test_load_profile_refuses_deep_nesting_quickly(tmp_path):
    import time

    path = _write(tmp_path)
    text = path.read_text()
    for deep in ("x: " + "[" * 5000 + "]" * 5000 + "\n",
                 "x:\n" + "".join("  " * i + "-\n" for i in range(1, 3000)),
                 "x: " + "[" * 33 + "]" * 33 + "\n"):
        path.write_text(text + deep)
        start = time.perf_counter()
        with pytest.raises(ProfileError, match="nest") as info:
            load_profile(path)
        assert time.perf_counter() - start < 1.0 and "\n" not in info.value.one_line()
    path.write_text(text + "x: " + "[" * 20 + "]" * 20 + "\n")
    assert load_profile(path).model.name == "demo"  # 21 levels: fine (unknown keys are ignored)


def test_load_profile_refuses_an_alias_bomb_quickly(tmp_path):
    import time

    path = _write(tmp_path)
    bomb = "lol0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"lol{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
    path.write_text(path.read_text() + bomb)
    start = time.perf_counter()
    with pytest.raises(ProfileError, match="YAML alias"):
        load_profile(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text,message", [
    ("seed_text: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("big: " + "9" * 5000 + "\n", "not valid YAML"),
    ("? [a, b]\n: 1\n", "not valid YAML"),
    ("---\nversion: 1\n", "not valid YAML"),
])
def test_load_profile_turns_every_yaml_failure_into_a_profile_error(tmp_path, text, message):
    path = _write(tmp_path)
    path.write_text(path.read_text() + text)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_load_profile_refuses_a_file_larger_than_a_profile_can_be(tmp_path, monkeypatch):
    from vlsparse.profile import checks as profile_checks

    path = _write(tmp_path)
    monkeypatch.setattr(profile_checks, "MAX_YAML_BYTES", 100)
    with pytest.raises(ProfileError, match="MiB"):
        load_profile(path)


def test_save_profile_writes_the_sidecar_first_and_records_its_hash(tmp_path, monkeypatch):
    import hashlib

    from vlsparse.profile import schema as profile_module

    order = []
    real = profile_module.atomic_file

    def recording(path, *args, **kwargs):
        order.append(Path(path).suffix)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(profile_module, "atomic_file", recording)
    path = save_profile(_profile(), tmp_path / "p.yaml")
    assert order == [".safetensors", ".yaml"]
    recorded = yaml.safe_load(path.read_text())["sidecar_sha256"]
    assert recorded == hashlib.sha256((tmp_path / "p.safetensors").read_bytes()).hexdigest()


def test_load_profile_refuses_an_old_yaml_beside_a_new_sidecar(tmp_path, monkeypatch):
    from vlsparse.profile import schema as profile_module

    path = save_profile(_profile(), tmp_path / "p.yaml")
    newer = _profile()
    newer.tensors = {"layer0.head1": torch.ones(4, 4, dtype=torch.bool)}
    real = profile_module.atomic_file

    def killed_before_the_yaml(target, *args, **kwargs):
        if Path(target).suffix == ".yaml":
            raise KeyboardInterrupt  # the process dies between the sidecar and the YAML
        return real(target, *args, **kwargs)

    monkeypatch.setattr(profile_module, "atomic_file", killed_before_the_yaml)
    with pytest.raises(KeyboardInterrupt):
        save_profile(newer, path, force=True)
    assert torch.equal(_sidecar_mask(tmp_path / "p.safetensors"), torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ProfileError, match="does not belong to") as info:
        load_profile(path)
    assert "\n" not in info.value.one_line()


def _sidecar_mask(side):
    from safetensors.torch import load_file

    return load_file(str(side))["layer0.head1"]


def test_load_profile_reads_a_profile_written_before_hashes_were_recorded(tmp_path):
    path = _write(tmp_path, lambda d: d.pop("sidecar_sha256"))
    assert "sidecar_sha256" not in path.read_text()
    assert torch.equal(load_profile(path).tensors["layer0.head1"], torch.eye(4, dtype=torch.bool))


def test_save_profile_writes_shared_values_in_full(tmp_path):
    shared = [1, 2, 3]
    profile = _profile()
    profile.pruning = {"a": shared, "b": shared}
    path = save_profile(profile, tmp_path / "p.yaml")
    assert "&" not in path.read_text() and load_profile(path).pruning == {"a": [1, 2, 3], "b": [1, 2, 3]}


# ----------------------------------------------------------------------------- inspect: one line, exit 1


@pytest.mark.parametrize("mutate", [
    lambda d: _head(d).update(density="0.08", recall_min="0.96"),
    lambda d: _head(d, 0, 1).update(mask=["layer0.head1"]),
    lambda d: d.update(pruning={"x": _nested(200)}),
], ids=["string-numbers", "list-mask", "deep-nesting"])
def test_inspect_prints_one_error_line_for_a_malformed_profile(tmp_path, mutate):
    from typer.testing import CliRunner

    from vlsparse.cli.main import build_app

    path = _write(tmp_path, mutate)
    result = CliRunner().invoke(build_app(), ["inspect", str(path)], catch_exceptions=False)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: profile {path}")


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value
