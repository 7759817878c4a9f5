"""Print the sparse-attention table (`vlsparse bench attention` without the CLI).

    python benchmarks/attention.py --seq 8192,32768 --densities 0.05,0.1 [--threads 1 --clock process] [--flex] [--load 2]

Every ratio in a row comes from one run: dense SDPA and the sparse path on the same inputs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from vlsparse.bench.attention import BENCH_PATTERNS, bench_attention, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="8192,32768")
    parser.add_argument("--patterns", default=",".join(BENCH_PATTERNS))
    parser.add_argument("--densities", default="0.05,0.1,0.25")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    parser.add_argument("--flex", action="store_true")
    parser.add_argument("--load", type=int, default=0, help="busy processes running while timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_attention([int(x) for x in args.seq.split(",")], args.patterns.split(","),
                           [float(x) for x in args.densities.split(",")], heads=args.heads, head_dim=args.head_dim,
                           repeats=args.repeats, flex=args.flex, load=args.load, clock=args.clock,
                           progress=lambda msg: print(msg, file=sys.stderr))
    print(format_table(rows))


if __name__ == "__main__":
    main()
