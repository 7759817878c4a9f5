"""Per-query-block index lists for sparse prefill attention (MInference's kernel contract).

A [B, H, N, D] problem is cut into query blocks of ``block_size`` (bs, 64) rows:
query block ``i`` holds rows ``r0 = i*bs .. r1-1`` with ``r1 = min(r0 + bs, N)``.
A :class:`SparseIndex` says what each (batch, head, query block) attends to:

- ``block_count[b, h, i]`` key *windows*; ``block_offset[b, h, i, :count]`` their first keys,
  ascending. Window ``o`` covers keys ``o .. o+bs-1`` that exist (``0 <= key < N``).
  Windows from block masks are aligned (``o = j*bs``); windows covering slash diagonals
  start anywhere (MInference). All windows lie in ``[0, r0]``: the diagonal window
  (``o = r0``) is always listed, and last.
- ``column_count[b, h, i]`` single keys; ``column_index[b, h, i, :count]`` ascending, each
  before ``r0`` and outside every listed window of that block.

Kernels apply causality (key <= row) on top. Every builder here keeps the diagonal
window, so no row is empty, and keeps windows and columns disjoint, so a kernel can add
their softmax terms without double counting. Only the diagonal window needs the causal
mask; a partial last block's diagonal window reaches past N (those keys do not exist).

Patterns (the profile's ``HeadProfile.pattern``) map onto two converters:

- verticals + slashes -> :func:`vertical_slash_index` (``vertical_slash``, ``a_shape`` =
  verticals ``0..sink-1`` + slashes ``0..local-1``, ``grid`` = slashes ``phase + m*stride``
  + ``0..local-1``, ``modality_vertical_slash`` = one set per query-row modality);
- a block mask ``[NQB, NKB]`` -> :func:`block_mask_index` (``dense``, ``block_sparse``, ``static``).

``vlsparse.patterns.layer.layer_index`` builds one layer's lists from its ``HeadProfile`` list
and the actual inputs with these builders, one pattern module per pattern.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_SIZE = 64


@dataclass(frozen=True)
class SparseIndex:
    """Index lists of one attention call; shapes in the module docstring (all int32)."""

    block_count: Tensor  # [B, H, NQB]
    block_offset: Tensor  # [B, H, NQB, MAXB]
    column_count: Tensor  # [B, H, NQB]
    column_index: Tensor  # [B, H, NQB, MAXC]
    block_size: int = BLOCK_SIZE

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, H, NQB)."""
        return tuple(self.block_count.shape)  # type: ignore[return-value]

    def expand(self, batch: int) -> SparseIndex:
        """The same lists for ``batch`` inputs (a B = 1 index broadcasts; views, no copy)."""
        b = self.shape[0]
        if b == batch:
            return self
        if b != 1:
            raise ValueError(f"index has batch {b}, inputs have {batch}")
        return SparseIndex(*(t.expand(batch, *t.shape[1:]) for t in (self.block_count, self.block_offset,
                                                                       self.column_count, self.column_index)),
                           self.block_size)

    def to(self, device: torch.device | str) -> SparseIndex:
        return SparseIndex(self.block_count.to(device), self.block_offset.to(device), self.column_count.to(device),
                           self.column_index.to(device), self.block_size)


def num_blocks(n: int, block_size: int = BLOCK_SIZE) -> int:
    return (n + block_size - 1) // block_size


# ----------------------------------------------------------------------------- small tensor helpers


def _compact(keep: Tensor, values: Tensor, min_width: int = 1) -> tuple[Tensor, Tensor]:
    """Pack ``values[..., j]`` where ``keep[..., j]`` to the front, order kept.

    Returns ``(count [...], packed [..., W])`` with ``W = max(count, min_width)``, padding 0.
    """
    count = keep.sum(-1)
    width = max(int(count.max()) if count.numel() else 0, min_width)
    pos = torch.where(keep, keep.cumsum(-1) - 1, torch.full_like(count, width)[..., None])
    packed = torch.zeros(*keep.shape[:-1], width + 1, dtype=values.dtype, device=values.device)
    packed.scatter_(-1, pos, values.expand_as(keep).to(packed.dtype))
    return count.to(torch.int32), packed[..., :width].to(torch.int32)


