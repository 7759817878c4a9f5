"""Uniform low-bit KV: every token's keys per channel and values per token at ``bits`` (KIVI's scheme).

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024.

Keys are quantised per channel over groups of ``group`` tokens, values per token over groups of
``group`` channels; the prompt's last ``residual`` tokens and the newest decoded ones stay at full
precision until a whole group can be quantised. The plain baseline for the mixed-precision and
eviction methods (transformers' ``QuantizedCache`` does the same with quanto or HQQ kernels, but
dequantises the whole cache on every step).
"""

from __future__ import annotations

from vlsparse.kv.plan import KVContext, KVPlan

NAME = "uniform"
PAPER = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024)"
DEFAULTS = {"bits": 4, "group": 32, "residual": 32}
OBSERVES = False


def plan(ctx: KVContext, bits: int = 4, group: int = 32, residual: int = 32) -> KVPlan:
    return KVPlan(low_bits=bits, key_group=group, value_group=group)
