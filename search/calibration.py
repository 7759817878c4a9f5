"""Calibration inputs for the pattern search and core calibration, on top of the ``--calib`` reader.

``vlsparse.calibration`` parses ``--calib`` and reads the source; here its samples become
model inputs (``calibration_from``):

- real text with images (``pydoc+images``, the default for a vision-language model whose
  tokenizer reads English): each sample's images, then as much pydoc text as reaches
  ``seq_len`` tokens;
- demo scenes (the default for the demo model, whose vocabulary is closed: ``demo:multi+grid``, sample
  i of ``multi`` / ``grid`` alternately; ``demo:multi`` or ``demo:grid`` for one kind),
  with as many images (grid cells) as it takes to reach ``seq_len`` tokens in the
  model's own prompt format, each image after its label (a few images, and a short
  prompt, where images enter through cross-attention: Mllama);
- JSONL entries used as given (a text entry becomes one window of its text);
- plain text (pydoc for a text-only model, a ``.txt`` file, a folder of them): ``samples``
  windows of ``seq_len`` tokens at seeded random, distinct offsets.

Plain text is tokenised without a chat template; each window starts with the
tokenizer's BOS token when it has one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlsparse.calibration import demo_items, parse_calib, read_calib
from vlsparse.errors import InputError, param

DEMO_TASKS = ("multi", "grid")
"""The demo tasks ``--calib demo:...`` may name; without ``--calib``, all of them."""


@dataclass
class CalibSample:
    """One calibration input: images + prompt (chat format), or token ids of plain text."""

    name: str
    images: list = field(default_factory=list)
    prompt: str = ""
    input_ids: torch.Tensor | None = None
    labels: list[str] = field(default_factory=list)


@dataclass
class CalibrationSet:
    """Calibration inputs and the description the profile records."""

    source: str
    samples: list[CalibSample]
    seq_len: int
    seed: int


# ----------------------------------------------------------------------------- building


CROSS_ATTENTION_IMAGES = 4
"""Images (grid cells) per demo prompt for a model whose images enter through cross-attention (Mllama):
each adds one marker token, so no count of them reaches ``seq_len`` (thousands would be asked for, each
run through the vision tower); the prompt stays short."""


def demo_images(loaded, seq_len: int) -> int:
    """Images (grid cells) per demo prompt to reach about ``seq_len`` tokens in ``loaded``'s prompt format
    (``CROSS_ATTENTION_IMAGES`` when images are not tokens of the prompt)."""
    if loaded.adapter.is_vlm and not loaded.adapter.image_tokens:
        return CROSS_ATTENTION_IMAGES
    per_image, overhead = _image_cost(loaded)
    return max(1, math.ceil((seq_len - overhead) / max(per_image, 1)))


def _image_cost(loaded) -> tuple[int, int]:
    """(tokens per demo image, tokens of the rest of the prompt) in ``loaded``'s format."""
    item = demo_items(("multi",), 1, 0, n_images=3)[0]
    two = prepare_sample(loaded, CalibSample("probe", item.images[:2], item.prompt, labels=item.labels[:2]))
    three = prepare_sample(loaded, CalibSample("probe", item.images, item.prompt, labels=item.labels))
    n2, n3 = two["input_ids"].shape[1], three["input_ids"].shape[1]
    return n3 - n2, n2 - 2 * (n3 - n2)


