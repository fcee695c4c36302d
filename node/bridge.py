"""RowBridge: rows made by a coroutine on the node's loop, read by one blocking thread.

A C-FIND runs on a pynetdicom association thread; its rows come from the coordinator, an
async generator on the node's loop. The bridge between them is bounded, and nothing in
it ever parks a thread on behalf of a consumer that may have gone:

- the producer (a coroutine on the loop) appends while there is room, and when the
  buffer is full it awaits an asyncio.Event: a suspended coroutine, not a thread of the
  loop's executor (the old bridge called `asyncio.to_thread(queue.put, row)`, and every
  abandoned C-FIND kept one of the executor's 16 threads blocked for ever);
- the consumer (the association thread) waits on a Condition with a timeout, so that it
  can look at C-CANCEL and abort between rows; when it has drained the buffer to half,
  it wakes a waiting producer through `call_soon_threadsafe`;
- `close()` (the consumer leaving: C-CANCEL, abort, a result cap, the generator closed)
  drops the buffered rows at once and wakes the producer, whose next `put` raises
  BridgeClosed; the caller also cancels the producer's task.

The producer ends with `finish(error)`: the consumer gets every row before it, then the
error raised in its own thread (a coordinator that could not ask some ranges says so at
the end of its rows, and the consumer must see it after them).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class BridgeClosed(Exception):
    """The consumer has gone; the producer stops."""


class RowBridge(Generic[T]):
    """A bounded buffer from one coroutine on `loop` to one consumer thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._loop = loop
        self._capacity = capacity
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        self._readable = threading.Condition(self._lock)
        self._space: asyncio.Event | None = None  # Created on the loop by the first put that waits.
        self._producer_waiting = False
        self._closed = False
        self._finished = False
        self._error: BaseException | None = None

    # ----------------------------------------------------------------- producer (on the loop)
    async def put(self, item: T) -> None:
        """Append `item`; when the buffer is full, wait (on the loop) for room.
        Raises BridgeClosed once the consumer has gone."""
        while True:
            with self._lock:
                if self._closed:
                    raise BridgeClosed()
                if len(self._items) < self._capacity:
                    self._items.append(item)
                    self._readable.notify()
                    return
                if self._space is None:
                    self._space = asyncio.Event()
                self._space.clear()
                self._producer_waiting = True
                space = self._space
            await space.wait()

    def finish(self, error: BaseException | None = None) -> None:
        """No more rows; the consumer raises `error` after the last one. Only the first call counts."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._error = error
            self._readable.notify_all()

    # ----------------------------------------------------------------- consumer (its own thread)
    def take(self, timeout_s: float) -> list[T] | None:
        """Every buffered row, waiting up to `timeout_s` for one: [] when none came in time,
        None at the end. Raises the producer's error once its rows are taken."""
        with self._lock:
            if not self._items and not self._finished and not self._closed:
                self._readable.wait(timeout_s)
            if self._items:
                items = list(self._items)
                self._items.clear()
                self._wake_producer()
                return items
            if self._closed:
                return None
            if self._finished:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                return None
            return []

    def close(self) -> None:
        """The consumer is leaving: drop what is buffered and release the producer."""
        with self._lock:
            self._closed = True
            self._items.clear()
            self._error = None
            self._readable.notify_all()
            self._wake_producer()

    def _wake_producer(self) -> None:
        # Caller holds the lock.
        if not self._producer_waiting or self._space is None:
            return
        if not self._closed and len(self._items) > self._capacity // 2:
            return
        self._producer_waiting = False
        try:
            self._loop.call_soon_threadsafe(self._space.set)
        except RuntimeError:  # The loop is closed: nobody is waiting any more.
            pass

    # ----------------------------------------------------------------- views
    @property
    def buffered(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed
