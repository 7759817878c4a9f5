"""`vlsparse calibrate` on a tiny LLaVA: the core section, its round trip, and the runtime reading it."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from vlsparse.compress.core_calibrate import calibrate_core
from vlsparse.errors import InputError
from vlsparse.kernels.core_runtime import attach_core, detach_core
from vlsparse.models import load
from vlsparse.profile import Profile, load_profile, save_profile
from vlsparse.profile.core import core_settings


@pytest.fixture(scope="module")
def app():
    from vlsparse.cli.calibrate import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def main() -> None:
        pass

    return app


def test_calibrate_adds_a_core_section_the_runtime_reads(app, llava_dir, tmp_path):
    loaded = load(llava_dir)
    base = tmp_path / "base.yaml"
    save_profile(Profile(model=loaded.adapter.fingerprint(), pruning={"ratio": 0.5}), base)
    out = tmp_path / "with-core.yaml"
    result = CliRunner().invoke(app, ["calibrate", str(llava_dir), "--samples", "1", "--seq-len", "128",
                                      "--decode-tokens", "2", "--max-error", "10", "--guard-tokens", "0", "--profile", str(base),
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["out"] == str(out) and json.loads(result.output)["peak_rss_mb"] > 50
    profile = load_profile(out)
    assert profile.pruning == {"ratio": 0.5}  # other sections are kept
    core = profile.core
    assert core["neurons"]["layers"] == {"first": 0, "last": 1}  # every layer passes a loose error bound
    assert [row["layer"] for row in core["layers"]] == [0, 1]
    assert all(row["threshold"] > 0 and row["neurons"] == 128 for row in core["layers"])
    assert core["tokens"]["candidates"] and core["tokens"]["candidates"][0]["layer"] == 0  # never the last layer
    settings = core_settings(core, loaded.adapter.num_layers)
    assert settings.neuron_layers == (0, 1) and set(settings.thresholds) == {0, 1}
    runtime = attach_core(loaded, settings)
    images = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    with torch.inference_mode():
        loaded.model.generate(**loaded.prepare(images, "what color is the circle ?"), max_new_tokens=2,
                              do_sample=False)
    st = runtime.stats()
    assert st["core_neurons_kept"] == 2 * 52 and st["image_tokens_total"] == 48
    assert (st["image_tokens_kept"] < 48) == (settings.token_layer is not None)
    detach_core(loaded, runtime)


def test_calibrate_errors_are_one_line(app, llava_dir, tmp_path):
    result = CliRunner().invoke(app, ["calibrate", str(llava_dir), "--token-layers", "7", "--samples", "1",
                                      "--seq-len", "128", "--out", str(tmp_path / "x.yaml")])
    assert result.exit_code == 1
    assert "layer 7 does not exist" in result.output
    result = CliRunner().invoke(app, ["calibrate", str(llava_dir), "--score", "attention"])
    assert result.exit_code == 1 and "unknown --score" in result.output
    assert not (tmp_path / "x.yaml").exists()
    with pytest.raises(InputError, match="not consecutive"):  # checked before any model work
        calibrate_core(None, None, neuron_layers=[1, 3])
