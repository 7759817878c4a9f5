"""The calibration layout a profile records, and the warning for prompts outside it (vlsparse.profile.layout)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from vlsparse.errors import ProfileError
from vlsparse.profile.layout import check_layout, layout_warnings, prompt_layout


def spans(*lengths_per_image):
    return [SimpleNamespace(image_index=i, length=n) for i, n in enumerate(lengths_per_image)]


def test_layout_worked_example_and_warnings():
    layout = prompt_layout([(4000, spans(144, 144)), (4400, spans(144, 144, 144))])
    assert layout == {"tokens": [4000, 4400], "images": [2, 3], "tokens_per_image": [144, 144]}
    assert layout_warnings(layout, (4200, spans(144, 144))) == []  # inside
    assert layout_warnings(layout, (8000, spans(144, 144))) == []  # within a factor 2
    notes = layout_warnings(layout, (9000, spans(1200)))
    assert notes == ["9000 tokens, outside the profile's calibrated 4000-4400",
                     "1200 image tokens per image, outside the profile's calibrated 144-144"]
    assert layout_warnings(layout, (300, spans(1200)), min_tokens=512) == []  # runs dense anyway
    text_only = prompt_layout([(2000, [])])
    assert text_only["tokens_per_image"] is None
    assert layout_warnings(text_only, (2000, spans(600))) == ["600 image tokens per image, and the profile was "
                                                              "calibrated on text only"]


def test_layout_is_checked_when_read():
    assert check_layout({"tokens": [1, 2], "images": [0, 0], "tokens_per_image": None}, "c")["tokens"] == [1, 2]
    for bad in ({"tokens": [3, 2]}, {"tokens": [1]}, {"pages": [1, 2]}, [1, 2]):
        with pytest.raises(ProfileError):
            check_layout(bad, "calibration")


def test_profile_records_the_layout_and_run_warns(llava, llava_dir, image_file, tmp_path):
    from vlsparse.cli.main import build_app
    from vlsparse.profile import load_profile, save_profile
    from vlsparse.search.api import profile_model
    from vlsparse.search.calibration import calibration_from

    profile = profile_model(llava, calibration_from(llava, None, samples=1, seq_len=256), threads=1)
    layout = profile.calibration.layout
    assert layout["tokens"][0] > 0 and layout["tokens_per_image"] == [16, 16]  # 16x16 px, 4 px patches
    path = tmp_path / "tiny.yaml"
    save_profile(profile, path)
    assert load_profile(path).calibration.layout == layout
    # a prompt of 40 images (640 image tokens) is far longer than the calibration's
    result = CliRunner().invoke(build_app(), ["run", "--model", str(llava_dir), "--profile", str(path), "--json",
                                              *[str(image_file)] * 40, "what is it"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.stdout)["layout_warnings"]
    assert any("tokens, outside the profile's calibrated" in note for note in notes)
