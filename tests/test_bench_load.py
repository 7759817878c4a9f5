"""Busy processes for benchmarks (vlsparse.bench.load) and `bench attention --load / --flex`.

No timing assertions: the workers are checked by process state and by the steps they count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from vlsparse.bench.load import alive, busy_processes
from vlsparse.errors import InputError


def wait_for(condition, timeout: float = 60.0) -> bool:
    """Poll ``condition()`` until true or ``timeout`` s pass (a liveness deadline, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("kind", ["python", "matmul"])
def test_busy_processes_run_inside_the_block_and_are_gone_after(kind):
    with busy_processes(2, kind) as load:
        pids = load.pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
        assert all(p.is_alive() for p in load.processes) and all(alive(pid) for pid in pids)
        first = load.steps()
        assert min(first) > 0  # each has done work before the block's body runs
        assert wait_for(lambda: all(now > then for now, then in zip(load.steps(), first)))  # and keeps working
    assert not any(p.is_alive() for p in load.processes) and not any(alive(pid) for pid in pids)
    assert [p.exitcode for p in load.processes] == [0, 0]  # stopped by the pipe, not killed


def test_busy_processes_stop_when_the_block_raises():
    with pytest.raises(KeyboardInterrupt), busy_processes(1, "python") as load:
        assert alive(load.pids[0])
        raise KeyboardInterrupt  # what Ctrl-C raises in the benchmark
    assert not load.processes[0].is_alive() and not alive(load.pids[0])


def test_busy_workers_exit_when_their_parent_is_killed():
    script = ("import sys, time\nfrom vlsparse.bench.load import busy_processes\n"
              "with busy_processes(1, 'python') as load:\n"
              "    print(load.pids[0], flush=True)\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert alive(worker)
        parent.send_signal(signal.SIGKILL)  # no finally, no atexit: only the pipe tells the worker
        parent.wait()
        assert wait_for(lambda: not alive(worker))
    finally:
        parent.kill()
        parent.wait()


def test_no_load_starts_nothing_and_bad_input_names_the_parameter():
    with busy_processes(0) as load:
        assert load.processes == [] and load.steps() == []
    with pytest.raises(InputError) as exc, busy_processes(-1):
        pass
    assert exc.value.option == "load"
    with pytest.raises(InputError), busy_processes(1, "sleep"):
        pass


def test_bench_attention_runs_under_load_and_times_flex_in_the_same_rows():
    from vlsparse.bench import attention as bench

    seen_alive: list[int] = []
    rows = bench.bench_attention([256], ["vertical_slash", "a_shape"], [0.3], heads=2, head_dim=32, repeats=1,
                                 flex=True, load=2, load_kind="python",  # no torch import per worker
                                 progress=lambda _msg: seen_alive.append(_workers_alive()))
    assert seen_alive[0] == 0 and len(seen_alive) > 1  # "starting 2 busy processes", then the rows' messages
    assert all(count == 2 for count in seen_alive[1:])  # both workers ran through every row
    assert _workers_alive() == 0
    for row in rows:
        assert row["load"] == 2 and row["load_kind"] == "python"
        assert row["max_abs_err"] < 1e-5 and row["flex_max_abs_err"] < 1e-5
        # the ms columns are rounded to 0.01 ms, a large share of a 256-token time: the ratios (from the
        # unrounded times) agree with them only that far
        assert row["flex_speedup"] == pytest.approx(row["dense_ms"] / row["flex_ms"], rel=0.3, abs=0.05)
        assert row["sparse_vs_flex"] == pytest.approx(row["flex_ms"] / row["sparse_ms"], rel=0.3, abs=0.05)
        assert row["flex_efficiency"] == pytest.approx(row["flex_speedup"] * row["density"], rel=0.05, abs=5e-3)
    header = bench.format_table(rows).splitlines()[0].split()
    assert header[:8] == ["seq", "pattern", "density", "load", "dense_ms", "sparse_ms", "flex_ms", "speedup"]
    assert {"flex_speedup", "sparse_vs_flex", "efficiency", "flex_efficiency"} <= set(header)


def _workers_alive() -> int:
    """Busy workers (children of this process named by multiprocessing) still alive."""
    import multiprocessing

    return sum(1 for p in multiprocessing.active_children() if p.name == "vlsparse-busy")


def test_cli_bench_attention_load_is_in_the_json_rows():
    from vlsparse.cli.main import build_app

    result = CliRunner().invoke(build_app(), ["bench", "attention", "--seq", "256", "--patterns", "a_shape",
                                              "--densities", "0.3", "--heads", "2", "--head-dim", "32",
                                              "--repeats", "1", "--load", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["load"] for r in rows] == [1] and "flex_ms" not in rows[0]
    assert _workers_alive() == 0
    refused = CliRunner().invoke(build_app(), ["bench", "attention", "--load", "-1"])
    assert refused.exit_code != 0
