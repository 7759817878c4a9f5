"""One lookup for the method registries (``vlsparse.tokens``, ``vlsparse.kv``): a method is a module of its package."""

from __future__ import annotations

import importlib
from types import ModuleType

from vlsparse.errors import InputError


def modules_of(package: str, names: tuple[str, ...]) -> dict[str, ModuleType]:
    """A fresh dict ``name -> module`` of ``package`` (modules are imported on first call)."""
    return {name: importlib.import_module(f"{package}.{name}") for name in names}


def module_named(package: str, names: tuple[str, ...], name: str, what: str) -> ModuleType:
    """The module ``package.NAME`` for ``name`` (case-insensitive), or an ``InputError`` naming the known ones."""
    key = str(name).strip().lower()
    if key not in names:
        raise InputError(f"unknown {what} {name!r}", f"choose one of: {', '.join(names)}")
    return importlib.import_module(f"{package}.{key}")


__all__ = ["module_named", "modules_of"]
