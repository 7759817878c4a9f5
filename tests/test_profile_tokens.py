"""The profile's `tokens` section (vlsparse/profile/tokens.py): round trip, and every malformed section is one ProfileError."""

from __future__ import annotations

import copy

import pytest
import yaml

from vlsparse.errors import InputError, ProfileError
from vlsparse.profile import ModelFingerprint, Profile, load_profile, save_profile
from vlsparse.profile.tokens import TokenSettings, resolve_settings, token_settings, tokens_section
from vlsparse.tokens import METHOD_NAMES, method_named

FINGERPRINT = ModelFingerprint("LlavaForConditionalGeneration", "tiny", 4, 4, 2, 16, "0" * 64)
GOOD = {"version": 1, "method": "pyramiddrop", "keep": 0.5, "params": {"stages": 4},
        "schedule": [{"layer": 0, "keep": 0.5}, {"layer": 1, "keep": 0.25}, {"layer": 2, "keep": 0.125}],
        "guard": {"auto": True, "candidates": []}}


def _write(tmp_path, section) -> str:
    path = tmp_path / "p.yaml"
    save_profile(Profile(model=FINGERPRINT, tokens=section), path, force=True)
    return path


def test_a_tokens_section_round_trips_and_is_read_into_settings(tmp_path):
    profile = load_profile(_write(tmp_path, GOOD))
    assert profile.tokens == GOOD
    settings = token_settings(profile.tokens, 4)
    assert settings == TokenSettings("pyramiddrop", 0.5, {"stages": 4}, ((0, 0.5), (1, 0.25), (2, 0.125)))
    assert tokens_section(settings, guard=GOOD["guard"]) == GOOD


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_with_its_defaults_makes_a_section_that_loads(tmp_path, method):
    params = {"todre": {"layers": [2]}}.get(method, {})  # 7L/8 = 3 is the last layer of a 4-layer LM
    settings = resolve_settings(method, None, 4, params)
    assert settings.keep == method_named(method).DEFAULTS["keep"]
    profile = load_profile(_write(tmp_path, tokens_section(settings)))
    assert token_settings(profile.tokens, 4) == settings


BAD = [
    (lambda s: s.update(version=2), "version 2"),
    (lambda s: s.update(method="fastvv"), "unknown"),
    (lambda s: s.update(method=["fastv"]), "unknown"),
    (lambda s: s.update(keep=0), r"\(0, 1\]"),
    (lambda s: s.update(keep=1.5), r"\(0, 1\]"),
    (lambda s: s.update(keep="0.5"), r"\(0, 1\]"),
    (lambda s: s.update(keep=True), r"\(0, 1\]"),
    (lambda s: s.update(params=[1]), "mapping"),
    (lambda s: s["params"].update(lam=0.5), "no parameter 'lam'"),
    (lambda s: s["params"].update(keep=0.5), "no parameter 'keep'"),
    (lambda s: s["params"].update(stages="4"), "integer"),
    (lambda s: s["params"].update(stages=1), "integer in 2"),
    (lambda s: s["params"].update(layers=[0, "x"]), "list of layer"),
    (lambda s: s["params"].update(layers=[2, 1]), "not increasing"),
    (lambda s: s["params"].update(layers=[0, 7]), "4-layer"),
    (lambda s: s["schedule"].pop(), "schedule is not the one"),
    (lambda s: s["schedule"][0].update(keep=0.4), "schedule is not the one"),
    (lambda s: s["schedule"][0].update(layer="0"), "schedule is not the one"),
    (lambda s: s.update(schedule={"layer": 0}), "list of"),
    (lambda s: s.update(guard=[1]), "tokens.guard"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_a_malformed_tokens_section_is_one_profile_error_at_load(tmp_path, mutate, message):
    section = copy.deepcopy(GOOD)
    mutate(section)
    path = tmp_path / "bad.yaml"
    data = {"version": 1, "model": FINGERPRINT.__dict__, "tokens": section}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert "\n" not in str(info.value)


def test_method_specific_parameters_are_checked(tmp_path):
    for method, params, message in [("fastv", {"rows": "diagonal"}, "one of"), ("zipvl", {"tau": 1.5}, r"\(0, 1\]"),
                                    ("todre", {"objective": "random", "layers": [1]}, "k_center"),
                                    ("fastv", {"k": 4}, "4-layer"), ("feather", {"layers": [0, 1, 2]}, "two stages")]:
        section = {"version": 1, "method": method, "keep": 0.5, "params": params}
        with pytest.raises(ProfileError, match=message):
            token_settings(section, 4)


def test_resolve_settings_errors_name_parameters_not_flags():
    with pytest.raises(InputError) as info:
        resolve_settings("fastv", 0.0, 4)
    assert info.value.option == "keep" and "--keep" not in str(info.value)
    assert "--keep" in info.value.one_line(flags=True)
    with pytest.raises(InputError, match="unknown token-reduction method"):
        resolve_settings("nope", 0.5, 4)
    with pytest.raises(InputError, match="4-layer"):
        resolve_settings("fastv", 0.5, 4, {"k": 9})
