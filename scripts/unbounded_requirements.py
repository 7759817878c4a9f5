"""Print the project's requirements with their upper bounds lifted, for `make test-newest`.

    python scripts/unbounded_requirements.py [EXTRA ...] [--pin REQUIREMENT ...]

Reads pyproject.toml; a `--pin` replaces the requirement of the same name (the
Makefile pins torch to the CPU wheel this machine has). Lower bounds and
environment markers stay; `<`, `<=`, `~=` and `==` clauses go, so pip resolves
the newest releases, including ones newer than the tested range.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def name_of(requirement: str) -> str:
    return NAME.match(requirement).group(1).lower().replace("_", "-")


def lift_upper_bounds(requirement: str) -> str:
    spec, _, marker = requirement.partition(";")
    name = NAME.match(spec).group(1)
    clauses = [c.strip() for c in spec[len(name):].split(",") if c.strip()]
    kept = [c for c in clauses if c.startswith(">=") or c.startswith(">") or c.startswith("!=")]
    lifted = name + ",".join(kept)
    return f"{lifted}; {marker.strip()}" if marker.strip() else lifted


def main(argv: list[str]) -> int:
    extras, pins, i = [], {}, 0
    while i < len(argv):
        if argv[i] == "--pin":
            pins[name_of(argv[i + 1])] = argv[i + 1]
            i += 2
        else:
            extras.append(argv[i])
            i += 1
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    for requirement in requirements:
        print(pins.pop(name_of(requirement), None) or lift_upper_bounds(requirement))
    for pin in pins.values():
        print(pin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
