"""Nothing lost: the audit's cases of outputs that clobbered inputs, users' files or each other."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from vlsparse.cli.main import build_app, main

runner = CliRunner()
TEXT = "what is this color shape circle square red blue green " * 80


def invoke(*args):
    return runner.invoke(build_app(), [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def digest(path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*"))
                                       if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def made_profile(llama_dir, tmp_path, calib):
    out = tmp_path / "p.yaml"
    result = invoke("profile", "--model", llama_dir, "--calib", calib, "--samples", 1, "--seq-len", 128,
                    "--out", out, "--no-png", "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_inspect_never_draws_over_its_input_profile(made_profile):
    before = digest(made_profile)
    assert "should end in .png" in one_error_line(invoke("inspect", made_profile, "--png", made_profile))
    as_png = made_profile.with_suffix(".png")
    made_profile.rename(as_png)  # a profile that happens to be named .png
    assert "is an input" in one_error_line(invoke("inspect", as_png, "--png", as_png, "--force"))
    as_png.rename(made_profile)
    assert digest(made_profile) == before


def test_figures_never_replace_an_image_vlsparse_did_not_draw(made_profile, llama_dir, calib, tmp_path):
    from PIL import Image

    holiday = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(holiday)
    before = digest(holiday)
    assert "already exists" in one_error_line(invoke("inspect", made_profile, "--png", holiday))
    assert "did not write" in one_error_line(invoke("inspect", made_profile, "--png", holiday, "--force"))
    assert "did not write" in one_error_line(invoke(
        "profile", "--model", llama_dir, "--calib", calib, "--samples", 1, "--seq-len", 128,
        "--out", tmp_path / "q.yaml", "--png", holiday, "--force", "--quiet"))
    assert digest(holiday) == before and not (tmp_path / "q.yaml").exists()
    drawn = tmp_path / "drawn.png"
    assert invoke("inspect", made_profile, "--png", drawn).exit_code == 0
    assert invoke("inspect", made_profile, "--png", drawn, "--force").exit_code == 0  # its own figure: replaced


def test_profile_needs_force_to_replace_a_profile(made_profile, llama_dir, calib):
    before = digest(made_profile)
    args = ["profile", "--model", llama_dir, "--calib", calib, "--samples", 1, "--seq-len", 128, "--out",
            made_profile, "--no-png", "--quiet"]
    assert "already exists" in one_error_line(invoke(*args))
    assert digest(made_profile) == before
    assert invoke(*args, "--seed", 1, "--force").exit_code == 0
    assert yaml.safe_load(made_profile.read_text())["calibration"]["seed"] == 1


def test_profile_default_output_is_checked_before_work(llama_dir, calib, tmp_path, monkeypatch):
    import vlsparse.search.api as search_api

    monkeypatch.chdir(tmp_path)
    (tmp_path / "profiles").mkdir()
    taken = tmp_path / "profiles" / "tiny-llama.yaml"
    taken.write_text("my notes\n")
    monkeypatch.setattr(search_api, "profile_model", lambda *a, **k: pytest.fail("searched before the check"))
    assert "already exists" in one_error_line(invoke("profile", "--model", llama_dir, "--calib", calib, "--quiet"))
    assert taken.read_text() == "my notes\n"


def test_calibrate_never_writes_into_the_model_folder(llava_dir, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ck"
    shutil.copytree(llava_dir, checkpoint)
    before = digest(checkpoint)
    monkeypatch.chdir(tmp_path)
    args = ["calibrate", "--model", checkpoint, "--samples", 1, "--seq-len", 128, "--decode-tokens", 1, "--quiet"]
    assert "inside the input" in one_error_line(invoke(*args, "--out", checkpoint / "vlsparse.yaml", "--force"))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "profiles/ck.yaml" and (tmp_path / "profiles" / "ck.yaml").is_file()
    assert digest(checkpoint) == before


def test_prune_force_refuses_folders_vlsparse_did_not_write(llama_dir, tmp_path, monkeypatch):
    import vlsparse.compress.api as api

    monkeypatch.setattr(api, "build_calibration", lambda *a, **k: pytest.fail("pruned before the check"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    assert "did not write" in one_error_line(invoke("prune", "--model", llama_dir, "--out", victim, "--force"))
    assert (victim / "thesis.txt").read_text() == "years of work"
    monkeypatch.chdir(tmp_path)
    assert "did not write" in one_error_line(invoke("prune", "--model", llama_dir, "--out", ".", "--force"))


def test_concurrent_prunes_to_one_output_the_later_one_fails(llama_dir, tmp_path):
    from vlsparse.atomic import atomic_dir
    from vlsparse.compress.api import PruneConfig, prune_model
    from vlsparse.errors import OutputError

    out = tmp_path / "X"

    def other_run_finishes_first(message: str) -> None:
        if message.startswith("Writing") and message.endswith(".safetensors") and not out.exists():
            with atomic_dir(out) as tmp:  # another vlsparse prune of the same --out completes meanwhile
                (tmp / "ratio").write_text("0.3")

    config = PruneConfig(ratio=0.5, allocation="uniform", samples=2, ecoflap_samples=2, seq_len=16)
    with pytest.raises(OutputError, match="appeared while"):
        prune_model(str(llama_dir), out, config, progress=other_run_finishes_first)
    assert (out / "ratio").read_text() == "0.3"  # the other run's output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # and no temporary folder is left


@pytest.mark.parametrize("argv,expect", [
    (["prune", "--ratio", "abc"], "Invalid value for '--ratio'"),
    (["eval", "--n", "0"], "Invalid value for '--n'"),
    (["prune", "--bogus"], "No such option: --bogus"),
    (["prune", "--epsilon", "inf"], "--epsilon must be a finite number"),
    (["calibrate", "--neuron-layers", "9-2"], "runs backwards"),
])
def test_flag_errors_are_one_line_with_exit_1(argv, expect, capsys):
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("Error: ") and expect in err[0], err


def test_run_with_an_image_and_no_question_is_refused(llava_dir, image_file):
    assert "not a question" in one_error_line(invoke("run", "--model", llava_dir, image_file))