def _as_head_tensor(value: int | Sequence[int] | Tensor, heads: int) -> Tensor:
    """An int or per-head sequence -> LongTensor [heads]."""
    t = torch.as_tensor(value, dtype=torch.long)
    return t.expand(heads).clone() if t.dim() == 0 else t


def _ranges(lengths: Tensor, starts: Tensor | None = None, fill: int = 0) -> Tensor:
    """Row h = ``starts[h] + arange(lengths[h])``, padded with ``fill`` to the longest: [H, max]."""
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    ar = torch.arange(width)
    out = ar.expand(len(lengths), width) + (0 if starts is None else starts[:, None])
    return torch.where(ar < lengths[:, None], out, torch.full_like(out, fill))


# ----------------------------------------------------------------------------- block masks (aligned windows)


def block_mask_index(block_mask: Tensor, n: int, block_size: int = BLOCK_SIZE) -> SparseIndex:
    """Aligned key blocks from a boolean block mask.

    block_mask: [B, H, NQB, NKB] (NQB = NKB = ceil(n / block_size)); entries above the
    diagonal are dropped (causal) and the diagonal block is always added.
    """
    nqb = num_blocks(n, block_size)
    if block_mask.shape[-2:] != (nqb, nqb):
        raise ValueError(f"block mask is {tuple(block_mask.shape[-2:])}, expected {(nqb, nqb)} for n={n}")
    qb = torch.arange(nqb, device=block_mask.device)
    causal = qb[None, :] <= qb[:, None]
    keep = (block_mask.bool() & causal) | torch.eye(nqb, dtype=torch.bool, device=block_mask.device)
    b, h = keep.shape[:2]
    block_count, block_offset = _compact(keep, qb * block_size)
    empty = torch.zeros(b, h, nqb, dtype=torch.int32, device=keep.device)
    return SparseIndex(block_count, block_offset, empty, empty[..., None].clone(), block_size)


def dense_index(n: int, heads: int = 1, batch: int = 1, block_size: int = BLOCK_SIZE) -> SparseIndex:
    """All causal blocks (exact dense causal attention)."""
    nqb = num_blocks(n, block_size)
    return block_mask_index(torch.ones(batch, heads, nqb, nqb, dtype=torch.bool), n, block_size)


def resize_block_mask(mask: Tensor, nqb: int, nkb: int | None = None) -> Tensor:
    """Nearest-neighbour resize of a ``[..., Sq, Sk]`` block mask to ``[..., nqb, nkb]``.

    Target cell (i, j) takes source cell (floor((i + 0.5) Sq / nqb), floor((j + 0.5) Sk / nkb)).
    """
    nkb = nqb if nkb is None else nkb
    sq, sk = mask.shape[-2:]
    iq = ((torch.arange(nqb, dtype=torch.float64) + 0.5) * sq / nqb).long().clamp(max=sq - 1)
    ik = ((torch.arange(nkb, dtype=torch.float64) + 0.5) * sk / nkb).long().clamp(max=sk - 1)
    return mask.index_select(-2, iq.to(mask.device)).index_select(-1, ik.to(mask.device))


def static_index(mask: Tensor, n: int, block_size: int = BLOCK_SIZE) -> SparseIndex:
    """SparseD's fixed block mask: ``mask`` [H, Sq, Sk] (or [Sq, Sk]) from calibration,
    resized by nearest neighbour to this length's block grid; causal, diagonal kept. B = 1."""
    mask = mask if mask.dim() == 3 else mask[None]
    nqb = num_blocks(n, block_size)
    resized = resize_block_mask(mask.bool(), nqb) if mask.shape[-2:] != (nqb, nqb) else mask.bool()
    return block_mask_index(resized[None], n, block_size)


# ----------------------------------------------------------------------------- verticals + slashes


