"""Timers shared by the benchmarks and ``vlsparse eval``: ``ForwardClock`` times a model's forwards.

Resident memory has its own meter, ``vlsparse.rss``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vlsparse.compat import cache_length, cache_nbytes, cache_of_call, cache_of_output

_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")


@dataclass
class ForwardClock:
    """Times every forward of a model: prefills (empty cache) and decode steps; keeps the first prompts."""

    keep_prompts: int = 0
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    prompts: list[dict] = field(default_factory=list)
    kv_bytes: int = 0
    _start: float = 0.0
    _prefill: bool = False

    def pre(self, module, args, kwargs) -> None:
        self._prefill = cache_length(cache_of_call(kwargs)) == 0
        if self._prefill and len(self.prompts) < self.keep_prompts:
            self.prompts.append({k: kwargs[k].clone() for k in _INPUT_KEYS if isinstance(kwargs.get(k), torch.Tensor)})
        self._start = time.perf_counter()

    def post(self, module, args, kwargs, output) -> None:
        elapsed = time.perf_counter() - self._start
        (self.prefill_s if self._prefill else self.decode_s).append(elapsed)
        cache = cache_of_output(output)
        if cache is not None:
            self.kv_bytes = cache_nbytes(cache)

    def attach(self, model) -> list:
        return [model.register_forward_pre_hook(self.pre, with_kwargs=True),
                model.register_forward_hook(self.post, with_kwargs=True)]
