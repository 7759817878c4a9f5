"""Calibration inputs for the pattern search: demo scenes, a JSONL file, or plain text.

Sources (``calibration_from``):

- no ``--calib``, a vision-language model: the demo generator's long-context
  tasks (``vlsparse.demo.scenes``), alternating ``multi`` (many labelled scenes)
  and ``grid`` (a large image cut into tiles), with as many images as it takes
  to reach ``seq_len`` tokens in the model's own prompt format. Seeds come from
  a reserved slice of the evaluation split (``CALIB_SEED_BASE + seed + i``).
- ``--calib demo:multi``, ``demo:grid`` (or ``demo:multi+grid``, the default): only those
  demo tasks, for a profile fitted to the prompts it will serve.
- no ``--calib``, a text-only model: windows of CPython's pydoc topics
  (the calibration part of ``vlsparse.perplexity.pydoc_text``).
- ``--calib FILE.jsonl``: image-text entries used as given, or plain text
  (the format of ``vlsparse.calib_file``).
- ``--calib FILE.txt`` or a folder of ``*.txt`` files: plain text, cut into
  ``samples`` windows of ``seq_len`` tokens at seeded random offsets.

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

from vlsparse.calib_file import read_text_file
from vlsparse.errors import InputError

CALIB_SEED_OFFSET = 500_000_000
"""Calibration seeds sit this far into the demo generator's evaluation split."""
DEMO_TASKS = ("multi", "grid")


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


def demo_calibration(loaded, samples: int, seq_len: int, seed: int,
                     tasks: tuple[str, ...] = DEMO_TASKS) -> CalibrationSet:
    """Demo scenes sized to about ``seq_len`` tokens in ``loaded``'s prompt format (VLMs only),
    sample i from ``tasks[i % len(tasks)]``."""
    from vlsparse.demo import scenes

    per_image, overhead = _image_cost(loaded)
    n_images = max(1, math.ceil((seq_len - overhead) / max(per_image, 1)))
    base = scenes.EVAL_SEED_BASE + CALIB_SEED_OFFSET + seed
    out = []
    for i in range(samples):
        task = tasks[i % len(tasks)]
        rng = scenes.sample_rng(task, base + i)
        if task == "grid":
            item = scenes.sample("grid", rng, grid=grid_shape(n_images))
        else:
            item = scenes.sample("multi", rng, n_images=n_images)
        images, labels = item.model_images()
        out.append(CalibSample(name=f"demo-{task}-{base + i}", images=images, prompt=item.question, labels=labels))
    return CalibrationSet(source=f"demo:{'+'.join(tasks)}", samples=out, seq_len=seq_len, seed=seed)


def demo_tasks(calib: str) -> tuple[str, ...]:
    """``demo:multi+grid`` -> ("multi", "grid"); a one-line ``InputError`` for unknown tasks."""
    tasks = tuple(t for t in calib.split(":", 1)[1].split("+") if t)
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if not tasks or unknown:
        raise InputError(f"unknown demo calibration {calib!r}",
                         f"use demo: followed by {' or '.join(DEMO_TASKS)} joined with +, e.g. demo:multi")
    return tasks


def grid_shape(cells: int) -> tuple[int, int]:
    """(rows, cols) with rows <= cols <= about 4 x rows and the fewest cells >= ``cells`` (squarer on ties)."""
    root = max(1, math.isqrt(cells))
    shapes = [(r, -(-cells // r)) for r in range(max(1, (root + 1) // 2), root + 1)]
    return min(shapes, key=lambda rc: (rc[0] * rc[1], -rc[0]))


def _image_cost(loaded) -> tuple[int, int]:
    """(tokens per demo image, tokens of the rest of the prompt) in ``loaded``'s format."""
    from vlsparse.demo import scenes

    item = scenes.sample("multi", scenes.sample_rng("multi", scenes.EVAL_SEED_BASE + CALIB_SEED_OFFSET), n_images=3)
    images, labels = item.model_images()
    two = prepare_sample(loaded, CalibSample("probe", images[:2], item.question, labels=labels[:2]))
    three = prepare_sample(loaded, CalibSample("probe", images, item.question, labels=labels))
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


def jsonl_calibration(loaded, path: Path, samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """The first ``samples`` entries of a JSONL file (format: ``vlsparse.calib_file``)."""
    from vlsparse.calib_file import read_entries
    from vlsparse.images import load_image

    out: list[CalibSample] = []
    for entry in read_entries(path, samples):
        if entry.is_text:
            out.append(text_calibration(loaded, entry.text, entry.where, 1, seq_len, seed).samples[0])
            continue
        if entry.images and not loaded.adapter.is_vlm:
            raise InputError(f"{entry.where} has images but {loaded.name} is a text-only model",
                             "use text lines, or a vision-language model")
        out.append(CalibSample(name=entry.where, images=[load_image(p) for p in entry.images], prompt=entry.prompt))
    return CalibrationSet(source=f"jsonl:{path.name}", samples=out, seq_len=seq_len, seed=seed)


def calibration_from(loaded, calib: str | Path | None = None, samples: int = 4, seq_len: int = 4096,
                     seed: int = 0) -> CalibrationSet:
    """Pick and build the calibration set for ``loaded`` (see the module docstring)."""
    if samples < 1:
        raise InputError(f"--samples must be at least 1, got {samples}", "pass --samples 1 or more")
    if seq_len < 128:
        raise InputError(f"--seq-len must be at least 128 tokens, got {seq_len}", "pass e.g. --seq-len 4096")
    from vlsparse.memory import check_sequence_fits

    check_sequence_fits(loaded, seq_len)
    if calib is None:
        if loaded.adapter.is_vlm:
            return demo_calibration(loaded, samples, seq_len, seed)
        from vlsparse.perplexity import pydoc_text

        return text_calibration(loaded, pydoc_text("calib"), "pydoc", samples, seq_len, seed)
    if str(calib).startswith("demo:"):
        tasks = demo_tasks(str(calib))
        if not loaded.adapter.is_vlm:
            raise InputError(f"--calib {calib} needs a vision-language model", "drop --calib for text models")
        return demo_calibration(loaded, samples, seq_len, seed, tasks)
    path = Path(calib)
    if not path.exists():
        raise InputError(f"calibration file {path} not found", "pass a .jsonl, a .txt file or a folder of .txt files")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise InputError(f"calibration folder {path} has no .txt files", "put plain-text files in it")
        text = "\n\n".join(read_text_file(f) for f in files)
        return text_calibration(loaded, text, f"text:{path.name}", samples, seq_len, seed)
    if path.suffix == ".jsonl":
        return jsonl_calibration(loaded, path, samples, seq_len, seed)
    return text_calibration(loaded, read_text_file(path), f"text:{path.name}", samples, seq_len, seed)


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
