"""Keep the repository's code folders from shadowing installed packages of the same name.

The project card puts ``kernels/``, ``search/``, ``cli/`` and ``compress/`` at the
repository root; they install as ``vlsparse.kernels`` and so on. Whenever the
root is on ``sys.path`` (``python -c`` or ``python -m pytest`` started there),
``import kernels`` would find the folder before Hugging Face's ``kernels``
distribution, which transformers 5.25+ imports while loading a model. Each
folder's ``__init__`` therefore checks the name it was imported under and, if it
is the bare top-level name, hands the import over to the installed package.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def _same_dir(entry: str, root: Path) -> bool:
    try:
        return Path(entry or ".").resolve() == root
    except OSError:
        return False


def hand_over(name: str, init_file: str) -> None:
    """Replace the module ``name`` (our folder, imported by its bare name) by the installed one.

    Called from a folder's ``__init__`` while it is being imported as ``name``: the
    import is redone with the repository root left off ``sys.path``, so the result
    is whatever the environment has under that name. If it has nothing, our module
    stays, emptied into what Python makes of a folder without ``__init__.py``: no
    ``__file__``, no submodules (transformers' availability checks read exactly that
    as "not installed").
    """
    root = Path(init_file).resolve().parent.parent
    ours = sys.modules.pop(name, None)
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if not _same_dir(entry, root)]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name or ours is None:
            raise
        sys.modules[name] = ours
        ours.__file__ = None
        ours.__path__ = []
    finally:
        sys.path[:] = saved
