"""The card's top-level folders install as vlsparse.* and never shadow installed packages.

transformers 5.25+ imports Hugging Face's ``kernels`` distribution while loading a
model; the repository's ``kernels/`` folder must not stand in for it when the
root is on ``sys.path``, whether vlsparse is installed editable, from the source
folder, or from a wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("kernels", "search", "cli", "compress")


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=300)


def _where(name: str, cwd: Path) -> str:
    probe = _python(f"import importlib.util as u; s = u.find_spec({name!r}); print(s.origin if s else 'missing')",
                    cwd)
    return probe.stdout.strip()


@pytest.mark.parametrize("name", CODE_FOLDERS)
def test_a_bare_name_from_the_root_is_what_the_environment_has(name, tmp_path):
    outside = _where(name, tmp_path)  # what the environment itself offers under that name
    assert outside != str(ROOT / name / "__init__.py")
    run = _python(f"import {name}; print({name}.__file__, list(getattr({name}, '__path__', [])))", ROOT)
    assert run.returncode == 0, run.stderr
    if outside == "missing":  # what Python makes of a folder without __init__.py: no file, no submodules
        assert run.stdout.strip() == "None []"
    else:
        assert run.stdout.split()[0] == outside


def test_hugging_face_kernels_imports_from_the_root_when_installed(tmp_path):
    if _where("kernels", tmp_path) == "missing":
        pytest.skip("Hugging Face's kernels distribution is not installed (transformers < 5.25)")
    run = _python("from kernels import CUDAProperties; import kernels; print(kernels.__file__)", ROOT)
    assert run.returncode == 0, run.stderr
    assert "site-packages" in run.stdout


def test_a_model_loads_from_python_started_in_the_root(llama_dir):
    run = _python(f"from vlsparse.models import load; print(load({str(llama_dir)!r}).adapter.family)", ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("causal_lm")


def _check_installed_tree(site: Path, tmp_path: Path) -> None:
    for folder in CODE_FOLDERS:
        assert (site / "vlsparse" / folder / "__init__.py").is_file()
        assert not (site / folder).exists()  # never a top-level package of that name
    code = "import vlsparse.kernels.cpu as c, vlsparse.cli.main as m; print(c.__file__); print(m.__file__)"
    run = _python(code, tmp_path, PYTHONPATH=str(site))
    assert run.returncode == 0, run.stderr
    assert all(line.startswith(str(site)) for line in run.stdout.split())


def test_a_wheel_carries_the_folders_as_vlsparse_subpackages(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("vlsparse-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert all(not n.startswith(f"{folder}/") for n in names for folder in CODE_FOLDERS)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    _check_installed_tree(site, tmp_path)


def test_a_plain_install_from_the_source_folder(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_installed_tree(site, tmp_path)


def test_an_editable_install_reads_the_source_folders(tmp_path):
    where = _where("vlsparse.kernels", tmp_path)
    if where == "missing" or not where.startswith(str(ROOT)):
        pytest.skip("vlsparse is not installed editable from this checkout (make install does that)")
    assert where == str(ROOT / "kernels" / "__init__.py")
    run = _python("import vlsparse.search.api as s, vlsparse.cli.main as m; print(s.__file__); print(m.__file__)",
                  tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(ROOT / "search" / "api.py"), str(ROOT / "cli" / "main.py")]
