"""Attention received by each key position, computed in row blocks (never an N x N matrix).

Most in-LM token-reduction rules rank image tokens by how much softmax attention
they receive from some query rows (the last prompt token, the instruction, every
row). ``attention_received`` gives that quantity for one layer from its query and
key states, processing the chosen query rows ``block`` at a time, so the largest
temporary is ``[H, block, N]``: memory O(block x N) per head whatever N is.

Conventions (shared with the methods in this package):

- ``q``: ``[H, N, d]`` query states of the whole prompt; ``k``: ``[H_kv, N, d]`` key
  states. Grouped-query attention: query head ``h`` reads key head
  ``h // (H // H_kv)``. Whether RoPE was applied is the caller's choice (a method's
  ``AttentionSpec.rope`` says which one it wants).
- Causal: query row ``i`` sees keys ``j <= i``.
- ``keys``: optional subset of key positions. The softmax is then normalised over that
  subset only (FEATHER scores the last token against the image keys alone); other
  columns of the result are 0.
- ``reduce``: ``"sum"`` adds the probabilities over the chosen rows; ``"mean"`` divides
  that sum by the number of chosen rows (so a key set's total is the average share of
  a row's attention it receives); ``"visible"`` divides each key's sum by the number of
  chosen rows that can see it (rows ``i >= j``), the causal-mask normalisation of ZipVL.

All arithmetic is float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW_SETS = ("last", "text", "image", "all")
REDUCTIONS = ("sum", "mean", "visible")


def attention_received(q: Tensor, k: Tensor, scale: float, rows: Tensor, *, keys: Tensor | None = None,
                       reduce: str = "sum", block: int = 256) -> Tensor:
    """Softmax attention each key receives from the query ``rows``: ``[H, N]`` (see the module docstring)."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [heads, N, d]; got {tuple(q.shape)} and {tuple(k.shape)}")
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    if k.shape[1] != n or k.shape[2] != dim:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key heads")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, not {reduce!r}")
    if block < 1:
        raise ValueError("block must be at least 1")
    rows = torch.as_tensor(rows, dtype=torch.long, device=q.device).flatten()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"query rows must lie in [0, {n})")
    group = heads // kv_heads
    kf = k.float()
    positions = torch.arange(n, device=q.device)
    allowed_keys = torch.ones(n, dtype=torch.bool, device=q.device)
    if keys is not None:
        keys = torch.as_tensor(keys, dtype=torch.long, device=q.device).flatten()
        allowed_keys = torch.zeros(n, dtype=torch.bool, device=q.device)
        allowed_keys[keys] = True
    total = torch.zeros(kv_heads, group, n, dtype=torch.float32, device=q.device)
    for start in range(0, rows.numel(), block):
        chunk = rows[start:start + block]
        rows_q = q[:, chunk].float().reshape(kv_heads, group * chunk.numel(), dim)  # only the rows asked for
        scores = (rows_q @ kf.transpose(1, 2)).mul_(scale).view(kv_heads, group, chunk.numel(), n)
        if keys is None:  # every key before the earliest row is visible to all: mask only the columns after it
            first = int(chunk.min())
            scores[..., first:].masked_fill_(positions[None, first:] > chunk[:, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)  # each row sees at least itself
        else:
            visible = (positions[None, :] <= chunk[:, None]) & allowed_keys[None, :]  # [B, N]
            probs = torch.softmax(scores.masked_fill_(~visible, float("-inf")), dim=-1)
            probs = torch.nan_to_num(probs, nan=0.0)  # a row that sees no allowed key contributes nothing
        total += probs.sum(dim=2)
    total = total.reshape(heads, n)
    if reduce == "mean" and rows.numel():
        total = total / rows.numel()
    elif reduce == "visible":
        total = total / visible_row_counts(rows, n).clamp(min=1).to(total)
    return total


def visible_row_counts(rows: Tensor, n: int) -> Tensor:
    """For every key position j < n: how many of ``rows`` can see it (rows i >= j). [N] long."""
    ordered = torch.sort(torch.as_tensor(rows, dtype=torch.long).flatten()).values
    positions = torch.arange(n, device=ordered.device)
    return ordered.numel() - torch.searchsorted(ordered, positions, right=False)


def query_rows(name: str, image_mask: Tensor) -> Tensor:
    """Positions of a named row set in a prompt whose image positions are ``image_mask`` ([N] bool).

    ``last``: the final prompt position. ``image``: every image position. ``all``: every
    position. ``text``: the non-image positions after the first image token (the
    instruction; the system prompt before the image is left out); every non-image
    position if the prompt has no image.
    """
    image_mask = torch.as_tensor(image_mask, dtype=torch.bool).flatten()
    n = image_mask.numel()
    if name == "last":
        return torch.tensor([n - 1], dtype=torch.long) if n else torch.zeros(0, dtype=torch.long)
    if name == "all":
        return torch.arange(n)
    if name == "image":
        return image_mask.nonzero().flatten()
    if name == "text":
        after = torch.ones(n, dtype=torch.bool)
        if bool(image_mask.any()):
            first = int(image_mask.nonzero()[0])
            after[:first] = False
        return (after & ~image_mask).nonzero().flatten()
    raise ValueError(f"unknown row set {name!r}; expected one of {ROW_SETS}")


def received_for(spec, q: Tensor, k: Tensor, scale: float, image_mask: Tensor, *, block: int = 256) -> dict[str, Tensor]:
    """Fill ``TokenContext.received`` for a method's ``AttentionSpec``: row-set name -> [N] head mean.

    ``q``/``k`` must already be the states the spec asks for (layer, RoPE or not); this
    function applies the spec's key set, reduction and row sets.
    """
    image_mask = torch.as_tensor(image_mask, dtype=torch.bool, device=q.device).flatten()
    keys = image_mask.nonzero().flatten() if spec.keys == "image" else None
    out = {}
    for name in spec.rows:
        rows = query_rows(name, image_mask.cpu()).to(q.device)
        out[name] = attention_received(q, k, scale, rows, keys=keys, reduce=spec.reduce, block=block).mean(0)
    return out
