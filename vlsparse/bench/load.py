"""Busy processes for benchmarks: reproduce "other processes on the cores" on demand.

    with busy_processes(2) as load:   # two workers spinning until the block ends
        ...time something...
    load.steps()                      # work each worker did (a liveness check, not a speed)

Each worker is a separate process (``spawn``: a fresh interpreter, nothing inherited) with one
torch thread, multiplying two 256 x 256 fp32 matrices in a loop (``kind="matmul"``: the
arithmetic and cache traffic of another numeric job), or running a plain Python loop
(``kind="python"``: a core taken, no torch). The workers are started and running (each has
finished a first step) before the block's body runs, and stopped when it ends, whatever
the ending (exception, Ctrl-C). They also stop on their own when this process dies, even
by SIGKILL: each polls the read end of a pipe whose only write end is held here, and a
closed write end (stop, or death) ends the loop.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

KINDS = ("matmul", "python")


def _work(kind: str, size: int):
    """One step of a worker's loop (imports torch only for ``matmul``)."""
    if kind == "python":
        return lambda: sum(i * i for i in range(2_000))
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    return lambda: torch.mm(a, b, out=out)


def _spin(stop, steps, kind: str, size: int) -> None:
    """A worker: step until ``stop`` (a pipe's read end) is readable or closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent stops us
    step = _work(kind, size)
    while not stop.poll():
        step()
        steps.value += 1


@dataclass
class BusyProcesses:
    """Running workers: their processes and step counters."""

    kind: str
    processes: list = field(default_factory=list)
    counters: list = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def steps(self) -> list[int]:
        """Steps each worker has done so far."""
        return [c.value for c in self.counters]


def _stop(processes: list, grace: float) -> None:
    for process in processes:
        process.join(grace)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


@contextmanager
def busy_processes(n: int, kind: str = "matmul", *, size: int = 256, start_timeout: float = 120.0,
                   grace: float = 5.0) -> Iterator[BusyProcesses]:
    """Run ``n`` busy worker processes for the duration of the block (``n = 0``: none).

    ``kind``: ``"matmul"`` (fp32 ``size`` x ``size`` matmuls on one thread) or ``"python"``.
    Waits up to ``start_timeout`` s for every worker to finish its first step; on leaving,
    gives them ``grace`` s to stop, then kills them.
    """
    from vlsparse.errors import InputError, param

    if n < 0:
        raise InputError(f"{param('load')} must be 0 or more, got {n}", f"e.g. {param('load', 2)}")
    if kind not in KINDS:
        raise InputError(f"unknown load kind {kind!r}", f"choose from {', '.join(KINDS)}")
    load = BusyProcesses(kind)
    if n == 0:
        yield load
        return
    ctx = multiprocessing.get_context("spawn")
    stop_read, stop_write = ctx.Pipe(duplex=False)
    try:
        for _ in range(n):
            counter = ctx.Value("q", 0, lock=False)
            process = ctx.Process(target=_spin, args=(stop_read, counter, kind, size), name="vlsparse-busy",
                                  daemon=True)
            process.start()
            load.processes.append(process)
            load.counters.append(counter)
        stop_read.close()  # the workers hold their own copies
        _wait_started(load, start_timeout)
        yield load
    finally:
        stop_write.close()  # every worker's poll() now sees end-of-file
        _stop(load.processes, grace)


def _wait_started(load: BusyProcesses, timeout: float) -> None:
    """Block until every worker has done a step; a worker that exits first is an error."""
    import time

    deadline = time.monotonic() + timeout
    while min(load.steps()) == 0:
        dead = [p for p in load.processes if not p.is_alive()]
        if dead:
            raise RuntimeError(f"a busy worker exited at start (exit code {dead[0].exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"busy workers did not start within {timeout:g} s")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux ``/proc``; elsewhere any existing pid)."""
    from vlsparse.atomic import pid_exists

    if not pid_exists(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


__all__ = ["KINDS", "BusyProcesses", "alive", "busy_processes"]
