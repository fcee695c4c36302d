"""A process's CPU use while it should be waiting, judged on what it does steadily.

A waiting node still runs its own timers (membership, hint replay, the store's health
probe), and once in a while something heavier lands in any window: a full pass of
Python's cyclic garbage collector, a RocksDB background flush. One such pause in a
single 2.5 s window was 80 ms on a loaded CI machine (3.2% of a core) and failed a 2%
bound although nothing polled. What these tests guard against is steady: a reactor that
polls every 0.2 ms costs ~20% of a core in *every* window. So the time is cut into short
windows and the median window is judged: a one-off pause moves one window, polling moves
all of them.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def _cpu_s(pid: int, tick: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def has_proc() -> bool:
    return Path(f"/proc/{os.getpid()}/stat").exists()


def median_window_fraction(pid: int, *, windows: int = 5, window_s: float = 0.5) -> tuple[float, list[float]]:
    """Sleep `windows` x `window_s`; return the median fraction of one core the process used
    per window, with the tick's resolution subtracted (one clock tick of rounding per
    reading), and every window's raw fraction for the assertion's message."""
    tick = os.sysconf("SC_CLK_TCK")
    fractions: list[float] = []
    for _ in range(windows):
        before, start = _cpu_s(pid, tick), time.monotonic()
        time.sleep(window_s)
        used = _cpu_s(pid, tick) - before
        fractions.append(used / (time.monotonic() - start))
    resolution = 2 / tick / window_s  # A window's reading is off by up to two ticks.
    return max(0.0, statistics.median(fractions) - resolution), fractions
