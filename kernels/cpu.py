"""Fast CPU sparse prefill attention: same semantics as the reference, columns exact.

:func:`sparse_attention_cpu` feeds the CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, which also returns the row
log-sum-exp) batches of 64-row query blocks, in three steps:

1. In place: the windows that end a block's list back to back (its diagonal window and the
   local band before it) form one run of ``R`` windows; for ``min_group`` or more consecutive
   blocks of one head with the same ``R >= min_run`` (any ``R`` when the run is the whole list;
   a single block when ``R >= long_run``) these runs are a single strided view of K and V
   (batch stride = 64 rows), so nothing is copied. One causal-tail mask ``[1, 1, 64, 64R]``
   serves them all.
2. Gathered windows: the other blocks, grouped by window count, get their windows copied
   with ``index_select(..., out=workspace)`` into buffers reused across groups and small
   enough to stay in cache (fresh large buffers page-fault; a 2-4 MB workspace ran ~2x faster
   than 64 MB). The diagonal window is last, so one causal-tail mask again serves a group.
3. The rest (windows before an in-place run, and the columns, all before the block), merged:
   ``o = (o1 e^{lse1} + o2 e^{lse2}) / (e^{lse1} + e^{lse2})``. Blocks whose rest is exactly the
   same keys (an a-shape sink; vertical columns between two slashes) gather them once and fold
   them in with two plain matmuls over all their query rows; the others get their token rows
   gathered, grouped by count rounded up to ``quantum``, with a ``[G, 1, 1, L]`` key-padding mask.

GQA: every read goes to KV head ``h // group`` directly. Computes in fp32 by default. Calls
cut the query blocks into one consecutive part per torch thread and run each part, steps 1-3,
in its own thread (:func:`_run_in_threads`): no barrier after every small call, which is what
keeps the speed when other processes share the cores.
Measured (2 cores, D=64): gathered windows ran at ~75% of the in-place speed; compiled
``flex_attention`` (below) was ~1.4x slower on block-sparse lists and ~6x slower on
vertical-slash lists (exact columns make most blocks partial), so it is not the default.

:func:`flex_sparse_attention` runs the same lists through compiled ``flex_attention`` with
a ``BlockMask`` (exact: a token-level mask_mod on partial blocks). Its first compile costs
tens of seconds per new length, so it is optional and never used by default.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vlsparse.kernels.indices import SparseIndex, kept_keys


def attention_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, *, mask: Tensor | None = None,
                  causal: bool = False, fused: bool = True) -> tuple[Tensor, Tensor]:
    """Softmax attention returning (out [G, 1, M, D], lse [G, 1, M] fp32).

    q [G, 1, M, D], k/v [G, 1, L, D] (any strides, last dim contiguous); ``mask`` additive,
    broadcastable to [G, 1, M, L]; ``causal`` aligns row i with key i. ``fused``: the CPU
    flash kernel when this torch has it, else plain matmuls (same result).
    """
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused and op is not None and q.device.type == "cpu":
        out, lse = op(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    if causal:
        m, L = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(m, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).nan_to_num(0.0), v.float())
    return out.to(q.dtype), lse


def _merge_into(out: Tensor, lse: Tensor, rows: Tensor, o2: Tensor, lse2: Tensor) -> None:
    """Fold a partial result over disjoint keys into ``out[rows]``, ``lse[rows]`` (stable):
    o = (o1 e^{lse1} + o2 e^{lse2}) / (e^{lse1} + e^{lse2}), lse = log(e^{lse1} + e^{lse2})."""
    o1, lse1 = out[rows], lse[rows]
    new_lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - new_lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - new_lse).unsqueeze(-1)
    out.index_copy_(0, rows, o1.mul_(w1).add_(o2.mul_(w2)))
    lse.index_copy_(0, rows, new_lse)


def _merge_shared_keys(out: Tensor, lse: Tensor, qf: Tensor, rows: Tensor, kc: Tensor, vc: Tensor,
                       scale: float) -> None:
    """Fold attention over keys ``kc``/``vc`` [W, D], the same for every block in ``rows`` (all before
    them), into ``out[rows]`` / ``lse[rows]`` with two plain matmuls over all their query rows:
    ``lse' = log(e^lse + sum_j e^{s_j})``, ``out' = out e^{lse - lse'} + e^{s - lse'} V`` (fp32)."""
    g, bs, d = len(rows), qf.shape[1], qf.shape[2]
    first = int(rows[0])
    consecutive = int(rows[-1]) - first + 1 == g
    pick = (lambda t: t[first: first + g]) if consecutive else (lambda t: t[rows])
    o1, lse1 = pick(out).reshape(g * bs, d).float(), pick(lse).reshape(g * bs)
    s = torch.mm(pick(qf).reshape(g * bs, d).float(), kc.float().t()).mul_(scale)
    new_lse = torch.logaddexp(lse1, torch.logsumexp(s, -1))
    o1.mul_(torch.exp(lse1 - new_lse)[:, None]).addmm_(s.sub_(new_lse[:, None]).exp_(), vc.float())
    if consecutive:  # o1 is already that slice of ``out`` when it is fp32
        if out.dtype != torch.float32:
            out[first: first + g] = o1.view(g, bs, d)
        lse[first: first + g] = new_lse.view(g, bs)
    else:
        out.index_copy_(0, rows, o1.view(g, bs, d).to(out.dtype))
        lse.index_copy_(0, rows, new_lse.view(g, bs))


def _padded(x: Tensor, rows: int, dtype: torch.dtype) -> Tensor:
    """``x`` [B, H, N, D] as a contiguous ``dtype`` tensor with ``rows`` rows (zeros after N); no copy if it is one."""
    if x.shape[2] == rows:
        return x.to(dtype).contiguous()
    out = x.new_empty(x.shape[0], x.shape[1], rows, x.shape[3], dtype=dtype)
    out[:, :, : x.shape[2]].copy_(x)
    out[:, :, x.shape[2]:].zero_()
    return out


def _causal_tail_masks(windows: int, bs: int, dtype: torch.dtype):
    """``tail(c)``: additive mask [1, 1, bs, c*bs] for c <= ``windows``: 0, except -inf above the diagonal of
    the last bs x bs tile. All are views of one tensor built once (the CPU kernel takes row-strided masks)."""
    full = torch.zeros(1, 1, bs, max(windows, 1) * bs, dtype=dtype)
    full[..., -bs:].masked_fill_(torch.ones(bs, bs, dtype=torch.bool).triu(1), float("-inf"))
    return lambda count: full[..., full.shape[-1] - count * bs:]


def _groups(sizes: Tensor, cost_per_unit: int, capacity: int, floor: int = 0, min_members: int = 1):
    """Yield (size, members) chunks: members share ``sizes``; ``max(size * cost_per_unit, floor) * len``
    stays within ``capacity``, unless that leaves fewer than ``min_members`` members."""
    order = torch.argsort(sizes, stable=True)
    values, counts = torch.unique_consecutive(sizes[order], return_counts=True)
    first = 0
    for size, count in zip(values.tolist(), counts.tolist()):
        members = order[first: first + count]
        first += count
        if size == 0:
            continue
        per_chunk = max(1, min_members, capacity // max(size * cost_per_unit, floor))
        for c0 in range(0, count, per_chunk):
            yield size, members[c0: c0 + per_chunk]


def _trailing_runs(offsets: Tensor, count: Tensor, r0: Tensor, bs: int) -> Tensor:
    """Per query block, how many windows end the list back to back (r0 - bs*t for t = 0, 1, ...)."""
    t = torch.arange(offsets.shape[1])
    back = offsets.gather(1, (count[:, None] - 1 - t).clamp(min=0))
    match = (back == r0[:, None] - bs * t) & (t < count[:, None])
    return match.long().cumprod(1).sum(1)


def _segments(run: Tensor, head_start: Tensor, min_run: int, min_group: int, long_run: int,
              whole: Tensor | None = None) -> list[tuple[int, int, int]]:
    """Maximal ranges [e0, e1) of consecutive query blocks of one (batch, head) (``head_start``
    marks a block that opens a head) sharing a trailing run length R >= min_run (or any R where
    ``whole``: the run is the block's whole window list, so reading it in place leaves no windows
    to merge), at least ``min_group`` long (any length if R >= ``long_run``, e.g. a dense last
    block): [(e0, e1, R), ...]."""
    ok = run >= min_run if whole is None else (run >= min_run) | (whole & (run > 0))
    key = torch.where(ok, run, 0)
    start = head_start | torch.cat([torch.ones(1, dtype=torch.bool), key[1:] != key[:-1]])
    seg = start.long().cumsum(0) - 1
    lengths = torch.bincount(seg)
    firsts = torch.nonzero(start).flatten()
    keep = (key[firsts] > 0) & ((lengths >= min_group) | (key[firsts] >= long_run))
    return [(int(f), int(f) + int(n), int(r)) for f, n, r in zip(firsts[keep], lengths[keep], key[firsts[keep]])]


def _pack_tokens(offsets: Tensor, n_win: Tensor, cols: Tensor, n_cols: Tensor, bs: int, width: int) -> Tensor:
    """Key positions of the first ``n_win`` windows and the ``n_cols`` columns of each row, packed to
    the front of [G, width]; padding is -1."""
    wmax, cmax = int(n_win.max()), int(n_cols.max())
    win = (offsets[:, :wmax, None] + torch.arange(bs)).flatten(1)
    win_ok = (torch.arange(wmax)[None, :, None] < n_win[:, None, None]).expand(-1, -1, bs).flatten(1)
    col_ok = torch.arange(cmax) < n_cols[:, None]
    tok = torch.cat([win, cols[:, :cmax]], 1)
    ok = torch.cat([win_ok, col_ok], 1)
    pos = torch.where(ok, ok.cumsum(1) - 1, width)
    packed = torch.full((len(tok), width + 1), -1, dtype=torch.long)
    packed.scatter_(1, pos, torch.where(ok, tok, -1))
    return packed[:, :width]


def _shared_rests(kv_base: Tensor, offsets: Tensor, n_win: Tensor, cols: Tensor, n_cols: Tensor, bs: int,
                  min_share: int) -> list[tuple[Tensor, Tensor]]:
    """Groups of at least ``min_share`` blocks whose rest (first ``n_win`` windows, then ``n_cols``
    columns) is exactly the same key tokens of the same KV head: [(rows, tokens), ...].

    Candidates share a cheap fingerprint (KV head, counts, sums, first and last column); each
    is then checked token by token against its group's first block."""
    has = torch.nonzero((n_win > 0) | (n_cols > 0)).flatten()
    if len(has) < min_share:
        return []
    wmax, cmax = max(int(n_win.max()), 1), int(n_cols.max())
    win_ok = torch.arange(wmax) < n_win[has, None]
    c = F.pad(cols[has, :cmax], (0, 1))  # one spare column: no column is then an all-zero row
    col_ok = torch.arange(cmax + 1) < n_cols[has, None]
    first = torch.where(n_cols[has] > 0, c[:, 0], -1)
    last = c.gather(1, (n_cols[has] - 1).clamp(min=0)[:, None]).squeeze(1)
    fingerprint = torch.zeros(len(has), dtype=torch.long)
    for part in (kv_base[has], n_win[has], n_cols[has], torch.where(win_ok, offsets[has, :wmax], 0).sum(1),
                 torch.where(col_ok, c, 0).sum(1), first, last):
        fingerprint = fingerprint * 1_000_003 + part  # wraps around: collisions are caught below
    _, inverse, counts = torch.unique(fingerprint, return_inverse=True, return_counts=True)
    groups = []
    for u in torch.nonzero(counts >= min_share).flatten().tolist():
        rows = has[inverse == u]
        width = int(n_win[rows[0]]) * bs + int(n_cols[rows[0]])
        tok = _pack_tokens(offsets[rows], n_win[rows], cols[rows], n_cols[rows], bs, width)
        same = (tok == tok[0]).all(1)
        if int(same.sum()) >= min_share:
            groups.append((rows[same], tok[0]))
    return groups


