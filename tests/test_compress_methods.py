"""The pruning-method registry: its interface, Wanda through it, and a new method as one module."""

from __future__ import annotations

import types

import pytest
import torch

from vlsparse.compress.methods import LayerUpdate, method_named, methods
from vlsparse.errors import InputError


def reference_wanda(weight: torch.Tensor, norms: torch.Tensor, prune_per_row: int) -> torch.Tensor:
    """Plain Wanda: zero the ``prune_per_row`` lowest |W|*||X|| of each row."""
    scores = weight.abs() * norms
    keep = torch.ones_like(weight, dtype=torch.bool)
    for r in range(weight.shape[0]):
        keep[r, scores[r].argsort()[:prune_per_row]] = False
    return keep


def stats_of(method, x: torch.Tensor):
    stats = method.new_stats(torch.nn.Linear(x.shape[-1], 1))
    stats.add(x)
    return stats


def test_registry_lists_wanda_first_and_every_method_has_the_interface():
    table = methods()
    assert list(table)[0] == "wanda"
    for module in table.values():
        assert callable(module.new_stats) and callable(module.prune_layer)
    with pytest.raises(InputError, match="use one of: wanda, sparsegpt"):
        method_named("bogus")


def test_wanda_through_the_registry_equals_the_reference():
    wanda = method_named("wanda")
    weight = torch.arange(1.0, 9.0).reshape(1, 8)
    norms = torch.tensor([100, 10, 1, 0.1, 0.01, 0.001, 1e-4, 1e-5])
    got = wanda.prune_layer(weight, stats_of(wanda, torch.diag(norms)), 4, None)
    assert torch.equal(got.mask, reference_wanda(weight, norms, 4)) and got.weight is None
    assert got.mask.tolist() == [[True, True, True, True, False, False, False, False]]
    nm = wanda.prune_layer(weight, stats_of(wanda, torch.ones(3, 8)), 0, (2, 4))
    assert (weight * nm.mask).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]
    weights, x = torch.randn(6, 16), torch.randn(40, 16)
    got = wanda.prune_layer(weights, stats_of(wanda, x), 6 * 5, None).mask
    assert torch.equal(got, reference_wanda(weights, x.norm(dim=0), 5))


def test_unknown_method_is_one_line_exit_1(capsys):
    from vlsparse.cli.main import main

    assert main(["prune", "--method", "bogus", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.strip()] == [
        "Error: unknown --method 'bogus' — use one of: wanda, sparsegpt"]


class CountStats:
    def __init__(self) -> None:
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        self.tokens += x.reshape(-1, x.shape[-1]).shape[0]


def magnitude_prune_layer(weight, stats, prune, structure):
    """A toy method: the smallest |W| of the matrix go (no input statistics needed)."""
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[weight.abs().reshape(-1).argsort()[:prune]] = False
    return LayerUpdate(keep.reshape(weight.shape))


def test_a_new_method_is_one_module_and_runs_through_the_loop(llama_dir):
    from vlsparse.compress.calibration import text_calibration
    from vlsparse.compress.checkpoint import CheckpointReader
    from vlsparse.compress.sequential import StreamedModel, build_skeleton, find_blocks, sequential_prune
    from vlsparse.models.adapter import Adapter
    from vlsparse.models.processors import load_processor

    toy = types.SimpleNamespace(new_stats=lambda linear: CountStats(), prune_layer=magnitude_prune_layer)
    table = {**methods(), "magnitude": toy}  # a copy: the global table is untouched
    assert "magnitude" not in methods()
    method = method_named("magnitude", table)
    skeleton = build_skeleton(llama_dir, "causal_lm")
    blocks = find_blocks(skeleton, Adapter(skeleton, "causal_lm"))
    streamed = StreamedModel(skeleton, CheckpointReader(llama_dir), blocks)
    streamed.load_stem()
    calib = text_calibration(load_processor(llama_dir, "causal_lm"), None, 2, 16, 0)
    seen = {}

    def prune_block(block, stats):
        seen.update({n: s.tokens for n, s in stats.items()})
        return {n: method.prune_layer(skeleton.get_parameter(n), stats[n], skeleton.get_parameter(n).numel() // 2,
                                      None) for n in block.weight_names()}

    sequential_prune(streamed, calib.batches, prune_block, new_stats=method.new_stats)
    assert set(streamed.masks) == {n for b in blocks for n in b.weight_names()}
    assert all(tokens == 2 * 16 for tokens in seen.values())
