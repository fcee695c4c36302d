"""Versions from a hybrid logical clock (Kulkarni et al., 2014). Pure code.

A version is (physical ms, logical counter, node id), ordered as a tuple. The clock's
physical part follows the wall clock; the logical part orders events inside one
millisecond and events that follow a message from a node whose clock is ahead. Every
node calls `observe` with the version of every message that carries one (a replica
write, a tombstone, a listing read before a delete), so a version stamped after that is
greater than every version the node has seen: a delete stamped after its coordinator
read the instances it deletes supersedes each of them, whatever the wall clocks say.
The node id breaks the last tie, so two versions are never equal unless they are the
same event.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Version:
    ms: int = 0
    logical: int = 0
    node: str = ""

    def mark(self) -> str:
        """The version as a string that sorts like the version (digest and listing entries)."""
        return f"~{self.ms:015d}.{self.logical:010d}.{self.node}"

    @classmethod
    def from_mark(cls, mark: str) -> "Version":
        if not mark.startswith("~"):
            raise ValueError("not a version mark")
        ms, logical, node = mark[1:].split(".", 2)
        return cls(int(ms), int(logical), node)


def is_mark(content: str) -> bool:
    """True for a listing entry's third field that names a tombstone's version (content
    hashes are hex digits and never start with '~')."""
    return content.startswith("~")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class HybridClock:
    """One node's hybrid logical clock. Thread-safe (stores stamp from worker threads)."""

    def __init__(self, node_id: str, wall: Callable[[], int] = wall_ms, *, drift_warn_ms: int = 60_000) -> None:
        self.node_id = node_id
        self._wall = wall
        self._drift_warn_ms = drift_warn_ms
        self._ms = 0
        self._logical = 0
        self._lock = threading.Lock()

    def now(self) -> Version:
        """A version greater than every version stamped or observed here before."""
        with self._lock:
            wall = self._wall()
            if wall > self._ms:
                self._ms, self._logical = wall, 0
            else:
                self._logical += 1
            return Version(self._ms, self._logical, self.node_id)

    def observe(self, seen: Version) -> None:
        """Move the clock past a version received from another node."""
        with self._lock:
            wall = self._wall()
            if seen.ms > wall + self._drift_warn_ms:
                log.warning("hlc.drift seen_ms=%d wall_ms=%d node=%s: a peer's clock is far ahead",
                            seen.ms, wall, seen.node)
            if seen.ms > self._ms or (seen.ms == self._ms and seen.logical > self._logical):
                self._ms, self._logical = seen.ms, seen.logical

    def peek(self) -> Version:
        with self._lock:
            return Version(self._ms, self._logical, self.node_id)