class _Blocks(NamedTuple):
    """Per query block (flattened over batch, heads, blocks): where its KV head starts in the
    flattened K/V rows, its first row, and its lists."""

    kv_base: Tensor  # [E]
    r0: Tensor  # [E]
    n_windows: Tensor  # [E]
    offsets: Tensor  # [E, MAXB]
    n_cols: Tensor  # [E]
    cols: Tensor  # [E, MAXC]

    def slice(self, lo: int, hi: int) -> _Blocks:
        return _Blocks(*(t[lo:hi] for t in self))


class _Knobs(NamedTuple):
    quantum: int
    min_batch: int
    min_run: int
    min_group: int
    long_run: int
    min_share: int
    capacity: int  # elements per gathered K / V buffer
    size: int  # elements allocated per buffer (capacity, grown for the longest window lists)


def _balanced_ranges(cost: Tensor, parts: int) -> list[tuple[int, int]]:
    """Cut [0, len(cost)) into at most ``parts`` consecutive ranges of about equal total cost."""
    total = cost.cumsum(0)
    if parts <= 1 or len(cost) < 2 * parts or int(total[-1]) == 0:
        return [(0, len(cost))]
    cuts = (torch.searchsorted(total, total[-1] * torch.arange(1, parts) / parts) + 1).tolist()
    edges = sorted({0, *(min(max(c, 1), len(cost) - 1) for c in cuts), len(cost)})
    return list(zip(edges[:-1], edges[1:]))