def _slash_windows(slash: Tensor, n: int, bs: int) -> tuple[Tensor, Tensor]:
    """Cover every query block's slash diagonals with ``bs``-wide key windows.

    Work in distance space ``d = r0 - key`` (r0 = first row of the query block): slash
    ``s`` (key = row - s) covers ``d in [s-bs+1, s]`` for every full block, so one window
    layout serves all query blocks. With ``p = d + bs - 1`` in ``[0, n+bs-2]``, greedy
    covering from p = 0 (optimal for covering points with fixed-width windows) gives starts
    ``p_0 = 0`` (slash 0: the diagonal block), ``p_{j+1}`` = first covered p >= p_j + bs.
    Window p holds keys ``r0 - p .. r0 - p + bs - 1``.

    slash: [R, NS] long; entries outside [0, n) are padding. Slash 0 is always added.
    Returns (starts [R, NW] ascending, padded with ``n + bs - 1``; covered [R, n + 2bs]).
    """
    rows, nd = slash.shape[0], n + bs - 1
    dev = slash.device
    ind = torch.zeros(rows, n + 1, dtype=torch.int32, device=dev)
    ok = (slash >= 0) & (slash < n)
    ind.scatter_(1, torch.where(ok, slash, torch.full_like(slash, n)), 1)
    ind[:, n] = 0
    ind[:, 0] = 1
    csum = torch.nn.functional.pad(ind[:, :n].cumsum(1), (1, 0))  # csum[t] = #slashes < t
    p = torch.arange(nd, device=dev)
    covered_p = (csum[:, (p + 1).clamp(max=n)] - csum[:, (p - bs + 1).clamp(min=0)]) > 0
    pos = torch.where(covered_p, p.expand(rows, nd), torch.full_like(covered_p, nd, dtype=torch.long))
    nxt = pos.flip(1).cummin(1).values.flip(1)
    nxt = torch.cat([nxt, torch.full((rows, bs + 1), nd, dtype=torch.long, device=dev)], 1)
    # orbit of p = 0 under step(p) = nxt[p + bs], by pointer doubling: jumps[j] = step^(2^j)
    step = torch.cat([nxt[:, bs:], torch.full((rows, bs), nd, dtype=torch.long, device=dev)], 1)  # [R, nd+1]
    longest = (nd + bs - 1) // bs + 1  # windows never overlap, so at most this many
    jumps = [step]
    while (1 << len(jumps)) < longest:
        jumps.append(jumps[-1].gather(1, jumps[-1]))
    t = torch.arange(longest, device=dev)
    starts_t = nxt[:, :1].expand(rows, longest).contiguous()
    for j, jump in enumerate(jumps):
        starts_t = torch.where(((t >> j) & 1).bool(), jump.gather(1, starts_t), starts_t)
    starts_t = starts_t[:, : max(int((starts_t < nd).sum(1).max()), 1)]
    diff = torch.zeros(rows, nd + 2 * bs + 1, dtype=torch.int32, device=dev)
    live = starts_t < nd
    diff.scatter_add_(1, torch.where(live, starts_t, nd + 2 * bs), live.int())
    diff.scatter_add_(1, torch.where(live, starts_t + bs, nd + 2 * bs), -live.int())
    covered = diff.cumsum(1)[:, : n + 2 * bs] > 0
    return starts_t, covered


def slash_windows(offsets: Tensor | Sequence[int], n: int, block_size: int = BLOCK_SIZE) -> Tensor:
    """Window starts (distance space, ascending) covering the diagonals at ``offsets`` in every query block.

    One set of :func:`_slash_windows` (the runtime's greedy cover from the diagonal, MInference's
    merged ranges): diagonal ``o`` needs distances ``[o, o + bs - 1]``; the next window starts at
    the first needed distance at or past the previous start + ``bs``. Offsets outside [0, n) are
    ignored; the diagonal is always covered.
    """
    offsets = torch.as_tensor(offsets, dtype=torch.long).flatten()
    starts = _slash_windows(offsets[None], n, block_size)[0][0]
    return starts[starts < n + block_size - 1]


