"""STOW-RS's node-wide budget of request bytes held in memory (`stow_bytes_max`).

A STOW-RS part is held whole in memory: while its body arrives (the multipart reader's
buffer) and then while it is stored (up to STOW_PARTS_IN_FLIGHT parts a request). Without
a bound, several clients sending big parts at once could make the node hold 8 x
the part limit x clients. Every request takes its bytes from one `StowBudget` before it
feeds them to its reader, and gives them back as the reader drops them (delimiters, part
headers, a part over the limit) and as each stored part's write ends. A request that cannot
take its next bytes waits: it reads no more of its body, so uvicorn stops reading the
socket and TCP pushes back on the client. A request that waits longer than the budget's
`wait_s` gets BudgetWaitTimeout (the front end then answers 503 or 202, docs/
conformance-statement.md 9.4).

No deadlock between requests whose parts are half received: half of the budget is kept for
the oldest request still receiving its body (the "leader"): it may take any bytes that are
free, while every other request takes only what leaves the leader's remaining need free
(`part_bytes_max` plus RECEIVE_SLACK_BYTES, less what it holds) and, together with the
other followers, at most the other half. So the leader can always receive a part of the
largest size the budget accepts (once the parts being stored have been written), and when
it finishes its body, the followers together hold at most the other half, which leaves the
next oldest what it needs too. Parts over `part_bytes_max` are refused by the reader as
over the size limit (their bytes dropped as they arrive).

Used from one event loop (the HTTP thread's); no decoding, no I/O: bookkeeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time

log = logging.getLogger(__name__)

# What a request's multipart reader may hold beyond a part of `part_bytes_max` bytes: the
# delimiter, the part's headers (at most 16 KiB: node/dicomweb_media.py), and one slice of
# the body fed after the part reached its limit (FEED_BYTES_MAX).
RECEIVE_SLACK_BYTES = 1024**2
# The request body is fed to the reader, and taken from the budget, at most this much at a
# time (uvicorn hands over what one socket read gave).
FEED_BYTES_MAX = 256 * 1024


class BudgetWaitTimeout(Exception):
    """A STOW-RS request waited longer than the budget's wait_s for bytes to hold."""

    def __init__(self, waited_s: float, wanted_bytes: int) -> None:
        super().__init__(f"waited {waited_s:.1f} s for {wanted_bytes} bytes of the STOW-RS memory budget")
        self.waited_s = waited_s
        self.wanted_bytes = wanted_bytes


@dataclasses.dataclass(frozen=True)
class StowBudgetStats:
    limit_bytes: int
    used_bytes: int
    peak_bytes: int
    receiving_requests: int
    waiting_requests: int
    waits: int  # Takes that had to wait.
    timeouts: int  # Requests that waited longer than wait_s.


def part_bytes_max(limit_bytes: int, instance_size_bytes_max: int) -> int:
    """The largest STOW-RS part a node with this budget accepts: instance_size_bytes_max,
    or half the budget less RECEIVE_SLACK_BYTES when that is smaller (the leader's share)."""
    return max(1, min(instance_size_bytes_max, limit_bytes // 2 - RECEIVE_SLACK_BYTES))


class StowBudget:
    """Bytes held by all STOW-RS requests of a node together; see the module's docstring."""

    def __init__(self, limit_bytes: int, instance_size_bytes_max: int, *, wait_s: float) -> None:
        self.limit_bytes = limit_bytes
        self.part_bytes_max = part_bytes_max(limit_bytes, instance_size_bytes_max)
        self._reserve = self.part_bytes_max + RECEIVE_SLACK_BYTES  # At most half the budget.
        self._wait_s = wait_s
        self._used = 0
        self._peak = 0
        self._receiving: dict[int, StowHold] = {}  # By arrival: the first is the leader.
        self._ids = itertools.count()
        self._waiters: list[asyncio.Future[None]] = []
        self._waits = 0
        self._timeouts = 0

    def request(self) -> StowHold:
        """The hold of one STOW-RS request (close it when the request ends)."""
        return StowHold(self, next(self._ids))

    def statistics(self) -> StowBudgetStats:
        return StowBudgetStats(limit_bytes=self.limit_bytes, used_bytes=self._used, peak_bytes=self._peak,
                               receiving_requests=len(self._receiving), waiting_requests=len(self._waiters),
                               waits=self._waits, timeouts=self._timeouts)

    def _grantable(self, hold: StowHold, count: int) -> bool:
        if self._used + count > self.limit_bytes:
            return False
        leader = next(iter(self._receiving.values()), hold)
        if leader is hold:
            return True
        leader_need = max(0, self._reserve - leader.receiving)
        followers = sum(other.receiving for other in self._receiving.values() if other is not leader)
        return (self._used + count + leader_need <= self.limit_bytes
                and followers + count <= self.limit_bytes - self._reserve)

    async def _take(self, hold: StowHold, count: int) -> None:
        if not self._grantable(hold, count):
            self._waits += 1
            started = time.monotonic()
            while not self._grantable(hold, count):
                left = self._wait_s - (time.monotonic() - started)
                if left <= 0:
                    self._timeouts += 1
                    raise BudgetWaitTimeout(time.monotonic() - started, count)
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await asyncio.wait({waiter}, timeout=left)  # Woken by any release.
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        if hold.key not in self._receiving:
            self._receiving[hold.key] = hold
        hold.receiving += count
        self._used += count
        self._peak = max(self._peak, self._used)

    def _release(self, count: int) -> None:
        self._used -= count
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _stop_receiving(self, hold: StowHold) -> None:
        if self._receiving.pop(hold.key, None) is not None:
            self._wake()


class StowHold:
    """One STOW-RS request's bytes in its StowBudget: `receiving` (in its multipart reader)
    and `storing` (parts handed to the store whose write has not ended)."""

    def __init__(self, budget: StowBudget, key: int) -> None:
        self._budget = budget
        self.key = key
        self.receiving = 0
        self.storing = 0

    async def take(self, count: int) -> None:
        """Hold `count` more bytes, about to be fed to the reader; waits for them (at most
        the budget's wait_s: BudgetWaitTimeout)."""
        await self._budget._take(self, count)

    def settle(self, buffered: int, parts: list[int]) -> None:
        """After a feed: the reader holds `buffered` bytes, and handed out parts of these
        sizes (held on, as `storing`, until `stored` gives each back); the rest is released."""
        handed = sum(parts)
        freed = self.receiving - buffered - handed
        if freed < 0:
            raise RuntimeError(f"STOW budget: the reader holds {buffered + handed} bytes, more than the "
                               f"{self.receiving} taken for it")
        self.receiving = buffered
        self.storing += handed
        self._budget._release(freed)

    def stored(self, count: int) -> None:
        """A part of `count` bytes was stored (or refused, or dropped): its bytes are free."""
        self.storing -= count
        self._budget._release(count)

    def end_receiving(self) -> None:
        """The body has ended (or is no longer read): what the reader held is free, and the
        request is no longer the leader or a follower."""
        count, self.receiving = self.receiving, 0
        self._budget._stop_receiving(self)
        self._budget._release(count)
