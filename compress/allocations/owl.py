"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): blocks with more outliers keep more.

Layer outlier distribution (LOD): the share of a block's Wanda scores
``|W_ij| * ||X_j||`` above ``m`` (default 5) times their mean, with ``||X_j||``
from one dense streamed pass; keep fractions ``1 - ratio + d_g - mean(d)``
with ``d_g`` the LOD scaled to ``[0, 2 * lam]`` (lam = 0.08), mean weighted by
size, clipped to ``ratio +- max_deviation`` and shifted to meet the total exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlsparse.compress.allocations.fill import deviation_bounds, fill_to_total, keep_total
from vlsparse.compress.methods.wanda import new_stats as sq_norm_stats
from vlsparse.compress.sequential import Progress, StreamedModel, StopForward, layer_stats
from vlsparse.compress.wanda import wanda_scores


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """OWL's layer outlier distribution (LOD): share of all ``scores`` above ``m`` times their mean.

    ``scores`` are the Wanda scores of every matrix in one block, taken together
    (OWL, Yin et al. 2024, default M = 5).
    """
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        return 0.0
    cut = m * total / count
    return sum(int((s > cut).sum()) for s in scores) / count


def owl(sizes: Sequence[int], outlier_ratios: Sequence[float], ratio: float, max_deviation: float = 0.1,
        lam: float = 0.08) -> list[int]:
    """OWL keep counts from layer outlier ratios (higher = more outliers = keep more)."""
    if len(sizes) != len(outlier_ratios):
        raise ValueError("one outlier ratio per group")
    low, high = min(outlier_ratios), max(outlier_ratios)
    spread = [(r - low) / (high - low) * 2 * lam if high > low else 0.0 for r in outlier_ratios]
    n = sum(sizes)
    mean = sum(d * s for d, s in zip(spread, sizes)) / n
    lo, hi = deviation_bounds(sizes, ratio, max_deviation)
    base = [s * (1 - ratio + d - mean) for d, s in zip(spread, sizes)]
    return fill_to_total(base, list(sizes), lo, hi, keep_total(sizes, ratio))


def dense_input_norms(streamed: StreamedModel, batches: list[dict],
                      progress: Progress = lambda _: None) -> dict[str, torch.Tensor]:
    """``||X_j||^2`` of every prunable Linear's input over one dense streamed pass (OWL)."""
    linears = {n: lin for b in streamed.blocks for n, lin in b.linears.items()}

    def stop(*_):  # nothing after the last block matters here: skip the final norm and the logits
        raise StopForward

    handle = streamed.blocks[-1].module.register_forward_hook(stop)
    try:
        with layer_stats(linears, sq_norm_stats) as stats:
            for i, batch in enumerate(batches):
                progress(f"({i + 1}/{len(batches)}) Dense pass for outlier ratios")
                try:
                    streamed.forward(batch)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return {f"{n}.weight": s.sum_sq for n, s in stats.items() if s.tokens}


def outlier_ratios(streamed: StreamedModel, norms: dict[str, torch.Tensor], m: float) -> list[float]:
    ratios = []
    for block in streamed.blocks:
        streamed.materialise(block)
        try:
            scores = [wanda_scores(streamed.model.get_parameter(n), norms[n]) for n in block.weight_names()]
            ratios.append(outlier_ratio(scores, m))
        finally:
            streamed.release(block)
    return ratios


def scores(streamed: StreamedModel, batches: list[dict], config, progress: Progress) -> tuple[list[float], dict]:
    """Each block's outlier ratio (``config.owl_m``) over one dense pass of the calibration ``batches``."""
    norms = dense_input_norms(streamed, batches, progress)
    return outlier_ratios(streamed, norms, config.owl_m), {"owl": {"m": config.owl_m, "lam": config.owl_lambda}}


def keep_counts(sizes: Sequence[int], scores: Sequence[float], config) -> list[int]:
    return owl(sizes, scores, config.ratio, config.max_deviation, config.owl_lambda)
