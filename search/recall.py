"""Exact attention recall of sparse layouts, without an N x N tensor.

Attention recall (MInference, MMInference) of a kept set ``K`` of query-key
pairs is the mean over query rows of the softmax mass the set keeps::

    P[i, j] = exp(s[i, j] - lse[i]),   s[i, j] = scale * q_i . k_j,   lse[i] = log sum_{j <= i} exp(s[i, j])
    recall  = (1 / N) * sum_i sum_{j <= i, (i, j) in K} P[i, j]

MInference materialises the full N x N softmax (so it stops near 30k tokens).
Here query rows are processed a block at a time against all their causal keys
(``rows_per_step * H * N`` floats alive, 32 MiB by default) and each row block
is reduced at once to what every candidate needs, summed over the 64 rows of
each query block ``qb`` (first row ``r0 = 64 qb``):

- ``tile_mass[h, qb, kb]``: mass of the aligned 64 x 64 tile (block masks);
- ``window_mass[h, g, p]``: mass at distance ``p = r0 + 63 - key`` summed over the
  query blocks of group ``g`` (text-only, image-only, mixed), length ``N + 64``. A
  64-wide key window placed the same way relative to ``r0`` in every query block
  (MInference's slash windows) keeps ``sum_p covered[p] * window_mass[p]``;
- ``column_mass[h, qb, c]``: mass of key column ``columns[h, c]`` (vertical lines);
- ``tail_window_mass[h, p]``: ``window_mass`` of the last query block alone.

Besides the mean over all rows, ``layout_scores`` gives the *tail recall* (the pattern's own, also
under ``dense_tail``): the mean
kept mass over the rows of the last query block. In a VLM prompt those rows hold the
question and the row that predicts the answer; they are a few dozen of thousands, so
the overall mean hardly sees them, yet a layout that cuts them off from the image
changes the answer.

Memory is ``O(H (N + nb^2 + nb U))`` with ``nb = N / 64`` and ``U`` the collected
columns; never ``N x N``.

A ``Layout`` is what the kernels run (``vlsparse.kernels.indices``, MInference's
contract): per query block, aligned tiles (block masks) or key windows given by
their start ``p0`` in distance space (window keys ``r0 - p0 .. r0 - p0 + 63``; a
window reaching below key 0 is computed as ``r0 - p0 + 64`` single columns), plus
single key columns before ``r0`` outside every window. Cost in query-key pairs:
``64^2`` per tile or window, ``64`` per column; density is cost over the dense
causal layout, ``nb (nb + 1) / 2`` tiles.

``q`` is ``[H, N, d]`` (query heads), ``k`` is ``[H_kv, N, d]`` (not repeated for
GQA: query head ``h`` reads KV head ``h // (H // H_kv)``). Computation is in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsparse.kernels.indices import BLOCK_SIZE, num_blocks
from vlsparse.patterns.layout import Layout, causal_tiles

BLOCK = BLOCK_SIZE
"""Tile side of the kernels' block layout."""

STEP_ELEMENTS = 1 << 23
"""Target size (floats) of one row block's probability matrix: 8M floats = 32 MiB."""

GROUPS = 3
"""Query-block groups for modality-aware layouts: 0 text-only, 1 image-only, 2 mixed."""


@dataclass
class TileStats:
    """Per-tile, per-distance and per-column softmax mass of one sequence (all heads); see the module docstring.

    ``tile_mass`` ``[H, nb, nb]``; ``window_mass`` ``[H, GROUPS, N + block]``; ``groups``
    ``[nb]``; ``columns`` ``[H, U]`` sorted (padded with ``N``); ``column_mass`` ``[H, nb, U]``;
    ``tail_window_mass`` ``[H, N + block]`` (the last query block's ``window_mass``).
    """

    n: int
    block: int
    tile_mass: torch.Tensor
    window_mass: torch.Tensor
    groups: torch.Tensor
    columns: torch.Tensor
    column_mass: torch.Tensor
    tail_window_mass: torch.Tensor


def _rows_per_step(heads: int, n: int, block: int, max_elements: int) -> int:
    per_block = heads * block * num_blocks(n, block) * block
    return block * max(1, min(num_blocks(n, block), max_elements // max(per_block, 1)))


def _padded(x: torch.Tensor, length: int) -> torch.Tensor:
    x = x.float()
    if x.shape[-2] == length:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[-2]))


