"""The packed (values + bitmask) format: bit packing, round trip, size."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from vlsparse.compress.checkpoint import CheckpointReader
from vlsparse.compress.packed import (count_kept, is_packed, pack_mask, unpack_mask, unpack_state_dict,
                                      write_packed_checkpoint)


def test_pack_mask_round_trip_ragged_length():
    torch.manual_seed(0)
    mask = torch.rand(7, 13) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_mask(bits, mask.shape), mask)
    assert count_kept(bits) == int(mask.sum())


def test_pack_mask_bit_order_lsb_first():
    assert pack_mask(torch.tensor([True, False, False, False, False, False, False, False, False, True])).tolist() == [1, 2]


def test_packed_checkpoint_round_trip_and_size(tmp_path):
    src = tmp_path / "dense"
    src.mkdir()
    torch.manual_seed(0)
    weight = torch.randn(256, 512).to(torch.bfloat16)
    mask = torch.rand(256, 512) > 0.5
    pruned = weight.masked_fill(~mask, 0)
    save_file({"w.weight": pruned, "norm.weight": torch.ones(512)}, str(src / "model.safetensors"))
    out = tmp_path / "packed"
    out.mkdir()
    assert not is_packed(out)
    write_packed_checkpoint(CheckpointReader(src), out, {"w.weight": pack_mask(mask)})
    assert is_packed(out)
    restored = unpack_state_dict(out)
    assert restored.keys() == {"w.weight", "norm.weight"}
    assert restored["w.weight"].dtype == torch.bfloat16 and torch.equal(restored["w.weight"], pruned)
    packed_bytes = sum(p.stat().st_size for p in out.glob("packed-*.safetensors"))
    dense_bytes = (src / "model.safetensors").stat().st_size
    assert packed_bytes <= 0.57 * dense_bytes