def _vs_blocks(starts: Tensor, covered: Tensor, vertical: Tensor, qbs: Tensor, n: int, bs: int):
    """Windows and columns of query blocks ``qbs`` [c] for one set per head.

    starts [B, H, NW] and covered [B, H, W] from :func:`_slash_windows`; vertical [B, H, NV]
    sorted, padding = n. Returns (count [B,H,c], offsets [B,H,c,*], ccount [B,H,c], cols [B,H,c,*]).
    """
    b, h, nw = starts.shape
    c = len(qbs)
    r0 = qbs * bs
    # windows reaching key >= 0 (p <= r0 + bs - 1); listed with ascending keys
    count = torch.searchsorted(starts, (r0 + bs - 1).expand(b, h, c).contiguous(), right=True)
    maxb = max(int(count.max()), 1)
    j = torch.arange(maxb, device=starts.device)
    src = (count[..., None] - 1 - j).clamp(0, nw - 1)
    offsets = r0[:, None] - starts.gather(-1, src.view(b, h, -1)).view(b, h, c, maxb)
    # a first window starting below key 0 becomes columns 0 .. offset+bs-1 (no negative offsets)
    below = offsets[..., 0] < 0
    head_cols = offsets[..., :1] + bs
    offsets = torch.where(below[..., None], torch.cat([offsets[..., 1:], offsets[..., :1]], -1), offsets)
    count = count - below.long()
    offsets = torch.where(j < count[..., None], offsets, torch.zeros_like(offsets))
    # columns: verticals before r0 that no window covers (the window below 0 counts as covering:
    # the verticals it held are in head_cols)
    p = (r0 + bs - 1)[:, None] - vertical[:, :, None, :]  # [B, H, c, NV]; p >= bs <=> vertical < r0
    cov = covered.gather(-1, p.clamp(0, covered.shape[-1] - 1).view(b, h, -1)).view_as(p)
    first = torch.arange(bs, device=starts.device).expand(b, h, c, bs)
    keep = torch.cat([below[..., None] & (first < head_cols), (p >= bs) & ~cov], -1)
    ccount, cols = _compact(keep, torch.cat([first, vertical[:, :, None, :].expand(b, h, c, -1)], -1))
    return count, offsets, ccount, cols


def _vs_index(vertical: Tensor, slash: Tensor, n: int, variant: Tensor, bs: int) -> SparseIndex:
    """Core of :func:`vertical_slash_index` with per-query-block variants.

    vertical [B, H, V, NV], slash [B, H, V, NS]: V alternative sets; ``variant`` [NQB]
    says which set each query block uses. Works through query blocks in chunks that stay in
    cache (the per-block work is [B, H, chunk, NV]).
    """
    b, h, nvar = slash.shape[:3]
    dev = slash.device
    nqb = num_blocks(n, bs)
    starts, covered = _slash_windows(slash.reshape(b * h * nvar, -1).long(), n, bs)
    starts = starts.view(b, h, nvar, -1)
    covered = covered.view(b, h, nvar, -1)
    v = vertical.long().sort(-1).values
    v = torch.where(torch.cat([torch.ones_like(v[..., :1], dtype=torch.bool), v[..., 1:] != v[..., :-1]], -1)
                    & (v >= 0) & (v < n), v, torch.full_like(v, n)).sort(-1).values
    nv, nw = v.shape[-1], starts.shape[-1]
    block_count = torch.zeros(b, h, nqb, dtype=torch.int32, device=dev)
    column_count = torch.zeros_like(block_count)
    block_offset = torch.zeros(b, h, nqb, nw, dtype=torch.int32, device=dev)
    column_index = torch.zeros(b, h, nqb, nv + bs, dtype=torch.int32, device=dev)
    variant = variant.to(dev).long()
    chunk = max(1, 2**18 // (b * h * max(nv + bs, nw)))
    for var in variant.unique().tolist():
        qbs_all = torch.nonzero(variant == var).flatten()
        for c0 in range(0, len(qbs_all), chunk):
            qbs = qbs_all[c0: c0 + chunk]
            count, offsets, ccount, cols = _vs_blocks(starts[:, :, var].contiguous(), covered[:, :, var],
                                                      v[:, :, var], qbs, n, bs)
            block_count[:, :, qbs] = count.to(torch.int32)
            block_offset[:, :, qbs, : offsets.shape[-1]] = offsets.to(torch.int32)
            column_count[:, :, qbs] = ccount
            column_index[:, :, qbs, : cols.shape[-1]] = cols
    maxb = max(int(block_count.max()), 1)
    maxc = max(int(column_count.max()), 1)
    return SparseIndex(block_count, block_offset[..., :maxb].contiguous(), column_count,
                       column_index[..., :maxc].contiguous(), bs)


def vertical_slash_index(vertical: Tensor, slash: Tensor, n: int, block_size: int = BLOCK_SIZE) -> SparseIndex:
    """MInference's vertical-slash conversion.

    vertical: [B, H, NV] absolute key columns; slash: [B, H, NS] diagonal offsets
    (key = row - offset). Entries outside [0, n) are padding; order and duplicates do not
    matter. Slash 0 (the diagonal) is always kept. Per query block, the slash ranges are
    merged and covered by ``block_size``-wide windows (greedy, anchored at the diagonal); a
    window that would start below key 0 is listed as columns ``0 .. offset+block_size-1``
    instead; verticals not inside a window (and before the block) become columns.
    """
    nqb = num_blocks(n, block_size)
    return _vs_index(vertical[:, :, None], slash[:, :, None], n,
                     torch.zeros(nqb, dtype=torch.long, device=slash.device), block_size)


def modality_rows(spans: Sequence[tuple[int, int]], n: int) -> Tensor:
    """Boolean [n]: True on image-token rows (``spans`` = [(start, end), ...] or objects with
    ``.start`` / ``.end``, end exclusive)."""
    image = torch.zeros(n, dtype=torch.bool)
    for span in spans:
        start, end = (span.start, span.end) if hasattr(span, "start") else span
        image[max(int(start), 0): min(int(end), n)] = True
    return image


def modality_block_groups(spans: Sequence[tuple[int, int]], n: int, block_size: int = BLOCK_SIZE) -> Tensor:
    """Group of each query block [NQB]: 0 text rows only, 1 image rows only, 2 both (MMInference's Q-boundary)."""
    nqb = num_blocks(n, block_size)
    pad = nqb * block_size - n
    image = torch.nn.functional.pad(modality_rows(spans, n), (0, pad)).view(nqb, block_size)
    rows = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, pad)).view(nqb, block_size)
    has_image, has_text = image.any(1), (rows & ~image).any(1)
    return torch.where(has_image & has_text, 2, torch.where(has_image, 1, 0))


