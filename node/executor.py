"""The loop's default executor (behind every `asyncio.to_thread` of the node), with counts.

Every local store read and write of the loop runs on it, so it is the node's store path:
a task that never returns holds one of its threads for ever, and once all are held
every store waits. `statistics()` says how many threads it has started (a
ThreadPoolExecutor keeps idle ones), how many tasks are running and how many wait for a
thread; metrics export them and local health (node/health.py) probes it.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ExecutorStats:
    threads: int  # Started so far and still alive (idle ones are kept for the next task).
    running: int  # Tasks on a thread now.
    queued: int  # Tasks waiting for a thread.
    threads_max: int


class CountedExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor that counts its running and queued tasks."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._threads_max = max_workers
        self._counts_lock = threading.Lock()
        self._running = 0
        self._queued = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[T]":
        started = threading.Event()

        def run() -> T:
            with self._counts_lock:
                self._queued -= 1
                self._running += 1
            started.set()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._counts_lock:
                    self._running -= 1

        def done(future: "concurrent.futures.Future[T]") -> None:
            if future.cancelled() and not started.is_set():  # Never ran: no longer queued.
                with self._counts_lock:
                    self._queued -= 1

        with self._counts_lock:
            self._queued += 1
        try:
            future = super().submit(run)
        except BaseException:
            with self._counts_lock:
                self._queued -= 1
            raise
        future.add_done_callback(done)
        return future

    def statistics(self) -> ExecutorStats:
        with self._counts_lock:
            return ExecutorStats(threads=len(self._threads), running=self._running, queued=self._queued,
                                 threads_max=self._threads_max)
