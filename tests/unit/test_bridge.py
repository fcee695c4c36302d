"""RowBridge and ClusterArchive.find: a C-FIND whose consumer goes away frees its threads,
tasks and rows at once, and an error the coordinator raises reaches the consumer after
its rows (node/bridge.py, node/runtime.py)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any, AsyncIterator

import pytest

from pacsnode.node.bridge import BridgeClosed, RowBridge
from pacsnode.node.runtime import ClusterArchive, LoopThread
from pacsnode.replication.matching import Query


_LOOPS = itertools.count()


@pytest.fixture
def loop_thread() -> Any:
    loop = LoopThread(name="test-loop", io_thread_prefix=f"test-io-{next(_LOOPS)}-")
    yield loop
    loop.stop()


def wait_until(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class FakeCoordinator:
    """An endless (or `rows`-long) find that records whether it was closed, and may raise at the end."""

    def __init__(self, rows: int | None = None, error: Exception | None = None) -> None:
        self.rows = rows
        self.error = error
        self.produced = 0
        self.closed = threading.Event()
        self.running = 0

    def find_here(self, query: Query, rows_max: int) -> list[dict[str, Any]] | None:
        return None  # Not answered from the store on the caller's thread: find() on the loop.

    async def find(self, query: Query) -> AsyncIterator[dict[str, Any]]:
        self.running += 1
        try:
            index = 0
            while self.rows is None or index < self.rows:
                self.produced += 1
                yield {"SOPInstanceUID": f"1.2.{index}"}
                index += 1
                if index % 100 == 0:
                    await asyncio.sleep(0)
            if self.error is not None:
                raise self.error
        finally:
            self.running -= 1
            self.closed.set()


def archive(loop: LoopThread, coordinator: Any, buffer_rows: int = 50) -> ClusterArchive:
    return ClusterArchive(loop, coordinator, store_timeout_ms=1_000, find_buffer_rows=buffer_rows)


QUERY = Query(level="IMAGE", conditions=(), return_keys=("SOPInstanceUID",), model="STUDY")


def executor_threads(loop: LoopThread) -> int:
    prefix = loop.executor._thread_name_prefix  # type: ignore[attr-defined]
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefix))


# --------------------------------------------------------------------------- the bridge
def test_rows_pass_in_order_and_the_end_is_seen(loop_thread: LoopThread) -> None:
    bridge: RowBridge[int] = RowBridge(loop_thread.loop, capacity=3)

    async def produce() -> None:
        for i in range(10):
            await bridge.put(i)
        bridge.finish()

    asyncio.run_coroutine_threadsafe(produce(), loop_thread.loop)
    seen: list[int] = []
    while (batch := bridge.take(1.0)) is not None:
        seen.extend(batch)
        assert len(batch) <= 3
    assert seen == list(range(10))


def test_a_full_bridge_parks_the_producer_on_the_loop_not_a_thread(loop_thread: LoopThread) -> None:
    bridge: RowBridge[int] = RowBridge(loop_thread.loop, capacity=2)
    outcome: list[str] = []

    async def produce() -> None:
        try:
            for i in range(100):
                await bridge.put(i)
        except BridgeClosed:
            outcome.append("closed")

    threads_before = threading.active_count()
    future = asyncio.run_coroutine_threadsafe(produce(), loop_thread.loop)
    assert wait_until(lambda: bridge.buffered == 2)
    time.sleep(0.05)
    assert threading.active_count() == threads_before  # Waiting costs no thread.
    assert not future.done()
    bridge.close()
    future.result(timeout=2)
    assert outcome == ["closed"] and bridge.buffered == 0


def test_the_producers_error_comes_after_its_rows(loop_thread: LoopThread) -> None:
    bridge: RowBridge[int] = RowBridge(loop_thread.loop, capacity=100)

    async def produce() -> None:
        await bridge.put(1)
        await bridge.put(2)
        bridge.finish(RuntimeError("2 ranges could not be asked"))

    asyncio.run_coroutine_threadsafe(produce(), loop_thread.loop).result(timeout=2)
    assert bridge.take(1.0) == [1, 2]
    with pytest.raises(RuntimeError, match="2 ranges"):
        bridge.take(1.0)


def test_take_times_out_empty_while_the_producer_is_slow(loop_thread: LoopThread) -> None:
    bridge: RowBridge[int] = RowBridge(loop_thread.loop, capacity=4)
    started = time.monotonic()
    assert bridge.take(0.05) == []
    assert time.monotonic() - started >= 0.04
    bridge.close()
    assert bridge.take(0.05) is None


# --------------------------------------------------------------------------- ClusterArchive.find
def test_find_delivers_every_row_then_the_coordinators_error(loop_thread: LoopThread) -> None:
    coordinator = FakeCoordinator(rows=1_234, error=ValueError("some ranges could not be asked"))
    rows = []
    with pytest.raises(ValueError, match="could not be asked"):
        for row in archive(loop_thread, coordinator).find(QUERY):
            rows.append(row)
    assert len(rows) == 1_234
    assert rows[-1] == {"SOPInstanceUID": "1.2.1233"}


def test_find_without_error_ends_cleanly(loop_thread: LoopThread) -> None:
    coordinator = FakeCoordinator(rows=500)
    assert len(list(archive(loop_thread, coordinator).find(QUERY))) == 500
    assert coordinator.closed.wait(2)


@pytest.mark.parametrize("how", ["closed", "cancelled", "dropped"])
def test_abandoned_finds_free_their_threads_tasks_and_rows(loop_thread: LoopThread, how: str) -> None:
    """The gray failure: 16 abandoned finds used to keep the loop's 16 executor threads
    blocked on full queues for ever. Now 200 of them leave nothing behind."""
    coordinators = []
    for _ in range(200):
        coordinator = FakeCoordinator(rows=None)  # Endless: only the consumer can stop it.
        coordinators.append(coordinator)
        cancelled = threading.Event()
        rows = archive(loop_thread, coordinator, buffer_rows=64).find(QUERY, cancelled.is_set)
        assert next(rows) == {"SOPInstanceUID": "1.2.0"}
        if how == "closed":  # find_result_max, or pynetdicom closing the handler's generator on abort.
            rows.close()
        elif how == "cancelled":  # C-CANCEL: the handler's flag, seen between rows.
            cancelled.set()
            for _ in rows:
                pass
        else:  # The handler's frame went away without closing it.
            del rows  # CPython closes it as its last reference goes.
    assert wait_until(lambda: all(c.closed.is_set() for c in coordinators))
    assert sum(c.running for c in coordinators) == 0
    # Each producer stopped at about the bound, not at the end of an endless answer.
    assert max(c.produced for c in coordinators) <= 64 + 64 + 100 + 1

    def loop_tasks() -> int:
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1
        return asyncio.run_coroutine_threadsafe(count(), loop_thread.loop).result(2)

    assert wait_until(lambda: loop_tasks() == 0)
    # No executor thread was ever taken, and the loop still answers its executor at once.
    assert executor_threads(loop_thread) == 0

    async def probe() -> str:
        return await asyncio.to_thread(lambda: "ok")

    assert loop_thread.run(probe(), 2) == "ok"


def test_a_slow_consumer_holds_at_most_the_bound(loop_thread: LoopThread) -> None:
    coordinator = FakeCoordinator(rows=None)
    rows = archive(loop_thread, coordinator, buffer_rows=100).find(QUERY)
    next(rows)
    time.sleep(0.2)  # The producer fills the bridge and waits.
    assert coordinator.produced <= 100 + 100 + 100 + 1
    taken = sum(1 for _ in zip(range(1_000), rows))
    assert taken == 1_000
    rows.close()
    assert coordinator.closed.wait(2)


class AnsweredHere(FakeCoordinator):
    """find_here answers (a ring of one, an exact key): find() must not run."""

    def __init__(self) -> None:
        super().__init__(rows=0, error=AssertionError("find() ran on the loop"))
        self.asked: list[tuple[Query, int]] = []

    def find_here(self, query: Query, rows_max: int) -> list[dict[str, Any]] | None:
        self.asked.append((query, rows_max))
        return [{"SOPInstanceUID": "1.2.1"}, {"SOPInstanceUID": "1.2.2"}]


def test_find_answered_here_takes_no_trip_through_the_loop(loop_thread: LoopThread) -> None:
    coordinator = AnsweredHere()
    rows = list(archive(loop_thread, coordinator, buffer_rows=77).find(QUERY))
    assert rows == [{"SOPInstanceUID": "1.2.1"}, {"SOPInstanceUID": "1.2.2"}]
    assert coordinator.asked == [(QUERY, 77)]  # At most the bridge's bound, else the loop streams it.
    assert coordinator.running == 0 and not coordinator.closed.is_set()  # find() never started.


# --------------------------------------------------------------------------- LoopThread.run
def test_run_gives_up_at_once_when_the_requestor_goes(loop_thread: LoopThread) -> None:
    from pacsnode.node.runtime import RequestAbandoned

    cancelled = threading.Event()
    gone = threading.Event()

    async def slow_locate() -> list[str]:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []

    threading.Timer(0.1, gone.set).start()
    started = time.monotonic()
    with pytest.raises(RequestAbandoned):
        loop_thread.run(slow_locate(), 600, gone.is_set)
    assert time.monotonic() - started < 2
    assert cancelled.wait(2)  # The coroutine (the scatter) was cancelled, not left running.


def test_run_still_answers_and_still_times_out(loop_thread: LoopThread) -> None:
    async def quick() -> str:
        return "ok"

    assert loop_thread.run(quick(), 5, lambda: False) == "ok"
    assert loop_thread.run(quick(), 5) == "ok"
    with pytest.raises(TimeoutError):
        loop_thread.run(asyncio.sleep(5), 0.3, lambda: False)