def causal_probs_blocks(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = BLOCK,
                        max_elements: int = STEP_ELEMENTS):
    """Yield ``(start, p)`` for consecutive row blocks: ``p[h, r, j] = P[start + r, j]``.

    ``p`` is ``[H, R, end]`` with ``end = start + R`` a multiple of ``block`` (rows and
    keys past ``N`` are zero). Each row is normalised over its full causal row
    (``lse = max + log sum exp(s - max)``), so ``p`` is exact; one row block is alive at a time.
    """
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    group = heads // kv_heads
    nb = num_blocks(n, block)
    qs = (_padded(q, nb * block) * scale).view(kv_heads, group, nb * block, dim)
    kp = _padded(k, nb * block)
    step = _rows_per_step(heads, n, block, max_elements)
    for start in range(0, nb * block, step):
        end = min(nb * block, start + step)
        rows = end - start
        # one (group * rows) x end matmul per KV head: K is shared, never repeated
        s = torch.bmm(qs[:, :, start:end].reshape(kv_heads, group * rows, dim),
                      kp[:, :end].transpose(1, 2)).view(heads, rows, end)
        i = torch.arange(start, end)
        s[:, :, start:end].masked_fill_(i[None, :] > i[:, None], float("-inf"))
        s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
        s.div_(s.sum(dim=-1, keepdim=True))
        if end > n:
            s[:, n - start:] = 0.0
        yield start, s


def row_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = BLOCK,
                  key_chunk: int = 1024) -> torch.Tensor:
    """``lse[h, i] = log sum_{j <= i} exp(scale * q_i . k_j)`` as ``[H, N]``.

    Blockwise in both directions (query rows by ``block``, keys by ``key_chunk``,
    merged with ``logaddexp``), so memory is ``O(H * block * key_chunk + N * d)``.
    """
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    kf = k.float()
    out = torch.empty(heads, n)
    for start in range(0, n, block):
        end = min(n, start + block)
        rows = end - start
        qr = q[:, start:end].float().view(kv_heads, group, rows, dim)
        lse = torch.full((heads, rows), float("-inf"))
        i = torch.arange(start, end)
        for k0 in range(0, end, key_chunk):
            k1 = min(end, k0 + key_chunk)
            s = torch.matmul(qr, kf[:, None, k0:k1].transpose(-1, -2)).view(heads, rows, k1 - k0) * scale
            s.masked_fill_(torch.arange(k0, k1)[None, :] > i[:, None], float("-inf"))
            lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
        out[:, start:end] = lse
    return out


