"""Procedural scenes with known answers: the demo model's training data and benchmark.

A *scene* is a 64x64 RGB image holding 1-6 flat shapes on a dark background, each
in its own cell of a 3x3 layout. Within a scene every shape kind and every colour
occurs at most once, so each question below has exactly one right answer:

    qtype     question                           answer (one word, one token)
    color     What color is the circle?          red | green | blue | yellow | purple | orange
    shape     What shape is red?                 circle | square | triangle | star | cross | diamond
    count     How many shapes are there?         one ... six
    position  Where is the triangle?             topleft top topright left center right
                                                 bottomleft bottom bottomright
    exist     Is there a blue square?            yes | no   (half of them "no", with the
                                                 colour or the shape present elsewhere)

Tasks (``Sample.task``):

- ``vqa``   one scene, one question.
- ``multi`` several scenes in one prompt (each labelled "image k :"); the question names
  one of them: "In image 7, what color is the square?". Any ``n_images`` works; the
  default, 28-32 scenes, is 4,100-4,700 prompt tokens for the demo model (144 image
  tokens per scene + 3 label tokens).
- ``grid``  one large image of ``rows x cols`` cells of 64 px, one shape per cell:
  "In row 2, column 3, what color is the shape?". The model sees it the way
  LLaVA-NeXT's "anyres" sees a large image: cut into base-size tiles (``tile_grid``),
  each tile encoded as one image and labelled "row r column c :" in the prompt
  (the vision tower's position embeddings are fixed at its input size, so the big
  image is never resized into one). The default 6x6 grid is ~5,400 prompt tokens for
  the demo model (36 tiles x (144 + 5)).

Everything is a pure function of a ``random.Random``; ``generate(task, n, seed)``
derives sample ``i``'s generator from the string ``f"{task}:{seed + i}"``, so a
sample depends only on its task and seed. Training seeds lie in
``TRAIN_SEEDS = [TRAIN_SEED_BASE, EVAL_SEED_BASE)`` and evaluation seeds in
``EVAL_SEEDS = [EVAL_SEED_BASE, EVAL_SEED_BASE + SEED_SPAN)``: disjoint by
construction, and ``generate`` refuses a seed range that straddles them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image

from vlsparse.demo.drawing import (BACKGROUND, COLOR_JITTER, COLORS, IMAGE_SIZE, POSITIONS, SHAPES,  # noqa: F401
                                   Shape, draw_shape, jitter_rgb, render, shape_polygon, tile_grid)

COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
MAX_SHAPES = 6

QTYPES = ("color", "shape", "count", "position", "exist")
GRID_QTYPES = ("color", "shape", "exist")
TASKS = ("vqa", "multi", "grid", "long")
MULTI_TASKS = ("multi", "long")
"""Tasks whose prompt is many labelled scenes ("image k :")."""

ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": tuple(p for row in POSITIONS for p in row),
    "exist": ("yes", "no"),
}
"""Every possible answer per question type; chance level is ``1 / len(ANSWERS[qtype])``."""

MULTI_IMAGES = (28, 32)
"""Default number of scenes in a ``multi`` sample (inclusive range): >= 4,096 prompt tokens
for the demo model. Pass ``n_images`` for other lengths (e.g. 8-16 for short contexts)."""
LONG_IMAGES = (56, 60)
"""Scenes in a ``long`` sample: ``multi`` at about 8,300-8,900 prompt tokens, where prefill
attention is most of the demo model's prefill time (the sparse runtime's test)."""
GRID_SIDES = (6, 6)
"""Default rows and columns of a ``grid`` sample (each drawn from this inclusive range):
a 6x6 grid is >= 4,096 prompt tokens for the demo model."""

SEED_SPAN = 10**9
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = TRAIN_SEED_BASE + SEED_SPAN
TRAIN_SEEDS = range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + SEED_SPAN)
EVAL_SEEDS = range(EVAL_SEED_BASE, EVAL_SEED_BASE + SEED_SPAN)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str


@dataclass
class Sample:
    """One benchmark item.

    ``images`` is what a user would pass: one scene (vqa), the scenes in order
    (multi), or the single large grid image (grid; see ``model_images``).
    ``scenes[i]`` lists the shapes drawn in image (or grid cell, row-major) ``i``.
    ``followups`` holds further questions about the same images (training uses
    them as extra conversation turns; evaluation ignores them).
    """

    images: list[Image.Image]
    question: str
    answer: str
    qtype: str
    task: str
    scenes: list[list[Shape]] = field(default_factory=list)
    grid: tuple[int, int] | None = None
    followups: list[QA] = field(default_factory=list)
    seed: int | None = None

    def model_images(self) -> tuple[list[Image.Image], list[str]]:
        """Images as the model receives them, with the text label of each.

        vqa: the scene, no label. multi: the scenes, labelled "image k :".
        grid: base-size tiles of the grid in row-major order, labelled "row r column c :".
        """
        if self.task == "grid":
            rows, cols = self.grid
            tiles = tile_grid(self.images[0], rows, cols)
            labels = [f"row {r + 1} column {c + 1} :" for r in range(rows) for c in range(cols)]
            return tiles, labels
        if self.task in MULTI_TASKS:
            return list(self.images), [f"image {k + 1} :" for k in range(len(self.images))]
        return list(self.images), [""] * len(self.images)


# ---------------------------------------------------------------- scenes


def random_scene(
    rng: random.Random, n_shapes: int | None = None, size: int = IMAGE_SIZE, max_shapes: int = MAX_SHAPES
) -> list[Shape]:
    """1-``max_shapes`` (default 6) shapes, distinct kinds, distinct colours, distinct 3x3 cells.

    Cell centres sit at (c + 0.5) * size / 3, jittered by +-2 px (at 64 px);
    radii 6-8 px, so shapes never cover another's centre.
    """
    n = n_shapes if n_shapes is not None else rng.randint(1, max_shapes)
    kinds = rng.sample(SHAPES, n)
    colors = rng.sample(list(COLORS), n)
    cells = rng.sample(range(9), n)
    unit, scale = size / 3, size / IMAGE_SIZE
    shapes = []
    for kind, color, cell in zip(kinds, colors, cells):
        row, col = divmod(cell, 3)
        cx = (col + 0.5) * unit + rng.uniform(-2, 2) * scale
        cy = (row + 0.5) * unit + rng.uniform(-2, 2) * scale
        shapes.append(Shape(kind, color, jitter_rgb(rng, color), row, col, cx, cy, rng.uniform(6, 8) * scale))
    return shapes


def random_cell(rng: random.Random, size: int = IMAGE_SIZE) -> Shape:
    """One larger shape (radius 11-17 px at 64 px) near the centre of a grid cell."""
    scale = size / IMAGE_SIZE
    color = rng.choice(list(COLORS))
    cx = size / 2 + rng.uniform(-5, 5) * scale
    cy = size / 2 + rng.uniform(-5, 5) * scale
    return Shape(rng.choice(SHAPES), color, jitter_rgb(rng, color), 1, 1, cx, cy, rng.uniform(11, 17) * scale)


# ---------------------------------------------------------------- questions


def ask_scene(rng: random.Random, shapes: list[Shape], qtype: str | None = None) -> QA:
    """One question about a scene (uniform question type unless given)."""
    qtype = qtype or rng.choice(QTYPES)
    if qtype == "color":
        s = rng.choice(shapes)
        return QA(f"What color is the {s.kind}?", s.color, qtype)
    if qtype == "shape":
        s = rng.choice(shapes)
        return QA(f"What shape is {s.color}?", s.kind, qtype)
    if qtype == "count":
        return QA("How many shapes are there?", COUNT_WORDS[len(shapes) - 1], qtype)
    if qtype == "position":
        s = rng.choice(shapes)
        return QA(f"Where is the {s.kind}?", s.position, qtype)
    if qtype == "exist":
        color, kind = exist_query(rng, shapes)
        present = any(s.color == color and s.kind == kind for s in shapes)
        return QA(f"Is there a {color} {kind}?", "yes" if present else "no", qtype)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def exist_query(rng: random.Random, shapes: list[Shape]) -> tuple[str, str]:
    """A (colour, kind) pair: present half of the time; otherwise a hard negative
    that swaps in a colour or kind seen elsewhere in the scene when possible."""
    s = rng.choice(shapes)
    if rng.random() < 0.5:
        return s.color, s.kind
    other_colors = [t.color for t in shapes if t is not s] or [c for c in COLORS if c != s.color]
    other_kinds = [t.kind for t in shapes if t is not s] or [k for k in SHAPES if k != s.kind]
    if rng.random() < 0.5:
        return rng.choice(other_colors), s.kind
    return s.color, rng.choice(other_kinds)


def ask_cell(rng: random.Random, shape: Shape, qtype: str | None = None) -> QA:
    """A question about the single shape of a grid cell (without the cell reference)."""
    qtype = qtype or rng.choice(GRID_QTYPES)
    if qtype == "color":
        return QA("what color is the shape?", shape.color, qtype)
    if qtype == "shape":
        return QA("what shape is there?", shape.kind, qtype)
    if qtype == "exist":
        if rng.random() < 0.5:
            color, kind = shape.color, shape.kind
        elif rng.random() < 0.5:
            color, kind = rng.choice([c for c in COLORS if c != shape.color]), shape.kind
        else:
            color, kind = shape.color, rng.choice([k for k in SHAPES if k != shape.kind])
        return QA(f"is there a {color} {kind}?", "yes" if (color, kind) == (shape.color, shape.kind) else "no", qtype)
    raise ValueError(f"unknown grid question type {qtype!r}; expected one of {GRID_QTYPES}")


def describe(shapes: list[Shape]) -> QA:
    """A caption listing every shape in reading order: "topleft red circle , center blue star".

    Not a benchmark question: training uses it as a dense auxiliary answer (every colour,
    kind and position of the scene is a supervised token).
    """
    ordered = sorted(shapes, key=lambda s: (s.row, s.col))
    text = " , ".join(f"{s.position} {s.color} {s.kind}" for s in ordered)
    return QA("Describe this picture.", text, "caption")


def list_by_kind(shapes: list[Shape]) -> QA:
    """Every shape in a fixed order of kinds, each with its colour and position:
    "circle yellow bottomleft , square blue top".

    Not a benchmark question: the counterpart of ``describe`` for training, where each
    colour and position has to be found from the kind named just before it.
    """
    ordered = sorted(shapes, key=lambda s: SHAPES.index(s.kind))
    text = " , ".join(f"{s.kind} {s.color} {s.position}" for s in ordered)
    return QA("Which shapes are there?", text, "caption")


def lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


# ---------------------------------------------------------------- samples


def sample(
    task: str,
    rng: random.Random,
    *,
    n_images: int | None = None,
    grid: tuple[int, int] | None = None,
    n_questions: int = 1,
    qtype: str | None = None,
    max_shapes: int = MAX_SHAPES,
) -> Sample:
    """Draw one sample of ``task`` from ``rng``.

    ``n_images`` (multi, long) defaults to a uniform draw from ``MULTI_IMAGES`` (``LONG_IMAGES``); ``grid``
    (rows, cols) to draws from ``GRID_SIDES``. ``n_questions`` > 1 adds follow-up
    questions about the same images. ``qtype`` fixes the first question's type.
    ``max_shapes`` < 6 draws simpler scenes (a training curriculum; the benchmark uses 6).
    """
    if task == "vqa":
        shapes = random_scene(rng, max_shapes=max_shapes)
        qas = [ask_scene(rng, shapes, qtype)] + [ask_scene(rng, shapes) for _ in range(n_questions - 1)]
        return _make(task, [render(shapes)], [shapes], qas)
    if task in MULTI_TASKS:
        n = n_images if n_images is not None else rng.randint(*(MULTI_IMAGES if task == "multi" else LONG_IMAGES))
        scenes = [random_scene(rng, max_shapes=max_shapes) for _ in range(n)]
        qas = []
        for i in range(n_questions):
            k = rng.randrange(n)
            qa = ask_scene(rng, scenes[k], qtype if i == 0 else None)
            qas.append(QA(f"In image {k + 1}, {lower_first(qa.question)}", qa.answer, qa.qtype))
        return _make(task, [render(s) for s in scenes], scenes, qas)
    if task == "grid":
        rows, cols = grid if grid is not None else (rng.randint(*GRID_SIDES), rng.randint(*GRID_SIDES))
        cells = [random_cell(rng) for _ in range(rows * cols)]
        big = Image.new("RGB", (cols * IMAGE_SIZE, rows * IMAGE_SIZE), BACKGROUND)
        for i, cell in enumerate(cells):
            r, c = divmod(i, cols)
            big.paste(render([cell]), (c * IMAGE_SIZE, r * IMAGE_SIZE))
        qas = []
        for i in range(n_questions):
            k = rng.randrange(rows * cols)
            qa = ask_cell(rng, cells[k], qtype if i == 0 else None)
            r, c = divmod(k, cols)
            qas.append(QA(f"In row {r + 1}, column {c + 1}, {qa.question}", qa.answer, qa.qtype))
        out = _make(task, [big], [[cell] for cell in cells], qas)
        out.grid = (rows, cols)
        return out
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _make(task: str, images: list[Image.Image], scenes: list[list[Shape]], qas: list[QA]) -> Sample:
    first = qas[0]
    return Sample(images, first.question, first.answer, first.qtype, task, scenes, followups=qas[1:])


def sample_rng(task: str, seed: int) -> random.Random:
    """The generator behind sample ``seed`` of ``task`` (string seeding is stable across runs)."""
    return random.Random(f"{task}:{seed}")


def generate(task: str, n: int, seed: int, **kwargs) -> list[Sample]:
    """``n`` samples with seeds ``seed .. seed + n - 1``, all inside one split.

    Use ``TRAIN_SEED_BASE + k`` for training and ``EVAL_SEED_BASE + k`` for evaluation.
    Keyword arguments go to ``sample``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    last = seed + max(n, 1) - 1
    if not any(seed in split and last in split for split in (TRAIN_SEEDS, EVAL_SEEDS)):
        raise ValueError(
            f"seeds {seed}..{last} are not inside one split; use TRAIN_SEED_BASE ({TRAIN_SEED_BASE}) + k "
            f"or EVAL_SEED_BASE ({EVAL_SEED_BASE}) + k with k + n <= {SEED_SPAN}"
        )
    out = []
    for i in range(n):
        s = sample(task, sample_rng(task, seed + i), **kwargs)
        s.seed = seed + i
        out.append(s)
    return out


def split_of(seed: int) -> str:
    """'train' or 'eval' for a sample seed."""
    if seed in TRAIN_SEEDS:
        return "train"
    if seed in EVAL_SEEDS:
        return "eval"
    raise ValueError(f"seed {seed} is outside both splits")
