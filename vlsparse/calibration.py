"""The ``--calib`` option, read one way by every command: which source, and what it holds.

Sources (``parse_calib``), with the source string a profile records:

- none: for a vision-language model whose tokenizer reads English (``real_text``), real
  text with images (``pydoc+images``, below); for one that does not (the demo model's
  closed vocabulary), demo scenes of the command's default tasks (``prune``: ``demo:vqa``;
  ``profile`` and ``calibrate``: ``demo:multi+grid``); for a text-only model, CPython's
  pydoc topics (``pydoc``: the calibration part of ``vlsparse.perplexity.pydoc_text``,
  disjoint from its held-out text);
- ``pydoc+images``: sample ``i`` holds ``IMAGE_COUNTS[i % 3]`` demo scenes drawn at
  ``IMAGE_SIDES[(i // 3) % 3]`` px (so a processor that resizes or tiles by resolution shows
  its small, middle and large layouts), then consecutive pydoc calibration paragraphs from a
  seeded start as the prompt, the next paragraph as the answer: the model's language layers
  see real English, not the demo's synthetic vocabulary;
- ``demo:TASK`` or ``demo:TASK+TASK``: demo scenes (``vlsparse.demo.scenes``) of the
  tasks the command takes (``demo:multi+grid``; vision-language models only);
- ``FILE.jsonl``: image-text entries (an optional ``answer``) or text entries, in the
  format of ``vlsparse.calib_file`` (``jsonl:FILE.jsonl``);
- any other file: plain UTF-8 text (``text:FILE``); a folder: its ``*.txt`` files,
  joined by blank lines (``text:FOLDER``).

Paths are recorded by name only. ``read_calib`` reads a source into ``CalibData``:
samples as given (demo scenes, JSONL entries: ``CalibItem``), or one plain text.
Demo sample ``i`` of task ``t`` is drawn from ``scenes.sample_rng(t, base + seed + i)``
with ``base`` from ``DEMO_SEED_BASES``: ``vqa`` from the training split (the
distribution the demo model learnt, answers included), ``multi`` and ``grid`` from a
reserved slice of the evaluation split.

What a command makes of the samples is its own: token batches with labels for
pruning (``vlsparse.compress.calibration``), prompts sized to ``seq_len`` and
text windows for the pattern search and core calibration (``vlsparse.search.calibration``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from vlsparse.errors import InputError, param

DEMO_SEED_BASES = {"vqa": ("train", 900_000_000), "multi": ("eval", 500_000_000), "grid": ("eval", 500_000_000)}
"""Demo task -> (split, offset into it) of its calibration seeds, far from the seeds training and
evaluation use most."""

NOT_FOUND_HINT = "pass a .jsonl, a .txt file or a folder of .txt files"
TEXT_AND_IMAGES = "pydoc+images"
IMAGE_SIDES = (224, 448, 896)
"""Sides in px of the images of ``pydoc+images``, in turn (see the module docstring)."""
IMAGE_COUNTS = (1, 2, 3)
TEXT_CHARS = 2400
"""Characters of pydoc text per ``pydoc+images`` prompt (about 600 tokens), unless a command asks for more."""


@dataclass(frozen=True)
class CalibSource:
    """A parsed ``--calib`` for one model: what to read, and the string the profile records."""

    kind: str  # "demo", "mixed" (pydoc+images), "pydoc", "jsonl", "file" (plain text) or "folder" (of .txt files)
    name: str
    path: Path | None = None
    tasks: tuple[str, ...] = ()
    vlm: bool = True

    @property
    def plain_text(self) -> bool:
        """The source is one plain text (pydoc, a file, a folder), not samples."""
        return self.kind in ("pydoc", "file", "folder")


@dataclass
class CalibItem:
    """One sample as the source gives it: images + prompt (+ answer, + a label per image), or plain text."""

    name: str
    images: list = field(default_factory=list)
    prompt: str = ""
    answer: str = ""
    labels: list[str] = field(default_factory=list)
    text: str = ""

    @property
    def is_text(self) -> bool:
        return not self.images and not self.prompt


@dataclass
class CalibData:
    """What a source holds: ``items`` (demo scenes, JSONL entries), or one plain ``text``."""

    source: CalibSource
    items: list[CalibItem] = field(default_factory=list)
    text: str | None = None


def is_demo(calib: str | Path | None) -> bool:
    return calib is not None and str(calib).startswith("demo:")


def parse_calib(calib: str | Path | None, *, vlm: bool, default_tasks: tuple[str, ...],
                demo_tasks: tuple[str, ...] = (), real_text: bool = False) -> CalibSource:
    """The source ``calib`` names for a model (``vlm``: it reads images), or a one-line ``InputError``.

    ``default_tasks``: the demo tasks used without ``calib`` by a vision-language model that does not
    read English (``real_text`` False: the demo model); one that does gets ``pydoc+images``;
    ``demo_tasks``: the ones ``calib`` may name as ``demo:...``.
    """
    if calib is None:
        if vlm and real_text:
            return CalibSource("mixed", TEXT_AND_IMAGES)
        if vlm:
            return CalibSource("demo", f"demo:{'+'.join(default_tasks)}", tasks=tuple(default_tasks))
        return CalibSource("pydoc", "pydoc", vlm=False)
    if str(calib) == TEXT_AND_IMAGES:
        if not vlm:
            raise InputError(f"{param('calib', TEXT_AND_IMAGES)} needs a vision-language model",
                             f"drop {param('calib')}: text models calibrate on pydoc text")
        return CalibSource("mixed", TEXT_AND_IMAGES)
    if is_demo(calib):
        tasks = tuple(t for t in str(calib).split(":", 1)[1].split("+") if t)
        if not tasks or any(t not in demo_tasks for t in tasks):
            raise InputError(f"unknown demo calibration {str(calib)!r}",
                             f"use demo: followed by {' or '.join(demo_tasks)} joined with +, e.g. demo:{demo_tasks[0]}"
                             if demo_tasks else f"pass a .jsonl or a text file as {param('calib')}")
        if not vlm:
            raise InputError(f"{param('calib', calib)} needs a vision-language model",
                             f"drop {param('calib')} for text models")
        return CalibSource("demo", f"demo:{'+'.join(tasks)}", tasks=tasks)
    path = Path(calib)
    if not path.exists():
        raise InputError(f"calibration file {path} not found", NOT_FOUND_HINT)
    if path.is_dir():
        if not any(path.glob("*.txt")):
            raise InputError(f"calibration folder {path} has no .txt files", "put plain-text files in it")
        return CalibSource("folder", f"text:{path.name}", path, vlm=vlm)
    if path.suffix == ".jsonl":
        return CalibSource("jsonl", f"jsonl:{path.name}", path, vlm=vlm)
    return CalibSource("file", f"text:{path.name}", path, vlm=vlm)


def read_calib(source: CalibSource, samples: int | None = None, seed: int = 0, n_images: int = 1,
               text_chars: int = TEXT_CHARS) -> CalibData:
    """What ``source`` holds: ``samples`` demo scenes (``n_images`` images or grid cells each, for
    ``multi`` and ``grid``), ``samples`` pydoc+images prompts (``text_chars`` characters of text each),
    the first ``samples`` JSONL entries (all if None), or the plain text."""
    if source.kind in ("demo", "mixed") and samples is None:
        raise ValueError(f"{source.name} calibration needs a number of samples")
    if source.kind == "demo":
        return CalibData(source, demo_items(source.tasks, samples, seed, n_images))
    if source.kind == "mixed":
        return CalibData(source, text_image_items(samples, seed, text_chars))
    if source.kind == "jsonl":
        return CalibData(source, jsonl_items(source.path, samples, source.vlm))
    return CalibData(source, text=read_text(source))


def read_text(source: CalibSource) -> str:
    """The text of a plain-text source."""
    from vlsparse.calib_file import read_text_file

    if source.kind == "pydoc":
        from vlsparse.perplexity import pydoc_text

        return pydoc_text("calib")
    if source.kind == "folder":
        return "\n\n".join(read_text_file(f) for f in sorted(source.path.glob("*.txt")))
    if source.kind == "file":
        return read_text_file(source.path)
    raise ValueError(f"{source.name} is not plain text")


def jsonl_items(path: Path, limit: int | None, vlm: bool = True) -> list[CalibItem]:
    """The first ``limit`` entries of a calibration JSONL file, images loaded (a text-only model
    takes no image entries)."""
    from vlsparse.calib_file import read_entries
    from vlsparse.images import load_image

    entries = read_entries(path, limit)
    bad = next((e for e in entries if e.images and not vlm), None)
    if bad is not None:
        raise InputError(f"{bad.where} has images, which a text-only model cannot read",
                         "use text lines, or a vision-language model")
    return [CalibItem(e.where, [load_image(p) for p in e.images], e.prompt, e.answer, text=e.text) for e in entries]


def text_image_items(samples: int, seed: int, text_chars: int = TEXT_CHARS) -> list[CalibItem]:
    """``samples`` pydoc+images prompts (see the module docstring)."""
    import random

    from PIL import Image

    from vlsparse.demo import scenes
    from vlsparse.perplexity import pydoc_text

    paragraphs = pydoc_text("calib").split("\n\n")
    out = []
    for i in range(samples):
        number = demo_seed_base("vqa") + seed + i
        rng = random.Random(f"{TEXT_AND_IMAGES}:{number}")
        side = IMAGE_SIDES[(i // len(IMAGE_COUNTS)) % len(IMAGE_SIDES)]
        images = [scenes.sample("vqa", scenes.sample_rng("vqa", number * 8 + j)).model_images()[0][0]
                  .resize((side, side), Image.BICUBIC) for j in range(IMAGE_COUNTS[i % len(IMAGE_COUNTS)])]
        at = rng.randrange(len(paragraphs))
        text: list[str] = []
        while sum(len(p) + 2 for p in text) < text_chars:
            text.append(paragraphs[at % len(paragraphs)])
            at += 1
        out.append(CalibItem(f"{TEXT_AND_IMAGES}-{number}", images, "\n\n".join(text),
                             paragraphs[at % len(paragraphs)][:400]))
    return out


def demo_seed_base(task: str) -> int:
    from vlsparse.demo import scenes

    split, offset = DEMO_SEED_BASES[task]
    return (scenes.TRAIN_SEED_BASE if split == "train" else scenes.EVAL_SEED_BASE) + offset


def demo_items(tasks: tuple[str, ...], samples: int, seed: int, n_images: int = 1) -> list[CalibItem]:
    """``samples`` demo scenes, sample ``i`` of ``tasks[i % len(tasks)]``; ``multi`` shows ``n_images``
    scenes, ``grid`` a grid of at least ``n_images`` cells."""
    from vlsparse.demo import scenes

    out = []
    for i in range(samples):
        task = tasks[i % len(tasks)]
        number = demo_seed_base(task) + seed + i
        rng = scenes.sample_rng(task, number)
        if task == "grid":
            item = scenes.sample("grid", rng, grid=grid_shape(n_images))
        elif task in scenes.MULTI_TASKS:
            item = scenes.sample(task, rng, n_images=n_images)
        else:
            item = scenes.sample(task, rng)
        images, labels = item.model_images()
        out.append(CalibItem(f"demo-{task}-{number}", images, item.question, item.answer, labels))
    return out


def grid_shape(cells: int) -> tuple[int, int]:
    """(rows, cols) with rows <= cols <= about 4 x rows and the fewest cells >= ``cells`` (squarer on ties)."""
    root = max(1, math.isqrt(cells))
    shapes = [(r, -(-cells // r)) for r in range(max(1, (root + 1) // 2), root + 1)]
    return min(shapes, key=lambda rc: (rc[0] * rc[1], -rc[0]))
