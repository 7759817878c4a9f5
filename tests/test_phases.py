"""The time split: Phases sums each named phase; prune reports its phases and they cover its run."""

from __future__ import annotations

import itertools

from vlsparse.phases import Phases


def test_phases_sum_repeated_entries_in_first_run_order(monkeypatch):
    clock = itertools.count(0.0, 1.5)  # every perf_counter call advances 1.5 s
    monkeypatch.setattr("vlsparse.phases.time.perf_counter", lambda: next(clock))
    phases = Phases()
    for _ in range(3):
        with phases("read"):
            pass
    with phases("write"):
        pass
    try:
        with phases("read"):
            raise ValueError
    except ValueError:
        pass  # a failing phase still counts its time
    assert phases.seconds == {"read": 6.0, "write": 1.5} and phases.total() == 7.5


def test_prune_reports_a_time_split_that_covers_the_run(llama_dir, tmp_path):
    from vlsparse.compress.api import PruneConfig, prune_model

    result = prune_model(str(llama_dir), tmp_path / "out", PruneConfig(allocation="uniform", samples=2, seq_len=16))
    assert {"calibration data", "allocation scores (uniform)", "read weights", "statistics (block forward)",
            "masks and updates (method)", "write the checkpoint"} <= set(result.phases)
    assert all(s >= 0 for s in result.phases.values())
    covered = sum(result.phases.values())
    assert covered <= result.seconds and covered >= 0.5 * result.seconds
