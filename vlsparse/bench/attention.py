"""`vlsparse bench attention`: sparse prefill attention against dense causal SDPA, one run.

For each length, pattern and target density, on random q/k/v ([1, heads, N, head_dim],
fp32), side by side:

- ``dense_ms``: ``F.scaled_dot_product_attention(is_causal=True)``;
- ``sparse_ms``: our CPU path (``vlsparse.kernels.cpu.sparse_attention_cpu``) on the lists;
- ``flex_ms`` (``flex=True`` only): the ``flex`` backend (``vlsparse.kernels.flex``: compiled
  ``flex_attention``, the lists as a BlockMask built beforehand; the first call per length
  compiles for tens of seconds and is not timed);
- all of them timed in turn (dense, sparse, flex, dense, ...), so all see the same load;
- ``lists_ms``: building the lists from the pattern's indices (vertical/slash sets or block
  mask), which the runtime pays per layer; the online estimate is not included;
  ``flex_mask_ms``: building the BlockMask from the lists, which the flex backend pays per layer;
- ``density``: kept fraction of causal query-key pairs; ``speedup`` = dense / sparse,
  ``flex_speedup`` = dense / flex; ``efficiency`` (and ``flex_efficiency``) = speedup x density,
  the speedup over the ideal 1 / density (1.0 = as fast per kept pair as dense);
  ``sparse_vs_flex`` = flex / sparse time (above 1: our path is faster);
- ``max_abs_err`` (``flex_max_abs_err``): against a dense masked fp32 reference on ``error_rows``
  sampled rows per head (all rows when N <= 2048);
- ``load``, ``load_kind``: busy processes running meanwhile (``vlsparse.bench.load``: one-thread fp32 matmul
  loops, started before the first length and stopped after the last), to reproduce a shared machine.

Timings are the median of ``repeats`` runs after one warm-up, on the wall clock or (``clock=
"process"``, with one thread) on this process's CPU time, which a busy shared machine
disturbs much less. Lists are synthetic, with
the structure of each pattern: ``vertical_slash`` = 30 sink columns + random columns and
100 nearest diagonals + random slashes (half the budget each), ``block_sparse`` = top
share of random block scores, ``a_shape`` = 64 sink keys + a local window. Budgets are
bisected until the density is at most the target and within 3% of it (where the pattern's
steps allow).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlsparse.bench.load import busy_processes
from vlsparse.kernels.cpu import sparse_attention_cpu
from vlsparse.kernels.flex import flex_attention_sparse, flex_length, flex_mask
from vlsparse.kernels.indices import SparseIndex, index_density, kept_keys
from vlsparse.memory import check_fits
from vlsparse.patterns import BENCH_ORDER, PATTERNS

BENCH_PATTERNS = BENCH_ORDER


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, clock: str = "wall") -> float:
    """Median time of ``fn()`` in seconds, after ``warmup`` untimed calls.

    ``clock="process"`` counts this process's CPU time: with one thread it ignores time spent
    descheduled, which keeps ratios stable on a shared machine (with more threads it also counts
    threads spinning at barriers)."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times)


