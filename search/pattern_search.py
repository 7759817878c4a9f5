"""The stateful half of the search: collect candidate scores layer by layer, sample by sample, then choose.

    search = PatternSearch(candidates, num_layers, num_heads)
    for each sample, for each layer:  search.add(layer, q, k, scale, spans)
    chosen, masks = search.choose(target=0.95, n_cal=4096)   # tail_target: defaults to target

Memory kept between samples: per (layer, sample) a recall and a density per
candidate and head and, when static candidates are searched, the ``[H, nb, nb]``
tile masses the static masks are built from (``nb = N / 64``: 256 KiB per head
and sample at 16k tokens, the one term that grows with N^2).
"""

from __future__ import annotations

import torch

from vlsparse.patterns import PATTERNS, lookup
from vlsparse.search.candidates import Candidate
from vlsparse.search.choose import Scored, choose
from vlsparse.search.evaluate import evaluate_layer, evaluate_static
from vlsparse.search.recall import BLOCK, STEP_ELEMENTS, num_blocks


def is_offline(cand: Candidate) -> bool:
    """Whether ``cand``'s pattern is scored after all samples (a static mask) rather than per input."""
    return lookup(cand.pattern, PATTERNS).OFFLINE


class PatternSearch:
    """Scores of every candidate for every (layer, query head), accumulated over calibration samples."""

    def __init__(self, candidates: list[Candidate], num_layers: int, num_heads: int, last_q: int = 64,
                 block: int = BLOCK, max_elements: int = STEP_ELEMENTS, dense_tail: bool = False) -> None:
        self.candidates = list(candidates)
        self.online = [c for c in self.candidates if not is_offline(c)]
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.last_q = last_q
        self.block = block
        self.max_elements = max_elements
        self.dense_tail = dense_tail
        self.keep_tiles = any(is_offline(c) for c in self.candidates)
        self.recall: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.density: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.tail: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.tile_mass: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.lengths: list[list[int]] = [[] for _ in range(num_layers)]

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float, spans=()) -> None:
        """Score one layer of one input. ``q``: ``[H, N, d]`` query heads, ``k``: ``[H_kv, N, d]``."""
        if q.shape[0] != self.num_heads:
            raise ValueError(f"layer {layer} has {q.shape[0]} query heads, expected {self.num_heads}")
        scores = evaluate_layer(q, k, scale, self.online, spans, last_q=self.last_q, block=self.block,
                                max_elements=self.max_elements, dense_tail=self.dense_tail)
        self.recall[layer].append(scores.recall)
        self.density[layer].append(scores.density)
        self.tail[layer].append(scores.tail)
        if self.keep_tiles:  # only static masks need them after the layer is done
            self.tile_mass[layer].append(scores.tile_mass)
        self.lengths[layer].append(scores.n)

    @property
    def samples(self) -> int:
        """Samples scored in every layer that was scored at all (layers never scored are recorded dense)."""
        return min((len(r) for r in self.recall if r), default=0)

    def scored(self, layer: int, head: int, n_cal: int) -> tuple[list[Scored], dict[Candidate, torch.Tensor]]:
        """Every candidate's aggregate for one head, in catalogue order, and the static masks built.

        Static masks are scored on held-out samples (leave-one-out), so they need two
        or more samples; with one they are left out.
        """
        recall = torch.stack([r[head] for r in self.recall[layer]])  # [S, C_online]
        density = torch.stack([d[head] for d in self.density[layer]])
        tail = torch.stack([t[head] for t in self.tail[layer]])
        masses = [m[head] for m in self.tile_mass[layer]] if self.keep_tiles else []
        lengths = self.lengths[layer]
        index = {c: i for i, c in enumerate(self.online)}
        statics = [c for c in self.candidates if is_offline(c)] if len(lengths) > 1 else []
        static_scores = {}
        if statics:
            found = evaluate_static(masses, lengths, [c.budgets["select"] for c in statics],
                                    num_blocks(n_cal, self.block), self.dense_tail)
            static_scores = dict(zip(statics, found))
        out, masks = [], {}
        for cand in self.candidates:
            if is_offline(cand):
                if cand not in static_scores:  # one sample: no held-out recall, so no static masks
                    continue
                mask, recalls, densities, tails = static_scores[cand]
                masks[cand] = mask
                rec, den, end = (torch.tensor(x, dtype=torch.float64) for x in (recalls, densities, tails))
            else:
                rec, den, end = recall[:, index[cand]], density[:, index[cand]], tail[:, index[cand]]
            out.append(Scored(cand, float(rec.min()), float(rec.mean()), float(den.mean()), float(end.min())))
        return out, masks

    def choose(self, target: float = 0.95, n_cal: int | None = None, tie_density: float = 0.01,
               min_gain: float = 0.01, tail_target: float | None = None) -> tuple[list[list[Scored]], dict[tuple[int, int], torch.Tensor]]:
        """Per layer and head the chosen candidate, and the static masks of heads that chose ``static``."""
        if self.samples == 0:
            raise ValueError("no calibration sample was scored")
        n_cal = n_cal or max(next(lengths for lengths in self.lengths if lengths))
        chosen: list[list[Scored]] = []
        masks: dict[tuple[int, int], torch.Tensor] = {}
        for layer in range(self.num_layers):
            if not self.recall[layer]:  # never scored (no self-attention: Mllama's cross-attention layers)
                chosen.append([Scored(Candidate("dense"), 1.0, 1.0, 1.0) for _ in range(self.num_heads)])
                continue
            row = []
            for head in range(self.num_heads):
                scored, static_masks = self.scored(layer, head, n_cal)
                # with a dense tail the last block runs dense: the pattern's own tail recall is recorded, not required
                best = choose(scored, target, tie_density=tie_density, min_gain=min_gain,
                              tail_target=0.0 if self.dense_tail else tail_target)
                if is_offline(best.candidate):
                    masks[(layer, head)] = static_masks[best.candidate]
                row.append(best)
            chosen.append(row)
        return chosen, masks
