"""Local health: is this node's own store path answering? (Lifeguard's local-health idea)

A node whose store path is stuck (a disk that does not return from fsync, the loop's
executor with every thread held) still answers membership pings from its loop, so the
cluster would keep sending it writes that never finish. Two observations tell:

- `WriteWatch`: every local write (C-STORE on this node, a peer's StoreInstance, a hint
  kept here) registers while it runs; the age of the oldest one still running is the
  store's own answer time.
- a probe: every `health_probe_interval_ms` the node hands the executor a no-op; the time
  it waits for a thread is the executor's answer time (at most one probe is outstanding).

`LocalHealth.assess` turns both into a `Health`: unhealthy while either is older than
`store_stall_ms`, healthy again as soon as both are back under it. While unhealthy the
node says so in `pacsnode status`, does not ack membership probes and does not refute
suspicion (node/swim_membership.py), so its peers suspect it, declare it dead and route
around it; once healthy it refutes as usual. Pure logic: the caller supplies the time.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Callable, Iterator, Sequence

from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes, StoredInstance
from pacsnode.replication.transport import LocalReplica
from pacsnode.ring.placement import TokenRange


class HealthReason(StrEnum):
    HEALTHY = "healthy"
    WRITE_STALLED = "store-write-stalled"  # A local write has been running longer than the bound.
    EXECUTOR_STALLED = "store-executor-stalled"  # The store's thread pool has not run a probe within the bound.


@dataclass(frozen=True)
class Health:
    reason: HealthReason
    detail: str = ""
    oldest_write_age_ms: int = 0  # 0: no local write running.
    probe_wait_ms: int = 0  # How long the outstanding probe has waited (0: none outstanding).
    unhealthy_for_ms: int = 0

    @property
    def healthy(self) -> bool:
        return self.reason is HealthReason.HEALTHY


class WriteWatch:
    """Local writes in progress, from any thread; `oldest_started_ms` for the assessment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[int, int] = {}
        self._tokens = itertools.count()
        # Called with the seconds each finished local instance write took (/metrics).
        self.observers: list[Callable[[float], None]] = []

    def finished(self, seconds: float) -> None:
        for observer in self.observers:
            observer(seconds)

    def begin(self, now_ms: int) -> int:
        token = next(self._tokens)
        with self._lock:
            self._started[token] = now_ms
        return token

    def end(self, token: int) -> None:
        with self._lock:
            self._started.pop(token, None)

    def oldest_started_ms(self) -> int | None:
        with self._lock:
            return min(self._started.values(), default=None)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._started)


class LocalHealth:
    """The assessment, with its transitions. Only the loop calls it."""

    def __init__(self, stall_ms: int) -> None:
        if stall_ms < 1:
            raise ValueError(f"stall_ms must be >= 1, got {stall_ms}")
        self.stall_ms = stall_ms
        self._probe_sent_ms: int | None = None
        self._unhealthy_since_ms: int | None = None
        self.current = Health(HealthReason.HEALTHY)
        self.transitions = 0

    # ----------------------------------------------------------------- probe
    @property
    def probe_outstanding(self) -> bool:
        return self._probe_sent_ms is not None

    def probe_sent(self, now_ms: int) -> None:
        self._probe_sent_ms = now_ms

    def probe_answered(self) -> None:
        self._probe_sent_ms = None

    # ----------------------------------------------------------------- assessment
    def assess(self, now_ms: int, oldest_write_started_ms: int | None) -> Health:
        """The health now; `changed()` tells whether it flipped since the last call."""
        write_age = max(0, now_ms - oldest_write_started_ms) if oldest_write_started_ms is not None else 0
        probe_wait = max(0, now_ms - self._probe_sent_ms) if self._probe_sent_ms is not None else 0
        if write_age >= self.stall_ms:
            reason, detail = HealthReason.WRITE_STALLED, f"a local store write has run for {write_age} ms"
        elif probe_wait >= self.stall_ms:
            reason, detail = (HealthReason.EXECUTOR_STALLED,
                              f"the store's thread pool has not run a probe for {probe_wait} ms")
        else:
            reason, detail = HealthReason.HEALTHY, ""
        if reason is HealthReason.HEALTHY:
            self._unhealthy_since_ms = None
        elif self._unhealthy_since_ms is None:
            self._unhealthy_since_ms = now_ms
        unhealthy_for = now_ms - self._unhealthy_since_ms if self._unhealthy_since_ms is not None else 0
        previous = self.current
        self.current = Health(reason, detail, write_age, probe_wait, unhealthy_for)
        if previous.healthy != self.current.healthy:
            self.transitions += 1
        return self.current


class WatchedReplica:
    """A LocalReplica whose writes register with a WriteWatch while they run."""

    def __init__(self, inner: LocalReplica, watch: WriteWatch, now_ms: Callable[[], int]) -> None:
        self.inner = inner
        self._watch = watch
        self._now_ms = now_ms

    def put_stored(self, stored: StoredInstance, *, hint_for: str = "") -> str:
        token = self._watch.begin(self._now_ms())
        started = time.perf_counter()
        try:
            return self.inner.put_stored(stored, hint_for=hint_for)
        finally:
            self._watch.end(token)
            self._watch.finished(time.perf_counter() - started)

    def delete_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> None:
        token = self._watch.begin(self._now_ms())
        try:
            self.inner.delete_hint(owner, study_instance_uid, sop_instance_uid)
        finally:
            self._watch.end(token)

    def read_stored(self, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None:
        return self.inner.read_stored(study_instance_uid, sop_instance_uid)

    def read_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None:
        return self.inner.read_hint(owner, study_instance_uid, sop_instance_uid)

    def query_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]:
        return self.inner.query_rows(query, ranges)

    def query_hint_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]:
        return self.inner.query_hint_rows(query, ranges)

    def hint_owners(self) -> dict[str, tuple[int, int]]:
        return self.inner.hint_owners()

    def hints(self, owner: str) -> Iterator[StoredInstance]:
        return self.inner.hints(owner)

    def __getattr__(self, name: str) -> Any:  # Anything else the store offers, unwatched (reads).
        return getattr(self.inner, name)