def text_calibration(loaded, text: str, source: str, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """``samples`` windows of ``seq_len`` tokens of ``text`` at seeded random, distinct offsets."""
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() == 0:
        raise InputError(f"calibration text {source} is empty", "give a file with some text in it")
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - (1 if bos is not None else 0)
    starts = list(range(0, max(1, ids.numel() - body + 1)))
    rng = random.Random(f"calibration:{seed}")
    chosen = sorted(rng.sample(starts, min(samples, len(starts))))
    out = []
    for start in chosen:
        window = ids[start:start + body]
        if bos is not None:
            window = torch.cat([torch.tensor([bos]), window])
        out.append(CalibSample(name=f"{source}@{start}", input_ids=window))
    return CalibrationSet(source=source, samples=out, seq_len=seq_len, seed=seed)


def calibration_from(loaded, calib: str | Path | None = None, samples: int = 4, seq_len: int = 4096,
                     seed: int = 0) -> CalibrationSet:
    """The calibration set for ``loaded`` from ``calib`` (see the module docstring)."""
    if samples < 1:
        raise InputError(f"{param('samples')} must be at least 1, got {samples}", f"pass {param('samples', 1)} or more")
    if seq_len < 128:
        raise InputError(f"{param('seq_len')} must be at least 128 tokens, got {seq_len}",
                         f"pass e.g. {param('seq_len', 4096)}")
    from vlsparse.memory import check_sequence_fits

    check_sequence_fits(loaded, seq_len, option=param("seq_len"))
    from vlsparse.models.processors import reads_english

    vlm = loaded.adapter.is_vlm
    source = parse_calib(calib, vlm=vlm, default_tasks=DEMO_TASKS, demo_tasks=DEMO_TASKS,
                         real_text=vlm and reads_english(loaded.processor))
    data = read_calib(source, samples, seed, n_images=demo_images(loaded, seq_len) if source.kind == "demo" else 1,
                      text_chars=6 * seq_len)
    if data.text is not None:
        return text_calibration(loaded, data.text, source.name, samples, seq_len, seed)
    out: list[CalibSample] = []
    for item in data.items:
        if source.kind == "mixed":
            out.append(sized_sample(loaded, item, seq_len))
        elif item.is_text:
            out.append(text_calibration(loaded, item.text, item.name, 1, seq_len, seed).samples[0])
        else:
            out.append(CalibSample(name=item.name, images=item.images, prompt=item.prompt, labels=item.labels))
    return CalibrationSet(source=source.name, samples=out, seq_len=seq_len, seed=seed)


def sized_sample(loaded, item, seq_len: int) -> CalibSample:
    """A pydoc+images item as one sample of about ``seq_len`` tokens: its images, then as much of its text as
    the images leave room for (at least 64 tokens)."""
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    image_tokens = int(prepare_sample(loaded, CalibSample("probe", item.images, "."))["input_ids"].shape[1])
    ids = tokenizer(item.prompt, add_special_tokens=False)["input_ids"][: max(64, seq_len - image_tokens)]
    return CalibSample(name=item.name, images=item.images, prompt=tokenizer.decode(ids))


def prepare_sample(loaded, sample: CalibSample) -> dict[str, Any]:
    """Model inputs for one calibration sample (on the model's device).

    Images with ``labels`` ("image 3 :", "row 2 column 1 :") go through the processor's
    chat template with each label before its image, when the processor has a template
    that takes interleaved text and images; otherwise images come first, then the prompt.
    """
    if sample.input_ids is not None:
        ids = sample.input_ids[None].to(loaded.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = _interleaved(loaded, sample) if any(sample.labels) else None
    if inputs is None:
        inputs = loaded.adapter.prepare(loaded.processor, sample.images, sample.prompt)
    return inputs.to(loaded.device) if hasattr(inputs, "to") else inputs


def _interleaved(loaded, sample: CalibSample):
    processor = loaded.processor
    if not getattr(processor, "chat_template", None) or not loaded.adapter.is_vlm:
        return None
    content: list[dict] = []
    for label in sample.labels:
        if label:
            content.append({"type": "text", "text": label})
        content.append({"type": "image"})
    content.append({"type": "text", "text": sample.prompt})
    try:
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        return processor(text=[prompt], images=sample.images, return_tensors="pt")
    except (ValueError, TypeError, KeyError) as exc:  # a template that cannot interleave: images first instead
        del exc
        return None
