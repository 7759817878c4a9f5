"""Compare the start of two demo-training logs (``train_log.jsonl``) step by step.

Used to show that re-running the first few hundred steps of ``scripts/train_demo.py``
reproduces the logged loss curve:

    python scripts/train_demo.py --stop-after 200 --out /tmp/demo-check
    python scripts/check_train_log.py vlsparse/demo/weights/train_log.jsonl /tmp/demo-check/train_log.jsonl

Records are matched by (stage, step). Losses agree up to float non-associativity (thread
counts and BLAS builds change summation order), so the check is a tolerance on the
relative difference, not equality. Exit code 1 if any matched step differs by more.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_losses(path: Path) -> dict[tuple[str, int], float]:
    """{(stage, step): loss} from a training log; stage is "vision" or "lm"."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[(record.get("stage", "lm"), int(record["step"]))] = float(record["loss"])
    return out


def compare(reference: dict, rerun: dict) -> tuple[int, float, tuple[str, int] | None]:
    """Matched steps, the largest relative loss difference, and the step where it occurs."""
    worst, where = 0.0, None
    common = sorted(set(reference) & set(rerun))
    for key in common:
        diff = abs(reference[key] - rerun[key]) / max(abs(reference[key]), 1e-8)
        if diff > worst:
            worst, where = diff, key
    return len(common), worst, where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path)
    parser.add_argument("rerun", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest allowed relative loss difference")
    args = parser.parse_args()
    matched, worst, where = compare(read_losses(args.reference), read_losses(args.rerun))
    if matched == 0:
        print("no common steps between the two logs", file=sys.stderr)
        return 1
    print(f"{matched} steps matched; largest relative loss difference {worst:.2e} at {where}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
