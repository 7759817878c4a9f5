"""Packed sparse checkpoints (values + bitmask), for disk size only.

Stock loaders decompress every sparse format to dense anyway (docs/methods.md, section 6),
so this format exists to make the *files* smaller: a pruned matrix of
``numel`` weights at sparsity ``s`` is stored as its kept values in their own
dtype (``(1 - s) * numel`` of them) plus one bit per weight, i.e. at 50%
``0.5 + 1/(8 * bytes_per_weight)`` of dense (0.5625 for bf16, 0.53 for fp32).
Everything else is stored unchanged.

Layout of a packed folder (config, tokenizer and processor files as usual)::

    packed_index.json                 {"format": "vlsparse-packed", "version": 1, "tensors": {...}}
    packed-00001-of-0000N.safetensors one per source shard; for a pruned ``KEY``:
                                      ``KEY::values`` (1-D) and ``KEY::mask`` (uint8 bits, LSB first)

``packed_index.json`` maps every original checkpoint key to its file, dtype,
shape and whether it is packed. The reader (vlsparse/models/packed_reader.py):
``unpack_state_dict`` restores the exact dense
tensors under their original checkpoint names; ``load_packed`` builds the model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from vlsparse.models.packed_reader import (BIT_WEIGHTS, PACKED_FORMAT, PACKED_INDEX, PACKED_VERSION,  # noqa: F401
                                           is_packed, unpack_mask, unpack_state_dict)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ``ceil(numel / 8)`` bytes (bit ``i % 8`` of byte ``i // 8``)."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8) * BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def count_kept(packed: torch.Tensor) -> int:
    """Number of set bits (kept weights) in a packed mask (padding bits are zero)."""
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    return int(table[packed.long()].sum())


def _write_safetensors(path: Path, entries: list[tuple[str, str, tuple[int, ...], int, Callable[[], bytes]]],
                       metadata: dict[str, str]) -> None:
    """Stream a safetensors file: header from (name, dtype, shape, nbytes), then each producer's bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name, _, _, nbytes, produce in entries:
            data = produce()
            if len(data) != nbytes:
                raise ValueError(f"{name}: produced {len(data)} bytes, expected {nbytes}")
            out.write(data)


def write_packed_checkpoint(reader, out_dir: Path, masks: dict[str, torch.Tensor],
                            on_file: Callable[[str], None] | None = None,
                            source: Callable[[str], torch.Tensor] | None = None) -> list[str]:
    """Write the packed shards and ``packed_index.json``; ``masks`` maps checkpoint key -> packed bits.

    Pruned tensors' values come from ``source(key)`` (default: the checkpoint's own; a method
    that corrects the kept weights gives their new values).

    Memory: one tensor at a time (its kept values are gathered when written).
    """
    from vlsparse.compress.checkpoint import DTYPE_NAMES, tensor_bytes

    index: dict[str, dict] = {}
    files = []
    n = len(reader.files)
    tensor_of = source or reader.tensor
    for i, shard in enumerate(reader.files):
        name = f"packed-{i + 1:05d}-of-{n:05d}.safetensors"
        if on_file is not None:
            on_file(name)
        entries = []
        for key in reader.keys_of(shard):
            info = reader.infos[key]
            width = torch.empty((), dtype=DTYPE_NAMES[info.dtype]).element_size()
            if key in masks:
                bits = masks[key]
                kept = count_kept(bits)

                def values(key=key, bits=bits, shape=info.shape) -> bytes:
                    dense = tensor_of(key)
                    return bytes(tensor_bytes(dense.reshape(-1)[unpack_mask(bits, shape).reshape(-1)]))

                entries.append((f"{key}::values", info.dtype, (kept,), kept * width, values))
                entries.append((f"{key}::mask", "U8", (bits.numel(),), bits.numel(),
                                lambda bits=bits: bytes(tensor_bytes(bits))))
            else:
                entries.append((key, info.dtype, info.shape, info.end - info.begin,
                                lambda key=key: bytes(tensor_bytes(reader.tensor(key)))))
            index[key] = {"file": name, "dtype": info.dtype, "shape": list(info.shape), "packed": key in masks}
        _write_safetensors(out_dir / name, entries, {"format": PACKED_FORMAT})
        files.append(name)
    (out_dir / PACKED_INDEX).write_text(json.dumps(
        {"format": PACKED_FORMAT, "version": PACKED_VERSION, "tensors": index}, indent=1, sort_keys=True))
    return files


def load_packed(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A ready model (eval mode) from a packed checkpoint folder, via stock ``from_pretrained``."""
    from transformers import AutoConfig

    from vlsparse.models.adapter import family_of
    from vlsparse.models.loading import model_class

    folder = Path(folder)
    config_dict = json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    concrete = model_class(family_of(config_dict))._model_mapping[type(config)]  # the Auto class needs a path
    return concrete.from_pretrained(None, config=config, state_dict=unpack_state_dict(folder), dtype=dtype).eval()
