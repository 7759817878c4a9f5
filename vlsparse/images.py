"""Reading user images with one-line errors for every way a file can be wrong.

The size is checked from the file's header before any pixel is decoded: above
``MAX_MEGAPIXELS`` (and for anything Pillow itself flags as a decompression bomb)
the image is refused, so a forged or hugely inflating file cannot exhaust memory.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlsparse.errors import InputError

MAX_MEGAPIXELS = 64
"""Largest image decoded (width x height / 1e6); vision encoders resize far below this anyway."""


def _too_large(path: Path, detail: str) -> InputError:
    return InputError(f"image {path} is {detail}, above the limit of {MAX_MEGAPIXELS} megapixels",
                      "resize it (e.g. to 4096 x 4096 or smaller) and try again")


def _open_checked(path: Path) -> Image.Image:
    """``Image.open`` (header only) with Pillow's bomb warning as an error and our pixel limit applied."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            detail = f"{int(found.group(1)) / 1e6:,.0f} megapixels" if found else "too large to decode safely"
            raise _too_large(path, detail) from None
    width, height = img.size
    if width * height > MAX_MEGAPIXELS * 1_000_000:
        img.close()
        raise _too_large(path, f"{width} x {height} pixels ({width * height / 1e6:,.0f} megapixels)")
    return img


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (a truncated file fails here, not later)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} not found", "check the path")
    if path.is_dir():
        raise InputError(f"image {path} is a folder", "pass an image file (PNG, JPEG, ...)")
    try:
        with _open_checked(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise InputError(f"{path} is not an image PIL can read", "pass a PNG, JPEG or other image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"image {path} is damaged ({reason})", "re-export or re-download the image") from exc
