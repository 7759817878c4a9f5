"""The one output rule: outputs appear whole or not at all, and never clobber anything.

- A command checks its outputs before any work (``check_output``) and again at
  the final rename, so a concurrent writer of the same path loses with a clear
  error instead of silently replacing the other's result.
- An existing output is replaced only with ``force``, and only if vlsparse wrote
  it: a folder holding the marker file ``MARKER``, a profile YAML (a mapping
  with ``version`` and ``model``) or its safetensors sidecar, a recipe YAML (a
  mapping with ``vlsparse_recipe``), or a PNG whose
  ``Software`` text says vlsparse. Any other file or folder is refused.
- An output is never an input, inside an input folder, or a folder holding one.
- Work happens in a temporary name beside the output, ``.NAME.PID.RANDOM.tmp``;
  temporary names left by a killed process (its PID is gone) are swept the next
  time the same output is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from vlsparse.errors import InputError, OutputError, param

MARKER = ".vlsparse-output"
PNG_SOFTWARE = "vlsparse"
_PROFILE_SUFFIXES = (".yaml", ".yml")
_LARGEST_PROFILE_READ = 64 * 2**20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _explain(exc: OSError, path: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device while writing {path}", f"free some disk space or choose another {param('out')}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"no permission to write {path}", f"choose a folder you can write to with {param('out')}")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}", "check the output path")


# ----------------------------------------------------------------------------- what vlsparse wrote


def _is_profile_yaml(path: Path, recipe: bool = False) -> bool:
    """A profile YAML vlsparse wrote (with ``recipe``: or a recipe)."""
    import yaml

    try:
        if path.stat().st_size > _LARGEST_PROFILE_READ:
            return False
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return False
    if recipe and isinstance(data, dict) and "vlsparse_recipe" in data:  # ``vlsparse.recipe``
        return True
    return isinstance(data, dict) and "version" in data and isinstance(data.get("model"), dict)


def _is_our_png(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as image:
            return str(image.info.get("Software", "")).startswith(PNG_SOFTWARE)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def written_by_vlsparse(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder, profile, sidecar or figure that vlsparse wrote."""
    path = Path(path)
    if path.is_dir():
        return (path / MARKER).is_file()
    if path.suffix in _PROFILE_SUFFIXES:
        return _is_profile_yaml(path, recipe=True)
    if path.suffix == ".safetensors":  # a profile's sidecar goes with its YAML
        return any(_is_profile_yaml(path.with_suffix(s)) for s in _PROFILE_SUFFIXES)
    if path.suffix == ".png":
        return _is_our_png(path)
    return False


# ----------------------------------------------------------------------------- the checks


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(path)).resolve()


def _check_not_an_input(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    target = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if target == source:
            raise InputError(f"the output {out} is an input of this command (nothing is written over or inside "
                             "the input)", "choose another output path")
        if source in target.parents:
            raise InputError(f"the output {out} is inside the input {given}",
                             "choose an output outside it; inputs are never modified")
        if target in source.parents:
            raise InputError(f"the output {out} contains the input {given}",
                             "choose an output that does not hold an input")


def _check_replaceable(out: Path, force: bool, option: str) -> None:
    if not os.path.lexists(out):
        return
    if not force:
        raise OutputError(f"{out} already exists", f"pass {param('force')} to replace it, or choose another {option}")
    if out.is_symlink() or not written_by_vlsparse(out):
        kind = "folder" if out.is_dir() else "file"
        raise OutputError(f"{out} is a {kind} vlsparse did not write, so {param('force')} will not replace it",
                          f"choose another {option}, or remove it yourself")


def check_output(out: str | os.PathLike, *, force: bool = False, inputs: Iterable = (),
                 option: str = param("out")) -> Path:
    """Refuse ``out`` before any work: an input (or inside/holding one), an existing path
    without ``force``, one vlsparse did not write, or a folder that cannot be written."""
    out = Path(out)
    _check_not_an_input(out, inputs)
    _check_replaceable(out, force, option)
    parent = _resolved(out).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"no permission to write in {parent}", f"choose a folder you can write to with {option}")
    return out


# ----------------------------------------------------------------------------- temporary names


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+\.(tmp|old)$")


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts; a zombie too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by processes that no longer run; returns what went."""
    path = Path(path)
    pattern, removed = _temp_pattern(path.name), []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if match and not pid_exists(int(match.group(1))):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    sibling.unlink()
            removed.append(sibling)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename, failing with FileExistsError if ``target`` exists (atomically where the kernel can)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):  # no renameat2 here: a check just before the rename
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    os.rename(source, target)


def _lost_race(path: Path) -> OutputError:
    return OutputError(f"{path} appeared while this command ran (another vlsparse writing the same output?)",
                       f"nothing was replaced; choose another {param('out')}, or pass {param('force')}")


def _commit(tmp: Path, path: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``path`` under the output rule, re-checked now."""
    if not force:
        try:
            _rename_noreplace(tmp, path)
        except FileExistsError:
            raise _lost_race(path) from None
        return
    _check_replaceable(path, force=True, option=param("out"))
    if tmp.is_dir() and os.path.lexists(path):
        old = path.with_name(f"{_temp_prefix(path)}replaced.old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", force: bool = False) -> Iterator:
    """Yield a handle on a temporary file next to ``path``; on success it becomes ``path``.

    An existing ``path`` is an error unless ``force`` and vlsparse wrote it (checked
    at the start and again at the rename).
    """
    path = Path(path)
    _check_replaceable(path, force, param("out"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _explain(exc, path) from exc
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        _commit(Path(tmp), path, force)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _explain(exc, path) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``, with ``MARKER``.

    An existing ``path`` is an error unless ``force`` and it holds ``MARKER``; the old
    folder is removed only after the new one is complete.
    """
    from vlsparse import __version__

    path = Path(path)
    _check_replaceable(path, force, param("out"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise _explain(exc, path) from exc
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"written_by": "vlsparse", "version": __version__}) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _commit(tmp, path, force)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain(exc, path) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