def modality_vertical_slash_index(text_vertical: Tensor, text_slash: Tensor, image_vertical: Tensor,
                                  image_slash: Tensor, n: int, spans: Sequence[tuple[int, int]],
                                  block_size: int = BLOCK_SIZE) -> SparseIndex:
    """MMInference's modality-aware (Q-boundary) vertical-slash lists.

    All sets [B, H, *]; ``spans`` = image-token ranges [(start, end), ...] (end exclusive).
    Query blocks whose rows are all text use the text sets, all image the image sets; a
    block straddling a boundary uses the union (lists are per block, so a superset).
    """
    variant = modality_block_groups(spans, n, block_size)

    def stack(a: Tensor, c: Tensor) -> Tensor:
        width = max(a.shape[-1], c.shape[-1])
        a = torch.nn.functional.pad(a.long(), (0, width - a.shape[-1]), value=n)
        c = torch.nn.functional.pad(c.long(), (0, width - c.shape[-1]), value=n)
        union = torch.cat([a, c], -1)
        return torch.stack([torch.nn.functional.pad(a, (0, width), value=n),
                            torch.nn.functional.pad(c, (0, width), value=n), union], 2)

    return _vs_index(stack(text_vertical, image_vertical), stack(text_slash, image_slash), n, variant, block_size)


def a_shape_index(n: int, sink: int | Sequence[int] | Tensor, local: int | Sequence[int] | Tensor,
                  heads: int = 1, block_size: int = BLOCK_SIZE) -> SparseIndex:
    """StreamingLLM's A-shape: keys ``0..sink-1`` (exact columns) and the last ``local`` keys
    of each row (slashes ``0..local-1``); per-head ``sink``/``local`` allowed. B = 1."""
    sink_t, local_t = _as_head_tensor(sink, heads), _as_head_tensor(local, heads)
    return vertical_slash_index(_ranges(sink_t.clamp(0, n), fill=n)[None], _ranges(local_t.clamp(1, n), fill=n)[None],
                                n, block_size)


def grid_slashes(n: int, stride: int, phase: int, local: int) -> Tensor:
    """Offsets of the grid pattern: ``phase + m*stride`` (m >= 0) and the local band ``0..local-1``."""
    periodic = torch.arange(phase % max(stride, 1), n, max(stride, 1)) if stride > 0 else torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(min(max(local, 1), n)), periodic]).unique()


def grid_index(n: int, stride: int | Sequence[int], phase: int | Sequence[int], local: int | Sequence[int],
               heads: int = 1, block_size: int = BLOCK_SIZE) -> SparseIndex:
    """Grid heads (vision spans): slashes at multiples of the image's row/frame ``stride``
    shifted by ``phase``, plus a local band of ``local`` diagonals. B = 1."""
    stride_t, phase_t, local_t = (_as_head_tensor(x, heads) for x in (stride, phase, local))
    sets = [grid_slashes(n, int(s), int(p), int(lo)) for s, p, lo in zip(stride_t, phase_t, local_t)]
    width = max(len(s) for s in sets)
    slash = torch.stack([torch.nn.functional.pad(s, (0, width - len(s)), value=n) for s in sets])
    return vertical_slash_index(torch.full((1, heads, 1), n, dtype=torch.long), slash[None], n, block_size)


