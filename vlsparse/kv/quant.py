"""Group-wise asymmetric integer quantisation of KV tensors, packed into bytes.

Keys and values are quantised along different axes, as KIVI and ZipVL do:

- keys **per channel** (``axis="channel"``): each channel gets its own scale and zero over a
  group of ``group`` consecutive tokens (key outliers live in fixed channels);
- values **per token** (``axis="token"``): each token gets its own scale and zero over a group
  of ``group`` consecutive channels.

A code is ``round((x - zero) / scale)`` in ``0 .. 2**bits - 1`` with ``zero`` the group's
minimum and ``scale = (max - min) / (2**bits - 1)``, so every element is recovered within
``scale / 2`` (``error_bound``). Codes of 2 and 4 bits are packed 4 and 2 to a byte along the
last (channel) dimension; 8-bit codes are bytes. Attention reads a block at a time: keys are
dequantised block by block (``key_scores``), values never are: ``value_mix`` folds each token's
scale into the attention weights, so their codes are only converted to floats.

Tensors are ``[heads, tokens, dim]`` (one sequence: the batch dimension is the caller's).
A channel-axis group is padded by repeating the last token; ``length`` counts the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

BITS = (2, 4, 8)
AXES = ("channel", "token")


@dataclass
class Quantized:
    """Quantised ``[heads, length, dim]``: packed codes and per-group scale and zero (float32).

    ``axis="channel"``: codes ``[heads, padded, dim*bits/8]``, scale/zero ``[heads, padded/group, 1, dim]``.
    ``axis="token"``: codes ``[heads, length, dim*bits/8]``, scale/zero ``[heads, length, dim/group, 1]``.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    axis: str
    group: int
    length: int
    dim: int

    def tensors(self) -> tuple[Tensor, ...]:
        return self.codes, self.scale, self.zero


def check_layout(bits: int, axis: str, group: int, dim: int) -> None:
    """Raise ValueError unless ``bits``/``axis``/``group`` can quantise a last dimension of ``dim``."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if group < 1 or (axis == "token" and dim % group):
        raise ValueError(f"a token-axis group must divide the head dimension {dim}, got {group}")
    if (dim * bits) % 8:
        raise ValueError(f"{bits}-bit codes of a {dim}-wide head do not fill whole bytes")


def quantize(x: Tensor, bits: int, axis: str, group: int) -> Quantized:
    """Quantise ``x`` [heads, n, dim] (see the module docstring)."""
    heads, n, dim = x.shape
    check_layout(bits, axis, group, dim)
    x = x.float()
    top = 2**bits - 1
    if axis == "channel":
        padded = -(-n // group) * group
        if padded != n:
            x = torch.cat([x, x[:, -1:].expand(heads, padded - n, dim)], dim=1)
        grouped = x.view(heads, padded // group, group, dim)
        low, high = grouped.amin(2, keepdim=True), grouped.amax(2, keepdim=True)
    else:
        grouped = x.view(heads, n, dim // group, group)
        low, high = grouped.amin(3, keepdim=True), grouped.amax(3, keepdim=True)
    scale = ((high - low) / top).clamp_min(1e-8)
    codes = ((grouped - low) / scale).round_().clamp_(0, top).to(torch.uint8)
    return Quantized(pack(codes.view(heads, -1, dim), bits), scale, low, bits, axis, group, n, dim)


def error_bound(q: Quantized) -> Tensor:
    """The largest error any element of ``q`` can carry: half its group's scale, broadcast to [heads, n, dim]."""
    return (q.scale / 2).expand(*_grouped_shape(q, q.codes.shape[1])).reshape(q.codes.shape[0], -1, q.dim)[:, :q.length]


def _grouped_shape(q: Quantized, tokens: int) -> tuple[int, ...]:
    heads = q.codes.shape[0]
    if q.axis == "channel":
        return heads, tokens // q.group, q.group, q.dim
    return heads, tokens, q.dim // q.group, q.group