def _run_in_threads(tasks: list[Callable[[], None]]) -> None:
    """Run ``tasks`` at once, one OS thread each, every thread with one torch thread.

    Each task is a set of whole query blocks, so the threads share no work and no barrier
    follows every small kernel call; each core keeps its own gathered buffers. Grad and
    inference modes are thread-local and are copied in; torch's default thread count (which
    ``torch.set_num_threads`` in a thread also sets) is restored afterwards."""
    if len(tasks) == 1:
        tasks[0]()
        return
    previous = torch.get_num_threads()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    errors: list[BaseException] = []

    def run(task: Callable[[], None]) -> None:
        torch.set_num_threads(1)
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                task()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(task,), name="vlsparse-attention", daemon=True)  # Ctrl-C exits
               for task in tasks]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        torch.set_num_threads(previous)
    if errors:
        raise errors[0]


def _attend_blocks(qf: Tensor, kf: Tensor, vf: Tensor, blocks: _Blocks, out: Tensor, lse: Tensor, scale: float,
                   tail_mask: Callable[[int], Tensor], knobs: _Knobs) -> None:
    """Steps 1-3 of the module docstring for the query blocks ``qf`` [E, bs, D] (``blocks`` are
    theirs), writing ``out`` [E, bs, D] and ``lse`` [E, bs]; ``kf`` / ``vf`` are all K / V rows."""
    e_total, bs, d = qf.shape
    kv_base, r0, n_windows, offsets, n_cols, cols = blocks
    dtype = qf.dtype
    k_windows = kf.as_strided((kf.shape[0] - bs + 1, bs, d), (d, d, 1))
    v_windows = vf.as_strided((vf.shape[0] - bs + 1, bs, d), (d, d, 1))

    # 1) trailing runs read in place: consecutive blocks' runs are one strided view of K and V
    in_place = torch.zeros(e_total, dtype=torch.long)
    runs = _trailing_runs(offsets, n_windows, r0, bs)
    for e0, e1, run in _segments(runs, r0 == 0, knobs.min_run, knobs.min_group, knobs.long_run, runs == n_windows):
        first_row = int(kv_base[e0] + r0[e0]) - bs * (run - 1)
        shape, stride = (e1 - e0, 1, run * bs, d), (bs * d, 0, d, 1)
        k_run = kf.as_strided(shape, stride, kf.storage_offset() + first_row * d)  # offsets are absolute
        v_run = vf.as_strided(shape, stride, vf.storage_offset() + first_row * d)
        o, l = attention_lse(qf[e0:e1].view(e1 - e0, 1, bs, d), k_run, v_run, scale, mask=tail_mask(run))
        out[e0:e1] = o.view(e1 - e0, bs, d)
        lse[e0:e1] = l.view(e1 - e0, bs)
        in_place[e0:e1] = run

    rest_windows = torch.where(in_place > 0, n_windows - in_place, 0)
    rest = rest_windows * bs + n_cols
    kws = torch.empty(knobs.size, dtype=dtype)
    vws = torch.empty(knobs.size, dtype=dtype)
    qws = torch.empty(knobs.size, dtype=dtype)

    # 2) the other blocks' windows, gathered; the same window count shares one causal-tail mask
    for count, rows in _groups(torch.where(in_place > 0, 0, n_windows), bs * d, knobs.capacity,
                               min_members=knobs.min_batch):
        g = len(rows)
        starts = (kv_base[rows, None] + offsets[rows, :count]).reshape(-1)
        kg = torch.index_select(k_windows, 0, starts, out=kws[: g * count * bs * d].view(g * count, bs, d))
        vg = torch.index_select(v_windows, 0, starts, out=vws[: g * count * bs * d].view(g * count, bs, d))
        qg = torch.index_select(qf, 0, rows, out=qws[: g * bs * d].view(g, bs, d))
        o, l = attention_lse(qg.view(g, 1, bs, d), kg.view(g, 1, count * bs, d), vg.view(g, 1, count * bs, d),
                             scale, mask=tail_mask(count))
        out.index_copy_(0, rows, o.view(g, bs, d))
        lse.index_copy_(0, rows, l.view(g, bs))

    # 3) the rest (windows before an in-place run, and columns): all before the block, so no causal
    #    mask; merged with what steps 1-2 gave. First, groups of blocks whose rest is the same keys
    #    (a-shape's sink, vertical columns between two slashes): one copy of them, two matmuls
    for rows, tokens in _shared_rests(kv_base, offsets, rest_windows, cols, n_cols, bs, knobs.min_share):
        kc = kf.index_select(0, kv_base[rows[0]] + tokens)
        vc = vf.index_select(0, kv_base[rows[0]] + tokens)
        step = max(1, knobs.size // (bs * max(len(tokens), d)))
        for c0 in range(0, len(rows), step):
            _merge_shared_keys(out, lse, qf, rows[c0: c0 + step], kc, vc, scale)
        rest[rows] = 0
    #    then the others, gathered per block, padded to a multiple of quantum with a key-padding mask
    quantum = knobs.quantum
    for width, rows in _groups((rest + quantum - 1) // quantum * quantum, d, knobs.capacity, floor=bs * d):
        g = len(rows)
        tok = _pack_tokens(offsets[rows], rest_windows[rows], cols[rows], n_cols[rows], bs, width)
        live = tok >= 0
        idx = (kv_base[rows, None] + tok.clamp(min=0)).reshape(-1)
        kg = torch.index_select(kf, 0, idx, out=kws[: g * width * d].view(g * width, d))
        vg = torch.index_select(vf, 0, idx, out=vws[: g * width * d].view(g * width, d))
        qg = torch.index_select(qf, 0, rows, out=qws[: g * bs * d].view(g, bs, d))
        mask = None
        if not bool(live.all()):
            mask = torch.zeros(g, 1, 1, width, dtype=dtype).masked_fill_(~live[:, None, None], float("-inf"))
        o, l = attention_lse(qg.view(g, 1, bs, d), kg.view(g, 1, width, d), vg.view(g, 1, width, d), scale,
                             mask=mask)
        _merge_into(out, lse, rows, o.view(g, bs, d), l.view(g, bs))


def sparse_attention_cpu(q: Tensor, k: Tensor, v: Tensor, index: SparseIndex, scale: float, *,
                         threads: int | None = None, quantum: int = 64, workspace_mb: float = 4.0,
                         min_batch: int = 16, min_run: int = 4, min_group: int = 4, long_run: int = 16,
                         min_share: int = 16, parallel_min_keys: int = 0,
                         compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """Sparse prefill attention on CPU (see the module docstring).

    q: [B, H, N, D]; k, v: [B, Hkv, N, D]; ``index`` from ``vlsparse.kernels.indices``
    (windows in [0, r0], the diagonal last; columns before the block). ``threads`` (default:
    ``torch.get_num_threads()``): when the lists hold at least ``parallel_min_keys`` keys
    (summed over query blocks: 8 heads at 10% density hold ~0.4M at 8k tokens, ~1M at 12k,
    ~6.7M at 32k; default 0: always), the query blocks are cut into this many consecutive parts
    of about equal work, each run in its own thread with one torch thread; below that one
    sequence of calls uses torch's threads (``benchmarks/cpu_split.py``, 2 cores: the split was
    1.16-1.22x faster at 32k, 1.12-1.14x at 12k and 0.93-1.03x at 8k on an idle machine). With
    two busy processes on the 2 cores, torch's threads meet at a barrier after every small call
    and wait for whichever core is taken: at 8k the one sequence took 310-558 ms against 127-216
    ms split (A-shape, block-sparse, vertical-slash at 10%), so the split is the default. ``quantum``: the
    gathered rest is padded to a multiple of this; ``workspace_mb``: size of each gathered
    K / V buffer (small enough to stay in cache), grown so that blocks with the longest window
    lists still go ``min_batch`` at a time (fewer, larger kernel calls: 1.06x faster at 32k
    block-sparse, unchanged at 8k); ``min_share``: at least this many blocks with the same rest
    keys fold them in together; ``min_run``, ``min_group``, ``long_run``: a trailing run
    of at least ``min_run`` windows shared by at least ``min_group`` consecutive query blocks
    is read in place (shorter ones too when they are the whole window list), and so is a run
    of ``long_run`` windows or more in any block (e.g. the dense last block).
    Returns [B, H, N, D] in q's dtype.
    """
    b, h, n, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    bs = index.block_size
    nqb = index.shape[2]
    npad = nqb * bs
    e_total = b * h * nqb
    index = index.to("cpu").expand(b)
    item = torch.finfo(compute_dtype).bits // 8

    qf = _padded(q, npad, compute_dtype).view(e_total, bs, d)
    kf = _padded(k, npad, compute_dtype).view(-1, d)
    vf = _padded(v, npad, compute_dtype).view(-1, d)
    elem = torch.arange(e_total)
    blocks = _Blocks(kv_base=((elem // (h * nqb)) * hkv + (elem // nqb) % h // group) * npad,
                     r0=elem % nqb * bs, n_windows=index.block_count.reshape(-1).long(),
                     offsets=index.block_offset.reshape(e_total, -1).long(),
                     n_cols=index.column_count.reshape(-1).long(), cols=index.column_index.reshape(e_total, -1).long())
    out = torch.empty(e_total, bs, d, dtype=compute_dtype)
    lse = torch.empty(e_total, bs, dtype=torch.float32)
    most_windows = int(blocks.n_windows.max()) if e_total else 1
    tail_mask = _causal_tail_masks(most_windows, bs, compute_dtype)

    keys = blocks.n_windows * bs + blocks.n_cols  # listed keys per query block
    largest = max(most_windows * bs, int(keys.max()) + quantum, bs) * d
    capacity = max(int(workspace_mb * 2**20) // item, largest)
    knobs = _Knobs(quantum, min_batch, min_run, min_group, long_run, min_share, capacity,
                   size=max(capacity, min_batch * most_windows * bs * d))
    parts = torch.get_num_threads() if threads is None else threads
    ranges = _balanced_ranges(keys + bs, parts if int(keys.sum()) >= parallel_min_keys else 1)
    _run_in_threads([partial(_attend_blocks, qf[lo:hi], kf, vf, blocks.slice(lo, hi), out[lo:hi], lse[lo:hi], scale,
                             tail_mask, knobs) for lo, hi in ranges])
    return out.view(b, h, npad, d)[:, :, :n].to(q.dtype)


# ----------------------------------------------------------------------------- compiled flex_attention


def flex_block_mask(index: SparseIndex, n: int):
    """A ``BlockMask`` equal to the lists: aligned blocks touched by any kept key are partial
    (token-level ``mask_mod``), aligned blocks fully kept and strictly before the diagonal are
    full (no mask_mod). Memory O(B H NQB N) booleans."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = index.block_size
    b, h, nqb = index.shape
    kept = kept_keys(index.to("cpu"), n)
    padded = F.pad(kept, (0, nqb * bs - n)).view(b, h, nqb, nqb, bs)
    any_kept = padded.any(-1)
    qb = torch.arange(nqb)
    full = padded.all(-1) & (qb[None, :] < qb[:, None])
    partial = any_kept & ~full & (qb[None, :] <= qb[:, None])

    def lists(m: Tensor) -> tuple[Tensor, Tensor]:
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    def mask_mod(bi, hi, q_idx, kv_idx):
        return kept[bi, hi, q_idx // bs, kv_idx] & (kv_idx <= q_idx)

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def flex_sparse_attention(q: Tensor, k: Tensor, v: Tensor, index: SparseIndex, scale: float, *,
                          block_mask=None, compiled=None) -> Tensor:
    """Same lists through ``flex_attention`` (compiled if ``compiled`` is given, e.g.
    ``torch.compile(flex_attention)``; build it once and reuse it: compiling is slow)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = compiled if compiled is not None else flex_attention
    mask = block_mask if block_mask is not None else flex_block_mask(index, q.shape[2])
    out = fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out


__all__ = ["attention_lse", "flex_block_mask", "flex_sparse_attention", "sparse_attention_cpu"]
