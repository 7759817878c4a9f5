"""Does a CATS-thresholded MLP pay on this CPU? One decode-step MLP, dense against thresholded, timed in turns.

    .venv/bin/python benchmarks/cats_decode.py                  # SmolLM2-135M's MLP (576 -> 1536 -> 576)
    .venv/bin/python benchmarks/cats_decode.py --hidden 4096 --intermediate 11008

CATS (Lee et al., 2024) zeroes the gate activations below a per-layer threshold; the neurons
it zeroes need no up-projection row and no down-projection column. For one token (a decode
step) the thresholded MLP computes ``g = act(gate(x))``, keeps the ``k`` neurons with
``|g| > t`` and multiplies only their rows of ``up`` and of ``down`` (held transposed, so a
neuron's down weights are one contiguous row): ``(g_k * (up_k @ x)) @ down_k``. The gather of
those rows is a copy of ``2 k D`` weights per step; the dense MLP reads ``2 I D`` once. So the
gather path can win only when ``k`` is well below ``I / 2``. Thresholds are set on the token's
own activations at each sparsity (what calibration's thresholds aim for on average).

Prints, per sparsity, the median time of both (fp32, one thread count, interleaved rounds) and
the ratio dense / CATS, with the output's relative error against dense (the zeroed neurons' share).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def dense_mlp(x, gate, up, down_t):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down_t


def cats_mlp(x, gate, up, down_t, threshold: float):
    g = F.silu(x @ gate.T)
    keep = (g.abs() > threshold).nonzero()[:, -1]
    return (g[:, keep] * (x @ up.index_select(0, keep).T)) @ down_t.index_select(0, keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    d, i = args.hidden, args.intermediate
    gate, up = torch.randn(i, d, generator=g) / d**0.5, torch.randn(i, d, generator=g) / d**0.5
    down_t = torch.randn(i, d, generator=g) / i**0.5
    x = torch.randn(1, d, generator=g)
    act = F.silu(x @ gate.T).abs().flatten()
    print(f"MLP {d} -> {i} -> {d}, one token, fp32, {torch.get_num_threads()} threads")
    print(f"{'sparsity':>9} {'dense us':>9} {'cats us':>9} {'dense/cats':>11} {'rel err':>8}")
    with torch.inference_mode():
        reference = dense_mlp(x, gate, up, down_t)
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            threshold = float(act.quantile(sparsity))
            runs = {"dense": lambda: dense_mlp(x, gate, up, down_t),
                    "cats": lambda: cats_mlp(x, gate, up, down_t, threshold)}
            times = {name: [] for name in runs}
            for round_ in range(args.repeats + 1):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        fn()
                    if round_:
                        times[name].append((time.perf_counter() - start) / args.steps * 1e6)
            dense_us, cats_us = statistics.median(times["dense"]), statistics.median(times["cats"])
            err = float((runs["cats"]() - reference).norm() / reference.norm())
            print(f"{sparsity:>9.2f} {dense_us:>9.1f} {cats_us:>9.1f} {dense_us / cats_us:>10.2f}x {err:>8.3f}")


if __name__ == "__main__":
    main()
