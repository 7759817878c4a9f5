"""The one reader of safetensors headers: every weight file is checked before anything loads it.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` plus an optional
``"__metadata__"`` mapping of strings), then the data section; offsets count from its
start. ``read_header`` checks the length field against the file size (and a 100 MiB
limit) before reading the JSON, and every entry's dtype, shape and offsets (the byte
count matches dtype x shape, tensors do not overlap, all lie inside the file), so a
truncated, empty or forged file is a one-line ``ModelLoadError`` instead of a
traceback (or a 1 TB read) deep inside a loader.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from vlsparse.errors import ModelLoadError

MAX_HEADER_BYTES = 100 << 20
METADATA_KEY = "__metadata__"
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
              "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "C64": 64, "F8_E4M3": 8, "F8_E5M2": 8,
              "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}
_HINT = "re-download the file or re-save the model with save_pretrained"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header: dtype name, shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def _fail(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path} {what}", _HINT)


def read_header_with_length(path: str | Path) -> tuple[int, dict]:
    """(header byte length, parsed and checked JSON header) of a safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if size == 0:
                raise _fail(path, "is empty (0 bytes), not a safetensors file")
            if len(raw) < 8:
                raise _fail(path, f"is too short to be a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length == 0 or length > MAX_HEADER_BYTES:
                raise _fail(path, f"has an implausible safetensors header length ({length:,} bytes; "
                                  f"the limit is {MAX_HEADER_BYTES >> 20} MiB)")
            if 8 + length > size:
                raise _fail(path, f"is truncated: its header claims {length:,} bytes but the file has only {size:,}")
            text = handle.read(length)
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or type(exc).__name__})") from exc
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"has a corrupt safetensors header (not valid JSON: {str(exc).splitlines()[0]})") from exc
    if not isinstance(header, dict):
        raise _fail(path, "has a corrupt safetensors header (not a JSON object)")
    check_entries(path, header, size - 8 - length)
    return length, header


def read_header(path: str | Path) -> dict:
    """The parsed and checked JSON header of a safetensors file (``ModelLoadError`` if it is damaged)."""
    return read_header_with_length(path)[1]


def read_tensors(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, by name, from its checked header."""
    return tensor_entries(Path(path), read_header(path))


def tensor_entries(path: Path, header: dict) -> dict[str, TensorEntry]:
    """Header entries (not ``__metadata__``) as ``TensorEntry``; a malformed entry raises ``ModelLoadError``."""
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == METADATA_KEY:
            continue
        out[name] = _entry(path, name, meta)
    return out


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, meta) -> TensorEntry:
    if not isinstance(meta, dict):
        raise _fail(path, f"has a corrupt safetensors header (tensor {name!r} is not described by a JSON object)")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise _fail(path, f"has a corrupt safetensors header (tensor {name!r} has unknown dtype {dtype!r})")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise _fail(path, f"has a corrupt safetensors header (tensor {name!r} has shape {shape!r})")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[1] < offsets[0]):
        raise _fail(path, f"has a corrupt safetensors header (tensor {name!r} has data_offsets {offsets!r})")
    entry = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    expected = -(-entry.numel * DTYPE_BITS[dtype] // 8)
    if entry.end - entry.begin != expected:
        raise _fail(path, f"has a corrupt safetensors header (tensor {name!r}: {dtype} {list(shape)} takes "
                          f"{expected:,} bytes, its offsets span {entry.end - entry.begin:,})")
    return entry


def check_entries(path: str | Path, header: dict, data_size: int) -> None:
    """Every entry well formed, no two overlapping, all within the ``data_size`` bytes after the header."""
    path = Path(path)
    metadata = header.get(METADATA_KEY)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _fail(path, "has a corrupt safetensors header (__metadata__ is not a mapping of strings)")
    entries = sorted(tensor_entries(path, header).items(), key=lambda item: (item[1].begin, item[1].end))
    previous_end, previous_name = 0, None
    for name, entry in entries:
        if entry.begin < previous_end:
            raise _fail(path, f"has a corrupt safetensors header (tensors {previous_name!r} and {name!r} overlap)")
        previous_end, previous_name = entry.end, name
    if previous_end > data_size:
        raise _fail(path, f"is truncated: tensor {previous_name!r} ends at data byte {previous_end:,} but the file "
                          f"holds only {max(data_size, 0):,} data bytes")
