"""One layer's sparse index: each head's pattern module builds the lists for the heads that use it.

The runtime (``vlsparse.kernels.runtime``) calls :func:`layer_index` on every sparse
layer; the pattern modules build with ``vlsparse.kernels.indices``, and the heads are
merged back into one ``SparseIndex``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from vlsparse.kernels.indices import BLOCK_SIZE, SparseIndex, merge_heads, with_dense_tail
from vlsparse.patterns import PATTERNS, lookup

if TYPE_CHECKING:
    from vlsparse.profile import HeadProfile


@dataclass(frozen=True)
class IndexInputs:
    """One attention call as the pattern index builders see it (see :func:`layer_index`)."""

    q: Tensor  # [B, H, N, D] post-RoPE
    k: Tensor  # [B, Hkv, N, D]
    scale: float | None = None
    spans: Sequence[tuple[int, int]] = ()
    masks: Mapping[str, Tensor] | None = None
    block_size: int = BLOCK_SIZE
    last_q: int = 64

    @property
    def n(self) -> int:
        return self.q.shape[2]


def layer_index(heads: Sequence[HeadProfile], q: Tensor, k: Tensor, *, scale: float | None = None,
                spans: Sequence[tuple[int, int]] = (), masks: Mapping[str, Tensor] | None = None,
                block_size: int = BLOCK_SIZE, last_q: int = 64, dense_tail: bool = False,
                registry: Mapping | None = None) -> SparseIndex:
    """Build one layer's lists for all query heads from their profiles and this input.

    q: [B, H, N, D] (post-RoPE), k: [B, Hkv, N, D]; ``heads[h]`` is query head h's profile;
    ``spans`` the image-token ranges; ``masks`` the profile's sidecar tensors (``static``).
    Budgets are fractions of N (see ``vlsparse.profile``), turned into counts at this N with
    minimums: one slash (the diagonal), one local key, a top-k of at least one block. Heads
    sharing a pattern are built together by that pattern's ``runtime_index`` (the table in
    ``vlsparse.patterns``, or ``registry``); some estimate their indices online from q and k
    (``vlsparse.kernels.estimate``). ``dense_tail``: the last query block runs dense
    (``with_dense_tail``), for every head.
    """
    b, h, n, _ = q.shape
    if len(heads) != h:
        raise ValueError(f"{len(heads)} head profiles for {h} query heads")
    groups: dict[str, list[int]] = {}
    for i, head in enumerate(heads):
        groups.setdefault(head.pattern, []).append(i)
    inputs = IndexInputs(q, k, scale, spans, masks, block_size, last_q)
    parts: list[tuple[Sequence[int], SparseIndex]] = []
    for pattern, ids in groups.items():
        builder = lookup(pattern, PATTERNS if registry is None else registry)
        parts += builder.runtime_index([heads[i] for i in ids], ids, inputs)
    index = merge_heads(parts, h, b)
    return with_dense_tail(index, n) if dense_tail else index
