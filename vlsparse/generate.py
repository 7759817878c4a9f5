"""Greedy generation with the measurements `vlsparse run` reports."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vlsparse.models import LoadedModel


@dataclass
class Answer:
    """A generated answer and what it cost."""

    text: str
    prompt_tokens: int
    image_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float
    peak_memory_mb: float
    memory_kind: str


class _Clock:
    """A generation streamer that timestamps the prompt and every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:  # transformers' streamer protocol
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "GPU peak allocated"
    from vlsparse.rss import peak_rss_mb

    return peak_rss_mb(), "process peak RSS"


def generate_answer(loaded: LoadedModel, inputs, max_new_tokens: int = 16) -> Answer:
    """Greedy-decode up to ``max_new_tokens`` and time prefill and decode separately.

    Prefill time runs from the call to the first generated token; decode speed
    counts the tokens after it.
    """
    model = loaded.model
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    clock = _Clock()
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock,
                             pad_token_id=pad_id)
    stop = time.perf_counter()
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = out[0, prompt_len:]
    token_times = clock.times[1:]  # the first put() is the prompt
    first = token_times[0] if token_times else stop
    prefill_ms = (first - start) * 1000
    decode_tokens = max(len(token_times) - 1, 0)
    decode_s = (token_times[-1] - first) if decode_tokens else 0.0
    image_id = loaded.adapter.image_token_id
    image_tokens = int((inputs["input_ids"][0] == image_id).sum()) if image_id is not None else 0
    peak, kind = peak_memory_mb(loaded.device)
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    return Answer(text=text, prompt_tokens=prompt_len, image_tokens=image_tokens, new_tokens=len(new_ids),
                  prefill_ms=prefill_ms, decode_tokens_per_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
                  peak_memory_mb=peak, memory_kind=kind)