def tile_stats(q: torch.Tensor, k: torch.Tensor, scale: float, columns: torch.Tensor | None = None,
               groups: torch.Tensor | None = None, block: int = BLOCK,
               max_elements: int = STEP_ELEMENTS) -> TileStats:
    """Softmax mass per tile, per window distance and per requested key column (see the module docstring).

    ``columns``: ``[H, U]`` sorted key indices per head (padded with ``N``) whose
    per-query-block mass is wanted; ``groups``: ``[nb]`` group of each query block
    (default all 0).
    """
    heads, n, _ = q.shape
    nb = num_blocks(n, block)
    groups = torch.zeros(nb, dtype=torch.long) if groups is None else groups.long()
    if columns is None:
        columns = torch.empty(heads, 0, dtype=torch.long)
    width = columns.shape[1]
    tile_mass = torch.zeros(heads, nb, nb)
    window_mass = torch.zeros(heads, GROUPS, n + block)
    column_mass = torch.zeros(heads, nb, width)
    tail_window_mass = torch.zeros(heads, n + block)
    for start, p in causal_probs_blocks(q, k, scale, block, max_elements):
        rows, end = p.shape[1], p.shape[2]
        qb0, nq = start // block, rows // block
        per_block = p.view(heads, nq, block, end).sum(dim=2)  # [H, nq, end]: column sums over each block's rows
        tile_mass[:, qb0:qb0 + nq, :end // block] = per_block.view(heads, nq, end // block, block).sum(-1)
        for i in range(nq):
            reach = min((qb0 + i + 1) * block, n)  # keys 0 .. reach-1; distance p = r0 + 63 - key
            lo = (qb0 + i + 1) * block - reach
            window_mass[:, groups[qb0 + i], lo:lo + reach] += per_block[:, i, :reach].flip(-1)
            if qb0 + i == nb - 1:
                tail_window_mass[:, lo:lo + reach] = per_block[:, i, :reach].flip(-1)
        if width:
            picked = per_block.gather(2, columns.clamp(max=end - 1)[:, None, :].expand(heads, nq, width))
            column_mass[:, qb0:qb0 + nq] = picked * (columns < end)[:, None, :]
    return TileStats(n=n, block=block, tile_mass=tile_mass, window_mass=window_mass, groups=groups,
                     columns=columns, column_mass=column_mass, tail_window_mass=tail_window_mass)


# ----------------------------------------------------------------------------- layouts


def window_coverage(starts: torch.Tensor, length: int, block: int = BLOCK) -> torch.Tensor:
    """Bool ``[G, length]``: distances covered by windows ``[p0, p0 + block)`` for each row of ``starts``."""
    g = starts.shape[0]
    diff = torch.zeros(g, length + block + 1, dtype=torch.int32)
    live = starts < length
    s = torch.where(live, starts, torch.full_like(starts, length + block))
    diff.scatter_add_(1, s, live.int())
    diff.scatter_add_(1, (s + block).clamp(max=length + block), -live.int())
    return diff.cumsum(1)[:, :length] > 0


def _block_groups(layout: Layout, nb: int) -> torch.Tensor:
    return torch.zeros(nb, dtype=torch.long) if layout.groups is None else layout.groups


def _window_cost(layout: Layout, nb: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block: (windows fully above key 0, single columns from windows reaching below key 0)."""
    starts = layout.starts[_block_groups(layout, nb)]  # [nb, W]
    r0 = (torch.arange(nb) * block)[:, None]
    partial = (starts > r0) & (starts < r0 + block)
    return (starts <= r0).sum(1).double(), ((r0 + block - starts) * partial).sum(1).double()


def _extra_columns(layout: Layout, nb: int, block: int, covered: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[nb, C]``: (query block, column) pairs computed one by one: before ``r0``, used by the
    block, outside every kept tile and window of the block."""
    cols = layout.columns
    r0 = (torch.arange(nb) * block)[:, None]
    extra = cols[None, :] < r0
    if layout.column_blocks is not None:
        extra &= layout.column_blocks
    if layout.tiles is not None:
        extra &= ~layout.tiles.index_select(1, torch.div(cols, block, rounding_mode="floor").clamp(max=nb - 1))
    if covered is not None:
        length = covered.shape[1]
        flat = (r0 + block - 1 - cols[None, :]).clamp_(0, length - 1)
        if layout.groups is not None:
            flat += (layout.groups * length)[:, None]
        extra &= ~torch.take(covered, flat)
    return extra


def _block_costs(layout: Layout, nb: int, block: int, covered: torch.Tensor | None,
                 causal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per query block: (tiles + full windows, single keys), and the extra columns ``[nb, C]`` (or None).
    With ``dense_tail`` the last block counts as its ``nb`` causal tiles and nothing else."""
    units = torch.zeros(nb, dtype=torch.float64)
    singles = torch.zeros(nb, dtype=torch.float64)
    extra = None
    if layout.tiles is not None:
        units += (layout.tiles & (causal_tiles(nb) if causal is None else causal)).sum(1)
    if layout.starts is not None:
        full, partial = _window_cost(layout, nb, block)
        units += full
        singles += partial
    if layout.columns.numel():
        extra = _extra_columns(layout, nb, block, covered)
        singles += extra.sum(1)
    if layout.dense_tail:
        units[-1], singles[-1] = nb, 0.0
    return units, singles, extra


def layout_scores(stats: TileStats, head: int, layout: Layout, causal: torch.Tensor | None = None
                  ) -> tuple[float, float, float]:
    """``(recall, density, tail recall)`` of ``layout`` for ``head``: exact mean kept mass over all
    query rows, the kept share of the dense causal block layout, and the exact mean mass the
    pattern itself keeps over the rows of the last query block. With ``dense_tail`` that block
    runs dense, so the recall counts its rows whole; the tail recall still says what the pattern
    alone keeps there (what the runtime's recall guard compares a prompt against)."""
    n, block = stats.n, stats.block
    nb = num_blocks(n, block)
    last = nb - 1
    kept, tail = 0.0, 0.0
    covered = None
    if layout.tiles is not None:
        tiles = layout.tiles & (causal_tiles(nb) if causal is None else causal)
        kept += float((stats.tile_mass[head] * tiles).sum())
        tail += float((stats.tile_mass[head, last] * tiles[last]).sum())
    if layout.starts is not None:
        covered = window_coverage(layout.starts, n + block, block)
        mass = stats.window_mass[head]
        kept += float((covered[0] * mass.sum(0)).sum() if layout.groups is None else (covered * mass).sum())
        tail += float((covered[_block_groups(layout, nb)[last]] * stats.tail_window_mass[head]).sum())
    units, singles, extra = _block_costs(layout, nb, block, covered, causal)
    if extra is not None:
        have = stats.columns[head]
        pos = torch.searchsorted(have, layout.columns).clamp_(max=max(have.numel() - 1, 0))
        if have.numel() == 0 or not torch.equal(have[pos], layout.columns):
            raise ValueError("layout uses key columns whose mass was not collected in tile_stats")
        picked = stats.column_mass[head].index_select(1, pos) * extra
        kept += float(picked.sum())
        tail += float(picked[last].sum())
    rows_last = n - last * block
    if layout.dense_tail:  # the last block's rows keep all their mass
        kept += rows_last - tail
    density = float(units.sum() + singles.sum() / block) / (nb * (nb + 1) / 2)
    return kept / n, density, tail / rows_last


def layout_score(stats: TileStats, head: int, layout: Layout, causal: torch.Tensor | None = None
                 ) -> tuple[float, float]:
    """``(recall, density)`` of ``layout`` for ``head`` (``layout_scores`` without the tail)."""
    return layout_scores(stats, head, layout, causal)[:2]


def layout_recall(stats: TileStats, head: int, layout: Layout) -> float:
    """Mean over all query rows of the softmax mass ``layout`` keeps (exact, from ``stats``)."""
    return layout_score(stats, head, layout)[0]


def layout_density(layout: Layout, n: int, block: int = BLOCK) -> float:
    """Kept share of the dense causal block layout (tiles and windows 1, columns 1/64 each)."""
    nb = num_blocks(n, block)
    covered = window_coverage(layout.starts, n + block, block) if layout.starts is not None else None
    units, singles, _ = _block_costs(layout, nb, block, covered)
    return float(units.sum() + singles.sum() / block) / (nb * (nb + 1) / 2)


def layout_token_mask(layout: Layout, n: int, rows: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Bool ``[len(rows), n]``: which keys each of ``rows`` keeps (causal). For tests and small checks."""
    nb = num_blocks(n, block)
    keys = torch.arange(n)
    qb = torch.div(rows, block, rounding_mode="floor")
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    covered = None
    if layout.tiles is not None:
        mask |= layout.tiles[qb][:, torch.div(keys, block, rounding_mode="floor")]
    if layout.starts is not None:
        covered = window_coverage(layout.starts, n + block, block)
        dist = (qb[:, None] * block + block - 1 - keys[None, :]).clamp(0, n + block - 1)
        mask |= covered[_block_groups(layout, nb)[qb][:, None], dist]
    if layout.columns.numel():
        extra = _extra_columns(layout, nb, block, covered)[qb]  # [rows, C]
        cols = torch.zeros(len(rows), n, dtype=torch.bool)
        cols[:, layout.columns] = extra
        mask |= cols
    if layout.dense_tail:
        mask[qb == nb - 1] = True
    return mask & (keys[None, :] <= rows[:, None])


def kept_row_mass(q: torch.Tensor, k: torch.Tensor, scale: float, layouts: list[Layout], block: int = BLOCK,
                  max_elements: int = STEP_ELEMENTS) -> torch.Tensor:
    """Per-row kept mass ``[H, N]`` of one layout per head, row block by row block.

    Its mean over rows equals ``layout_recall``; used to check that one against
    a dense softmax and to look at where recall is lost.
    """
    heads, n, _ = q.shape
    out = torch.zeros(heads, n)
    for start, p in causal_probs_blocks(q, k, scale, block, max_elements):
        stop = min(n, start + p.shape[1])
        width = min(n, p.shape[2])
        rows = torch.arange(start, stop)
        for h, layout in enumerate(layouts):
            mask = layout_token_mask(layout, n, rows, block)[:, :width]
            out[h, start:stop] = (p[h, : stop - start, :width] * mask).sum(-1)
    return out


def dense_recall_check(q: torch.Tensor, k: torch.Tensor, scale: float, keep: torch.Tensor) -> torch.Tensor:
    """Reference: per-row kept mass from a dense ``[H, N, N]`` softmax and a bool ``keep``. Small N only."""
    heads, n, _ = q.shape
    group = heads // k.shape[0]
    s = torch.einsum("hid,hjd->hij", q.float(), k.float().repeat_interleave(group, 0)) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril_()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    return (p * (keep & causal)).sum(-1)


def attention_flops(n: int, head_dim: int, density: float = 1.0) -> float:
    """FLOPs of one head's causal prefill attention (QK^T and PV): ``2 * 2 * d * N (N + 1) / 2 * density``."""
    return 2.0 * head_dim * n * (n + 1) * density
