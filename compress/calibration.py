"""Calibration batches for pruning, on top of the ``--calib`` reader (``vlsparse.calibration``).

- A vision-language model: real English with images (``pydoc+images``, the default when its
  tokenizer reads English), demo scenes (``demo:vqa`` from the training split, the default
  for the demo model) or a JSONL file: one batch per sample, the model's own prompt for the
  images and question followed by the answer (a text entry is a prompt without images).
- A text-only model, pydoc text (the default), a ``.txt`` file, a folder of them or a
  JSONL file: ``samples`` random windows of ``seq_len`` tokens of the text, shuffled by
  paragraph (by entry for JSONL), batched by ``TEXT_BATCH``.

Every batch carries ``labels`` (= ``input_ids`` with image and padding tokens
set to -100) so the same batches serve ECoFLaP's loss and Wanda's statistics.
``prune`` takes no ``demo:`` source (its one demo calibration is the default), and
no plain-text source for a vision-language model (``prune_source``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsparse.calibration import CalibData, CalibSource, is_demo, parse_calib, read_calib
from vlsparse.errors import InputError, param

DEMO_TASKS = ("vqa",)
"""The demo calibration of a vision-language model without ``--calib``."""
TEXT_BATCH = 8


@dataclass
class CalibrationBatches:
    """Batches of model inputs plus what produced them (recorded in the profile); ``samples`` counts them."""

    batches: list[dict]
    source: str
    samples: int
    seq_len: int
    seed: int
    tokens: int


def _with_labels(inputs: dict, image_token_id: int | None) -> dict:
    batch = {k: v for k, v in dict(inputs).items()}
    labels = batch["input_ids"].clone()
    if image_token_id is not None:
        labels[labels == image_token_id] = -100
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def _append_answer(inputs: dict, tokenizer, answer: str) -> dict:
    """Append the answer's tokens to a one-sample prompt (extending every per-token tensor)."""
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        return inputs
    out = dict(inputs)
    length = inputs["input_ids"].shape[1]
    extra = torch.tensor([ids], dtype=inputs["input_ids"].dtype)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, length):
            fill = extra if key == "input_ids" else torch.full_like(extra, 1 if key == "attention_mask" else 0,
                                                                     dtype=value.dtype)
            out[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
        elif isinstance(value, torch.Tensor) and value.dim() > 2 and value.shape[:2] == (1, length):
            # per-token rows (Mllama's cross_attention_mask): the answer sees what the last prompt token sees
            out[key] = torch.cat([value, value[:, -1:].expand(1, len(ids), *value.shape[2:])], dim=1)
    return out


def _texts(data: CalibData) -> list[str]:
    """The units the text windows are shuffled in: paragraphs of a plain text, else JSONL entries."""
    if data.text is not None:
        return data.text.split("\n\n")
    return [item.text or f"{item.prompt} {item.answer}".strip() for item in data.items]


def text_calibration(tokenizer, calib: str | Path | CalibSource | None, samples: int, seq_len: int,
                     seed: int) -> CalibrationBatches:
    """``samples`` random windows of ``seq_len`` tokens (Wanda's C4 recipe on local text)."""
    source = calib if isinstance(calib, CalibSource) else parse_calib(calib, vlm=False, default_tasks=DEMO_TASKS)
    texts = _texts(read_calib(source))
    rng = random.Random(seed)
    rng.shuffle(texts)
    ids: list[int] = []
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for text in texts:  # tokenise only as much shuffled text as the windows need (x4 for variety)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if len(ids) >= 4 * samples * seq_len + seq_len:
            break
    if len(ids) <= seq_len:
        raise InputError(f"the calibration text has {len(ids)} tokens, fewer than {param('seq_len', seq_len)}",
                         f"use a shorter {param('seq_len')} or more text")
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(samples)]
    windows = torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.long)
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()}
               for w in windows.split(TEXT_BATCH)]
    return CalibrationBatches(batches, source.name, samples, seq_len, seed, samples * seq_len)


def vlm_calibration(adapter, processor, data: CalibData, seed: int) -> CalibrationBatches:
    """One batch per image-text sample, in the model's prompt format, answer appended."""
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = []
    for item in data.items:
        inputs = dict(adapter.prepare(processor, item.images, item.text if item.is_text else item.prompt))
        if item.answer:
            inputs = _append_answer(inputs, tokenizer, item.answer)
        batches.append(_with_labels(inputs, adapter.image_token_id))
    lengths = [b["input_ids"].shape[1] for b in batches]
    return CalibrationBatches(batches, data.source.name, len(batches), max(lengths), seed, sum(lengths))


def take_samples(batches: list[dict], n: int) -> list[dict]:
    """The first ``n`` samples of ``batches``, one batch each (split along the batch dimension).

    ECoFLaP draws fresh noise per batch, so one sample per batch means one draw
    per sample (and logits of one sequence at a time).
    """
    out: list[dict] = []
    for batch in batches:
        size = batch["input_ids"].shape[0]
        for i in range(size):
            if len(out) == n:
                return out
            out.append({k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v
                        for k, v in batch.items()})
    return out


def build_calibration(adapter, processor, calib: str | Path | None, samples: int, seq_len: int,
                      seed: int) -> CalibrationBatches:
    """Calibration batches for ``adapter``'s model (see the module docstring)."""
    if samples < 1:
        raise InputError(f"{param('samples')} must be at least 1, got {samples}")
    if seq_len < 2:
        raise InputError(f"{param('seq_len')} must be at least 2, got {seq_len}")
    from vlsparse.models.processors import reads_english

    source = prune_source(calib, adapter.is_vlm, real_text=adapter.is_vlm and reads_english(processor))
    if adapter.is_vlm:
        return vlm_calibration(adapter, processor, read_calib(source, samples, seed), seed)
    return text_calibration(getattr(processor, "tokenizer", processor), source, samples, seq_len, seed)


def prune_source(calib: str | Path | None, vlm: bool, real_text: bool = False) -> CalibSource:
    """The ``--calib`` source of a prune, or a one-line ``InputError``: no ``demo:`` names (the default is
    a demo calibration, for the demo model), and image-text samples for a vision-language model (its vision
    tower must run). ``real_text``: the model reads English, so its default is ``pydoc+images``."""
    if is_demo(calib):
        raise InputError(f"prune does not take {param('calib', calib)} (that is for profile and calibrate)",
                         f"drop {param('calib')} for the default calibration, or pass a .jsonl or text file")
    source = parse_calib(calib, vlm=vlm, default_tasks=DEMO_TASKS, real_text=real_text)
    if vlm and source.plain_text:
        what = source.path.name if source.path else source.name
        raise InputError(f"{what} is plain text, but pruning a vision-language model runs its vision tower on images",
                         f"pass a .jsonl of images and prompts, or drop {param('calib')} for the default calibration")
    return source
