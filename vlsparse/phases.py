"""Where a run's wall time goes: seconds per named phase, for the summaries (``prune``'s time split)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Phases:
    """Wall seconds accumulated per phase name, in the order the phases first ran.

    ``with phases("read weights"): ...`` adds the block's time to that phase; a phase
    entered many times (once per layer) sums.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return sum(self.seconds.values())