# ----------------------------------------------------------------------------- whole layer


def with_dense_tail(index: SparseIndex, n: int) -> SparseIndex:
    """The same lists, except that the last query block attends to every causal key (its aligned
    windows ``0, bs, .., r0``; no columns). In a prompt that ends with a question, those rows
    hold the question and the row that predicts the answer; at most ``bs`` rows, so it costs
    ``2 / (NQB + 1)`` of the causal pairs at most."""
    bs = index.block_size
    nqb = num_blocks(n, bs)
    width = max(index.block_offset.shape[-1], nqb)
    offsets = torch.nn.functional.pad(index.block_offset, (0, width - index.block_offset.shape[-1])).clone()
    offsets[:, :, -1, :] = 0
    offsets[:, :, -1, :nqb] = torch.arange(nqb, dtype=offsets.dtype, device=offsets.device) * bs
    counts, columns = index.block_count.clone(), index.column_count.clone()
    counts[:, :, -1] = nqb
    columns[:, :, -1] = 0
    return SparseIndex(counts, offsets, columns, index.column_index, bs)


def budget_count(fraction: float, n: int, minimum: int = 0) -> int:
    """A budget stored as a fraction of N, in tokens at this length: round(f * n) clamped to [minimum, n]."""
    return int(min(n, max(minimum, round(float(fraction) * n))))


def merge_heads(parts: Sequence[tuple[Sequence[int], SparseIndex]], heads: int, batch: int) -> SparseIndex:
    """Put per-pattern indices (each for a subset of heads, B = batch or 1) into one [batch, heads] index."""
    bs = parts[0][1].block_size
    nqb = parts[0][1].shape[2]
    maxb = max(p.block_offset.shape[-1] for _, p in parts)
    maxc = max(p.column_index.shape[-1] for _, p in parts)
    dev = parts[0][1].block_count.device
    bc = torch.zeros(batch, heads, nqb, dtype=torch.int32, device=dev)
    cc = torch.zeros_like(bc)
    bo = torch.zeros(batch, heads, nqb, maxb, dtype=torch.int32, device=dev)
    ci = torch.zeros(batch, heads, nqb, maxc, dtype=torch.int32, device=dev)
    for ids, part in parts:
        idx = torch.as_tensor(list(ids), dtype=torch.long, device=dev)
        bc[:, idx] = part.block_count
        cc[:, idx] = part.column_count
        bo[:, idx, :, : part.block_offset.shape[-1]] = part.block_offset
        ci[:, idx, :, : part.column_index.shape[-1]] = part.column_index
    return SparseIndex(bc, bo, cc, ci, bs)


# ----------------------------------------------------------------------------- inspection


def kept_keys(index: SparseIndex, n: int) -> Tensor:
    """Boolean [B, H, NQB, N]: the keys each query block lists (before causality)."""
    bs = index.block_size
    b, h, nqb = index.shape
    dev = index.block_count.device
    kept = torch.zeros(b, h, nqb, n + 1, dtype=torch.bool, device=dev)
    maxb = index.block_offset.shape[-1]
    tok = index.block_offset.long()[..., None] + torch.arange(bs, device=dev)
    live = (torch.arange(maxb, device=dev)[:, None] < index.block_count.long()[..., None, None]) & (tok >= 0) & (tok < n)
    kept.scatter_(-1, torch.where(live, tok, n).flatten(-2), True)
    maxc = index.column_index.shape[-1]
    col = index.column_index.long()
    live = (torch.arange(maxc, device=dev) < index.column_count.long()[..., None]) & (col >= 0) & (col < n)
    kept.scatter_(-1, torch.where(live, col, n), True)
    return kept[..., :n]


