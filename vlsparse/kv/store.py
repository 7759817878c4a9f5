"""Where one layer's keys and values live: an in-place buffer, and a compressed store read block by block.

``GrowingBuffer`` preallocates ``[..., capacity, dim]`` and writes new tokens in place; it grows
by ``chunk`` tokens (or an eighth of its size, if more) when full, so appending a decode token
copies nothing. transformers' ``DynamicCache`` concatenates, copying the whole cache every step.

``CompressedStore`` holds one sequence's tokens of one layer in **tiers** (each tier's tokens
at one precision, the same count per KV head) plus a full-precision ``recent`` buffer:

- the prompt, after prefill, as the KV method's plan says: kept tokens split into a high-bit
  and a low-bit tier (or one tier), its last ``residual`` tokens kept at full precision;
- every decoded token goes to ``recent``; once ``recent`` holds ``residual + group`` decoded
  tokens, its oldest ``group`` are quantised at the low bits and appended to the ``decoded`` tier.

Attention order does not matter (keys already carry their rotary positions), so tiers hold
tokens in any order. ``attend`` reads the tiers in blocks of ``BLOCK`` tokens straight from their
codes (``key_scores``, ``value_mix``): it never builds a full-precision copy of the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlsparse.kv.quant import Quantized, held_bytes, key_scores, quantize, value_mix

BLOCK = 8192  # tokens read from their codes at once (a multiple of every group size used)


class GrowingBuffer:
    """A preallocated tensor ``[..., capacity, dim]`` filled along dim -2 in place."""

    def __init__(self, chunk: int = 128) -> None:
        self.chunk = chunk
        self.data: Tensor | None = None
        self.length = 0

    def append(self, x: Tensor) -> Tensor:
        """Write ``x`` [..., n, dim] after the held tokens; returns the view of all held tokens."""
        n = x.shape[-2]
        if self.data is None or self.length + n > self.data.shape[-2]:
            capacity = self.length + n + (self.chunk if self.data is None else max(self.chunk, self.length // 8))
            grown = x.new_empty(*x.shape[:-2], capacity, x.shape[-1])
            if self.data is not None and self.length:
                grown[..., : self.length, :] = self.data[..., : self.length, :]
            self.data = grown
        self.data[..., self.length: self.length + n, :] = x
        self.length += n
        return self.view()

    def view(self) -> Tensor:
        return self.data[..., : self.length, :]

    def drop_front(self, n: int) -> Tensor:
        """Remove and return (a copy of) the oldest ``n`` tokens; the rest move to the front."""
        front = self.data[..., :n, :].clone()
        rest = self.data[..., n: self.length, :].clone()
        self.data[..., : rest.shape[-2], :] = rest
        self.length -= n
        return front

    def tensors(self) -> tuple[Tensor, ...]:
        return () if self.data is None else (self.data,)


@dataclass
class Tier:
    """Tokens at one precision: quantised keys and values, or full-precision ``[heads, n, dim]`` tensors."""

    keys: Quantized | Tensor
    values: Quantized | Tensor

    @property
    def length(self) -> int:
        return self.keys.length if isinstance(self.keys, Quantized) else self.keys.shape[1]

    def scores(self, query: Tensor, block: int = BLOCK):
        """``query`` [heads, m, dim] (float32) against the keys: [heads, m, <=block] per block of tokens."""
        for start in range(0, self.length, block):
            stop = min(start + block, self.length)
            if isinstance(self.keys, Quantized):
                yield key_scores(query, self.keys, start, stop)
            else:
                yield query @ self.keys[:, start:stop].float().transpose(1, 2)

    def mix(self, weights: Tensor, block: int = BLOCK) -> Tensor:
        """``weights`` [heads, m, length] applied to the values: [heads, m, dim], block by block."""
        out = None
        for start in range(0, self.length, block):
            part = weights[..., start: start + block]
            if isinstance(self.values, Quantized):
                step = value_mix(part, self.values, start)
            else:
                step = part @ self.values[:, start: start + part.shape[-1]].float()
            out = step if out is None else out + step
        return out

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for part in (self.keys, self.values)
                     for t in (part.tensors() if isinstance(part, Quantized) else (part,)))


def make_tier(keys: Tensor, values: Tensor, bits: int, key_group: int, value_group: int) -> Tier:
    """A tier of ``keys``/``values`` [heads, n, dim] at ``bits`` (16 or more: kept as they are). A value group
    that does not divide the head dimension shrinks to their greatest common divisor."""
    if bits >= 16:
        return Tier(keys.contiguous(), values.contiguous())
    value_group = math.gcd(value_group, values.shape[-1])
    return Tier(quantize(keys, bits, "channel", key_group), quantize(values, bits, "token", value_group))


def concat_tiers(a: Tier, b: Tier) -> Tier:
    """``a`` then ``b`` in one tier (same precision; ``a``'s channel-axis keys must end on a group boundary)."""
    if not isinstance(a.keys, Quantized):
        return Tier(torch.cat([a.keys, b.keys], 1), torch.cat([a.values, b.values], 1))
    if a.keys.length % a.keys.group:
        raise ValueError("a tier's keys must end on a group boundary to be extended")
    return Tier(_concat_quantized(a.keys, b.keys), _concat_quantized(a.values, b.values))


def _concat_quantized(a: Quantized, b: Quantized) -> Quantized:
    return Quantized(torch.cat([a.codes, b.codes], 1), torch.cat([a.scale, b.scale], 1),
                     torch.cat([a.zero, b.zero], 1), a.bits, a.axis, a.group, a.length + b.length, a.dim)


@dataclass
class CompressedStore:
    """One layer's tokens of one sequence (see the module docstring)."""

    low_bits: int
    key_group: int = 32
    value_group: int = 32
    residual: int = 32
    block: int = BLOCK
    tiers: list[Tier] = field(default_factory=list)
    decoded: Tier | None = None
    recent_keys: GrowingBuffer = field(default_factory=GrowingBuffer)
    recent_values: GrowingBuffer = field(default_factory=GrowingBuffer)
    decoded_recent: int = 0  # tokens in ``recent`` that were decoded (the rest: the prompt's tail)

    def __post_init__(self) -> None:  # room for one group of decoded tokens before the first quantisation
        self.recent_keys.chunk = self.recent_values.chunk = max(self.key_group, 1)

    @property
    def length(self) -> int:
        held = sum(t.length for t in self.tiers) + self.recent_keys.length
        return held + (self.decoded.length if self.decoded is not None else 0)

    def append(self, keys: Tensor, values: Tensor) -> None:
        """Decoded tokens [heads, n, dim] go to full precision; the oldest are quantised once enough wait."""
        self.recent_keys.append(keys)
        self.recent_values.append(values)
        self.decoded_recent += keys.shape[1]
        while self.low_bits < 16 and self.decoded_recent >= self.residual + self.key_group:
            old = self.recent_keys.length - self.decoded_recent  # the prompt's tail stays in front
            if old:  # the prompt's full-precision tail is quantised first, in front of the decoded tokens
                k, v = self.recent_keys.drop_front(old), self.recent_values.drop_front(old)
                self.tiers.append(make_tier(k, v, self.low_bits, self.key_group, self.value_group))
            k = self.recent_keys.drop_front(self.key_group)
            v = self.recent_values.drop_front(self.key_group)
            self.decoded_recent -= self.key_group
            tier = make_tier(k, v, self.low_bits, self.key_group, self.value_group)
            self.decoded = tier if self.decoded is None else concat_tiers(self.decoded, tier)

    def all_tiers(self) -> list[Tier]:
        return self.tiers + ([self.decoded] if self.decoded is not None else [])

    def attend(self, query: Tensor, scale: float, softcap: float | None = None) -> Tensor:
        """Softmax attention of ``query`` [heads_q, m, dim] (the last ``m`` tokens of ``recent``, causal among
        themselves) over every held token; returns [heads_q, m, dim] float32. GQA: query head ``h`` reads KV head
        ``h // (heads_q / heads_kv)``."""
        heads_q, m, dim = query.shape
        recent_k, recent_v = self.recent_keys.view(), self.recent_values.view()
        heads = recent_k.shape[0]
        q = query.float().reshape(heads, heads_q // heads * m, dim) * scale
        tiers = self.all_tiers()
        scores = [part for tier in tiers for part in tier.scores(q, self.block)]
        recent = q @ recent_k.float().transpose(1, 2)
        if m > 1:  # the new tokens see themselves causally
            n = recent.shape[-1]
            rows = torch.arange(m).repeat(heads_q // heads)[:, None] + (n - m)
            recent = recent.masked_fill(torch.arange(n)[None, :] > rows, -math.inf)
        scores.append(recent)
        logits = torch.cat(scores, -1)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        weights = torch.softmax(logits, -1)
        out = weights[..., logits.shape[-1] - recent.shape[-1]:] @ recent_v.float()
        start = 0
        for tier in tiers:
            out += tier.mix(weights[..., start: start + tier.length], self.block)
            start += tier.length
        return out.view(heads_q, m, dim)

    def tensors(self) -> tuple[Tensor, ...]:
        return (tuple(t for tier in self.all_tiers() for t in tier.tensors()) + self.recent_keys.tensors()
                + self.recent_values.tensors())

    def nbytes(self) -> int:
        """Bytes really allocated for this layer (codes, scales, buffers with their slack)."""
        return held_bytes(self.tensors())


__all__ = ["BLOCK", "CompressedStore", "GrowingBuffer", "Tier", "concat_tiers", "make_tier"]
