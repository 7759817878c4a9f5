"""Checkpoint I/O for ``vlsparse prune``: read shards lazily, write pruned shards streaming.

Reading: ``CheckpointReader`` parses each shard's safetensors header itself
(8-byte little-endian length, JSON) and hands out one tensor at a time from a
memory-mapped ``safe_open``, so no more than one tensor is ever resident.

Writing: a pruned shard has exactly the header of its source shard (same
names, dtypes, shapes, offsets: zeros are written in place), so the header is
copied byte for byte and the data streamed tensor by tensor; untouched tensors
are copied as raw bytes in chunks without being decoded. Stock
``from_pretrained`` loads the result.

Everything goes through ``vlsparse.atomic.atomic_dir``: a temporary folder,
renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsparse.errors import ModelLoadError
from vlsparse.safetensors_header import TensorEntry, tensor_entries
from vlsparse.safetensors_header import read_header_with_length as read_header

INDEX_NAME = "model.safetensors.index.json"
PROFILE_NAME = "vlsparse.yaml"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_OWN_FILES = ("vlsparse.yaml", "vlsparse.safetensors", "packed_index.json")
_CHUNK = 16 << 20

DTYPE_NAMES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
TORCH_TO_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo(TensorEntry):
    """Where one tensor sits: a checked header entry (dtype, shape, byte range) and its shard file."""

    file: str = ""


def weight_files(folder: Path) -> list[str]:
    """The model's safetensors shards in order (from the index if there is one)."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in _OWN_FILES)
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights", "convert the weights to safetensors")
    return files


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of a Hugging Face safetensors checkpoint."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        self.infos: dict[str, TensorInfo] = {}
        self.header_lengths: dict[str, int] = {}
        for name in self.files:
            length, header = read_header(self.folder / name)
            self.header_lengths[name] = length
            for key, entry in tensor_entries(self.folder / name, header).items():
                self.infos[key] = TensorInfo(entry.dtype, entry.shape, entry.begin, entry.end, file=name)

    def keys(self) -> list[str]:
        return list(self.infos)

    def nbytes(self) -> int:
        return sum(i.end - i.begin for i in self.infos.values())

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor in its stored dtype, read into fresh memory.

        Plain positioned reads rather than a long-lived memory map: mapped pages
        would stay resident (and counted) after use, so a model larger than RAM
        could not be walked through. Nothing but the returned tensor is kept.
        """
        info = self.infos[key]
        if info.dtype not in DTYPE_NAMES:
            raise ModelLoadError(f"tensor {key} has unsupported dtype {info.dtype}", "convert the checkpoint")
        buffer = bytearray(info.end - info.begin)
        with open(self.folder / info.file, "rb") as handle:
            handle.seek(8 + self.header_lengths[info.file] + info.begin)
            if handle.readinto(buffer) != len(buffer):
                raise ModelLoadError(f"{info.file} is truncated at {key}", "re-download or re-save the model")
        if not buffer:
            return torch.empty(info.shape, dtype=DTYPE_NAMES[info.dtype])
        return torch.frombuffer(buffer, dtype=DTYPE_NAMES[info.dtype]).reshape(info.shape)

    def tensor_dtype(self, key: str) -> torch.dtype:
        """The stored dtype of tensor ``key``."""
        return DTYPE_NAMES[self.infos[key].dtype]

    def keys_of(self, file: str) -> list[str]:
        """Keys of one shard in data order."""
        return sorted((k for k, i in self.infos.items() if i.file == file), key=lambda k: self.infos[k].begin)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_pruned_shard(reader: CheckpointReader, file: str, out_path: Path,
                       replacement: Callable[[str], torch.Tensor | None]) -> None:
    """Copy shard ``file`` to ``out_path``, taking ``replacement(key)`` where it is not None.

    A replacement must have the original dtype and shape; the header is copied
    verbatim and untouched tensors as raw bytes, so memory stays at one tensor.
    """
    src = reader.folder / file
    data_start = 8 + reader.header_lengths[file]
    with open(src, "rb") as inp, open(out_path, "wb") as out:
        out.write(inp.read(data_start))
        position = 0
        for key in reader.keys_of(file):
            info = reader.infos[key]
            if info.begin != position:  # padding between tensors (not written by safetensors, but allowed)
                inp.seek(data_start + position)
                out.write(inp.read(info.begin - position))
            new = replacement(key)
            if new is None:
                inp.seek(data_start + info.begin)
                remaining = info.end - info.begin
                while remaining:
                    chunk = inp.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise OSError(f"{src} ended early")
                    out.write(chunk)
                    remaining -= len(chunk)
            else:
                if TORCH_TO_NAME.get(new.dtype) != info.dtype or tuple(new.shape) != info.shape:
                    raise ValueError(f"replacement for {key} has {new.dtype} {tuple(new.shape)}, "
                                     f"expected {info.dtype} {info.shape}")
                out.write(tensor_bytes(new))
            position = info.end


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer, processor and other small files (not weights, not our own outputs)."""
    copied = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in _OWN_FILES or path.name == INDEX_NAME:
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.startswith("."):
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def write_pruned_checkpoint(reader: CheckpointReader, out_dir: Path,
                            replacement: Callable[[str], torch.Tensor | None],
                            on_file: Callable[[str], None] | None = None) -> list[str]:
    """Write every shard (and the index, if the source has one) into ``out_dir``."""
    for file in reader.files:
        if on_file is not None:
            on_file(file)
        write_pruned_shard(reader, file, out_dir / file, replacement)
    index = reader.folder / INDEX_NAME
    if index.is_file():
        shutil.copy2(index, out_dir / INDEX_NAME)
    return list(reader.files)


# ----------------------------------------------------------------------------- output checks


def check_output(out: Path, model_dir: Path, force: bool, inputs: Iterable = ()) -> None:
    """The output rule (``vlsparse.atomic.check_output``) for a checkpoint folder, before any work:
    never the input model, inside it or holding it; an existing folder only with ``force``
    and only if vlsparse wrote it."""
    from vlsparse.atomic import check_output as check

    check(out, force=force, inputs=[model_dir, *inputs])


def find_newest_checkpoint(cwd: str | Path = ".") -> Path | None:
    """The newest folder in ``cwd`` (or ``cwd`` itself) that ``vlsparse prune`` wrote, or None.

    A pruned checkpoint is recognised by its ``vlsparse.yaml`` with a ``pruning``
    mapping; "newest" is by that file's modification time.
    """
    import yaml

    cwd = Path(cwd)
    candidates: list[tuple[float, Path]] = []
    for folder in [cwd, *(p for p in cwd.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        marker = folder / PROFILE_NAME
        if not marker.is_file():
            continue
        try:
            data = yaml.safe_load(marker.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue
        if isinstance(data, dict) and isinstance(data.get("pruning"), dict):
            candidates.append((marker.stat().st_mtime, folder))
    return max(candidates)[1] if candidates else None


def dir_size(folder: Path, names: Iterable[str] | None = None) -> int:
    """Bytes in ``folder`` (only ``names`` if given)."""
    paths = [folder / n for n in names] if names is not None else [p for p in folder.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in paths)
