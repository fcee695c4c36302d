"""A virtual-time asyncio event loop: one thread, no I/O, time jumps to the next timer.

`VirtualEventLoop` is asyncio's own `BaseEventLoop` (the same ready queue, timer heap and
task machinery the real node runs on) with two things swapped:

- `time()` is a virtual clock that starts at 0 and only moves when nothing is ready:
  the loop then jumps straight to the earliest timer instead of sleeping for it. So
  `asyncio.sleep(600)` costs nothing, and code that reads `loop.time()` (the
  coordinator, the repairer) sees virtual time.
- there is no selector and no self-pipe: nothing but timers and callbacks can wake the
  loop, so a run where every task waits on something that will never happen ends with
  `SimDeadlock` instead of hanging.

Determinism. asyncio is deterministic given the same sequence of callbacks, with one
exception: `asyncio.wait` returns *sets* of tasks, and a set of tasks iterates in the
order of their hashes, which are memory addresses. Tasks and futures made by this loop
hash by creation order instead, so the same program gives the same run every time, in
the same process or another.

Exceptions that escape a callback or a task are recorded in `errors` (and logged) rather
than only logged: a simulation run treats them as failures.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import logging
from asyncio import base_events, format_helpers
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class SimDeadlock(RuntimeError):
    """Nothing is ready and no timer is pending, yet the awaited work is not done."""


class _SimTask(asyncio.Task):  # type: ignore[type-arg]
    """A Task whose hash is its creation number (sets of tasks iterate reproducibly).

    The number is set before `Task.__init__`, which registers the task in asyncio's
    `_all_tasks` WeakSet and so hashes it: numbered after, every task would enter that set
    with hash 0, and each registration would probe past every live task (a run of 10 nodes
    spent about 15% of its time there)."""

    _sim_order = 0

    def __init__(self, coro: Coroutine[Any, Any, Any], *, sim_order: int, **kwargs: Any) -> None:
        self._sim_order = sim_order
        super().__init__(coro, **kwargs)

    def __hash__(self) -> int:
        return self._sim_order


class _SimFuture(asyncio.Future):  # type: ignore[type-arg]
    _sim_order = 0

    def __hash__(self) -> int:
        return self._sim_order


class _VirtualSelector:
    """Stands in for the selector: a 'poll' with a timeout advances the virtual clock."""

    def __init__(self, loop: "VirtualEventLoop") -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        loop = self._loop
        if timeout is None:
            # Nothing ready and no timer: no event can ever arrive (there is no I/O).
            raise SimDeadlock(f"no ready callback and no timer at t={loop.time():.6f}s")
        if timeout > 0:
            scheduled = loop._scheduled  # type: ignore[attr-defined]
            # Jump exactly onto the next timer (not now + timeout, which may round below it).
            target = scheduled[0]._when if scheduled else loop.time() + timeout
            loop._now = max(loop._now, target)
            loop.clock_jumps += 1
        return []

    def close(self) -> None:
        pass


class VirtualEventLoop(asyncio.BaseEventLoop):
    """asyncio's event loop on a virtual clock (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0
        self._selector = _VirtualSelector(self)
        self._order = itertools.count(1)
        self.clock_jumps = 0
        self.errors: list[str] = []
        # Called with every new task and the context it will run in (None: the creator's,
        # which is current). The simulator uses it to know which node a task belongs to.
        self.task_observer: Callable[[asyncio.Task[Any], contextvars.Context | None], None] | None = None
        self.set_task_factory(self._make_task)  # type: ignore[arg-type]
        self.set_exception_handler(self._on_exception)

    # ----------------------------------------------------------------- the clock
    def time(self) -> float:
        return self._now

    def now_ms(self) -> int:
        """Virtual milliseconds since the loop started (rounded through microseconds)."""
        return round(self._now * 1_000_000) // 1000

    # ----------------------------------------------------------------- deterministic tasks
    def _make_task(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
                   ) -> asyncio.Task[Any]:
        task = _SimTask(coro, loop=loop, sim_order=next(self._order), **kwargs)
        if self.task_observer is not None:
            self.task_observer(task, kwargs.get("context"))
        return task

    def create_future(self) -> asyncio.Future[Any]:
        future = _SimFuture(loop=self)
        future._sim_order = next(self._order)
        return future

    # ----------------------------------------------------------------- one iteration
    def _run_once(self) -> None:
        """BaseEventLoop._run_once (CPython 3.11) for this loop, the same steps in the same
        order, so the same callbacks run in the same order: the cancelled-timer clean-up,
        the clock jump `_VirtualSelector.select` makes when nothing is ready, the due timers
        moved to the ready queue, then every callback ready at the start run once. Left out
        is what this loop does not have: selector events, and debug mode's timing of slow
        callbacks (`set_debug(True)` falls back to asyncio's own). Each callback runs as
        `Handle._run` does, without its frame (a run makes millions of them)."""
        if self._debug:
            super()._run_once()  # type: ignore[misc]
            return
        scheduled = self._scheduled  # type: ignore[attr-defined]
        sched_count = len(scheduled)
        if (sched_count > base_events._MIN_SCHEDULED_TIMER_HANDLES  # type: ignore[attr-defined]
                and self._timer_cancelled_count / sched_count  # type: ignore[attr-defined]
                > base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION):  # type: ignore[attr-defined]
            new_scheduled = []
            for handle in scheduled:
                if handle._cancelled:
                    handle._scheduled = False
                else:
                    new_scheduled.append(handle)
            heapq.heapify(new_scheduled)
            self._scheduled = scheduled = new_scheduled
            self._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0]._cancelled:
                self._timer_cancelled_count -= 1
                handle = heapq.heappop(scheduled)
                handle._scheduled = False

        ready = self._ready  # type: ignore[attr-defined]
        if not ready and not self._stopping:  # type: ignore[attr-defined]
            if not scheduled:
                raise SimDeadlock(f"no ready callback and no timer at t={self._now:.6f}s")
            when = scheduled[0]._when
            if when - self._now > 0:  # The selector's jump (a timeout of 0 does not move time).
                self._now = max(self._now, when)
                self.clock_jumps += 1

        end_time = self._now + self._clock_resolution  # type: ignore[attr-defined]
        while scheduled:
            handle = scheduled[0]
            if handle._when >= end_time:
                break
            handle = heapq.heappop(scheduled)
            handle._scheduled = False
            ready.append(handle)

        popleft = ready.popleft
        for _ in range(len(ready)):
            handle = popleft()
            if handle._cancelled:
                continue
            try:
                handle._context.run(handle._callback, *handle._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # As Handle._run reports it.
                context = {"message": f"Exception in callback "
                                      f"{format_helpers._format_callback_source(handle._callback, handle._args)}",
                           "exception": exc, "handle": handle}
                if handle._source_traceback:
                    context["source_traceback"] = handle._source_traceback
                self.call_exception_handler(context)
        handle = None  # Break cycles when an exception occurred.

    # ----------------------------------------------------------------- BaseEventLoop hooks
    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # One thread: call_soon_threadsafe has nobody to wake.

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("cannot close a running event loop")
        super().close()

    def _on_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        message = context.get("message", "")
        text = f"{message}: {exception!r}" if exception is not None else str(message)
        self.errors.append(text)
        log.error("sim.loop.exception %s", text, exc_info=exception)

    # ----------------------------------------------------------------- driving
    def run_until(self, until_s: float) -> None:
        """Run every callback due up to and including virtual time `until_s`, then return."""
        if until_s < self._now:
            return
        handle = self.call_at(until_s, self.stop)
        try:
            self.run_forever()
        finally:
            handle.cancel()
        self._now = max(self._now, until_s)

    def run_for(self, duration_s: float) -> None:
        self.run_until(self._now + duration_s)

    def run_task(self, awaitable: Awaitable[T]) -> T:
        """run_until_complete, with a deadlock reported as SimDeadlock."""
        return self.run_until_complete(awaitable)


def new_loop() -> VirtualEventLoop:
    """A fresh virtual loop, set as the current event loop of this thread."""
    loop = VirtualEventLoop()
    asyncio.set_event_loop(loop)
    return loop


async def inline(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`run_blocking` for the simulator: call the blocking function right here, no thread."""
    return function(*args, **kwargs)
