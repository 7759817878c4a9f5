"""Perplexity on real English text that ships with CPython (``pydoc_data.topics``).

The pydoc topics repeat paragraphs across topics, so the split is made on
unique paragraphs (topics sorted by name, paragraphs in order, exact
duplicates dropped): every fifth one (indices 4, 9, ...) is held out for
evaluation, the rest are for calibration, and no held-out paragraph appears
in the calibration text. The split is fixed, so numbers are comparable across
runs and machines with the same CPython docs.

Perplexity = exp(mean next-token NLL) over non-overlapping windows of
``seq_len`` tokens (the first token of each window has no target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HELD_OUT_EVERY = 5


def pydoc_text(split: str = "heldout") -> str:
    """The held-out or calibration part of CPython's pydoc topics, as one string."""
    from pydoc_data.topics import topics

    if split not in ("heldout", "calib"):
        raise ValueError(f"split must be 'heldout' or 'calib', not {split!r}")
    paragraphs = list(dict.fromkeys(p.strip() for name in sorted(topics) for p in topics[name].split("\n\n")
                                    if p.strip()))
    held = split == "heldout"
    chosen = [p for i, p in enumerate(paragraphs) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held]
    return "\n\n".join(chosen)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int


def token_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of exactly ``seq_len`` tokens (the ragged tail is dropped)."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None,
               progress=None) -> PerplexityResult:
    """exp(mean NLL) of ``model`` over ``text`` in windows of ``seq_len`` tokens."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = token_windows(ids, seq_len, max_windows)
    if not windows:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for window in windows:
        batch = window.unsqueeze(0).to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += batch.shape[1] - 1
        if progress is not None:
            progress()
    mean = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=total_tokens, windows=len(windows),
                            seq_len=seq_len)


@torch.inference_mode()
def decode_perplexity(model, tokenizer, text: str, seq_len: int = 512, decoded: int = 64,
                      max_windows: int | None = None, progress=None) -> PerplexityResult:
    """Perplexity of the last ``decoded`` tokens of each window, predicted through the KV cache.

    Each window's first ``seq_len - decoded`` tokens are one prefill into an empty cache; then the true
    tokens are fed one by one (teacher forcing), each step reading the cache as generation does. The
    NLL counts the predictions of those ``decoded`` tokens (the first from the prefill's last position).
    So a KV cache method attached to ``model`` (``vlsparse.kernels.kv_runtime``) changes it, and the
    plain ``perplexity`` (one full forward, no cache) cannot see it.
    """
    from vlsparse.compat import cache_argument, new_dynamic_cache

    if not 0 < decoded < seq_len:
        raise ValueError(f"decoded must lie in 1..{seq_len - 1}, got {decoded}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = token_windows(ids, seq_len, max_windows)
    if not windows:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    argument = cache_argument(model)
    total_nll, total_tokens = 0.0, 0
    for window in windows:
        batch = window.unsqueeze(0).to(device)
        start = seq_len - decoded
        cache = new_dynamic_cache(model)
        out = model(input_ids=batch[:, :start], use_cache=True, **{argument: cache})
        logits = [out.logits[0, -1].float()]
        for position in range(start, seq_len - 1):
            out = model(input_ids=batch[:, position: position + 1], use_cache=True, **{argument: cache},
                        position_ids=torch.tensor([[position]], device=device))
            logits.append(out.logits[0, -1].float())
        nll = torch.nn.functional.cross_entropy(torch.stack(logits), batch[0, start:], reduction="sum")
        total_nll += float(nll)
        total_tokens += decoded
        if progress is not None:
            progress()
    mean = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=total_tokens, windows=len(windows),
                            seq_len=seq_len)
