"""Static membership: members from seeds, spread by periodic push-pull of the member table.

A node contacts its seeds and every member it knows every `membership_sync_interval_ms`
and exchanges the whole table; a member counts as reachable while it answered within
`failure_timeout_ms`. This is the membership source of the cluster-data-path issue; the
gossip issue replaces it with SWIM behind the same MembershipView.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pacsnode.node import peer_wire
from pacsnode.replication.transport import PeerError
from pacsnode.ring.members import MemberInfo, MemberTable
from pacsnode.ring.placement import Ring

if TYPE_CHECKING:
    from pacsnode.node.grpc_transport import GrpcTransport

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.monotonic() * 1000)


def wall_ms() -> int:
    """Wall-clock milliseconds: orders a member's updates across nodes (with its generation)."""
    return int(time.time() * 1000)


class StaticMembership:
    """MembershipView for the node, kept current by push-pull with seeds and members."""

    def __init__(self, cluster_id: str, me: MemberInfo, seeds: Iterable[str], *, sync_interval_ms: int,
                 failure_timeout_ms: int, dead_grace_ms: int = 600_000) -> None:
        self.table = MemberTable(cluster_id, me, failure_timeout_ms=failure_timeout_ms)
        self.self_id = me.node_id
        self.seeds = [s for s in seeds if s != me.peer_address]
        self.sync_interval_ms = sync_interval_ms
        self.dead_grace_ms = dead_grace_ms
        self.transport: "GrpcTransport | None" = None
        self._task: asyncio.Task[None] | None = None
        self._ring_version = 0
        self._alive_before: dict[str, bool] = {}
        self.on_change: list[Callable[[], None]] = []  # Called after every ring change.

    # ----------------------------------------------------------------- MembershipView
    def ring(self) -> Ring:
        return self.table.ring()

    def is_alive(self, node_id: str) -> bool:
        return self.table.is_alive(node_id, now_ms())

    def member(self, node_id: str) -> MemberInfo | None:
        return self.table.member(node_id)

    def members(self) -> list[MemberInfo]:
        return self.table.members()

    # ----------------------------------------------------------------- updates
    def heard_from(self, node_id: str) -> None:
        if node_id and self.table.member(node_id) is not None:
            self.table.contact_succeeded(node_id, now_ms())

    def merge_wire(self, updates: Iterable[Any]) -> None:
        members = []
        for update in updates:
            try:
                members.append(peer_wire.member_from_wire(update))
            except ValueError as error:
                log.warning("membership.update.ignored reason=%s", error)
        before = self.table.ring().version
        changed = self.table.merge(members, now_ms(), wall_ms())
        self._changed(changed, before)

    def _changed(self, changed: list[str], before: int) -> None:
        if changed:
            ring = self.table.ring()
            log.info("membership.changed members=%d changed=%s ring_version=%x", len(ring), ",".join(changed),
                     ring.version)
            if ring.version != before:
                for callback in self.on_change:
                    callback()

    def leave(self) -> None:
        """Start handing our ranges over: we stop owning tokens; we keep serving until drained."""
        before = self.table.ring().version
        self.table.update_self(state="leaving", updated_at_ms=wall_ms())
        log.warning("membership.leaving node=%s", self.self_id)
        self._changed([self.self_id], before)

    def mark_left(self) -> None:
        before = self.table.ring().version
        self.table.update_self(state="left", updated_at_ms=wall_ms())
        log.warning("membership.left node=%s", self.self_id)
        self._changed([self.self_id], before)

    def remove(self, node_id: str, *, reason: str) -> bool:
        """Take a member out of the ring (operator, or dead for longer than the grace)."""
        before = self.table.ring().version
        if self.table.set_state(node_id, "removed", wall_ms()) is None:
            return False
        log.warning("membership.removed node=%s reason=%s", node_id, reason)
        self._changed([node_id], before)
        return True

    def _remove_dead(self) -> None:
        """Dead longer than the grace -> removed, within the rails: never below 75% of the
        ring's members, never every node of a site (that is a partition, not a dead site)."""
        ring_members = [m for m in self.members() if m.state == "alive"]
        now = now_ms()
        for member in ring_members:
            last = self.table.last_contact_ms(member.node_id)
            if member.node_id == self.self_id or last is None or now - last < self.dead_grace_ms:
                continue
            remaining = len([m for m in ring_members if m.state == "alive"]) - 1
            if remaining < 0.75 * len(ring_members):
                log.warning("membership.remove.held node=%s reason=would-leave-under-75%%", member.node_id)
                continue
            same_site = [m for m in ring_members if m.site == member.site and m.node_id != member.node_id]
            if not any(self.is_alive(m.node_id) for m in same_site):
                log.warning("membership.remove.held node=%s reason=last-of-site-%s", member.node_id, member.site)
                continue
            self.remove(member.node_id, reason=f"dead for more than {self.dead_grace_ms // 1000} s")
            ring_members = [m for m in ring_members if m.node_id != member.node_id]

    # ----------------------------------------------------------------- sync loop
    def start(self, transport: "GrpcTransport") -> None:
        self.transport = transport
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def sync_once(self) -> None:
        assert self.transport is not None
        targets: dict[str, str | None] = {m.peer_address: m.node_id for m in self.members()
                                          if m.node_id != self.self_id and m.state in ("alive", "leaving")}
        for seed in self.seeds:
            targets.setdefault(seed, None)
        timeout_ms = max(200, min(2_000, self.sync_interval_ms))
        results = await asyncio.gather(*(self._exchange(address, node_id, timeout_ms)
                                         for address, node_id in targets.items()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, PeerError):
                log.warning("membership.sync.error error=%r", result)
        self._log_liveness_changes()
        self._remove_dead()

    async def _exchange(self, address: str, node_id: str | None, timeout_ms: int) -> None:
        assert self.transport is not None
        try:
            sender_id, members = await self.transport.push_pull(address, self.members(), timeout_ms=timeout_ms)
        except PeerError:
            return
        self.merge_wire(members)
        if sender_id:
            self.table.contact_succeeded(sender_id, now_ms())

    def _log_liveness_changes(self) -> None:
        for member in self.members():
            alive = self.is_alive(member.node_id)
            before = self._alive_before.get(member.node_id)
            if before is not None and before != alive:
                if alive:
                    log.info("membership.reachable node=%s", member.node_id)
                else:
                    log.warning("membership.unreachable node=%s", member.node_id)
            self._alive_before[member.node_id] = alive

    async def _run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Never let membership die.
                log.error("membership.sync.failed error=%r", error)
            await asyncio.sleep(self.sync_interval_ms / 1000)
