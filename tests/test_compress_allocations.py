"""The allocation-policy registry: its interface, every policy through it, and a new policy as one module."""

from __future__ import annotations

import types

import pytest

from vlsparse.compress.allocations import DEFAULT, NAMES, STRUCTURED, allocation_named, allocations
from vlsparse.compress.allocations.fill import keep_total
from vlsparse.errors import InputError

CONFIG = types.SimpleNamespace(ratio=0.5, max_deviation=0.1, owl_lambda=0.08)


def test_registry_lists_every_policy_with_the_interface():
    table = allocations()
    assert tuple(table) == NAMES and DEFAULT == NAMES[0] and STRUCTURED in NAMES
    for name, module in table.items():
        assert callable(module.scores) and callable(module.keep_counts), name
        assert allocation_named(name) is module
    with pytest.raises(InputError, match="use one of: ecoflap, owl, uniform") as info:
        allocation_named("bogus")
    assert info.value.option == "allocation" and str(info.value).startswith("unknown allocation 'bogus'")


@pytest.mark.parametrize("name", NAMES)
def test_every_policy_meets_the_total_exactly(name):
    sizes = [1000, 37, 4096, 512]
    keeps = allocation_named(name).keep_counts(sizes, [3.0, 1.0, 0.5, 2.0], CONFIG)
    assert sum(keeps) == keep_total(sizes, CONFIG.ratio)
    assert all(abs((n - k) / n - CONFIG.ratio) <= CONFIG.max_deviation + 1 / n for n, k in zip(sizes, keeps))


def test_unknown_allocation_is_one_line_exit_1_with_the_flag(capsys):
    from vlsparse.cli.main import main

    assert main(["prune", "--allocation", "bogus", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.strip()] == [
        "Error: unknown --allocation 'bogus' — use one of: ecoflap, owl, uniform"]


def _last_heavy_scores(streamed, batches, config, progress):
    return [float(i) for i in range(len(streamed.blocks))], {"last_heavy": {"batches": len(batches)}}


def _last_heavy_keep_counts(sizes, scores, config):
    from vlsparse.compress.allocations.fill import deviation_bounds, fill_to_total

    lo, hi = deviation_bounds(sizes, config.ratio, config.max_deviation)
    return fill_to_total([float(x) for x in lo], [(1 + s) * n for s, n in zip(scores, sizes)], lo, hi,
                         keep_total(sizes, config.ratio))


def test_a_new_policy_is_one_module_and_runs_through_allocate(llama_dir):
    from vlsparse.compress.api import PruneConfig, allocate
    from vlsparse.compress.calibration import text_calibration
    from vlsparse.compress.checkpoint import CheckpointReader
    from vlsparse.compress.sequential import StreamedModel, build_skeleton, find_blocks
    from vlsparse.models.adapter import Adapter
    from vlsparse.models.processors import load_processor

    toy = types.SimpleNamespace(scores=_last_heavy_scores, keep_counts=_last_heavy_keep_counts)
    table = {**allocations(), "last_heavy": toy}  # a copy: the registry is untouched
    assert "last_heavy" not in allocations()
    skeleton = build_skeleton(llama_dir, "causal_lm")
    blocks = find_blocks(skeleton, Adapter(skeleton, "causal_lm"))
    streamed = StreamedModel(skeleton, CheckpointReader(llama_dir), blocks)
    streamed.load_stem()
    calib = text_calibration(load_processor(llama_dir, "causal_lm"), None, 2, 16, 0)
    config = PruneConfig(ratio=0.5, allocation="last_heavy")
    keeps, scores, record = allocate(streamed, calib.batches, config, lambda _: None, table)
    sizes = [b.size() for b in blocks]
    assert scores == [0.0, 1.0] and record == {"last_heavy": {"batches": 1}}
    assert sum(keeps) == keep_total(sizes, 0.5) and keeps[1] / sizes[1] > keeps[0] / sizes[0]
    uniform_keeps, none, nothing = allocate(streamed, calib.batches, PruneConfig(allocation="uniform"),
                                            lambda _: None)
    assert none is None and nothing == {} and sum(uniform_keeps) == sum(keeps)
