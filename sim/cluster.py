"""SimCluster: many pacsnode nodes in one process, one thread, on one virtual clock.

Each `SimNode` runs the real code of a node's core, wired the way node/server.py wires
it, with only the edges swapped (STYLE 4: clock, transport, store):

    node/swim_membership.py  SwimMembership, the node's SWIM driver over ring/swim.py's Swim
                       (SWIM + Lifeguard), with the node's clock (`_ProcessClock`: skew,
                       drift, pauses) and the SimNetwork (`_SimCarrier`) injected; it is
                       the MembershipView the data path sees
    ring/placement.py  Ring(cluster_id, the members Swim holds in the ring)
    replication/       Coordinator (store, find, locate, read, replay_hints) and Repairer
                       (run_forever: anti-entropy, rebalance, drop rule)
    node/peer_handler.py  PeerHandler: the peer requests a node serves
    sim/store.py       NonDurableStore instead of RocksStore
    sim/network.py     NodeTransport instead of GrpcTransport

A node's running state is a `_Process` (one boot, one generation). Faults act on it:

    crash    the process stops: its tasks are cancelled, its timers dropped, messages to
             it refused; the store is kept (sim/store.py says what a crash loses)
    restart  a new process with the same id and generation + 1, joining through running
             nodes; the store is the one it had
    wipe     crash, an empty store, restart (a lost disk); with `lose_generation` the
             boot generation count is lost too (a real node keeps it in identity.json in
             the data dir): it boots as generation 1 again and runs node/swim_membership.py's
             rejoin above the boot the cluster still holds (dead_boot_generation)
    pause    a stall (GC, SIGSTOP, a frozen VM): nothing of the node runs, messages to it
             queue, its own calls are held; on resume it reads its queue, then its timers
    skew     a per-boot clock offset and drift (ppm) on the time the node's Swim reads.
             The coordinator and repairer read the loop's clock (asyncio's loop.time(),
             shared by every node here): they only measure durations with it.

Every task a process starts, and every task those tasks start, runs in the process's
context (a ContextVar), so a crash can cancel all of them: a dead process runs no more
code. Randomness: one `random.Random` per node boot (f"{seed}:{node_id}:{generation}"),
one for the network and one for the faults, all from the run's seed.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

from pacsnode.node.codec import decompress
from pacsnode.node.peer_handler import PeerHandler, RangesPending
from pacsnode.node.swim_membership import MembershipUnavailable, SwimMembership, TimerHandle
from pacsnode.replication.coordinator import Coordinator, CoordinatorSettings, WriteQuorumMode, WriteScope
from pacsnode.replication.delete_coordinator import DeleteCoordinator
from pacsnode.replication.hlc import HybridClock
from pacsnode.replication.model import CorruptBlob, StoredInstance, StoreOutcome
from pacsnode.replication.modify_coordinator import ModifyCoordinator
from pacsnode.replication.ownership import RingSync
from pacsnode.replication.repair import YOUNG_MISSING_MS, Repairer, RepairSettings
from pacsnode.replication.transport import PeerError, PeerRefused, StoreReply
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.placement import Member, Replication, Ring
from pacsnode.ring.swim import Message, MemberUpdate, State, Swim, SwimConfig, Transition, message_bytes
from pacsnode.ring.token_choice import choose_token_salt
from pacsnode.sim.loop import VirtualEventLoop, new_loop
from pacsnode.sim.network import LinkModel, SimNetwork, Trace
from pacsnode.sim.store import NonDurableStore

log = logging.getLogger(__name__)

_CURRENT: contextvars.ContextVar["_Process | None"] = contextvars.ContextVar("pacsnode_sim_process", default=None)


def lan_swim(*, dead_grace_ms: int = 60_000) -> SwimConfig:
    """memberlist's LAN profile (the node default), with a shorter dead -> removed grace."""
    return dataclasses.replace(SwimConfig.lan(), dead_grace_ms=dead_grace_ms)


