"""Demo scenes drawn unlike the training generator, to see how far the demo model's accuracy carries.

``scenes`` draws what the demo model was trained on: 1-6 shapes of radius 6-8 px at the
centres of a 3x3 layout (+-2 px), or one shape of radius 11-17 px near the middle of a grid
cell, on a dark background, with ``drawing.shape_polygon``. A *wild* scene differs in every
one of those:

- one shape whose extent (the side of its bounding square) is 16-40 px (``EXTENT``);
- anywhere in the image: its centre is uniform over the places that keep the shape inside,
  outside the +-2 px square around its cell's layout centre, and at least ``BORDER_MARGIN``
  px from the 3x3 cell borders (so the position answer is unambiguous);
- drawn by ``draw_wild_shape``, its own geometry on PIL primitives (an isosceles triangle of
  height = base, a square filling its box, a 0.6-wide diamond, two crossing bars, a star with
  inner radius 0.4), not by ``shape_polygon``;
- on a white background (``wild``), or on the training background (``wild-dark``) to tell
  the background's share of the errors from the drawing's.

Colours are the named palette with the training jitter (+-12 per channel): the names are the
answers. Questions are ``scenes.ask_scene``'s, minus counting (one shape): colour, shape,
position, exist. ``generate(task, n, seed)`` derives sample ``i`` from the string
``f"wild:{seed + i}"`` for both tasks, so ``wild`` and ``wild-dark`` with one seed ask the same
questions about the same shapes; only the background differs.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

from vlsparse.demo.drawing import BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, Shape, jitter_rgb
from vlsparse.demo.scenes import EVAL_SEEDS, Sample, ask_scene

WHITE = (255, 255, 255)
WILD_TASKS: dict[str, tuple[int, int, int]] = {"wild": WHITE, "wild-dark": BACKGROUND}
"""Task name -> background colour."""
WILD_QTYPES = ("color", "shape", "position", "exist")
EXTENT = (16.0, 40.0)
"""Side of the shape's bounding square in px (uniform), at 64 px."""
BORDER_MARGIN = 3.0
"""Least distance in px from the shape's centre to a 3x3 cell border."""
LAYOUT_JITTER = 2.0
"""The training layout's jitter: centres within this many px of a cell centre (both axes) are refused."""


def wild_polygon(kind: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """Vertices of ``kind`` (not circle, square or cross) in the box of half-side ``half`` around (cx, cy)."""
    if kind == "triangle":  # apex up, base along the bottom of the box
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if kind == "diamond":
        return [(cx, cy - half), (cx + 0.6 * half, cy), (cx, cy + half), (cx - 0.6 * half, cy)]
    if kind == "star":  # five points, apex up, inner radius 0.4 of the outer
        return [(cx + rad * math.sin(math.pi * k / 5), cy - rad * math.cos(math.pi * k / 5))
                for k, rad in ((k, half if k % 2 == 0 else 0.4 * half) for k in range(10))]
    raise ValueError(f"no polygon for {kind!r}; expected triangle, diamond or star")


def draw_wild_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, half: float,
                    rgb: tuple[int, int, int]) -> None:
    """``kind`` filling (most of) the box of half-side ``half`` around (cx, cy); every kind covers its centre."""
    box = [cx - half, cy - half, cx + half, cy + half]
    if kind == "circle":
        draw.ellipse(box, fill=rgb)
    elif kind == "square":
        draw.rectangle(box, fill=rgb)
    elif kind == "cross":  # two bars of width 0.6 * half
        arm = 0.3 * half
        draw.rectangle([cx - half, cy - arm, cx + half, cy + arm], fill=rgb)
        draw.rectangle([cx - arm, cy - half, cx + arm, cy + half], fill=rgb)
    else:
        draw.polygon(wild_polygon(kind, cx, cy, half), fill=rgb)


def wild_centre(rng: random.Random, half: float, size: int = IMAGE_SIZE) -> tuple[float, float]:
    """A centre keeping the shape inside (1 px clear of the edge), off the training layout, clear of cell borders."""
    unit, low, high = size / 3, half + 1, size - 2 - half

    def fine(x: float) -> bool:
        return min(abs(x - unit), abs(x - 2 * unit)) >= BORDER_MARGIN

    for _ in range(1000):
        cx, cy = rng.uniform(low, high), rng.uniform(low, high)
        off_layout = max(abs(cx % unit - unit / 2), abs(cy % unit - unit / 2)) > LAYOUT_JITTER
        if fine(cx) and fine(cy) and off_layout:
            return cx, cy
    raise RuntimeError(f"no centre for a shape of half-side {half} in {size} px")  # not reached for EXTENT


def wild_shape(rng: random.Random, size: int = IMAGE_SIZE) -> Shape:
    """One shape of a wild scene; ``radius`` holds the half-side of its box."""
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    half = rng.uniform(*EXTENT) / 2 * size / IMAGE_SIZE
    cx, cy = wild_centre(rng, half, size)
    unit = size / 3
    return Shape(kind, color, jitter_rgb(rng, color), int(cy // unit), int(cx // unit), cx, cy, half)


def render_wild(shape: Shape, background: tuple[int, int, int], size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw_wild_shape(ImageDraw.Draw(image), shape.kind, shape.cx, shape.cy, shape.radius, shape.rgb)
    return image


def wild_sample(task: str, rng: random.Random, qtype: str | None = None) -> Sample:
    """One ``wild`` or ``wild-dark`` sample: one shape, one question (uniform over ``WILD_QTYPES`` unless given)."""
    if task not in WILD_TASKS:
        raise ValueError(f"unknown wild task {task!r}; expected one of {tuple(WILD_TASKS)}")
    shape = wild_shape(rng)
    qa = ask_scene(rng, [shape], qtype or rng.choice(WILD_QTYPES))
    return Sample([render_wild(shape, WILD_TASKS[task])], qa.question, qa.answer, qa.qtype, task, [[shape]])


def generate(task: str, n: int, seed: int, qtype: str | None = None) -> list[Sample]:
    """``n`` samples with seeds ``seed .. seed + n - 1`` (inside ``scenes.EVAL_SEEDS``); see the module doc."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed not in EVAL_SEEDS or seed + max(n, 1) - 1 not in EVAL_SEEDS:
        raise ValueError(f"wild seeds {seed}..{seed + n - 1} lie outside the evaluation seeds {EVAL_SEEDS}")
    out = []
    for i in range(n):
        s = wild_sample(task, random.Random(f"wild:{seed + i}"), qtype)
        s.seed = seed + i
        out.append(s)
    return out
