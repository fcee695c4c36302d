"""When membership last saw trouble: a member suspected, declared dead, restarted, leaving
or back. Pure code, fed by the membership driver with its own clock.

A read that names a study trusts R owners only while nothing has gone wrong recently.
Right after a fault (a partition healed, a node paused or restarted) an owner can look
alive yet lack an instance that was acknowledged through hints held elsewhere, until hint
replay delivers it. For `read_fault_window_ms` after any membership transition a named
read therefore also asks the study's stand-ins for hints (replication/gather.py).
"""

from __future__ import annotations


class TroubleLog:
    """The last time (membership clock, ms) any member other than ourselves changed state."""

    def __init__(self) -> None:
        self._last_ms: int | None = None
        self.transitions = 0

    def note(self, now_ms: int) -> None:
        """A member changed state (alive, suspect, dead, leaving, left, removed, a new boot)."""
        self.transitions += 1
        if self._last_ms is None or now_ms > self._last_ms:
            self._last_ms = now_ms

    def within(self, now_ms: int, window_ms: int) -> bool:
        """True when a transition was noted in the last `window_ms` (never when window_ms <= 0)."""
        if window_ms <= 0 or self._last_ms is None:
            return False
        return now_ms - self._last_ms <= window_ms