@dataclass(frozen=True)
class SimConfig:
    """Everything a simulated cluster is configured with. Defaults: the node's defaults."""

    cluster_id: str = "sim"
    replication_factor: Replication = 3  # N, or N copies per site (SiteReplicas)
    write_quorum: int = 2  # W
    write_scope: WriteScope = WriteScope.GLOBAL  # LOCAL: W counted in the receiving node's site.
    write_mode: WriteQuorumMode = WriteQuorumMode.STRICT  # SLOPPY: stand-ins' hints count toward W.
    read_quorum: int = 2  # R (requests that name a study)
    scatter_read_quorum: int = 2  # R per token range (queries with no study key)
    read_fault_window_ms: int = 60_000
    vnodes: int = 64
    # True: each node's token salt chosen as it is added, as a node's first start does
    # (ring/token_choice.py). False (default): salt 0, the random tokens of before salts, so
    # the seeded scenarios and tests keep the placement they were written against.
    token_salts: bool = False
    swim: SwimConfig = field(default_factory=lan_swim)  # LAN profile; dead -> removed after 60 s.
    replica_timeout_ms: int = 2_000
    store_timeout_ms: int = 30_000
    fetch_timeout_ms: int = 30_000
    query_timeout_ms: int = 60_000
    replica_start_timeout_ms: int = 2_000
    anti_entropy_interval_ms: int = 60_000
    repair_bytes_per_second_max: int = 50_000_000
    repair_fetch_window: int = 8
    repair_rpc_timeout_ms: int = 10_000
    repair_young_missing_ms: int = YOUNG_MISSING_MS  # 0: anti-entropy pulls what it lacks at once.
    hint_replay_interval_ms: int = 1_000
    tombstone_grace_ms: int = 10 * 86_400_000  # node/config.py tombstone_grace_s.
    disk_write_ms: float = 1.0  # A synced put (the reply waits for it).
    link: LinkModel = field(default_factory=LinkModel)
    bootstrap: str = "full"  # "full": every node starts knowing all; "join": through node 0, the real path.
    leave_drain_timeout_s: float = 600.0  # A leaving node exits once drained, or after this.

    def coordinator_settings(self) -> CoordinatorSettings:
        return CoordinatorSettings(replication_factor=self.replication_factor, write_quorum=self.write_quorum,
                                   write_scope=self.write_scope, write_mode=self.write_mode,
                                   read_quorum=self.read_quorum, read_fault_window_ms=self.read_fault_window_ms,
                                   scatter_read_quorum=self.scatter_read_quorum,
                                   replica_timeout_ms=self.replica_timeout_ms, store_timeout_ms=self.store_timeout_ms,
                                   fetch_timeout_ms=self.fetch_timeout_ms, query_timeout_ms=self.query_timeout_ms,
                                   replica_start_timeout_ms=self.replica_start_timeout_ms,
                                   hint_max_age_ms=self.tombstone_grace_ms)

    def repair_settings(self) -> RepairSettings:
        return RepairSettings(replication_factor=self.replication_factor, interval_ms=self.anti_entropy_interval_ms,
                              rpc_timeout_ms=self.repair_rpc_timeout_ms, fetch_timeout_ms=self.fetch_timeout_ms,
                              bytes_per_second_max=self.repair_bytes_per_second_max,
                              fetch_window=self.repair_fetch_window, tombstone_grace_ms=self.tombstone_grace_ms,
                              young_missing_ms=self.repair_young_missing_ms)


# ===================================================================== membership view


class SharedRing(Ring):
    """A Ring that remembers `ranges(n)`: every node of one membership shares one of these.

    Ring is immutable and `ranges` a pure function of it returning immutable tuples, so
    remembering the answer changes nothing but the time: the real node recomputes it on
    each call (four times per repair pass), which at 300 nodes is most of the simulator's
    time when 300 nodes do it in one process.
    """

    __slots__ = ("_ranges_memo",)

    def __init__(self, cluster_id: str, members: Any) -> None:
        super().__init__(cluster_id, members)
        self._ranges_memo: dict[Replication, Any] = {}

    def ranges(self, n: Replication) -> Any:
        found = self._ranges_memo.get(n)
        if found is None:
            found = self._ranges_memo[n] = super().ranges(n)
        return found


class RingCache:
    """Rings by membership, shared by every node: same members, same (immutable) Ring."""

    def __init__(self, cluster_id: str, size: int = 64) -> None:
        self.cluster_id = cluster_id
        self._rings: collections.OrderedDict[tuple[Member, ...], Ring] = collections.OrderedDict()
        self._size = size
        self.built = 0

    def get(self, members: tuple[Member, ...]) -> Ring:
        ring = self._rings.get(members)
        if ring is None:
            ring = self._rings[members] = SharedRing(self.cluster_id, members)
            self.built += 1
            if len(self._rings) > self._size:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(members)
        return ring


class _ProcessClock:
    """A node's clock, as its SWIM driver reads it: the loop's time with this node's skew and
    drift (`_Process.now_ms`); its timers fire on the loop and, while the process is paused,
    wait until it resumes (after what arrived meanwhile is read)."""

    def __init__(self, process: "_Process") -> None:
        self._process = process

    def now_ms(self) -> int:
        return self._process.now_ms()

    def wall_ms(self) -> int:
        return self._process.now_ms()

    def call_at(self, at_ms: int, callback: Callable[[], None]) -> TimerHandle:
        process = self._process
        loop = process.loop
        when = max(process._loop_ms_for(at_ms) / 1000, loop.time())
        return loop.call_at(when, process.timer_fired, callback)


class _SimCarrier:
    """A node's SWIM carriage over the SimNetwork: one call per request, answered by the
    target's driver (`_Process.handle("swim")`). A process paused meanwhile hears the
    outcome only once it runs again."""

    def __init__(self, process: "_Process", transport: Any) -> None:
        self._process = process
        self._transport = transport

    async def call(self, target_id: str, address: str, message: Message, *, timeout_ms: int
                   ) -> tuple[str, Message | None, list[str]]:
        try:
            source, reply = await self._transport.swim_call(target_id, address, message, timeout_ms=timeout_ms)
        finally:
            await self._process.wait_running()
        return source, reply, []


# ===================================================================== replica accounting


