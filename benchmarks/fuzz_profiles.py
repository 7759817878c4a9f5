"""Fuzz profile loading: every mutated profile must load and run, or be one ProfileError.

    python benchmarks/fuzz_profiles.py [--n 10000] [--seed 0] [--model PATH] [--show 5]

Mutates a valid profile of a tiny random LLaVA (built in a temporary folder, as the tests
do; or of ``--model``) with ``vlsparse.bench.profile_fuzz`` (the mutator the tests use), loads
each case and, if it loads, runs a prefill and one decode step with the sparse runtime and
the core runtime attached. Prints how many cases loaded and ran, how many were a
``ProfileError``, how many raised anything else (by exception type, with the first
``--show`` of them), and the slowest parse (``load_profile``). Exits 1 if any case raised
anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random LLaVA (``tests/tiny_models.py``), saved under ``folder``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_llava

    return tiny_llava(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="number of cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="a model folder (default: a tiny random LLaVA)")
    parser.add_argument("--show", type=int, default=5, help="print this many of the other exceptions")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from vlsparse.models import load
    from vlsparse.bench.profile_fuzz import PROFILE_ERROR, RAN, fuzz, prompt_inputs

    torch.set_num_threads(1)  # tiny matmuls: one thread is faster
    with tempfile.TemporaryDirectory(prefix="vlsparse-fuzz-") as tmp:
        loaded = load(args.model or tiny_model(Path(tmp)))
        inputs = prompt_inputs(loaded)
        counts: Counter[str] = Counter()
        slowest, shown, start = (0.0, None), 0, time.perf_counter()
        for i, outcome in enumerate(fuzz(loaded, inputs, Path(tmp), args.n, args.seed)):
            counts[outcome.result] += 1
            if outcome.parse_seconds > slowest[0]:
                slowest = (outcome.parse_seconds, i)
            if outcome.result not in (RAN, PROFILE_ERROR) and shown < args.show:
                shown += 1
                print(f"case {i}: {outcome.case.mutations}: {outcome.message}", flush=True)
            if (i + 1) % 1000 == 0:
                print(f"{i + 1} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    others = {k: v for k, v in counts.items() if k not in (RAN, PROFILE_ERROR)}
    print(f"cases {args.n} (seed {args.seed}) in {time.perf_counter() - start:.0f} s")
    print(f"loaded and ran  {counts[RAN]}")
    print(f"ProfileError    {counts[PROFILE_ERROR]}")
    print(f"other           {sum(others.values())}" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(others.items()))})"
                                                      if others else ""))
    print(f"slowest parse   {slowest[0] * 1e3:.1f} ms (case {slowest[1]})")
    return 1 if others else 0


if __name__ == "__main__":
    sys.exit(main())