def index_mask(index: SparseIndex, n: int) -> Tensor:
    """Dense boolean [B, H, N, N] mask the lists imply, causal. Small n only."""
    kept = kept_keys(index, n)
    rows = torch.arange(n, device=kept.device)
    mask = kept[:, :, rows // index.block_size]
    return mask & (rows[None, :] <= rows[:, None])


def index_density(index: SparseIndex, n: int) -> Tensor:
    """Kept fraction of causal query-key pairs, per (batch, head): [B, H].

    Window keys ``[a, e]`` (clipped to the sequence) and rows ``[r0, r1)``: row r keeps
    ``min(e, r) - a + 1`` keys when ``r >= a``, so the block keeps
    ``T(hi - a + 1) - T(lo - a) + (e - a + 1) * #{r >= e}`` pairs with ``T(x) = x (x + 1) / 2``,
    ``lo = max(r0, a)``, ``hi = min(r1, e) - 1``. A column c gives each row ``r >= c`` one pair.
    """
    bs = index.block_size
    nqb = index.shape[2]
    dev = index.block_count.device
    r0 = (torch.arange(nqb, device=dev) * bs)[:, None]
    r1 = (r0 + bs).clamp(max=n)
    a = index.block_offset.long().clamp(min=0)
    e = (index.block_offset.long() + bs - 1).clamp(max=n - 1)
    live = (torch.arange(a.shape[-1], device=dev) < index.block_count.long()[..., None]) & (a <= e)
    lo = torch.maximum(r0, a)
    hi = torch.minimum(r1, e) - 1
    tri = lambda x: x * (x + 1) // 2  # noqa: E731
    ramp = torch.where(hi >= lo, tri(hi - a + 1) - tri(lo - a), torch.zeros_like(a))
    flat = (e - a + 1) * (r1 - torch.maximum(r0, e)).clamp(min=0)
    windows = ((ramp + flat) * live).sum((-1, -2))
    cols = index.column_index.long()
    clive = torch.arange(cols.shape[-1], device=dev) < index.column_count.long()[..., None]
    columns = ((r1 - torch.maximum(cols, r0)).clamp(min=0) * clive).sum((-1, -2))
    return (windows + columns).double() / (n * (n + 1) / 2)


def check_index(index: SparseIndex, n: int) -> None:
    """Raise ``ValueError`` unless the lists keep the contract: windows ascending, disjoint,
    inside ``[0, r0]`` with the diagonal window (``r0``) listed last; columns ascending, before
    the block and outside every window."""
    bs = index.block_size
    b, h, nqb = index.shape
    if nqb != num_blocks(n, bs):
        raise ValueError(f"index has {nqb} query blocks, n={n} needs {num_blocks(n, bs)}")
    r0 = torch.arange(nqb) * bs
    bo, bcount = index.block_offset.long().cpu(), index.block_count.long().cpu()
    live = torch.arange(bo.shape[-1]) < bcount[..., None]
    if not bool((bcount >= 1).all()):
        raise ValueError("a query block lists no window")
    last = bo.gather(-1, (bcount - 1).clamp(min=0)[..., None])[..., 0]
    if not bool((last == r0).all()):
        raise ValueError("a query block does not list its diagonal window last")
    if not bool(((bo >= 0) | ~live).all()):
        raise ValueError("a window starts below key 0")
    gaps = bo[..., 1:] - bo[..., :-1]
    if not bool(((gaps >= bs) | ~live[..., 1:]).all()):
        raise ValueError("windows overlap or are not ascending")
    ci, ccount = index.column_index.long().cpu(), index.column_count.long().cpu()
    clive = torch.arange(ci.shape[-1]) < ccount[..., None]
    if not bool(((ci[..., 1:] > ci[..., :-1]) | ~clive[..., 1:]).all()):
        raise ValueError("columns are not strictly ascending")
    if not bool((((ci >= 0) & (ci < r0[:, None])) | ~clive).all()):
        raise ValueError("a column is not before its query block")
    inside = (ci[..., :, None] >= bo[..., None, :]) & (ci[..., :, None] < bo[..., None, :] + bs) & live[..., None, :]
    if bool((inside.any(-1) & clive).any()):
        raise ValueError("a column lies inside a listed window")


__all__ = [
    "BLOCK_SIZE", "SparseIndex", "a_shape_index", "block_mask_index", "budget_count", "check_index",
    "dense_index", "grid_index", "grid_slashes", "index_density", "index_mask", "kept_keys",
    "merge_heads", "modality_block_groups", "modality_rows", "modality_vertical_slash_index", "num_blocks",
    "resize_block_mask", "slash_windows", "static_index", "vertical_slash_index", "with_dense_tail",
]
