"""The search-side layout of one head: what the recall arithmetic scores and the kernels run.

Lives with the patterns (each pattern's ``layout`` builds one) so the patterns never reach
into ``vlsparse.search``; ``vlsparse.search.recall`` scores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    """One head's kept set in the kernels' layout (tiles *or* windows, plus columns).

    ``tiles``: bool ``[nb, nb]`` aligned tiles; ``starts``: window starts ``[G, W]`` in
    distance space, sorted, one row per window set (padding: a large value);
    ``groups``: ``[nb]`` which window set each query block uses (``None``: set 0 for all;
    otherwise the ``TileStats`` groups, so ``G = GROUPS``); ``columns``: sorted unique key
    indices ``[C]``; ``column_blocks``: bool ``[nb, C]``, which query blocks use each
    column (``None``: all); ``dense_tail``: the last query block keeps every causal key
    instead (``vlsparse.kernels.indices.with_dense_tail``).
    """

    tiles: torch.Tensor | None = None
    starts: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    columns: torch.Tensor | None = None
    column_blocks: torch.Tensor | None = None
    dense_tail: bool = False

    def __post_init__(self) -> None:
        if self.tiles is not None and self.starts is not None:
            raise ValueError("a layout has tiles or windows, not both")
        if self.columns is None:
            self.columns = torch.empty(0, dtype=torch.long)


def causal_tiles(nb: int) -> torch.Tensor:
    """Bool ``[nb, nb]``: the causal tiles (key block <= query block)."""
    return torch.arange(nb)[None, :] <= torch.arange(nb)[:, None]
