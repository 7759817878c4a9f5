"""Drawing of the demo scenes: colours, shape kinds, the 3x3 layout and rendering to PIL images."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
"""Side of a scene and of a grid cell, in pixels (the vision tower's input size)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 70, 220),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
POSITIONS = (
    ("topleft", "top", "topright"),
    ("left", "center", "right"),
    ("bottomleft", "bottom", "bottomright"),
)
COLOR_JITTER = 12  # +- per channel, so colours stay far apart
BACKGROUND = (32, 32, 36)


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour name, exact RGB, layout cell, centre and radius (px)."""

    kind: str
    color: str
    rgb: tuple[int, int, int]
    row: int
    col: int
    cx: float
    cy: float
    radius: float

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of ``kind`` centred on (cx, cy) with nominal radius r; None for a circle.

    Every shape covers its centre pixel, so the centre colour is the shape's colour.
    """

    def ring(radii: list[float], start: float) -> list[tuple[float, float]]:
        n = len(radii)
        return [
            (cx + rad * math.cos(start + 2 * math.pi * k / n), cy + rad * math.sin(start + 2 * math.pi * k / n))
            for k, rad in enumerate(radii)
        ]

    if kind == "circle":
        return None
    if kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":  # equilateral, centroid at the centre, apex up
        return ring([1.2 * r] * 3, -math.pi / 2)
    if kind == "star":  # five points, inner radius 45% of outer
        return ring([1.2 * r, 0.54 * r] * 5, -math.pi / 2)
    if kind == "diamond":  # taller than wide, so it is not a rotated square
        return [(cx, cy - 1.15 * r), (cx + 0.7 * r, cy), (cx, cy + 1.15 * r), (cx - 0.7 * r, cy)]
    if kind == "cross":  # plus sign, arm half-width 0.33 r
        a, w = 1.0 * r, 0.33 * r
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
            (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
            (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    poly = shape_polygon(shape.kind, shape.cx, shape.cy, shape.radius)
    if poly is None:
        r = shape.radius
        draw.ellipse([shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r], fill=shape.rgb)
    else:
        draw.polygon(poly, fill=shape.rgb)


def render(shapes: list[Shape], size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        draw_shape(draw, s)
    return image


def jitter_rgb(rng: random.Random, color: str) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color])


def tile_grid(image: Image.Image, rows: int, cols: int) -> list[Image.Image]:
    """Cut a grid image into rows*cols equal tiles, row-major (LLaVA-NeXT "anyres" style)."""
    w, h = image.size
    tw, th = w // cols, h // rows
    return [image.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)) for r in range(rows) for c in range(cols)]
