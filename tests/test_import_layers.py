"""Import layers: which package may import which, and no import cycles.

Read from the source with ``ast`` (nothing is imported), so an import inside a function
counts as much as one at the top of a module. Every ``.py`` under ``cli/``,
``compress/``, ``kernels/``, ``search/`` and ``vlsparse/`` is named as installed
(``compress/core.py`` is ``vlsparse.compress.core``).

The rules:

- ``vlsparse.kernels`` (the runtime) never imports ``vlsparse.compress`` or ``vlsparse.search``
  (the offline side may import the runtime, never the reverse);
- ``vlsparse.profile`` imports none of ``vlsparse.compress``, ``vlsparse.kernels``, ``vlsparse.search``;
- ``vlsparse.models`` never imports ``vlsparse.compress``;
- ``vlsparse.patterns`` (one module per attention pattern, used by search and runtime alike)
  never imports ``vlsparse.compress`` or ``vlsparse.search``;
- no cycle among those five packages (imports between their modules, collapsed per package);
- the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"cli": "vlsparse.cli", "compress": "vlsparse.compress", "kernels": "vlsparse.kernels",
           "search": "vlsparse.search", "vlsparse": "vlsparse"}

PACKAGES = ("vlsparse.compress", "vlsparse.kernels", "vlsparse.search", "vlsparse.models", "vlsparse.profile")
FORBIDDEN = {
    "vlsparse.kernels": ("vlsparse.compress", "vlsparse.search"),
    "vlsparse.profile": ("vlsparse.compress", "vlsparse.kernels", "vlsparse.search"),
    "vlsparse.models": ("vlsparse.compress",),
    "vlsparse.patterns": ("vlsparse.compress", "vlsparse.search"),
}

KNOWN_BREACHES: set[tuple[str, str]] = set()
"""(module, target) imports allowed to break the rules for now; empty: none."""


def module_files() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``module`` imports, anywhere in the file; ``from a import b`` gives ``a.b``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (its longest known prefix), or None outside the project."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (itself and its own package excluded)."""
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        targets = {project_target(name, modules) for name in imported_names(path, module)}
        graph[module] = {t for t in targets if t is not None and t != module and not module.startswith(t + ".")}
    return graph


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_every_folder_is_read():
    graph = import_graph()
    for module in ("vlsparse.cli.main", "vlsparse.compress.core_calibrate", "vlsparse.kernels.core_runtime",
                   "vlsparse.search.calibration", "vlsparse.profile.schema", "vlsparse.models.loading"):
        assert module in graph
    assert "vlsparse.profile.checks" in graph["vlsparse.profile.schema"]


def test_layers_import_only_downwards():
    graph = import_graph()
    breaches = sorted((module, target) for module, targets in graph.items() for target in targets
                      for layer, banned in FORBIDDEN.items()
                      if inside(module, layer) and any(inside(target, b) for b in banned))
    assert [b for b in breaches if b not in KNOWN_BREACHES] == []


def test_kernels_never_name_compress_or_search():
    for path in (ROOT / "kernels").rglob("*.py"):
        text = path.read_text()
        assert "vlsparse.compress" not in text and "vlsparse.search" not in text, path


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycle_between_packages():
    package_graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, targets in import_graph().items():
        for target in targets:
            if (module, target) in KNOWN_BREACHES:
                continue
            source = next((p for p in PACKAGES if inside(module, p)), None)
            sink = next((p for p in PACKAGES if inside(target, p)), None)
            if source and sink and source != sink:
                package_graph[source].add(sink)
    assert cycles(package_graph) == []


def test_no_import_cycle():
    graph = {module: targets - {t for m, t in KNOWN_BREACHES if m == module}
             for module, targets in import_graph().items()}
    assert cycles(graph) == []
