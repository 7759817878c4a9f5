"""Outputs appear whole or not at all."""

from __future__ import annotations

import errno

import pytest

from vlsparse.atomic import atomic_dir, atomic_file
from vlsparse.errors import OutputError


def test_atomic_file_leaves_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_file_reports_a_full_disk_as_output_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(OutputError, match="no space left"):
        with atomic_file(target) as handle:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_needs_force_to_replace(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputError, match="--force"):
        with atomic_dir(target):
            pass
    with atomic_dir(target, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    with atomic_file(tmp_path / "f.txt") as handle:
        handle.write("x")
    with atomic_dir(tmp_path / "d"):
        pass
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask
