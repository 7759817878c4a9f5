"""The prompt layout a profile was calibrated on, and the warning when a prompt lies outside it.

A head's pattern is chosen on the calibration prompts: their length, image count and tokens per
image. A pattern that kept 0.95 of the attention there may keep far less on a prompt of another
shape (a profile made at 4 tokens per image lost most of the attention of a 1120-px image). So
``vlsparse profile`` records the ranges it saw (``Calibration.layout``)::

    layout: {tokens: [8245, 8245], images: [56, 56], tokens_per_image: [144, 144]}

and ``vlsparse run`` warns when a prompt is more than ``FACTOR`` times outside a range (tokens
below the runtime's sparse minimum never run sparse, so short prompts are not warned about).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

FACTOR = 2.0
KEYS = ("tokens", "images", "tokens_per_image")


def prompt_layout(prompts: list[tuple[int, list]]) -> dict[str, list[int] | None]:
    """Ranges over ``prompts`` = [(length, image spans)]: tokens, images per prompt, image tokens per image
    (None without images). A span has ``image_index`` and ``length`` (``vlsparse.models`` adapters)."""
    lengths = [n for n, _ in prompts]
    images, per_image = [], []
    for _, spans in prompts:
        tokens = Counter()
        for span in spans:
            tokens[span.image_index] += span.length
        images.append(len(tokens))
        per_image.extend(tokens.values())
    return {"tokens": [min(lengths), max(lengths)], "images": [min(images), max(images)],
            "tokens_per_image": [min(per_image), max(per_image)] if per_image else None}


def check_layout(layout: Any, where: str) -> dict[str, list[int] | None]:
    """``layout`` as read from a profile, or ``ProfileError``."""
    from vlsparse.errors import ProfileError

    if not isinstance(layout, dict) or set(layout) - set(KEYS):
        raise ProfileError(f"{where}.layout should be a mapping of {', '.join(KEYS)}")
    out = {}
    for key in KEYS:
        value = layout.get(key)
        ok = value is None or (isinstance(value, list) and len(value) == 2
                               and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
                               and value[0] <= value[1])
        if not ok:
            raise ProfileError(f"{where}.layout.{key} should be [min, max] (integers), got {value!r}")
        out[key] = value
    return out


def layout_warnings(layout: dict | None, prompt: tuple[int, list], min_tokens: int = 0) -> list[str]:
    """Why ``prompt`` = (length, image spans) lies outside ``layout`` (each a sentence), or []."""
    if not layout or prompt[0] < min_tokens:
        return []
    seen = prompt_layout([prompt])
    out = []
    names = {"tokens": "tokens", "images": "images", "tokens_per_image": "image tokens per image"}
    for key in KEYS:
        have, want = seen.get(key), layout.get(key)
        if have is None or want is None:
            if key == "tokens_per_image" and have is not None and want is None and have[1]:
                out.append(f"{have[1]} {names[key]}, and the profile was calibrated on text only")
            continue
        low, high = want
        if key == "images" and high == 0:  # text-only calibration: said once, by tokens per image
            continue
        value = have[1] if have[1] > high else have[0]
        if value > FACTOR * high or value * FACTOR < low:
            out.append(f"{value} {names[key]}, outside the profile's calibrated {low}-{high}")
    return out


__all__ = ["FACTOR", "KEYS", "check_layout", "layout_warnings", "prompt_layout"]
