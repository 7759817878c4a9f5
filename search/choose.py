"""Pick each head's pattern: the cheapest candidate that keeps the target recall on every sample.

Rule (defaults in brackets):

1. A candidate *passes* if its recall on every calibration sample is at least
   ``target`` [0.95] (``recall_min >= target``) and so is its tail recall, over the
   rows of the last query block (``tail_min >= tail_target``, [``target``]; 0 turns
   the guard off). The mean over all rows is mostly image rows; the last rows hold the
   question and the row that predicts the answer.
2. Cost is the mean density over the samples in the kernels' 64 x 64 block
   layout (tiles * 64^2 + columns * 64 over the dense causal layout).
3. Among passing candidates whose density is within ``tie_density`` [0.01] of
   the cheapest, walk them in catalogue order and keep the earlier one unless a
   later one gains more than ``min_gain`` [0.01] recall (MMInference's
   tie-break); the catalogue lists patterns without online estimation first.
4. Nothing passes: ``dense``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlsparse.patterns import lookup
from vlsparse.profile import HeadProfile
from vlsparse.search.candidates import Candidate, budget_counts


@dataclass
class Scored:
    """A candidate's aggregate over the calibration samples for one head."""

    candidate: Candidate
    recall_min: float
    recall_mean: float
    density: float
    tail_min: float = 1.0


def choose(scored: list[Scored], target: float = 0.95, tie_density: float = 0.01, min_gain: float = 0.01,
           tail_target: float | None = None) -> Scored:
    """The chosen candidate among ``scored`` (in catalogue order); see the module docstring."""
    if not scored:
        raise ValueError("no candidates to choose from")
    tail_target = target if tail_target is None else tail_target
    passing = [s for s in scored if s.recall_min >= target and s.tail_min >= tail_target]
    if not passing:
        dense = [s for s in scored if s.candidate.pattern == "dense"]
        return dense[0] if dense else max(scored, key=lambda s: s.recall_min)
    cheapest = min(s.density for s in passing)
    window = [s for s in passing if s.density <= cheapest + tie_density]
    best = window[0]
    for s in window[1:]:
        if s.recall_min - best.recall_min > min_gain:
            best = s
    return best


def head_profile(chosen: Scored, n_cal: int, mask: str | None = None) -> HeadProfile:
    """The profile entry for a chosen candidate; ``budget_abs`` is taken at the calibration length ``n_cal``."""
    cand = chosen.candidate
    return HeadProfile(
        pattern=cand.pattern,
        budget=dict(cand.budgets),
        budget_abs=budget_counts(cand, n_cal),
        params=cand.parameters,
        recall_min=round(float(chosen.recall_min), 6),
        recall_mean=round(float(chosen.recall_mean), 6),
        tail_recall_min=round(float(chosen.tail_min), 6),
        density=round(float(chosen.density), 6),
        mask=mask if lookup(cand.pattern).USES_MASK else None,
    )
