"""The core-neuron answer guard of ``vlsparse calibrate`` (see ``vlsparse.compress.core_calibrate``).

Core neurons are chosen per prompt from the prompt's own activations, so the guard compares
whole greedy answers, end-of-sequence token included, with and without them: a changed
answer or a lost end-of-sequence token (an answer that repeats itself) fails it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vlsparse.profile.core import CoreSettings


def short_demo_inputs(loaded, calibration, count: int = 16) -> list[dict]:
    """One-image demo questions (about 150 tokens) when calibrating on demo scenes, else none:
    a prompt's core neurons come from its own tokens, and short prompts give the least to count."""
    if not (loaded.adapter.is_vlm and str(calibration.source).startswith("demo")):
        return []
    from vlsparse.calibration import demo_items
    from vlsparse.search.calibration import CalibSample, prepare_sample

    return [prepare_sample(loaded, CalibSample(name=item.name, images=item.images, prompt=item.prompt))
            for item in demo_items(("vqa",), count, calibration.seed)]


def greedy_answer(loaded, batch, new_tokens: int) -> list[int]:
    """The greedy answer's token ids, stopping at the end-of-sequence token (included)."""
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = loaded.model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def answer_guard(loaded, inputs: Sequence[dict], run: tuple[int, int], layer_rows: list[dict], base: CoreSettings,
                 new_tokens: int, automatic: bool = True, say: Callable[[str], None] = lambda m: None):
    """Greedy answers (up to ``new_tokens``, end-of-sequence included) with core neurons in layers
    ``run`` must equal the dense ones on every prompt. Returns the (possibly narrower) run, or
    None, and the guard record.

    While a prompt's answer changes, the end layer of the run with the larger decode error is
    dropped (only when the layers were chosen automatically; given layers are kept and the
    record says how many answers matched).
    """
    from dataclasses import replace

    from vlsparse.kernels.core_runtime import attach_core, detach_core

    lengths = [int(b["input_ids"].shape[1]) for b in inputs]
    say(f"answer guard: {len(inputs)} dense greedy answers of up to {new_tokens} tokens")
    dense = [greedy_answer(loaded, b, new_tokens) for b in inputs]
    errors = {i: row["decode_error"] for i, row in enumerate(layer_rows)}
    dropped: list[int] = []
    matched = 0
    while run is not None:
        say(f"answer guard: core neurons in layers {run[0]}-{run[1]}")
        runtime = attach_core(loaded, replace(base, neuron_layers=tuple(range(run[0], run[1] + 1))),
                              neurons=True, tokens=False)
        try:
            matched = sum(greedy_answer(loaded, b, new_tokens) == d for b, d in zip(inputs, dense))
        finally:
            detach_core(loaded, runtime)
        if matched == len(inputs) or not automatic:
            break
        end = run[0] if errors[run[0]] >= errors[run[1]] else run[1]
        dropped.append(end)
        run = None if run[0] == run[1] else ((run[0] + 1, run[1]) if end == run[0] else (run[0], run[1] - 1))
        matched = 0
    return run, {"prompts": len(inputs), "new_tokens": new_tokens, "matched": int(matched),
                 "prompt_tokens": {"least": min(lengths), "most": max(lengths)}, "dropped_layers": dropped}
