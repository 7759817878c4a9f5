"""Full precision, written in place: every token kept as computed, in a buffer preallocated per layer.

No paper: the baseline the other KV methods are measured against, and the cache ``vlsparse run``
uses instead of transformers' ``DynamicCache`` (which concatenates, copying the whole cache on every
decode step). The runtime gives such a layer plain tensors, so any attention function reads it.
"""

from __future__ import annotations

from vlsparse.kv.plan import KVContext, KVPlan

NAME = "fp"
PAPER = "none (full-precision baseline, written in place)"
DEFAULTS: dict = {}
OBSERVES = False


def plan(ctx: KVContext) -> KVPlan:
    return KVPlan(low_bits=32)
