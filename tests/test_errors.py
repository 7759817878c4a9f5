"""Errors name parameters, not flags: ``ratio`` for Python callers, ``--ratio`` on the command line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vlsparse.errors import InputError, param, render

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [path for folder in ("compress", "search", "kernels", "vlsparse") for path in sorted((ROOT / folder).rglob("*.py"))]
"""Every library module (the command-line layer, ``cli/``, is the one place that spells flags)."""


def test_a_parameter_reads_as_a_name_in_python_and_as_a_flag_on_the_command_line():
    error = InputError(f"{param('seq_len')} must be at least 2, got 1", f"e.g. {param('seq_len', 256)}")
    assert str(error) == "seq_len must be at least 2, got 1 — e.g. seq_len=256"
    assert error.message == "seq_len must be at least 2, got 1" and error.hint == "e.g. seq_len=256"
    assert error.args == ("seq_len must be at least 2, got 1",)
    assert error.one_line(flags=True) == "--seq-len must be at least 2, got 1 — e.g. --seq-len 256"
    assert error.option == "seq_len" and error.options == ("seq_len",)
    assert InputError("no parameter here").option is None
    assert render(f"{param('a_b')} and {param('c', 'x y')}", flags=True) == "--a-b and --c x y"
    with pytest.raises(ValueError):
        param("--ratio")


def test_prune_config_errors_name_the_argument():
    from vlsparse.compress.api import PruneConfig

    with pytest.raises(InputError) as info:
        PruneConfig(ratio=2.0).validate()
    assert str(info.value) == ("ratio must be between 0 and 1 (exclusive), got 2.0 — "
                               "e.g. ratio=0.5 prunes half of the weights")
    assert info.value.option == "ratio"
    with pytest.raises(InputError, match="^seq_len must be at least 1") as info:
        PruneConfig(seq_len=0).validate()
    assert "--" not in str(info.value)


def test_the_cli_prints_flags(capsys):
    from vlsparse.cli.main import main

    assert main(["prune", "--seq-len", "0", "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == "Error: --seq-len must be at least 1, got 0"
    assert main(["prune", "--ratio", "0.4", "--structure", "2:4", "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == (
        "Error: --structure 2:4 prunes exactly 2/4 of every row, so it needs --ratio 0.5, not 0.4 — "
        "use --ratio 0.5 or --structure unstructured")


def _error_texts(path: Path):
    """The string pieces of every ``...Error(...)`` call's arguments in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")).endswith("Error"):
            for arg in node.args:
                for piece in ast.walk(arg):
                    if isinstance(piece, ast.Constant) and isinstance(piece.value, str):
                        yield node.lineno, piece.value


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_errors_quote_no_flag(path):
    commands = re.compile(r"`vlsparse [^`]*`")  # a whole command to run may spell its flags
    flags = [(line, text) for line, text in _error_texts(path)
             if re.search(r"(^|[\s(\[])--[a-z]", commands.sub("", text))]
    assert flags == [], "name parameters with vlsparse.errors.param"
