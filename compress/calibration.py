"""Calibration batches for pruning: image-text pairs for VLMs, text windows for LMs.

Sources (``--calib``):

- none, VLM: the demo scene generator (``vlsparse.demo.scenes``, task ``vqa``,
  training split, seeds offset by ``CALIB_SEED_OFFSET`` so they differ from the
  samples the demo model saw most); each sample is the model's own prompt for the
  image and question, followed by the answer.
- none, LM: random ``--seq-len`` token windows of English text that ships with
  CPython (the calibration split of ``pydoc_data.topics`` from
  ``vlsparse.perplexity``, disjoint from its held-out evaluation text).
- a JSONL file (the format of ``vlsparse.calib_file``): image-text entries, with
  an optional ``answer``, for VLMs; ``{"text": ...}`` / ``{"text_file": ...}`` for LMs.

Every batch carries ``labels`` (= ``input_ids`` with image and padding tokens
set to -100) so the same batches serve ECoFLaP's loss and Wanda's statistics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsparse.errors import InputError

CALIB_SEED_OFFSET = 900_000_000  # inside the training split, far from the first training seeds
TEXT_BATCH = 8


@dataclass
class CalibrationSet:
    """Batches of model inputs plus what produced them (recorded in the profile)."""

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
    return out


def _pairs_from_demo(samples: int, seed: int) -> list[tuple[list, str, str]]:
    from vlsparse.demo.scenes import TRAIN_SEED_BASE, generate

    return [(s.images, s.question, s.answer) for s in generate("vqa", samples, TRAIN_SEED_BASE + CALIB_SEED_OFFSET + seed)]


def _pairs_from_jsonl(path: Path, samples: int) -> list[tuple[list, str, str]]:
    """Image-text pairs; a text entry becomes a prompt without images."""
    from vlsparse.calib_file import read_entries
    from vlsparse.images import load_image

    return [([load_image(p) for p in e.images], e.text if e.is_text else e.prompt, e.answer)
            for e in read_entries(path, samples)]


def _texts(calib: Path | None) -> tuple[list[str], str]:
    if calib is None:  # the calibration part only: vlsparse.perplexity holds the rest out for evaluation
        from vlsparse.perplexity import pydoc_text

        return pydoc_text("calib").split("\n\n"), "text:pydoc_data.topics(calib split)"
    from vlsparse.calib_file import read_entries

    entries = read_entries(calib)
    bad = next((e for e in entries if not e.is_text), None)
    if bad is not None:
        raise InputError(f"{bad.where}: a text model's calibration needs \"text\" or \"text_file\" lines",
                         'write lines like {"text": "Some English prose ..."}')
    return [e.text for e in entries], f"jsonl:{calib}"


def text_calibration(tokenizer, calib: Path | None, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """``samples`` random windows of ``seq_len`` tokens (Wanda's C4 recipe on local text)."""
    texts, source = _texts(calib)
    rng = random.Random(seed)
    rng.shuffle(texts)
    ids: list[int] = []
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for text in texts:  # tokenise only as much shuffled text as the windows need (x4 for variety)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if len(ids) >= 4 * samples * seq_len + seq_len:
            break
    if len(ids) <= seq_len:
        raise InputError(f"the calibration text has {len(ids)} tokens, fewer than --seq-len {seq_len}",
                         "use a shorter --seq-len or more text")
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(samples)]
    windows = torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.long)
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()}
               for w in windows.split(TEXT_BATCH)]
    return CalibrationSet(batches, source, samples, seq_len, seed, samples * seq_len)


def vlm_calibration(adapter, processor, calib: Path | None, samples: int, seed: int) -> CalibrationSet:
    """One batch per image-text pair, in the model's prompt format, answer appended."""
    pairs = _pairs_from_demo(samples, seed) if calib is None else _pairs_from_jsonl(calib, samples)
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = []
    for images, question, answer in pairs:
        inputs = dict(adapter.prepare(processor, images, question))
        if answer:
            inputs = _append_answer(inputs, tokenizer, answer)
        batches.append(_with_labels(inputs, adapter.image_token_id))
    lengths = [b["input_ids"].shape[1] for b in batches]
    source = "demo:vqa" if calib is None else f"jsonl:{calib}"
    return CalibrationSet(batches, source, len(batches), max(lengths), seed, sum(lengths))


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
                      seed: int) -> CalibrationSet:
    """Calibration batches for ``adapter``'s family (see the module docstring)."""
    if samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    if calib is not None and str(calib).startswith("demo:"):
        raise InputError(f"prune does not take --calib {calib} (that is for profile and calibrate)",
                         "drop --calib to prune on demo scenes, or pass a .jsonl or text file")
    path = Path(calib) if calib is not None else None
    if adapter.is_vlm:
        return vlm_calibration(adapter, processor, path, samples, seed)
    return text_calibration(getattr(processor, "tokenizer", processor), path, samples, seq_len, seed)