def paired_median_times(fns: Sequence[Callable[[], Any]], repeats: int = 3, warmup: int = 1,
                        clock: str = "wall") -> list[float]:
    """Median time of each of ``fns``, timed in turn (a, b, a, b, ...) after ``warmup`` rounds, so
    that every one sees the same stretches of a shared machine's load."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = now()
            fn()
            spent.append(now() - start)
    return [statistics.median(spent) for spent in times]


def synthetic_index(pattern: str, n: int, heads: int, budget: float, generator: torch.Generator,
                    block_size: int = 64) -> tuple[SparseIndex, float]:
    """Lists of one pattern with ``budget`` (a fraction of N or of causal blocks), from the pattern
    module's ``synthetic_index`` (``vlsparse.patterns``).

    Returns (index [1, heads, ...], seconds spent converting indices to lists)."""
    build = PATTERNS[pattern].synthetic_index if pattern in PATTERNS else None
    if build is None:
        raise ValueError(f"bench has no synthetic lists for pattern {pattern!r} (choose from {BENCH_PATTERNS})")
    return build(n, heads, budget, generator, block_size)


def index_at_density(pattern: str, n: int, heads: int, density: float, seed: int = 0,
                     block_size: int = 64) -> tuple[SparseIndex, float, float]:
    """Bisect the pattern's budget until its density is at most ``density`` and within 3% of it.

    Returns (index, achieved density, seconds to build the lists once): the densest lists at
    or under ``density`` met by the bisection (the closest overall if none is under)."""
    lo, hi = 0.0, 1.0
    guess = PATTERNS[pattern].density_guess(density)
    tried: list[tuple[SparseIndex, float, float]] = []
    for _ in range(16):
        index, seconds = synthetic_index(pattern, n, heads, guess, torch.Generator().manual_seed(seed), block_size)
        got = float(index_density(index, n).mean())
        tried.append((index, got, seconds))
        if 0.97 * density <= got <= density:
            break
        lo, hi = (guess, hi) if got < density else (lo, guess)
        guess = (lo + hi) / 2
    under = [t for t in tried if t[1] <= density]
    return max(under, key=lambda t: t[1]) if under else min(tried, key=lambda t: abs(t[1] - density))


def sampled_error(q: Tensor, k: Tensor, v: Tensor, out: Tensor, index: SparseIndex, scale: float,
                  rows: Tensor) -> float:
    """max |out - reference| over query ``rows`` (all heads); fp32 dense masked reference."""
    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    kept = kept_keys(index.expand(q.shape[0]), n)[:, :, rows // index.block_size]  # [B, H, R, N]
    mask = kept & (torch.arange(n)[None, :] <= rows[:, None])
    kk = k.float().repeat_interleave(group, 1)
    vv = v.float().repeat_interleave(group, 1)
    scores = torch.matmul(q[:, :, rows].float(), kk.transpose(-1, -2)) * scale
    ref = torch.matmul(scores.masked_fill(~mask, float("-inf")).softmax(-1), vv)
    return float((out[:, :, rows].float() - ref).abs().max())


def bench_bytes(n: int, heads: int, kv_heads: int, head_dim: int, patterns: Sequence[str],
                densities: Sequence[float], error_rows: int = 256, block_size: int = 64, flex: bool = False) -> int:
    """Estimated peak memory of one length ``n``: q/k/v and the dense and sparse outputs (fp32); the
    lists (up to NQB windows and ``density x N`` columns per query block, x2 while built); the largest
    working memory of a pattern's synthetic lists (``synthetic_bytes``: block_sparse's random block scores
    with their two argsorts, 25 bytes per block pair); the error check's scores,
    probabilities and masks over the sampled rows (14 bytes per row and key); with ``flex``, the
    BlockMask's kept-key booleans per query block and key (3 bytes with their copies, at the padded length)."""
    nqb = -(-n // block_size)
    tensors = 4 * head_dim * n * (4 * heads + 2 * kv_heads)
    lists = 2 * 4 * heads * nqb * (nqb + math.ceil(max(densities, default=1.0) * n))
    scores = max((PATTERNS[p].synthetic_bytes(n, heads, block_size) for p in patterns
                  if p in PATTERNS and PATTERNS[p].synthetic_bytes is not None), default=0)
    rows = n if n <= 2048 else min(error_rows, n)
    padded = flex_length(n, block_size)
    flex_mask_bytes = 3 * heads * (padded // block_size) * padded + 4 * head_dim * padded * (heads + 2 * kv_heads)
    return tensors + lists + scores + 14 * heads * rows * n + (flex_mask_bytes if flex else 0)


def _flex_columns(dense_s: float, sparse_s: float, flex_s: float, density: float, mask_s: float,
                  err: float) -> dict[str, Any]:
    return {"flex_ms": round(flex_s * 1e3, 2), "flex_speedup": round(dense_s / flex_s, 2),
            "flex_efficiency": round(dense_s / flex_s * density, 3), "sparse_vs_flex": round(flex_s / sparse_s, 2),
            "flex_mask_ms": round(mask_s * 1e3, 2), "flex_max_abs_err": err}


def bench_attention(seqs: Sequence[int] = (4096, 8192, 16384, 32768),
                    patterns: Sequence[str] = BENCH_PATTERNS, densities: Sequence[float] = (0.05, 0.1, 0.25), *,
                    heads: int = 8, kv_heads: int | None = None, head_dim: int = 64, repeats: int = 3,
                    flex: bool = False, load: int = 0, load_kind: str = "matmul", error_rows: int = 256, seed: int = 0,
                    clock: str = "wall",
                    progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure every (length, pattern, density); one dict per row (keys in the module docstring).

    ``load``: busy processes kept running for the whole measurement (0: none), of ``load_kind``
    (``vlsparse.bench.load.KINDS``: one-thread fp32 matmuls, or a pure Python loop)."""
    kv_heads = heads if kv_heads is None else kv_heads
    longest = max(seqs, default=0)  # the estimate grows with N: the longest decides, before any tensor exists
    check_fits(bench_bytes(longest, heads, kv_heads, head_dim, patterns, densities, error_rows, flex=flex),
               f"bench attention at --seq {longest:,} ({heads} heads of {head_dim})",
               "use shorter --seq lengths, or fewer --heads")
    say = progress or (lambda _msg: None)
    if load:
        say(f"starting {load} busy process{'es' if load > 1 else ''}")
    with busy_processes(load, load_kind):
        rows = [row for n in seqs for row in _bench_length(n, patterns, densities, heads, kv_heads, head_dim,
                                                            repeats, flex, load, error_rows, seed, clock, say)]
    for row in rows:
        row["load_kind"] = load_kind if load else None
    return rows


def _bench_length(n: int, patterns: Sequence[str], densities: Sequence[float], heads: int, kv_heads: int,
                  head_dim: int, repeats: int, flex: bool, load: int, error_rows: int, seed: int, clock: str,
                  say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of one length (see :func:`bench_attention`)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, head_dim, generator=gen)
    k = torch.randn(1, kv_heads, n, head_dim, generator=gen)
    v = torch.randn(1, kv_heads, n, head_dim, generator=gen)
    scale = 1.0 / math.sqrt(head_dim)
    gqa = heads != kv_heads

    def dense() -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    sample = torch.arange(n) if n <= 2048 else torch.randperm(n, generator=gen)[:error_rows].sort().values
    rows: list[dict[str, Any]] = []
    for pattern in patterns:
        for target in densities:
            say(f"seq {n}: {pattern} at density ~{target:g}")
            index, density, lists_s = index_at_density(pattern, n, heads, target, seed)
            fns = [dense, lambda: sparse_attention_cpu(q, k, v, index, scale)]
            if flex:
                start = time.perf_counter()
                block_mask = flex_mask(index, q)
                mask_s = time.perf_counter() - start
                if not rows:
                    say(f"seq {n}: compiling flex_attention for this length (10-40 s the first time)")
                flex_out = flex_attention_sparse(q, k, v, index, scale, block_mask=block_mask)  # compiles once per n
                fns.append(lambda: flex_attention_sparse(q, k, v, index, scale, block_mask=block_mask))
            times = paired_median_times(fns, repeats, clock=clock)
            dense_s, sparse_s = times[:2]
            out = sparse_attention_cpu(q, k, v, index, scale)
            row: dict[str, Any] = {
                "seq": n, "pattern": pattern, "target_density": target, "density": round(density, 4),
                "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "load": load,
                "dense_ms": round(dense_s * 1e3, 2), "sparse_ms": round(sparse_s * 1e3, 2),
                "lists_ms": round(lists_s * 1e3, 2),
                "speedup": round(dense_s / sparse_s, 2), "efficiency": round(dense_s / sparse_s * density, 3),
                "max_abs_err": sampled_error(q, k, v, out, index, scale, sample),
            }
            if flex:
                row |= _flex_columns(dense_s, sparse_s, times[2], density, mask_s,
                                     sampled_error(q, k, v, flex_out, index, scale, sample))
            rows.append(row)
    return rows


TABLE = ["seq", "pattern", "density", "load", "dense_ms", "sparse_ms", "flex_ms", "speedup", "flex_speedup",
         "sparse_vs_flex", "efficiency", "flex_efficiency", "max_abs_err", "lists_ms", "flex_mask_ms"]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`bench_attention` rows (the flex columns when the rows have them)."""
    cols = [c for c in TABLE if any(c in r for r in rows)] or TABLE[:4]
    cells = [[f"{r[c]:.2e}" if c == "max_abs_err" else str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


__all__ = ["BENCH_PATTERNS", "bench_attention", "bench_bytes", "format_table", "index_at_density", "median_time",
           "paired_median_times", "sampled_error", "synthetic_index"]