def dequantize(q: Quantized, start: int = 0, stop: int | None = None) -> Tensor:
    """Tokens ``start:stop`` of ``q`` as float32 [heads, stop-start, dim].

    For channel-axis codes ``start`` must be a multiple of ``group`` (a block boundary).
    """
    stop = q.length if stop is None else min(stop, q.length)
    if q.axis == "channel":
        if start % q.group:
            raise ValueError(f"channel-axis blocks start at multiples of {q.group}, not {start}")
        end = -(-stop // q.group) * q.group
        first, last = start // q.group, end // q.group
        values = unpack(q.codes[:, start:end], q.bits, q.dim)
        grouped = values.view(*_grouped_shape(q, end - start))
        out = grouped.mul_(q.scale[:, first:last]).add_(q.zero[:, first:last])  # in place: the codes are a fresh copy
        return out.view(q.codes.shape[0], end - start, q.dim)[:, : stop - start]
    values = unpack(q.codes[:, start:stop], q.bits, q.dim)
    grouped = values.view(*_grouped_shape(q, stop - start))
    return grouped.mul_(q.scale[:, start:stop]).add_(q.zero[:, start:stop]).view(q.codes.shape[0], stop - start, q.dim)


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [..., dim] (each < 2**bits) -> bytes [..., dim*bits/8]; code ``j`` of a byte at bit ``j*bits``."""
    per = 8 // bits
    if per == 1:
        return codes.contiguous()
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = grouped[..., 0].clone()
    for j in range(1, per):
        out |= grouped[..., j] << (j * bits)
    return out


def unpack(packed: Tensor, bits: int, dim: int) -> Tensor:
    """Bytes [..., dim*bits/8] -> float32 codes [..., dim] (the inverse of ``pack``)."""
    if bits == 8:
        return packed.float()
    mask = 2**bits - 1
    codes = torch.stack([(packed >> (r * bits)) & mask if r else packed & mask for r in range(8 // bits)], -1)
    return codes.view(*packed.shape[:-1], dim).float()


def key_scores(query: Tensor, keys: Quantized, start: int, stop: int) -> Tensor:
    """``query @ dequantize(keys, start, stop).T``: [heads, m, dim] -> [heads, m, stop-start].

    Channel-axis keys carry a scale per group of tokens, which no single matmul can fold in, so the
    block is dequantised (one block at a time, never the whole cache) and multiplied once.
    """
    return query.float() @ dequantize(keys, start, stop).transpose(1, 2)


def value_mix(weights: Tensor, values: Quantized, start: int) -> Tensor:
    """``weights @ dequantize(values, start, start + n)`` without dequantising: [heads, m, n] -> [heads, m, dim].

    Token-axis codes: token ``t``'s channel group ``j`` is ``s[t, j] * c + z[t, j]``, so each group's
    output is ``(weights * s[:, j]) @ c + weights @ z[:, j]``: the scales go into the (small) weights
    and the codes are only converted to floats.
    """
    if values.axis != "token":
        raise ValueError("value_mix reads token-axis values")
    heads, m, n = weights.shape
    dim, group = values.dim, values.group
    parts = dim // group
    codes = unpack(values.codes[:, start: start + n], values.bits, dim)  # [heads, n, dim]
    w = weights.float()[:, None]  # [heads, 1, m, n]
    ws = w * values.scale[:, start: start + n, :, 0].transpose(1, 2)[:, :, None]  # [heads, parts, m, n]
    zero = (w * values.zero[:, start: start + n, :, 0].transpose(1, 2)[:, :, None]).sum(-1, keepdim=True)
    if parts == 1:
        return (ws[:, 0] @ codes + zero[:, 0])
    out = ws @ codes.view(heads, n, parts, group).transpose(1, 2) + zero  # [heads, parts, m, group]
    return out.permute(0, 2, 1, 3).reshape(heads, m, dim)


def held_bytes(tensors) -> int:
    """Bytes of the storage behind ``tensors`` (each storage counted once): what is really allocated,
    slack of a preallocated buffer included."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


__all__ = ["AXES", "BITS", "Quantized", "check_layout", "dequantize", "error_bound", "held_bytes", "key_scores",
           "pack", "quantize", "unpack", "value_mix"]
