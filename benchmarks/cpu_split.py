"""When does the CPU path gain from splitting its query blocks across threads?

    python benchmarks/cpu_split.py [--seq 8192,12288,16384,32768] [--density 0.1]

For each length and pattern (the synthetic lists of `vlsparse bench attention`), times in turn
(serial, split, serial, ...):

- serial: ``sparse_attention_cpu(..., threads=1)``: one sequence of kernel calls, each on all of
  torch's threads;
- split: ``threads=torch.get_num_threads(), parallel_min_keys=0``: the query blocks cut into one
  part per thread, each part run in its own thread with one torch thread.

``keys`` is the number of listed keys summed over query blocks, which ``parallel_min_keys``
(the default threshold for splitting) is compared with.
"""

from __future__ import annotations

import argparse
import math

import torch

from vlsparse.bench.attention import BENCH_PATTERNS, index_at_density, paired_median_times
from vlsparse.kernels.cpu import sparse_attention_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", default="8192,12288,16384,32768")
    parser.add_argument("--patterns", default=",".join(BENCH_PATTERNS))
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"{'seq':>6} {'pattern':>15} {'keys':>9} {'serial_ms':>10} {'split_ms':>9} {'split gain':>10}  ({threads} threads)")
    for n in (int(s) for s in args.seq.split(",")):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=gen) for _ in range(3))
        scale = 1 / math.sqrt(args.head_dim)
        for pattern in args.patterns.split(","):
            index, _, _ = index_at_density(pattern, n, args.heads, args.density)
            keys = int((index.block_count.long() * index.block_size + index.column_count.long()).sum())
            serial, split = paired_median_times(
                [lambda: sparse_attention_cpu(q, k, v, index, scale, threads=1),
                 lambda: sparse_attention_cpu(q, k, v, index, scale, threads=threads, parallel_min_keys=0)],
                args.repeats)
            print(f"{n:>6} {pattern:>15} {keys:>9} {serial * 1e3:>10.1f} {split * 1e3:>9.1f} {serial / split:>9.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
