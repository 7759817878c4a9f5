"""The output rule: outputs appear whole or not at all, and never clobber inputs, each other, or users' files."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import yaml

from vlsparse.atomic import MARKER, atomic_dir, atomic_file, check_output, sweep_stale, written_by_vlsparse
from vlsparse.errors import InputError, OutputError

PROFILE_TEXT = yaml.safe_dump({"version": 1, "model": {"architecture": "X"}, "attention": None})


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_file_leaves_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "out.yaml"
    target.write_text(PROFILE_TEXT)
    with pytest.raises(RuntimeError):
        with atomic_file(target, force=True) as handle:
            handle.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == PROFILE_TEXT
    assert _names(tmp_path) == ["out.yaml"]


def test_atomic_file_reports_a_full_disk_as_output_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(OutputError, match="no space left"):
        with atomic_file(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_needs_force_to_replace_and_marks_what_it_wrote(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / MARKER).is_file() and written_by_vlsparse(target)
    with pytest.raises(OutputError, match="force") as info:
        with atomic_dir(target):
            pass
    assert "--force" in info.value.one_line(flags=True)  # the flag, as the CLI prints it
    with atomic_dir(target, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert _names(target) == sorted([MARKER, "b"])
    assert _names(tmp_path) == ["ckpt"]


def test_force_never_replaces_a_folder_vlsparse_did_not_write(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    with pytest.raises(OutputError, match="did not write"):
        check_output(victim, force=True)
    with pytest.raises(OutputError, match="did not write"):
        with atomic_dir(victim, force=True):
            pass
    assert (victim / "thesis.txt").read_text() == "years of work"


def test_force_replaces_only_files_vlsparse_wrote(tmp_path):
    image = tmp_path / "holiday.png"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(image)
    with pytest.raises(OutputError, match="did not write"):
        check_output(image, force=True, option="--png")
    ours = tmp_path / "figure.png"
    Image.new("RGB", (4, 4)).save(ours, pnginfo=_software("vlsparse 0.1.0"))
    assert check_output(ours, force=True, option="--png") == ours
    notes = tmp_path / "notes.yaml"
    notes.write_text("shopping: [milk, eggs]\n")
    assert not written_by_vlsparse(notes)
    profile = tmp_path / "p.yaml"
    profile.write_text(PROFILE_TEXT)
    assert written_by_vlsparse(profile) and written_by_vlsparse(tmp_path / "p.safetensors")


def _software(text):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", text)
    return info


def test_an_output_is_never_an_input_or_inside_one(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    profile = tmp_path / "p.yaml"
    profile.write_text(PROFILE_TEXT)
    with pytest.raises(InputError, match="is an input"):
        check_output(profile, force=True, inputs=[profile])
    with pytest.raises(InputError, match="inside the input"):
        check_output(model / "vlsparse.yaml", force=True, inputs=[model])
    with pytest.raises(InputError, match="contains the input"):
        check_output(tmp_path, force=True, inputs=[model])


def test_a_concurrent_writer_of_the_same_output_loses(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(OutputError, match="appeared while"):
        with atomic_dir(target) as tmp:
            (tmp / "mine").write_text("0.5")
            with atomic_dir(target) as other:  # a second run that finishes first
                (other / "theirs").write_text("0.3")
    assert (target / "theirs").read_text() == "0.3"
    assert _names(tmp_path) == ["ckpt"]
    with pytest.raises(OutputError, match="appeared while"):
        with atomic_file(tmp_path / "p.yaml") as handle:
            handle.write("mine")
            (tmp_path / "p.yaml").write_text("theirs")
    assert (tmp_path / "p.yaml").read_text() == "theirs"


def test_temporaries_carry_the_pid_and_stale_ones_are_swept(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    stale = tmp_path / f".ckpt.{dead_pid}.abc123.tmp"
    stale.mkdir()
    live = tmp_path / f".ckpt.{os.getppid()}.def456.tmp"  # a running process: left alone
    live.mkdir()
    other = tmp_path / f".other.{dead_pid}.abc.tmp"  # another output's: left alone
    other.mkdir()
    seen = []
    with atomic_dir(tmp_path / "ckpt") as tmp:
        seen.append(tmp.name)
    assert seen[0].startswith(f".ckpt.{os.getpid()}.")
    assert not stale.exists() and live.exists() and other.exists()
    assert sweep_stale(tmp_path / "ckpt") == []


def test_outputs_get_ordinary_permissions(tmp_path):
    import stat

    with atomic_file(tmp_path / "f.txt") as handle:
        handle.write("x")
    with atomic_dir(tmp_path / "d"):
        pass
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask
