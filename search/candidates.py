"""Candidate sparse patterns: the search space, the online index estimates, and their layouts.

Every candidate becomes, per head and per input, the ``Layout`` the runtime
(``vlsparse.kernels.indices.layer_index``) computes for the same ``HeadProfile``,
so the recall measured offline is the recall the kernels keep
(``tests/test_search_runtime_agreement.py`` checks the two against each other).
Budgets are fractions of the length ``N`` (``vlsparse.profile``), turned into
counts at each length by ``budget_count(fraction, n, minimum) = clamp(round(fraction * n), minimum, n)``:

``a_shape`` (StreamingLLM / MInference "A-shape")
    key columns ``0 .. sink-1`` (minimum 0) plus the ``local`` (minimum 1) nearest diagonals.
``vertical_slash`` (MInference)
    indices estimated from the last ``last_q`` = 64 query rows: ``A = softmax(q_last k^T)``
    (causal); column sums rank key columns, sums along each diagonal ``i - j = o``
    rank offsets. Keep ``vertical`` columns (the first ``scaled(30)`` always among
    them) and ``slash`` (minimum 1) offsets (the ``scaled(100)`` nearest always among
    them); ``scaled(m) = clamp(ceil(m N / 8192), 1, m)``.
``modality_vertical_slash`` (MMInference, Q-boundary)
    as ``vertical_slash`` with separate indices and budgets for text and image query
    rows, each estimated from the last 64 rows *of that modality*; a query block holding
    both kinds of rows keeps the union.
``grid`` (MMInference)
    diagonals ``phase + m * stride`` (``stride`` = the image's row or frame stride in
    tokens, from the processor's grid; ``phase`` in {0, 1, -1}, taken modulo the stride)
    plus the ``local`` nearest diagonals.
``block_sparse`` (FlexPrefill / XAttention style)
    mean-pool q and k per 64-token block, block scores ``scale * q_bar . k_bar`` (causal).
    ``blocks``: the top ``ceil(blocks * (qb + 1))`` key tiles of query block ``qb``;
    ``mass``: the fewest tiles whose softmax over block scores reaches ``mass``. The
    diagonal tile is always kept.
``static`` (SparseD)
    a fixed tile mask chosen offline (per query block the top ``ceil(select * (qb + 1))``
    key tiles by mean softmax mass over the calibration samples), stored at the
    calibration length, resized to other lengths by nearest tile centre; diagonal kept.
``dense``
    every causal tile.

Diagonals (slashes) run as MInference's 64-wide key windows, placed the same way in
every query block (greedy cover of the needed distances, starting at the diagonal);
single columns are the verticals outside every window.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from vlsparse.kernels.estimate import NEAR_SLASHES, SINK_COLUMNS, scaled_minimum
from vlsparse.kernels.indices import budget_count, grid_slashes
from vlsparse.search.recall import BLOCK, Layout, causal_tiles, num_blocks

LAST_Q = 64
"""Query rows the online estimate looks at."""
GRID_PHASES = (0, 1, -1)
"""Grid phases searched (MMInference: 0, 1 and stride - 1)."""

PATTERN_ORDER = ("a_shape", "grid", "static", "block_sparse", "vertical_slash", "modality_vertical_slash", "dense")
"""Catalogue order: patterns needing no online estimate first (the tie-break prefers earlier ones)."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search space: a pattern with named budgets (fractions of N) and integer params."""

    pattern: str
    budget: tuple[tuple[str, float], ...] = ()
    params: tuple[tuple[str, int], ...] = ()

    @property
    def budgets(self) -> dict[str, float]:
        return dict(self.budget)

    @property
    def parameters(self) -> dict[str, int]:
        return dict(self.params)

    @property
    def key(self) -> str:
        parts = [f"{k}={v:.4g}" for k, v in self.budget] + [f"{k}={v}" for k, v in self.params]
        return f"{self.pattern}({', '.join(parts)})"


def candidate(pattern: str, budget: dict[str, float] | None = None, params: dict[str, int] | None = None) -> Candidate:
    return Candidate(pattern, tuple((k, float(v)) for k, v in (budget or {}).items()),
                     tuple((k, int(v)) for k, v in (params or {}).items()))


@dataclass(frozen=True)
class SearchSpace:
    """Budget ladders of the search. Token counts are at the calibration length; fractions of N otherwise.

    Defaults: A-shape with 4 or 64 sink columns and local windows of 1-33 64-wide
    windows; vertical-slash with 30 / 1% / 2% / 5% / 10% columns and 100 / 5% / 10% /
    20% / 40% diagonals; top-k block shares 5-50%; cumulative block mass 0.5-0.99;
    static selections 5-50% (in 5-point steps up to 30%); grid local bands of 1-4 windows at three phases and two
    strides (image row, image); a coarser 3 x 3 ladder per modality.
    """

    sink_tokens: tuple[int, ...] = (4, 64)
    local_tokens: tuple[int, ...] = (1, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
    vertical: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1)
    slash: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4)
    blocks: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    mass: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    select: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5)
    grid_local_tokens: tuple[int, ...] = (1, 64, 128, 192)
    modality_vertical: tuple[float, ...] = (0.0, 0.02, 0.1)
    modality_slash: tuple[float, ...] = (0.0, 0.1, 0.3)
    patterns: tuple[str, ...] = PATTERN_ORDER


def catalogue(n0: int, images: bool = False, strides: tuple[int, ...] = (), space: SearchSpace = SearchSpace()
              ) -> list[Candidate]:
    """The candidates, in catalogue order, for calibration length ``n0``.

    A ladder value of 0.0 for ``vertical`` / ``slash`` means the forced minimum
    (30 columns / 100 diagonals), recorded as that count over ``n0``. Modality-aware
    candidates need image spans (``images``); grid candidates need image ``strides``.
    """
    frac = lambda tokens: min(1.0, tokens / n0)  # noqa: E731 - tiny local helper
    vs = lambda v, s: (max(v, frac(SINK_COLUMNS)), max(s, frac(NEAR_SLASHES)))  # noqa: E731
    out: list[Candidate] = []
    for pattern in space.patterns:
        if pattern == "a_shape":
            out += [candidate("a_shape", {"sink": frac(s), "local": frac(t)})
                    for s in space.sink_tokens for t in space.local_tokens if t < n0]
        elif pattern == "grid":
            out += [candidate("grid", {"local": frac(t)}, {"stride": stride, "phase": p})
                    for stride in strides if 0 < stride < n0 for t in space.grid_local_tokens if t < n0
                    for p in GRID_PHASES]
        elif pattern == "static":
            out += [candidate("static", {"select": s}) for s in space.select]
        elif pattern == "block_sparse":
            out += [candidate("block_sparse", {"blocks": b}) for b in space.blocks]
            out += [candidate("block_sparse", {"mass": m}) for m in space.mass]
        elif pattern == "vertical_slash":
            pairs = dict.fromkeys(vs(v, s) for v in space.vertical for s in space.slash)
            out += [candidate("vertical_slash", {"vertical": v, "slash": s}) for v, s in pairs]
        elif pattern == "modality_vertical_slash" and images:
            pairs = list(dict.fromkeys(vs(v, s) for v in space.modality_vertical for s in space.modality_slash))
            out += [candidate("modality_vertical_slash", {"text_vertical": tv, "text_slash": ts,
                                                          "image_vertical": iv, "image_slash": is_})
                    for tv, ts in pairs for iv, is_ in pairs]
        elif pattern == "dense":
            out.append(candidate("dense"))
    return out


# ----------------------------------------------------------------------------- budget -> counts


BUDGET_MINIMUM = {"sink": 0, "local": 1, "vertical": 0, "slash": 1, "text_vertical": 0, "text_slash": 1,
                  "image_vertical": 0, "image_slash": 1}


def budget_counts(cand: Candidate, n: int, block: int = BLOCK) -> dict[str, int]:
    """The budgets of ``cand`` at length ``n``: tokens, or tiles per query block row for ``blocks``
    and ``select`` (at the last row). ``mass`` has no fixed count and is left out."""
    nb = num_blocks(n, block)
    out: dict[str, int] = {}
    for key, value in cand.budget:
        if key in BUDGET_MINIMUM:
            out[key] = budget_count(value, n, BUDGET_MINIMUM[key])
        elif key in ("blocks", "select"):
            out[key] = max(1, math.ceil(value * nb - 1e-6))
    return out


# ----------------------------------------------------------------------------- online estimates


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, rows: torch.Tensor) -> torch.Tensor:
    """Causal softmax of ``rows``' queries over all keys: ``[H, R, N]``."""
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    qr = q[:, rows].float().reshape(kv_heads, (heads // kv_heads) * len(rows), dim)
    s = torch.bmm(qr, k.float().transpose(1, 2)).view(heads, len(rows), n) * scale
    s.masked_fill_(torch.arange(n)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, scale: float,
                          rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's estimate from query ``rows`` (the last 64): column sums and diagonal sums, ``[H, N]`` each.

    ``slash[h, o] = sum_r A[h, r, rows[r] - o]`` is the mass on the diagonal at offset ``o``.
    """
    heads, n, _ = q.shape
    a = _scores(q, k, scale, rows)
    vertical = a.sum(dim=1)
    offsets = (rows[:, None] - torch.arange(n)[None, :]).clamp(min=0).reshape(1, -1).expand(heads, -1)
    slash = torch.zeros(heads, n).scatter_add_(1, offsets, a.reshape(heads, -1))
    return vertical, slash


def priority_order(scores: torch.Tensor, forced: int) -> torch.Tensor:
    """Indices by priority: ``0 .. forced-1`` first, then the rest by descending score (ties by index).

    The first ``c`` of them are the runtime's top-``c`` with ``min(c, forced)`` forced.
    """
    key = scores.clone()
    key[:, :forced] = float("inf")
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = BLOCK) -> torch.Tensor:
    """``scale * mean_pool(q) . mean_pool(k)`` per (query block, key block), ``-inf`` above the diagonal."""
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    nb = num_blocks(n, block)
    counts = torch.full((nb,), float(block))
    counts[-1] = n - (nb - 1) * block

    def pool(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - n))
        return x.view(x.shape[0], nb, block, dim).sum(2) / counts[None, :, None]

    qb, kb = pool(q).reshape(kv_heads, (heads // kv_heads) * nb, dim), pool(k)
    s = torch.bmm(qb, kb.transpose(1, 2)).view(heads, nb, nb) * scale
    return s.masked_fill(~causal_tiles(nb), float("-inf"))


@dataclass
class Estimates:
    """What the online estimators see for one input and one layer (all heads).

    ``orders[kind]``: ``(vertical, slash)`` priority orders ``[H, N]`` for ``kind`` in
    ``all`` (last 64 rows), ``text`` and ``image`` (last 64 rows of that modality;
    ``None`` when the input has no rows of it); ``blocks``: pooled block scores
    ``[H, nb, nb]``; ``groups``: ``[nb]`` query-block groups (0 text-only, 1 image-only,
    2 mixed); ``images``: whether the input has image rows.
    """

    n: int
    block: int
    orders: dict[str, tuple[torch.Tensor, torch.Tensor] | None]
    blocks: torch.Tensor
    groups: torch.Tensor
    images: bool = False
    cache: dict = field(default_factory=dict, repr=False)


def image_row_mask(n: int, spans) -> torch.Tensor:
    """Bool ``[n]``: token positions inside an image span."""
    mask = torch.zeros(n, dtype=torch.bool)
    for span in spans:
        mask[max(span.start, 0):min(span.end, n)] = True
    return mask


def block_groups(n: int, spans, block: int = BLOCK) -> torch.Tensor:
    """Group of each query block: 0 text rows only, 1 image rows only, 2 both."""
    nb = num_blocks(n, block)
    pad = nb * block - n
    image = torch.nn.functional.pad(image_row_mask(n, spans), (0, pad)).view(nb, block)
    valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, pad)).view(nb, block)
    has_image, has_text = image.any(1), (valid & ~image).any(1)
    return torch.where(has_image & has_text, 2, torch.where(has_image, 1, 0))


def estimate(q: torch.Tensor, k: torch.Tensor, scale: float, spans=(), last_q: int = LAST_Q,
             block: int = BLOCK) -> Estimates:
    """Run every online estimator for one layer of one input (``q``: ``[H, N, d]``, ``k``: ``[H_kv, N, d]``)."""
    n = q.shape[1]
    sink, near = scaled_minimum(SINK_COLUMNS, n), scaled_minimum(NEAR_SLASHES, n)

    def orders(rows: torch.Tensor):
        if rows.numel() == 0:
            return None
        v, s = vertical_slash_scores(q, k, scale, rows)
        return priority_order(v, sink), priority_order(s, near)

    image = image_row_mask(n, spans)
    out = {"all": orders(torch.arange(max(0, n - last_q), n))}
    if image.any():
        out["text"] = orders((~image).nonzero().flatten()[-last_q:])
        out["image"] = orders(image.nonzero().flatten()[-last_q:])
    return Estimates(n=n, block=block, orders=out, blocks=pooled_block_scores(q, k, scale, block),
                     groups=block_groups(n, spans, block), images=bool(image.any()))


# ----------------------------------------------------------------------------- layouts


def slash_windows(offsets: torch.Tensor, n: int, block: int = BLOCK) -> torch.Tensor:
    """Window starts (distance space, ascending) covering the diagonals at ``offsets`` in every query block.

    Diagonal ``o`` needs distances ``[o, o + 63]`` (``p = r0 + 63 - key``); the diagonal
    ``o = 0`` is always added. Greedy cover from ``p = 0``: the next window starts at the
    first needed distance at or past the previous start + 64 (MInference's merged ranges).
    """
    offsets = torch.as_tensor(offsets, dtype=torch.long).flatten()
    slashes = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), offsets[(offsets >= 0) & (offsets < n)]]))
    slashes = slashes.tolist()
    ends = [s + block - 1 for s in slashes]
    starts, p = [], 0
    while True:
        starts.append(p)
        i = bisect.bisect_left(ends, p + block)
        if i == len(slashes):
            return torch.tensor(starts, dtype=torch.long)
        p = max(p + block, slashes[i])


def _stack_starts(sets: list[torch.Tensor], pad: int) -> torch.Tensor:
    width = max(s.numel() for s in sets)
    return torch.stack([torch.nn.functional.pad(s, (0, width - s.numel()), value=pad) for s in sets])


def block_topk_tiles(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Top ``ceil(share * (qb + 1))`` (at least 1) key tiles per query block by score, plus the diagonal."""
    nb = scores.shape[0]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep_n = torch.ceil(share * torch.arange(1, nb + 1, dtype=torch.float64) - 1e-6).clamp(min=1)
    keep_sorted = torch.arange(nb)[None, :] < keep_n[:, None]
    keep = torch.zeros(nb, nb, dtype=torch.bool).scatter_(1, order, keep_sorted)
    return (keep & causal_tiles(nb)) | torch.eye(nb, dtype=torch.bool)


def block_mass_tiles(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Fewest key tiles per query block whose softmax over ``scores`` reaches ``mass``, plus the diagonal."""
    nb = scores.shape[0]
    probs = torch.softmax(scores, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p < mass) | (mass >= 1.0)
    keep = torch.zeros(nb, nb, dtype=torch.bool).scatter_(1, order, keep_sorted)
    return (keep & causal_tiles(nb)) | torch.eye(nb, dtype=torch.bool)


def static_tiles(mean_mass: torch.Tensor, select: float) -> torch.Tensor:
    """SparseD: per query block the top ``ceil(select * (qb + 1))`` tiles by mean mass, plus the diagonal."""
    nb = mean_mass.shape[0]
    return block_topk_tiles(mean_mass.masked_fill(~causal_tiles(nb), float("-inf")), select)


def resize_tile_mask(mask: torch.Tensor, nb: int) -> torch.Tensor:
    """A static tile mask at another length: nearest tile centre, causal, diagonal kept (as the runtime)."""
    src = mask.shape[-1]
    idx = ((torch.arange(nb, dtype=torch.float64) + 0.5) * src / nb).long().clamp(max=src - 1)
    resized = mask.bool() if src == nb else mask.bool()[idx][:, idx]
    return (resized & causal_tiles(nb)) | torch.eye(nb, dtype=torch.bool)


def _cached(est: Estimates, key, build):
    if key not in est.cache:
        est.cache[key] = build()
    return est.cache[key]


def _vs_sets(est: Estimates, kind: str, head: int, v: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted vertical columns, window starts) of one vertical-slash set."""
    n = est.n
    nv, ns = budget_count(v, n), budget_count(s, n, 1)
    orders = est.orders.get(kind)
    if orders is None:
        return torch.empty(0, dtype=torch.long), slash_windows([], n, est.block)
    cols = _cached(est, ("v", kind, head, nv), lambda: torch.sort(orders[0][head, :nv]).values)
    starts = _cached(est, ("s", kind, head, ns), lambda: slash_windows(orders[1][head, :ns], n, est.block))
    return cols, starts


def build_layout(cand: Candidate, est: Estimates, head: int) -> Layout:
    """The layout ``cand`` runs for ``head`` on the input ``est`` was estimated from (not ``static``)."""
    n, block = est.n, est.block
    nb = num_blocks(n, block)
    b = cand.budgets
    pad = n + 2 * block
    if cand.pattern == "dense":
        return Layout(tiles=causal_tiles(nb))
    if cand.pattern == "a_shape":
        local = budget_count(b["local"], n, 1)
        starts = _cached(est, ("local", local), lambda: slash_windows(torch.arange(local), n, block))
        return Layout(starts=starts[None], columns=torch.arange(budget_count(b["sink"], n)))
    if cand.pattern == "grid":
        p = cand.parameters
        slashes = grid_slashes(n, p["stride"], p["phase"], budget_count(b["local"], n, 1))
        starts = _cached(est, ("grid", p["stride"], p["phase"], slashes.numel()),
                         lambda: slash_windows(slashes, n, block))
        return Layout(starts=starts[None])
    if cand.pattern == "block_sparse":
        scores = est.blocks[head]
        tiles = block_topk_tiles(scores, b["blocks"]) if "blocks" in b else block_mass_tiles(scores, b["mass"])
        return Layout(tiles=tiles)
    if cand.pattern == "vertical_slash":
        cols, starts = _vs_sets(est, "all", head, b["vertical"], b["slash"])
        return Layout(starts=starts[None], columns=cols)
    if cand.pattern == "modality_vertical_slash":
        if not est.images:  # text only: every block uses the text budgets on the text estimate
            cols, starts = _vs_sets(est, "all", head, b["text_vertical"], b["text_slash"])
            return Layout(starts=starts[None], columns=cols)
        t_cols, t_starts = _vs_sets(est, "text", head, b["text_vertical"], b["text_slash"])
        i_cols, i_starts = _vs_sets(est, "image", head, b["image_vertical"], b["image_slash"])
        ts, is_ = budget_count(b["text_slash"], n, 1), budget_count(b["image_slash"], n, 1)
        union = _cached(est, ("union", head, ts, is_), lambda: slash_windows(
            torch.cat([_offsets_of(est, "text", head, ts), _offsets_of(est, "image", head, is_)]), n, block))
        starts = _stack_starts([t_starts, i_starts, union], pad)
        cols = torch.unique(torch.cat([t_cols, i_cols]))
        text_blocks, image_blocks = (est.groups != 1)[:, None], (est.groups != 0)[:, None]
        use = (torch.isin(cols, t_cols)[None, :] & text_blocks) | (torch.isin(cols, i_cols)[None, :] & image_blocks)
        return Layout(starts=starts, groups=est.groups, columns=cols, column_blocks=use)
    raise ValueError(f"no online layout for pattern {cand.pattern!r}")


def _offsets_of(est: Estimates, kind: str, head: int, slashes: int) -> torch.Tensor:
    orders = est.orders.get(kind)
    return torch.empty(0, dtype=torch.long) if orders is None else orders[1][head, :slashes]


def needed_columns(est: Estimates, candidates: list[Candidate]) -> torch.Tensor:
    """Sorted key columns per head ``[H, U]`` (padded with ``N``) that any candidate may keep."""
    n = est.n
    heads = est.blocks.shape[0]
    most = {"all": 0, "text": 0, "image": 0}
    sink = 0
    for cand in candidates:
        b = cand.budgets
        if cand.pattern == "a_shape":
            sink = max(sink, budget_count(b["sink"], n))
        elif cand.pattern == "vertical_slash":
            most["all"] = max(most["all"], budget_count(b["vertical"], n))
        elif cand.pattern == "modality_vertical_slash":
            kinds = (("text", "text_vertical"), ("image", "image_vertical")) if est.images else \
                (("all", "text_vertical"),)
            for kind, key in kinds:
                most[kind] = max(most[kind], budget_count(b[key], n))
    per_head = []
    for h in range(heads):
        parts = [torch.arange(sink)]
        for kind, width in most.items():
            if width and est.orders.get(kind) is not None:
                parts.append(est.orders[kind][0][h, :width])
        per_head.append(torch.unique(torch.cat(parts)))
    width = max(max(c.numel() for c in per_head), 1)
    out = torch.full((heads, width), n, dtype=torch.long)
    for h, cols in enumerate(per_head):
        out[h, :cols.numel()] = cols
    return out