class ReplicaIndex:
    """Which nodes hold a primary copy of each instance (every NonDurableStore reports here)."""

    def __init__(self) -> None:
        self.holders: dict[str, set[str]] = {}  # sop uid -> node ids
        self.study_of: dict[str, str] = {}
        self.size_of: dict[str, int] = {}

    def instance_added(self, node_id: str, record: Any, size_bytes: int) -> None:
        sop = record.sop_instance_uid
        self.holders.setdefault(sop, set()).add(node_id)
        self.study_of[sop] = record.study_instance_uid
        self.size_of[sop] = size_bytes

    def instance_removed(self, node_id: str, study_instance_uid: str, sop_instance_uid: str) -> None:
        held = self.holders.get(sop_instance_uid)
        if held is not None:
            held.discard(node_id)


@dataclass(frozen=True)
class TransitionRecord:
    at_ms: int  # Virtual loop time.
    observer: str
    subject: str
    old: str | None
    new: str
    generation: int  # The subject's generation in the observer's record.


# ===================================================================== one boot of a node


class _Process:
    """One boot of a node: its Swim, membership view, coordinator and repairer."""

    def __init__(self, node: "SimNode", generation: int) -> None:
        cluster = node.cluster
        config = cluster.config
        self.node = node
        self.node_id = node.node_id
        self.cluster = cluster
        self.loop: VirtualEventLoop = cluster.loop
        self.generation = generation
        self.alive = True
        self.paused_until: float | None = None
        self.pauses = 0  # Pauses begun on this boot (a client op whose entry node paused did not stay up).
        self.started_at = self.loop.time()
        self._inbox: list[Callable[[], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self.tasks: dict[int, asyncio.Task[Any]] = {}  # By creation order; may hold done ones.
        self._prune_tasks_at = 256
        self.context = contextvars.copy_context()
        self.context.run(_CURRENT.set, self)
        self._timers: list[Callable[[], None]] = []  # Timers that fired while paused.
        rings = cluster.rings
        # The node's own SWIM driver, its clock and carriage injected.
        self.membership = SwimMembership(
            config.cluster_id, node.member_info(generation), [], config=config.swim,
            rng=random.Random(f"{cluster.seed}:{node.node_id}:{generation}"), next_generation=self._next_generation,
            clock=_ProcessClock(self), ring_factory=lambda _cluster_id, members: rings.get(members))
        self.membership.on_transitions.append(lambda events: cluster.on_transitions(self, events))
        transport = cluster.network.transport(node.node_id)
        self._carrier = _SimCarrier(self, transport)
        self.coordinator = Coordinator(node.node_id, self.membership, transport, node.store,
                                       config.coordinator_settings(), decode=_decode, run_blocking=self.run_blocking,
                                       hlc=HybridClock(node.node_id, wall=self.now_ms))
        self.repairer = Repairer(node.node_id, self.membership, _RepairTransportView(node, transport),
                                 _RepairStoreView(node), config.repair_settings(), run_blocking=self.run_blocking,
                                 wall_ms=self.now_ms)
        self.coordinator.pending = self.repairer.pending
        transport.observe = self.coordinator.hlc.observe
        self.deletes = DeleteCoordinator(node.node_id, self.membership, transport, node.store, self.coordinator.hlc,
                                         self.coordinator.find, replication_factor=config.replication_factor,
                                         write_quorum=config.write_quorum,
                                         replica_timeout_ms=config.coordinator_settings().replica_timeout_ms,
                                         strict_quorum=config.write_mode is WriteQuorumMode.STRICT,
                                         run_blocking=self.run_blocking)
        self.deletes.former_owners = self.repairer.former_owners
        self.coordinator.supersede = self.deletes.supersede
        # `pacsnode modify` / `merge-patient`: the node's own correction path (node/server.py).
        self.modifies = ModifyCoordinator(node.node_id, self.membership, transport, node.store,
                                          self.coordinator.hlc, self.coordinator.find,
                                          replication_factor=config.replication_factor,
                                          write_quorum=config.write_quorum,
                                          replica_timeout_ms=config.coordinator_settings().replica_timeout_ms,
                                          run_blocking=self.run_blocking)
        self.coordinator.send_correction = self.modifies.send_correction  # As node/server.py.
        # The node's own peer-request handling (node/peer_handler.py); `handle` below is only
        # the simulated network's adapter onto it, as node/peer_server.py is gRPC's.
        self.peer_handler = PeerHandler(node.node_id, node.store, self.membership, self.repairer,
                                        replication_factor=config.replication_factor,
                                        run_blocking=self.run_blocking, run_write=self.run_write)
        self.ring_changes = 0
        # node/server.py: membership.on_change -> repairer.ring_changed.
        self.membership.on_change.append(self._ring_changed)

    @property
    def swim(self) -> Swim:
        """The driver's state machine (a new one after a rejoin)."""
        return self.membership.swim

    @property
    def rejoins(self) -> int:
        return self.membership.counters.rejoins

    @property
    def ring_sync(self) -> RingSync:
        return self.membership.ring_sync

    @property
    def not_owner_refusals(self) -> int:
        return self.peer_handler.not_owner_refusals

    def _ring_changed(self) -> None:
        self.ring_changes += 1
        self.repairer.ring_changed()
        self.cluster.on_ring_change(self)

    def _next_generation(self, at_least: int) -> int:
        """The driver's rejoin (the cluster removed this generation, or made it leave): the
        node's next generation, at least `at_least`, as a node persists it; the old one's
        lifetime ends here."""
        node = self.node
        cluster = self.cluster
        was = self.membership.swim.self_state().value
        cluster.generation_ended(self)
        node.generation = max(node.generation + 1, at_least)
        self.generation = node.generation
        cluster.begin_lifetime(node.node_id, node.generation)
        cluster._fault("rejoin", f"{node.node_id} generation={node.generation} was={was}")
        return node.generation

    # ----------------------------------------------------------------- clock
    def now_ms(self) -> int:
        """The node's own monotonic clock: the loop's, with this boot's skew and drift."""
        loop_ms = self.loop.now_ms()
        node = self.node
        return loop_ms + node.skew_ms + (loop_ms * node.drift_ppm) // 1_000_000

    def _loop_ms_for(self, local_ms: int) -> int:
        node = self.node
        if not node.drift_ppm:
            return local_ms - node.skew_ms
        guess = math.ceil((local_ms - node.skew_ms) * 1_000_000 / (1_000_000 + node.drift_ppm))
        while guess + node.skew_ms + (guess * node.drift_ppm) // 1_000_000 < local_ms:
            guess += 1
        return guess

    # ----------------------------------------------------------------- process control
    @property
    def paused(self) -> bool:
        return self.paused_until is not None

    def adopt(self, task: asyncio.Task[Any]) -> None:
        if not self.alive:
            task.cancel()  # A dead process starts nothing.
            return
        # Done tasks are dropped in batches, not by a done callback each: one callback per
        # task was a ready-queue entry, a Handle and a lambda call for every task of a run.
        tasks = self.tasks
        tasks[hash(task)] = task
        if len(tasks) >= self._prune_tasks_at:
            self.tasks = tasks = {order: kept for order, kept in tasks.items() if not kept.done()}
            self._prune_tasks_at = max(256, 2 * len(tasks))

    def spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        return self.loop.create_task(coroutine, context=self.context.copy())

    def deliver(self, callback: Callable[[], None]) -> None:
        if not self.alive:
            return
        if self.paused_until is not None:
            self._inbox.append(callback)
            return
        callback()

    async def wait_running(self) -> None:
        if not self.alive:
            raise asyncio.CancelledError(f"{self.node_id} is down")
        while self.paused_until is not None:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._waiters.append(waiter)
            await waiter
            if not self.alive:
                raise asyncio.CancelledError(f"{self.node_id} is down")

    async def run_blocking(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The coordinator's and repairer's run_blocking: inline, on the loop, no thread."""
        await self.wait_running()
        return function(*args, **kwargs)

    async def run_write(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The peer handler's synced write: applied once the node's disk latency has passed
        (a node that crashes or pauses meanwhile applies it only if and when it runs again)."""
        disk_s = self.node.disk_write_ms / 1000
        if disk_s > 0:
            await asyncio.sleep(disk_s)
        return await self.run_blocking(function, *args, **kwargs)

    def timer_fired(self, callback: Callable[[], None]) -> None:
        """A timer of the node's SWIM driver: runs now, or (paused) after the resume's inbox."""
        if not self.alive:
            return
        if self.paused_until is not None:
            self._timers.append(callback)
            return
        self.context.run(callback)

    def crash(self) -> None:
        self.alive = False
        self.paused_until = None
        self.membership.stopped()
        self._timers.clear()
        self._inbox.clear()
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()
        for order in sorted(self.tasks):
            task = self.tasks[order]
            if not task.done():
                task.cancel()

    def pause(self, duration_s: float) -> None:
        if not self.alive:
            return
        until = self.loop.time() + duration_s
        self.pauses += 1
        self.paused_until = max(self.paused_until or 0.0, until)
        self.loop.call_at(self.paused_until, self._resume)

    def _resume(self) -> None:
        if not self.alive or self.paused_until is None or self.loop.time() < self.paused_until:
            return
        self.paused_until = None
        inbox, self._inbox = self._inbox, []
        for callback in inbox:  # What arrived during the stall is read first...
            callback()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        timers, self._timers = self._timers, []
        for callback in timers:  # ...then the overdue timers run.
            self.context.run(callback)

    # ----------------------------------------------------------------- SWIM
    def start(self, *, seeds: list[str] | None = None, snapshot: tuple[MemberUpdate, ...] | None = None) -> None:
        """node/server.py's start: the membership joins through `seeds` (or starts knowing
        `snapshot`, the whole cluster), then the repairer and the hint replay run."""
        membership = self.membership
        own = self.node.address
        membership.seeds = [s for s in (seeds or []) if s != own]

        def begin() -> None:
            if snapshot is not None:
                membership.learn(snapshot)
            membership.start(self._carrier)

        self.context.run(begin)
        self.spawn(self._repair_forever())
        self.spawn(self._replay_hints_forever())

    def ring_version(self) -> int:
        return self.membership.ring().version

    # ----------------------------------------------------------------- background work (as node/server.py)
    async def _repair_forever(self) -> None:
        await self.repairer.run_forever()

    async def _replay_hints_forever(self) -> None:
        interval = self.cluster.config.hint_replay_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.coordinator.replay_hints()
                await self.deletes.replay_tombstone_hints()
                await self.modifies.replay_correction_hints()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # As the node: keep replaying, say what went wrong.
                self.cluster.note_error(f"{self.node_id} hint replay: {error!r}")

    # ----------------------------------------------------------------- the peer server (node/peer_server.py)
    async def handle(self, method: str, args: tuple[Any, ...], sender_id: str, ring_version: int
                     ) -> tuple[Any, int]:
        await self.wait_running()
        self.membership.ring_mismatch(sender_id, ring_version)  # node/peer_server.py check()
        if method == "swim":  # node/peer_server.py MembershipService
            message, deadline_at = args
            try:
                reply = await self.membership.answer(sender_id, message, deadline_s=deadline_at - self.loop.time())
            except MembershipUnavailable as silent:
                raise PeerError(f"{self.node_id}: UNAVAILABLE: {silent}") from None
            await self.wait_running()
            return reply, (message_bytes(reply) if reply is not None else 64)
        handler = self.peer_handler
        if method == "store":
            stored, hint_for = args
            try:
                outcome = await handler.store_instance(stored, hint_for=hint_for, sender_id=sender_id,
                                                       sender_ring_version=ring_version)
            except PeerRefused as refusal:
                raise PeerRefused(f"{self.node_id}: {refusal.reason.value}: {refusal}", refusal.reason) from None
            self.coordinator.hlc.observe(stored.record.version)  # As peer_server: later stamps pass it.
            won = None
            if outcome == StoreOutcome.DELETED:  # StoreReply.tombstone_version.
                won = await handler.tombstone_version(stored.study_instance_uid, stored.sop_instance_uid)
            return (outcome, won), 96
        if method == "tombstone":
            tombstones, scope, hint_for = args
            if tombstones:
                self.coordinator.hlc.observe(tombstones[0].version)
            try:
                removed = await handler.apply_tombstones(tombstones, scope=scope, hint_for=hint_for)
            except PeerRefused as refusal:
                raise PeerRefused(f"{self.node_id}: {refusal.reason.value}: {refusal}", refusal.reason) from None
            return removed, 96
        if method == "correct":
            correction, hint_for = args
            self.coordinator.hlc.observe(correction.version)  # As peer_server: later stamps pass it.
            try:
                changed = await handler.apply_correction(correction, hint_for=hint_for)
            except PeerRefused as refusal:
                raise PeerRefused(f"{self.node_id}: {refusal.reason.value}: {refusal}", refusal.reason) from None
            return changed, 96
        if method == "fetch":
            study_uid, sop_uid, include_hints = args
            found = await handler.fetch(study_uid, sop_uid, include_hints=include_hints)
            return found, (len(found.blob) + 400 if found is not None else 64)
        if method == "query":
            query, ranges, include_hints = args
            try:
                rows = list(handler.query_rows(query, ranges, include_hints=include_hints))
            except RangesPending as pending:
                raise PeerError(f"{self.node_id}: FAILED_PRECONDITION: {pending}") from None
            return rows, 100 + 200 * len(rows)
        if method == "range_digest":
            (token_range,) = args
            digests = await handler.range_digest(token_range)
            return digests, 100 + 40 * len(digests)
        if method == "list_bucket":
            token_range, segment = args
            entries = await handler.list_bucket(token_range, segment)
            return entries, 100 + 120 * len(entries)
        raise PeerError(f"{self.node_id}: UNIMPLEMENTED: {method}")


class _RepairStoreView:
    """The node's store as its Repairer sees it; records what the repairer pulls in."""

    def __init__(self, node: "SimNode") -> None:
        self._node = node
        self._store = node.store

    def put_stored(self, stored: StoredInstance, *, hint_for: str = "") -> str:
        outcome = self._store.put_stored(stored, hint_for=hint_for)
        cluster = self._node.cluster
        source = cluster.pull_sources.pop((self._node.node_id, stored.sop_instance_uid), "")
        cluster.moves.append(Move(cluster.loop.now_ms(), self._node.node_id, stored.sop_instance_uid,
                                  len(stored.blob), outcome, "pull", source))
        return outcome

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _RepairTransportView:
    """The node's transport as its Repairer sees it; records what the repairer hands over
    (the drop pass pushes to an owner what only this node holds)."""

    def __init__(self, node: "SimNode", transport: Any) -> None:
        self._node = node
        self._transport = transport

    async def store(self, target: str, stored: StoredInstance, *, hint_for: str, timeout_ms: int) -> StoreReply:
        reply: StoreReply = await self._transport.store(target, stored, hint_for=hint_for, timeout_ms=timeout_ms)
        cluster = self._node.cluster
        cluster.moves.append(Move(cluster.loop.now_ms(), target, stored.sop_instance_uid, len(stored.blob),
                                  reply.outcome, "push", self._node.node_id))
        return reply

    async def fetch(self, target: str, study_instance_uid: str, sop_instance_uid: str, **kwargs: Any
                    ) -> StoredInstance | None:
        """A repairer's pull: remembers `target` as the source of the copy stored next."""
        stored: StoredInstance | None = await self._transport.fetch(target, study_instance_uid, sop_instance_uid,
                                                                    **kwargs)
        if stored is not None:
            self._node.cluster.pull_sources[(self._node.node_id, sop_instance_uid)] = target
        return stored

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@dataclass(frozen=True)
class Move:
    """One instance a repairer copied: pulled in by `node_id`, or pushed to it."""

    at_ms: int
    node_id: str  # The receiver.
    sop_instance_uid: str
    size_bytes: int
    outcome: str  # The receiver's StoreOutcome (stored, duplicate, conflict).
    via: str  # pull | push
    source: str = ""  # The node it came from (the pull's source, the pusher).


def _decode(stored: StoredInstance) -> bytes:
    """node/local_replica.py's decode: decompress and verify (CorruptBlob on a bad checksum)."""
    return decompress(stored.blob, stored.sop_instance_uid)


# ===================================================================== a node across boots


class SimNode:
    def __init__(self, cluster: "SimCluster", index: int, site: str) -> None:
        self.cluster = cluster
        self.index = index
        self.node_id = f"node-{index:03d}"
        self.site = site
        self.generation = 0
        self.store = NonDurableStore(self.node_id, listener=cluster.replicas)
        self.process: _Process | None = None
        self.skew_ms = 0
        self.drift_ppm = 0
        self.disk_write_ms = cluster.config.disk_write_ms
        self.gone = False  # Left the cluster for good.
        self.crashes = 0
        self.token_salt = 0  # Chosen when the cluster adds the node (SimConfig.token_salts).

    @property
    def host(self) -> str:
        return f"10.{self.index // 250}.{self.index % 250}.1"

    @property
    def address(self) -> str:
        return f"{self.host}:7946"

    def member_info(self, generation: int) -> MemberInfo:
        return MemberInfo(node_id=self.node_id, peer_host=self.host, peer_port=7946, dicom_host=self.host,
                          dicom_port=11112, ae_title="PACSNODE", site=self.site, vnodes=self.cluster.config.vnodes,
                          generation=generation, token_salt=self.token_salt)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.alive

    def boot(self) -> _Process:
        self.generation += 1
        self.process = _Process(self, self.generation)
        self.cluster.begin_lifetime(self.node_id, self.generation)
        return self.process

    def stop(self) -> None:
        """The process ends (crash, exit): nothing of it runs any more."""
        if self.process is not None and self.process.alive:
            self.process.crash()
            self.cluster.generation_ended(self.process)


# ===================================================================== the cluster


def site_names(sites: int) -> list[str]:
    """The names SimCluster gives its `sites` sites: site-a, site-b, ..."""
    return [f"site-{chr(ord('a') + i)}" for i in range(max(1, sites))]


class SimCluster:
    """`n` nodes in `sites` sites (round-robin), seeded, on a virtual-time loop."""

    def __init__(self, n: int, *, sites: int = 1, seed: int = 0, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.loop = new_loop()
        self.loop.task_observer = _observe_task
        self.trace = Trace()
        self.network = SimNetwork(self.loop, seed, dataclasses.replace(self.config.link), self.trace)
        self.rng = random.Random(f"{seed}:faults")
        self.rings = RingCache(self.config.cluster_id)
        self.replicas = ReplicaIndex()
        self.transitions: list[TransitionRecord] = []
        self.ring_change_log: list[tuple[int, str, int]] = []  # (at_ms, observer, ring version)
        self.faults: list[tuple[int, str, str]] = []  # (at_ms, kind, detail)
        self.moves: list[Move] = []  # Every instance a repairer copied (anti-entropy, rebalance, hand-over).
        self.pull_sources: dict[tuple[str, str], str] = {}  # (receiver, SOP) -> source, fetched, not yet stored.
        # (node, generation) -> its boots' [start, end]: one, unless a wipe lost the generation
        # count and the node booted under a generation it had had before.
        self.lifetimes: dict[tuple[str, int], list[list[int | None]]] = {}
        self.errors: list[str] = []
        self.nodes: dict[str, SimNode] = {}
        self.site_names = site_names(sites)
        for index in range(n):
            self._new_node()
        self._bootstrap(list(self.nodes.values()))

    # ----------------------------------------------------------------- building
    def _new_node(self, site: str | None = None) -> SimNode:
        index = len(self.nodes)
        node = SimNode(self, index, site or self.site_names[index % len(self.site_names)])
        if self.config.token_salts:
            # As node/server.py at a node's first start: the salt that balances its site best
            # against the nodes added before it (all of them: the ring it would join).
            ring = [n.member_info(1).as_ring_member() for n in self.nodes.values() if not n.gone]
            node.token_salt = choose_token_salt(self.config.cluster_id, ring, node.member_info(1).as_ring_member(),
                                                self.config.replication_factor)
        self.nodes[node.node_id] = node
        self.network.register(node.node_id, node.site, node.address, lambda: _running_process(node))
        self.network.transport(node.node_id).process = lambda: _running_process(node)
        return node

    def _bootstrap(self, nodes: list[SimNode]) -> None:
        if not nodes:
            return
        processes = [node.boot() for node in nodes]
        if self.config.bootstrap == "full":
            snapshot = tuple(p.membership.swim.me for p in processes)
            for process in processes:
                process.start(snapshot=snapshot)
        elif self.config.bootstrap == "join":
            processes[0].start()
            for process in processes[1:]:
                process.start(seeds=[nodes[0].address])
        else:
            raise ValueError(f"bootstrap must be 'full' or 'join', got {self.config.bootstrap!r}")

    # ----------------------------------------------------------------- time
    def now_ms(self) -> int:
        return self.loop.now_ms()

    def run_for(self, seconds: float) -> None:
        self.loop.run_until(self.loop.time() + seconds)

    def run_until(self, at_s: float) -> None:
        self.loop.run_until(at_s)

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.loop.run_for(0.001)
        self.loop.close()

    # ----------------------------------------------------------------- views
    def running_ids(self) -> list[str]:
        return [node_id for node_id, node in self.nodes.items() if node.running]

    def live_ids(self) -> list[str]:
        """Running nodes that hold themselves alive members (not left, not removed)."""
        return [node_id for node_id, node in self.nodes.items()
                if node.running and node.process is not None and node.process.swim.self_state() is State.ALIVE]

    def process(self, node_id: str) -> _Process:
        process = self.nodes[node_id].process
        if process is None or not process.alive:
            raise KeyError(f"{node_id} is not running")
        return process

    def ring_versions(self) -> dict[str, int]:
        return {node_id: self.process(node_id).membership.ring().version for node_id in self.live_ids()}

    def converged(self) -> bool:
        """Every live node holds every other live node alive, and all hold one ring."""
        live = self.live_ids()
        rings = set()
        for observer in live:
            swim = self.process(observer).swim
            if any(swim.state_of(other) is not State.ALIVE for other in live):
                return False
            rings.add(self.process(observer).membership.ring().version)
        return len(rings) <= 1

    def begin_lifetime(self, node_id: str, generation: int) -> None:
        self.lifetimes.setdefault((node_id, generation), []).append([self.now_ms(), None])

    def generation_ended(self, process: _Process) -> None:
        spans = self.lifetimes.get((process.node_id, process.generation))
        if spans and spans[-1][1] is None:
            spans[-1][1] = self.now_ms()

    def spans(self) -> Iterator[tuple[str, int, int | None, int | None]]:
        """Every boot's (node, generation, start, end) (end None: still running)."""
        for (node_id, generation), spans in self.lifetimes.items():
            for start, end in spans:
                yield node_id, generation, start, end

    def alive_at(self, node_id: str, generation: int, at_ms: int) -> bool:
        """Whether a boot of the node under that generation was running (possibly paused) at `at_ms`."""
        return any(start is not None and start <= at_ms and (end is None or at_ms < end)
                   for start, end in self.lifetimes.get((node_id, generation), ()))

    # ----------------------------------------------------------------- observation
    def on_transitions(self, process: _Process, events: list[Transition]) -> None:
        now = self.loop.now_ms()
        for event in events:
            record = process.swim.record(event.node_id)
            generation = record.generation if record is not None else 0
            old = None if event.old_state is None else event.old_state.value
            self.transitions.append(TransitionRecord(now, process.node_id, event.node_id, old, event.new_state.value,
                                                     generation))
            self.trace.record(now, "transition", process.node_id, event.node_id, old, event.new_state.value)

    def on_ring_change(self, process: _Process) -> None:
        self.ring_change_log.append((self.loop.now_ms(), process.node_id, process.membership.ring().version))

    def note_error(self, text: str) -> None:
        self.errors.append(text)
        log.error("sim.error %s", text)

    def _fault(self, kind: str, detail: str) -> None:
        at = self.loop.now_ms()
        self.faults.append((at, kind, detail))
        self.trace.record(at, "fault", kind, detail)

    # ----------------------------------------------------------------- faults and operations
    def crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.process is None or not node.process.alive:
            return
        node.stop()
        node.crashes += 1
        self._fault("crash", node_id)

    def restart(self, node_id: str, *, seeds: list[str] | None = None, skew_ms: int | None = None,
                drift_ppm: int | None = None) -> None:
        """Start `node_id` again (generation + 1, same store), joining through running nodes."""
        node = self.nodes[node_id]
        node.stop()
        if skew_ms is not None:
            node.skew_ms = skew_ms
        if drift_ppm is not None:
            node.drift_ppm = drift_ppm
        node.gone = False
        process = node.boot()
        self._fault("restart", f"{node_id} generation={node.generation}")
        process.start(seeds=seeds if seeds is not None else self._seeds(exclude=node_id))

    def wipe(self, node_id: str, *, lose_generation: bool = False) -> None:
        """The node's disk is lost: crash, an empty store, restart. `lose_generation`: the
        data dir's identity goes with it (node/server.py load_identity then starts the
        generation count over), so the node boots as generation 1 again, and with
        `token_salts` it chooses its token salt again as at a first start."""
        node = self.nodes[node_id]
        if node.running:
            self.crash(node_id)
        for record in list(node.store.all_instances()):
            self.replicas.instance_removed(node_id, record.study_instance_uid, record.sop_instance_uid)
        node.store = NonDurableStore(node_id, listener=self.replicas)
        if lose_generation:
            self._fault("wipe", f"{node_id} generation {node.generation} lost")
            node.generation = 0
            if self.config.token_salts:
                # identity.json held the salt too: a first start of the data dir chooses again,
                # against the ring a seed reports (node/token_salt.py; its own id left out).
                ring = [n.member_info(1).as_ring_member() for n in self.nodes.values() if not n.gone]
                salt = choose_token_salt(self.config.cluster_id, ring, node.member_info(1).as_ring_member(),
                                         self.config.replication_factor)
                if salt != node.token_salt:
                    self._fault("token-salt", f"{node_id} {node.token_salt} -> {salt}")
                node.token_salt = salt
        else:
            self._fault("wipe", node_id)
        self.restart(node_id)

    def set_clock(self, node_id: str, *, drift_ppm: int | None = None, forward_ms: int = 0) -> None:
        """Skew a node's clock (the one its Swim reads) while it runs: change its drift (ppm; the
        clock stays continuous) and/or jump it forward. Monotonic clocks never go back; a
        restart may start one anywhere (`restart(skew_ms=...)`)."""
        if forward_ms < 0:
            raise ValueError("a monotonic clock does not go back; restart the node with skew_ms instead")
        node = self.nodes[node_id]
        loop_ms = self.loop.now_ms()
        local = loop_ms + node.skew_ms + (loop_ms * node.drift_ppm) // 1_000_000
        if drift_ppm is not None:
            node.drift_ppm = drift_ppm
        node.skew_ms = local + forward_ms - loop_ms - (loop_ms * node.drift_ppm) // 1_000_000
        self._fault("clock", f"{node_id} drift_ppm={node.drift_ppm} forward_ms={forward_ms}")
        if node.process is not None and node.process.alive:
            node.process.deliver(node.process.membership.clock_changed)

    def pause(self, node_id: str, seconds: float) -> None:
        node = self.nodes[node_id]
        if node.process is not None and node.process.alive:
            self._fault("pause", f"{node_id} {seconds}s")
            node.process.pause(seconds)

    def add_node(self, site: str | None = None, *, seeds: list[str] | None = None) -> SimNode:
        """A new node (empty store) joins through running nodes."""
        node = self._new_node(site)
        process = node.boot()
        self._fault("join", node.node_id)
        process.start(seeds=seeds if seeds is not None else self._seeds(exclude=node.node_id))
        return node

    def leave(self, node_id: str) -> None:
        """`pacsnode leave` (node/server.py): LEAVING at once (its tokens go), keep serving until
        the drop rule has emptied the store and the hints are handed over, then LEFT, exit."""
        process = self.process(node_id)
        self._fault("leave", node_id)
        process.deliver(lambda: process.context.run(process.membership.leave))
        process.spawn(self._finish_leave_when_drained(process))

    async def _finish_leave_when_drained(self, process: _Process) -> None:
        node = process.node
        deadline = self.loop.time() + self.config.leave_drain_timeout_s
        while self.loop.time() < deadline:
            await asyncio.sleep(0.5)
            if process.swim.self_state() is not State.LEAVING:
                continue
            process.repairer.ring_changed()
            stats = node.store.statistics()
            if stats.instances == 0 and stats.hints == 0:
                break
        stats = node.store.statistics()
        self._fault("left", f"{node.node_id} instances={stats.instances} hints={stats.hints}")
        # node/server.py: LEFT to every reachable member, then a few gossip rounds.
        await process.membership.mark_left()
        node.gone = True
        self.loop.call_soon(node.stop)  # The process exits (not from inside one of its own tasks).

    def remove(self, node_id: str, *, via: str | None = None) -> None:
        """`pacsnode remove`: an operator takes `node_id` out of the ring at once, through `via`."""
        operator = via or self._pick_running(exclude=node_id)
        process = self.process(operator)
        self._fault("remove", f"{node_id} via {operator}")
        process.deliver(lambda: process.context.run(process.membership.remove, node_id, reason="operator"))

    def _pick_running(self, exclude: str = "") -> str:
        candidates = [n for n in self.live_ids() if n != exclude]
        return self.rng.choice(candidates)

    def _seeds(self, exclude: str, count: int = 3) -> list[str]:
        candidates = [n for n in self.live_ids() if n != exclude]
        chosen = self.rng.sample(candidates, min(count, len(candidates)))
        return [self.nodes[n].address for n in chosen]


def _running_process(node: SimNode) -> _Process | None:
    process = node.process
    return process if process is not None and process.alive else None


def _observe_task(task: asyncio.Task[Any], context: contextvars.Context | None) -> None:
    process = context.get(_CURRENT) if context is not None else _CURRENT.get()
    if process is not None:
        process.adopt(task)
