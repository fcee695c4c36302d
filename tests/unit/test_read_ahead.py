"""node/dicom.py RetrieveReadAhead: the next instances of a retrieve are read on the
reader pool while the current one is sent, their bytes are passed on unchanged, the
in-memory budget bounds what is read ahead, and closing early gives it all back."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Iterator

from pacsnode.node import spool
from pacsnode.node.dicom import RetrieveReadAhead
from pacsnode.node.raw_send import StoredDataset
from pacsnode.replication.archive import InstanceLocation


def _locations(count: int) -> list[InstanceLocation]:
    return [InstanceLocation("1.2", "1.2.3", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
            for i in range(count)]


class _Reads:
    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.threads: list[str] = []
        self.started: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, location: InstanceLocation) -> tuple[bytes, int]:
        with self.lock:
            self.started.append(location.sop_instance_uid)
            self.threads.append(threading.current_thread().name)
        return location.sop_instance_uid.encode().ljust(self.size, b"\x00"), 4


def _send_all(stored: Iterator[StoredDataset]) -> list[tuple[bytes, int]]:
    """Each instance's bytes, as a sender takes them: load, then `sent` once its request is out."""
    loaded = []
    for dataset in stored:
        loaded.append(dataset.load())
        dataset.sent()
    return loaded  # type: ignore[return-value]


def _wait_started(reads: _Reads, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(reads.started) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_reads_run_ahead_on_the_pool_and_bytes_pass_unchanged() -> None:
    """The reads ahead start once an instance's request has gone out (`sent`), to run
    while the sender waits for its response."""
    reads = _Reads()
    budget = spool.InflightBudget(10_000)
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="reader") as pool:
        ahead = RetrieveReadAhead(pool, reads, budget, window=2)
        stored = ahead.stored(_locations(5))
        first = next(stored)
        _wait_started(reads, 1)
        time.sleep(0.05)
        assert reads.started == ["1.2.3.0"]  # Nothing read ahead before the first is sent.
        assert first.load() == (b"1.2.3.0".ljust(100, b"\x00"), 4)
        first.sent()
        _wait_started(reads, 3)
        assert reads.started[:3] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]  # Two ahead of the first.
        rest = _send_all(stored)
        assert [part10.rstrip(b"\x00") for part10, _ in rest] == [f"1.2.3.{i}".encode() for i in range(1, 5)]
        ahead.close()
    assert all(name.startswith("reader") for name in reads.threads)
    assert budget.used_bytes == 0


def test_a_spent_budget_reads_again_when_the_instance_is_sent() -> None:
    reads = _Reads(size=600)
    budget = spool.InflightBudget(1000)  # One read-ahead result fits, not two.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ahead = RetrieveReadAhead(pool, reads, budget, window=2)
        loaded = _send_all(ahead.stored(_locations(4)))
        ahead.close()
    assert [part10.rstrip(b"\x00") for part10, _ in loaded] == [f"1.2.3.{i}".encode() for i in range(4)]
    assert len(reads.started) > 4  # Some were dropped and read again.
    assert budget.used_bytes == 0


def test_closing_early_gives_the_budget_back() -> None:
    reads = _Reads()
    budget = spool.InflightBudget(10_000)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ahead = RetrieveReadAhead(pool, reads, budget, window=2)
        stored = ahead.stored(_locations(10))
        next(stored).load()
        stored.close()
        ahead.close()
    assert budget.used_bytes == 0
    assert len(reads.started) <= 4


def test_prefetch_reads_the_first_instances_before_the_first_step_and_only_once() -> None:
    """C-MOVE: the first instances are read while the sub-association is set up; the
    iteration then takes those reads, it does not read them again."""
    reads = _Reads()
    budget = spool.InflightBudget(10_000)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ahead = RetrieveReadAhead(pool, reads, budget, window=2)
        locations = _locations(5)
        ahead.prefetch(locations)
        deadline = time.monotonic() + 5
        while len(reads.started) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(reads.started) == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]  # Nothing iterated yet.
        loaded = _send_all(ahead.stored(locations))
        ahead.close()
    assert [part10.rstrip(b"\x00") for part10, _ in loaded] == [f"1.2.3.{i}".encode() for i in range(5)]
    assert sorted(reads.started) == [f"1.2.3.{i}" for i in range(5)]  # Each read once.
    assert budget.used_bytes == 0


def test_closing_after_prefetch_without_a_step_gives_the_budget_back() -> None:
    """A C-MOVE whose destination refuses the sub-association never iterates."""
    reads = _Reads()
    budget = spool.InflightBudget(10_000)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ahead = RetrieveReadAhead(pool, reads, budget, window=2)
        ahead.prefetch(_locations(5))
        ahead.close()
    assert budget.used_bytes == 0


def test_first_sent_is_called_once_when_the_first_request_is_out_or_at_close() -> None:
    """The retrieve's start line (node/dicom.py) is written while the first instance's
    response is awaited, not on the way to it; once only, and at close when no request
    went out at all (every read failed, or nothing to send)."""
    reads = _Reads()
    calls: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ahead = RetrieveReadAhead(pool, reads, spool.InflightBudget(10_000), window=2,
                                  first_sent=lambda: calls.append(len(reads.started)))
        stored = ahead.stored(_locations(3))
        first = next(stored)
        first.load()
        assert calls == []  # Not before the first request is out.
        first.sent()
        assert len(calls) == 1
        _send_all(stored)
        ahead.close()
        assert len(calls) == 1
        unsent = RetrieveReadAhead(pool, reads, spool.InflightBudget(10_000), first_sent=lambda: calls.append(-1))
        next(unsent.stored(_locations(2)))
        unsent.close()
        unsent.close()
    assert calls[1:] == [-1]
