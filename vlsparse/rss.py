"""The one resident-memory meter: current, peak, and the peak's growth inside a block.

Linux reads ``/proc/self/status`` (``VmRSS``, ``VmHWM``); elsewhere the process
peak from ``getrusage`` stands in for both. ``reset_peak_rss`` restarts the peak
mark so a command's summary measures its own work, not what was loaded before.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _getrusage_peak_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def current_rss_mb() -> float:
    """Resident memory now (MiB)."""
    value = _status_mb("VmRSS")
    return value if value is not None else _getrusage_peak_mb()


def peak_rss_mb() -> float:
    """The largest resident memory since the process started or since ``reset_peak_rss`` (MiB)."""
    value = _status_mb("VmHWM")
    return value if value is not None else _getrusage_peak_mb()


def reset_peak_rss() -> bool:
    """Restart the kernel's peak mark (Linux); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssPeak:
    """Context manager: the largest resident-memory growth (MiB) seen while inside, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_mib = interval, 0.0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, current_rss_mb() - self._base)
            time.sleep(self.interval)

    def __enter__(self) -> "RssPeak":
        self._base = current_rss_mb()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
