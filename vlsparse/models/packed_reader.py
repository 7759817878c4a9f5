"""Reader of ``vlsparse prune --pack`` checkpoints (the format is described in vlsparse/compress/packed.py).

Lives in the models package so that loading a packed folder needs nothing from vlsparse.compress.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlsparse.errors import ModelLoadError
from vlsparse.safetensors_header import read_header

PACKED_INDEX = "packed_index.json"
PACKED_FORMAT = "vlsparse-packed"
PACKED_VERSION = 1
BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_mask``: the bool mask of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    bits = (packed.reshape(-1, 1) & BIT_WEIGHTS).ne(0).reshape(-1)[:numel]
    return bits.reshape(tuple(shape))

def is_packed(folder: str | Path) -> bool:
    """True if ``folder`` holds a checkpoint written by ``vlsparse prune --pack``."""
    path = Path(folder) / PACKED_INDEX
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == PACKED_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


def _read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / PACKED_INDEX).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{folder / PACKED_INDEX} is unreadable", "re-run `vlsparse prune --pack`") from exc
    if index.get("format") != PACKED_FORMAT or index.get("version") != PACKED_VERSION:
        raise ModelLoadError(f"{folder} is not a version-{PACKED_VERSION} vlsparse packed checkpoint",
                             "re-run `vlsparse prune --pack` with this version")
    return index


def unpack_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense tensors of a packed checkpoint, under their original checkpoint names."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = _read_index(folder)
    by_file: dict[str, list[str]] = {}
    for key, entry in index["tensors"].items():
        by_file.setdefault(entry["file"], []).append(key)
    out: dict[str, torch.Tensor] = {}
    for file, keys in sorted(by_file.items()):
        read_header(folder / file)  # a damaged shard is one line naming what is wrong, before it is read
        try:
            stored = load_file(str(folder / file))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{folder / file} is missing or unreadable", "re-run `vlsparse prune --pack`") from exc
        for key in keys:
            entry = index["tensors"][key]
            shape = tuple(entry["shape"])
            if not entry["packed"]:
                out[key] = stored.pop(key)
                continue
            mask = unpack_mask(stored.pop(f"{key}::mask"), shape)
            values = stored.pop(f"{key}::values")
            if int(mask.sum()) != values.numel():
                raise ModelLoadError(f"{file}: {key} has {values.numel()} values for {int(mask.sum())} kept weights",
                                     "the file is corrupt; re-run `vlsparse prune --pack`")
            dense = torch.zeros(shape, dtype=values.dtype)
            dense[mask] = values
            out[key] = dense
    return out

