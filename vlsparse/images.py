"""Reading user images with one-line errors for every way a file can be wrong."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlsparse.errors import InputError


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB (a truncated file fails here, not later)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} not found", "check the path")
    if path.is_dir():
        raise InputError(f"image {path} is a folder", "pass an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise InputError(f"{path} is not an image PIL can read", "pass a PNG, JPEG or other image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"image {path} is damaged ({reason})", "re-export or re-download the image") from exc
