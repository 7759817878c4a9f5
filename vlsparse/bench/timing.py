"""Timers shared by the benchmarks and ``vlsparse eval``: ``ForwardClock`` times a model's forwards,
``Turns`` lets configurations answer in turn, each on its own clock.

Resident memory has its own meter, ``vlsparse.rss``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


class Turns:
    """Configurations of one model answering in turn (dense, sparse, dense, sparse, ...), each timed by
    its own ``ForwardClock``.

    ``switch(name)`` gives the callable ``vlsparse.demo.evaluate.evaluate_paired`` runs before a
    configuration answers: it reports the previous answer (``answered(name)``), switches the model
    (``enter(name)``) and moves the clock hooks to ``name``'s clock. ``note()`` reports the last answer
    (call it from the progress callback, so each answer is reported once); ``close()`` removes the hooks.
    """

    def __init__(self, model, names, enter: Callable[[str], None],
                 answered: Callable[[str], None] = lambda name: None) -> None:
        self.model, self.enter, self.answered = model, enter, answered
        self.clocks = {name: ForwardClock() for name in names}
        self.current: str | None = None
        self.handles: list = []

    def note(self) -> None:
        if self.current is not None:
            self.answered(self.current)
            self.current = None

    def switch(self, name: str) -> Callable[[], None]:
        def go() -> None:
            self.note()
            self.current = name
            self.enter(name)
            self.close()
            self.handles = self.clocks[name].attach(self.model)

        return go

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
