"""SwimMembership: the node's membership, a `ring.swim.Swim` driven on the node's asyncio loop.

ring/swim.py is the state machine (SWIM + Lifeguard, Sans-IO); this module is its shell:

- a timer calls `tick(now_ms)` at `next_tick_ms()`;
- every `Outbound` request is sent as one call through a `MembershipCarrier` with a
  deadline; its reply goes back in through `on_message`, and a send that fails (refused,
  unreachable, deadline) through `message_failed`;
- the peer server hands incoming requests to `answer()` (or `receive()`), which answers
  with the reply the state machine produced. An IndirectPing's answer comes later (the
  target's ack, or a nack at the relay timeout), so its call is held open on a future
  (`hold()`) until then.

Its edges are injected, so that the simulator (sim/cluster.py) runs this very driver:

- the clock and timers (`MembershipClock`): `SystemClock` on a node (time.monotonic,
  time.time, the running asyncio loop's call_later); the simulator's per-node virtual
  clock (skew, drift, pauses);
- the carriage (`MembershipCarrier`): `GrpcCarrier` on a node (Membership RPCs, mapped by
  node/peer_wire.py); the simulator's network (sim/network.py `SimNetwork.swim_call`);
- how the ring is built from its members (`ring_factory`: `Ring`; the simulator shares
  one Ring per membership between its nodes).

For the data path it is a `MembershipView` (ring, is_alive, member, members): views are
rebuilt after every input and swapped in whole, so DICOM association threads may read
them while the loop updates them. `on_change` callbacks run whenever the ring members
change: one joins, leaves, is removed or restarts (a new generation), dies or comes back
from the dead. Every transition is logged as `membership.state`.

A node the cluster removed (it was cut off, or stopped, for longer than the grace) cannot
come back in the same generation (ring/swim.py): it takes the next generation (persisted
by the node), keeps what it knew of the others, and joins again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from pacsnode.node import peer_wire
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.replication.ownership import RingSync
from pacsnode.replication.transport import PeerError
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.placement import Member, Ring
from pacsnode.ring.trouble import TroubleLog
from pacsnode.ring.swim import (
    REPLIES,
    Ack,
    DeadBootRecord,
    Gossip,
    IndirectPing,
    JoinRefusal,
    JoinReply,
    JoinRequest,
    LeaveReply,
    LeaveRequest,
    MemberUpdate,
    Message,
    Nack,
    Outbound,
    Ping,
    PushPullReply,
    PushPullRequest,
    Signer,
    State,
    Swim,
    SwimConfig,
    SwimStatistics,
    Transition,
    Verifier,
    newer,
)

if TYPE_CHECKING:
    from pacsnode.node.grpc_transport import GrpcTransport

log = logging.getLogger(__name__)

# SwimStatistics fields that are levels, not counts (not carried across generations).
_GAUGES = frozenset({"awareness", "broadcast_queue_depth"})

PROFILES: dict[str, Callable[[], SwimConfig]] = {  # node/config.py PROFILES names them.
    "lan": SwimConfig.lan,
    "local": SwimConfig.local,
    "wan": SwimConfig.wan,
}
FULL_STATE_TIMEOUT_MS_MIN = 2_000  # PushPull, Join, Leave: whole member lists, not a probe.


def swim_config(profile: str, dead_grace_ms: int) -> SwimConfig:
    """The profile's SwimConfig with the node's own dead grace period."""
    return replace(PROFILES[profile](), dead_grace_ms=dead_grace_ms)


def now_ms() -> int:
    return int(time.monotonic() * 1000)


def wall_ms() -> int:
    return int(time.time() * 1000)


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class MembershipClock(Protocol):
    """The time the driver reads and its timers."""

    def now_ms(self) -> int:
        """Monotonic milliseconds: what every Swim input is stamped with."""
        ...

    def wall_ms(self) -> int:
        """Wall-clock milliseconds (a new generation's updated_at_ms)."""
        ...

    def call_at(self, at_ms: int, callback: Callable[[], None]) -> TimerHandle:
        """Run `callback` on the loop once now_ms() >= at_ms (about)."""
        ...


class SystemClock:
    """The node's clock: time.monotonic and time.time; timers on the running asyncio loop."""

    def now_ms(self) -> int:
        return now_ms()

    def wall_ms(self) -> int:
        return wall_ms()

    def call_at(self, at_ms: int, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(0, at_ms - now_ms()) / 1000, callback)


class MembershipCarrier(Protocol):
    """How one SWIM request reaches a peer and its reply comes back."""

    async def call(self, target_id: str, address: str, message: Message, *, timeout_ms: int
                   ) -> tuple[str, Message | None, list[str]]:
        """Send `message` to the member at `address`: (the answering node's id, its reply, or None
        when the request has none (a gossip round), problems found in the reply). Raises
        PeerError when the call failed (refused, unreachable, deadline, refused by the peer)."""
        ...


class GrpcCarrier:
    """The node's carriage: each SWIM request is a Membership RPC (node/peer_wire.py maps it)."""

    def __init__(self, transport: "GrpcTransport", settings: pb.ReplicationSettings | None = None) -> None:
        self.transport = transport
        self.settings = settings  # Sent with a Join: a seed refuses a joiner that places otherwise.

    async def call(self, target_id: str, address: str, message: Message, *, timeout_ms: int
                   ) -> tuple[str, Message | None, list[str]]:
        method, request = peer_wire.request_to_wire(message, target_id, self.transport.envelope())
        if isinstance(request, pb.JoinRequest) and self.settings is not None:
            request.settings.CopyFrom(self.settings)
        reply = await self.transport.membership_call(address, method, request, timeout_ms=timeout_ms)
        source: str = reply.envelope.sender_id
        if isinstance(message, Gossip):
            return source, None, []  # Its reply is an empty Ack.
        answer, problems = peer_wire.reply_from_wire(method, reply)
        if isinstance(answer, JoinReply) and not answer.accepted and self.settings is not None and \
                reply.HasField("settings") and peer_wire.placement_mismatch(reply.settings, self.settings):
            # The seed places studies otherwise than we would: no retry can change that.
            answer = replace(answer, refusal=JoinRefusal.PLACEMENT)
        return source, answer, problems


class MembershipUnavailable(Exception):
    """This node does not answer the request now: it is unhealthy (no acks), or no longer a
    member (left, removed). The caller sees a failed call (gRPC UNAVAILABLE on a node)."""


@dataclass(frozen=True)
class _View:
    """What the data path reads, rebuilt after an input that changed a member record (readers
    on other threads see one whole)."""

    ring: Ring
    members: dict[str, MemberInfo]
    reachable: frozenset[str]
    ring_key: tuple[tuple[str, int, bool], ...]
    records: tuple[MemberUpdate, ...]  # What it was built from (Swim.records()).


@dataclass
class MembershipCounters:
    sends_failed: int = 0  # Membership RPCs that failed (refused, unreachable, deadline).
    updates_ignored: int = 0  # Member records from peers that could not be used.
    updates_rejected: int = 0  # Member records whose signature the verifier refused (TLS).
    replies_late: int = 0  # Replies for an IndirectPing whose caller had gone.
    rejoins: int = 0  # Times this node was removed and came back as its next generation.
    by_method: dict[str, int] = field(default_factory=dict)


class SwimMembership:
    """MembershipView for the node, kept by SWIM + Lifeguard (ring/swim.py) over gRPC."""

    def __init__(self, cluster_id: str, me: MemberInfo, seeds: Iterable[str], *, config: SwimConfig,
                 rng: random.Random | None = None, next_generation: Callable[[int], int] | None = None,
                 clock: MembershipClock | None = None,
                 ring_factory: Callable[[str, tuple[Member, ...]], Ring] = Ring,
                 signer: Signer | None = None, verifier: Verifier | None = None) -> None:
        """`signer`/`verifier` (node/member_signing.py, with TLS): signed member records."""
        self.cluster_id = cluster_id
        self._hooks: dict[str, Any] = {"signer": signer, "verifier": verifier}
        self._rejected_logged: dict[tuple[str, str, str], int] = {}  # Last logged (clock ms).
        self.self_id = me.node_id
        self.config = config
        self.seeds = [s for s in seeds if s != me.peer_address]
        self._rng = rng or random.Random()
        self._me = me
        self._next_generation = next_generation or (lambda at_least: at_least)
        self.clock: MembershipClock = clock or SystemClock()
        self._ring_factory = ring_factory
        self.swim = Swim(config, me, self._rng, self.clock.now_ms(), **self._hooks)
        self.carrier: MembershipCarrier | None = None
        self.on_change: list[Callable[[], object]] = []  # Called whenever the ring members change.
        # Called with every batch of state transitions the state machine reports (after logging).
        self.on_transitions: list[Callable[[list[Transition]], None]] = []
        self._held_back: dict[str, str] = {}  # Dead members a removal rail keeps in the ring, and why.
        self._join_refused = ""
        self._dead_boot_logged = DeadBootRecord.NONE
        self._newer_boot_logged = 0
        self.counters = MembershipCounters()
        # The counts of the SWIM states this node's earlier generations ran (a rejoin starts a
        # new one): metrics() adds them, so a Prometheus counter never goes back.
        self._retired: dict[str, int] = {}
        self._left_by_us = False
        self._started = False
        self._stopped = False
        self._timer: TimerHandle | None = None
        self._timer_at_ms = -1
        self._last_tick_ms = -(1 << 62)
        self._sends: set[asyncio.Task[None]] = set()
        self._held: dict[tuple[str, int], asyncio.Future[Message]] = {}
        # Local health (node/health.py): while unhealthy, no acks and no refutations; the
        # newest accusation about us heard meanwhile is kept to be refuted on recovery.
        self.unhealthy_reason = ""
        self._withheld: MemberUpdate | None = None
        self.probes_unanswered = 0
        self.trouble = TroubleLog()  # When another member last changed state (reads widen after it).
        self._view = self._build_view(None)
        self.ring_sync = RingSync(peer_interval_ms=config.push_pull_interval_ms, gap_ms=config.probe_interval_ms)

    # ----------------------------------------------------------------- MembershipView
    def ring(self) -> Ring:
        return self._view.ring

    def is_alive(self, node_id: str) -> bool:
        """Reachable for data: alive, leaving or suspect (ourselves always)."""
        return node_id == self.self_id or node_id in self._view.reachable

    def member(self, node_id: str) -> MemberInfo | None:
        return self._view.members.get(node_id)

    def members(self) -> list[MemberInfo]:
        return list(self._view.members.values())

    def troubled_within(self, window_ms: int) -> bool:
        return self.trouble.within(self.clock.now_ms(), window_ms)

    # ----------------------------------------------------------------- more views
    def records(self) -> list[MemberUpdate]:
        """Every member's record (state, incarnation, generation), ourselves included. Loop only."""
        return [record for view in self.swim.members() if (record := self.swim.record(view.info.node_id))]

    @property
    def generation(self) -> int:
        return self.swim.generation

    @property
    def incarnation(self) -> int:
        return self.swim.incarnation

    def self_state(self) -> State:
        return self.swim.self_state()

    @property
    def joined(self) -> bool:
        """False from start() until a seed accepted our join (True without seeds). Until then
        the ring holds only what we knew: at a first start, or a restart, only ourselves."""
        return self.swim.joined

    def join_refusal(self) -> JoinRefusal:
        """PLACEMENT once a seed refused this node's join because the cluster places studies
        otherwise (site_replicas / replication_factor): it no longer asks, and the node stops."""
        return self.swim.join_refusal

    def statistics(self) -> SwimStatistics:
        return self.swim.statistics()

    def metrics(self) -> dict[str, float]:
        """The membership figures of Node.metrics() (Admin Metrics and /metrics, renamed by
        node/metrics.py: `pacsnode.membership.probes_count` is `pacsnode_membership_probes_total`)."""
        swim = self.swim.statistics()
        total = self._totals(swim)
        counters = self.counters
        metrics: dict[str, float] = {f"pacsnode.ring.members_{state}_count": count
                                     for state, count in swim.members_by_state.items()}
        metrics.update({
            "pacsnode.membership.probes_count": total["probes_sent"],
            "pacsnode.membership.probe_failures_count": total["probe_failures"],
            "pacsnode.membership.indirect_probes_count": total["indirect_probes_sent"],
            "pacsnode.membership.suspicions_raised_count": total["suspicions_raised"],
            "pacsnode.membership.suspicions_refuted_count": total["suspicions_refuted"],
            "pacsnode.membership.deaths_declared_count": total["deaths_declared"],
            "pacsnode.membership.removals_count": total["removals"],
            "pacsnode.membership.removals_blocked_count": total["removals_blocked"],
            "pacsnode.membership.removal_graces_restarted_count": total["removal_graces_restarted"],
            # Pings for our id left unanswered because they were meant for a newer boot of it
            # (a wiped node back before the cluster held that boot dead).
            "pacsnode.membership.pings_for_a_newer_boot_count": total["pings_for_a_newer_boot"],
            # Joins this node took back: a seed with a stale view let it in while the cluster
            # held a newer boot of its id alive (a wiped node back soon after a restart).
            "pacsnode.membership.joins_withdrawn_count": total["joins_withdrawn"],
            "pacsnode.membership.awareness_count": swim.awareness,
            "pacsnode.membership.broadcast_queue_depth_count": swim.broadcast_queue_depth,
            "pacsnode.membership.sent_bytes": total["sent_bytes"],
            "pacsnode.membership.sends_failed_count": counters.sends_failed,
            "pacsnode.membership.updates_ignored_count": counters.updates_ignored,
            "pacsnode.membership.rejoins_count": counters.rejoins,
            # Transitions of other members (read_fault_window_ms runs from the last one).
            "pacsnode.membership.transitions_count": self.trouble.transitions,
            "pacsnode.membership.incarnation_count": self.incarnation,
        })
        return metrics

    def _totals(self, swim: SwimStatistics) -> dict[str, int]:
        """The counters of `swim` (the current generation's statistics) plus the retired ones."""
        current = {f.name: getattr(swim, f.name) for f in fields(swim)
                   if f.type in (int, "int") and f.name not in _GAUGES}
        current["sent_bytes"] = sum(swim.bytes_sent.values())
        return {name: value + self._retired.get(name, 0) for name, value in current.items()}

    # ----------------------------------------------------------------- operations
    def update_self(self, **changes: Any) -> MemberInfo:
        """Change our own identity (the peer port once it is bound). Only before start()."""
        if self._started:
            raise RuntimeError("update_self after start: the cluster already knows us")
        self._me = replace(self._me, **changes)
        self.swim = Swim(self.config, self._me, self._rng, self.clock.now_ms(), **self._hooks)
        self.seeds = [s for s in self.seeds if s != self._me.peer_address]
        self._view = self._build_view(None)
        return self._me

    def leave(self) -> None:
        """Start handing our ranges over (`pacsnode leave`): we give up our tokens at once and
        keep serving, probing and gossiping until drained (then mark_left)."""
        log.warning("membership.leaving node=%s", self.self_id)
        self._input(lambda now: self.swim.start_leaving(now))

    async def mark_left(self, timeout_ms: int = 5_000) -> None:
        """Announce LEFT to every reachable member and wait (up to timeout_ms) for them to hear it."""
        self._left_by_us = True
        log.warning("membership.left node=%s", self.self_id)
        before = set(self._sends)
        self._input(lambda now: self.swim.leave(now))
        announced = [task for task in self._sends if task not in before]
        if announced:
            await asyncio.wait(announced, timeout=timeout_ms / 1000)
        # A few gossip rounds more, so that members it could not reach hear it second hand.
        await asyncio.sleep(3 * self.config.gossip_interval_ms / 1000)

    def remove(self, node_id: str, *, reason: str) -> bool:
        """Take a member out of the ring at once (`pacsnode remove`), gossiped to everyone."""
        if node_id == self.self_id or self.swim.record(node_id) is None:
            return False
        if self.swim.state_of(node_id) is State.REMOVED:
            return False
        log.warning("membership.removed node=%s reason=%s", node_id, reason)
        self._input(lambda now: self.swim.remove(now, node_id))
        return self.swim.state_of(node_id) is State.REMOVED

    def reannounce(self) -> None:
        """Our own record again, signed anew (after a certificate reload), gossiped."""
        self._input(lambda now: self.swim.reannounce(now))

    def ring_mismatch(self, node_id: str, sender_ring_version: int) -> None:
        """A peer's envelope carried another ring version than ours: exchange full state with
        it now (a push-pull, as the periodic one), rate-limited per peer (RingSync), so the
        two views converge in one round trip. Loop only (the peer server calls it)."""
        member = self.member(node_id)
        if member is None or node_id == self.self_id or self.carrier is None or self._stopped:
            return
        if not self.ring_sync.due(node_id, self.clock.now_ms(), ring_version=self.ring().version,
                                   sender_ring_version=sender_ring_version):
            return
        log.debug("membership.ring_mismatch node=%s theirs=%x ours=%x", node_id, sender_ring_version,
                  self.ring().version)
        snapshot = tuple(sorted(self.records(), key=lambda record: record.node_id))
        self._dispatch(Outbound(node_id, member.peer_address, PushPullRequest(snapshot)))

    def set_local_health(self, healthy: bool, reason: str = "") -> None:
        """Lifeguard's local health, at its strictest: a node whose own store path is stuck
        does not ack probes and does not refute suspicion, so its peers suspect it, declare
        it dead and route around it. Back to healthy, it refutes what it heard meanwhile."""
        if healthy:
            if not self.unhealthy_reason:
                return
            log.warning("membership.local_health node=%s healthy=true", self.self_id)
            self.unhealthy_reason = ""
            withheld, self._withheld = self._withheld, None
            if withheld is not None:
                self._input(lambda now: self.swim.on_message(now, "", Gossip((withheld,))))
            return
        if not self.unhealthy_reason:
            log.warning("membership.local_health node=%s healthy=false reason=%s: not acking probes, "
                        "not refuting suspicion", self.self_id, reason)
        self.unhealthy_reason = reason or "unhealthy"

    def _screen(self, message: Message) -> Message:
        """While unhealthy: take out accusations about us (SUSPECT, DEAD of this boot), which
        the state machine would refute, and keep the newest for later."""
        if not self.unhealthy_reason:
            return message
        field_name = "members" if isinstance(message, (PushPullRequest, PushPullReply, JoinReply)) else "updates"
        updates = getattr(message, field_name, None)
        if not updates:
            return message
        kept = []
        for update in updates:
            if (update.node_id == self.self_id and update.generation == self.generation
                    and update.state in (State.SUSPECT, State.DEAD)):
                if self._withheld is None or newer(update, self._withheld):
                    self._withheld = update
                continue
            kept.append(update)
        if len(kept) == len(updates):
            return message
        return replace(message, **{field_name: tuple(kept)})  # type: ignore[arg-type]  # One of the union's fields.

    # ----------------------------------------------------------------- loop
    def start(self, carrier: MembershipCarrier) -> None:
        """Join through the seeds and start the timers. On the node's loop."""
        self.carrier = carrier
        self._started = True
        self._input(lambda now: self.swim.join(now, self.seeds))
        log.info("membership.started node=%s generation=%d probe_interval_ms=%d probe_timeout_ms=%d "
                 "dead_grace_ms=%d seeds=%s", self.self_id, self.generation, self.config.probe_interval_ms,
                 self.config.probe_timeout_ms, self.config.dead_grace_ms, ",".join(self.seeds) or "none")

    def learn(self, records: Iterable[MemberUpdate]) -> None:
        """Merge member records (as a push-pull reply's): the simulator's start knowing the
        whole cluster. Before start(), nothing is sent."""
        snapshot = tuple(records)
        self._input(lambda now: self.swim.on_message(now, "", PushPullReply(snapshot)))

    async def stop(self) -> None:
        tasks = list(self._sends)
        self.stopped()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def stopped(self) -> None:
        """The process is ending: no more timers, sends or held answers (stop() also waits
        for the sends in flight to finish cancelling)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future in self._held.values():
            if not future.done():
                future.cancel()
        self._held.clear()

    def clock_changed(self) -> None:
        """The clock jumped or changed its rate (the simulator's clock faults): re-arm the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._schedule()

    def _schedule(self) -> None:
        """(Re)arm the timer for the state machine's next deadline (never twice at one instant)."""
        if not self._started or self._stopped:
            return
        due = max(self.swim.next_tick_ms(), self._last_tick_ms + 1)
        if self._timer is not None:
            if self._timer_at_ms == due:
                return
            self._timer.cancel()
        self._timer_at_ms = due
        self._timer = self.clock.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._stopped:
            return
        now = self.clock.now_ms()
        if now < self._timer_at_ms:  # Woken a little early: wait again.
            self._schedule()
            return
        self._last_tick_ms = now
        try:
            self._input(lambda t: self.swim.tick(t))
        except Exception as error:  # Never let membership die; say why and go on.
            log.error("membership.tick.error error=%r", error)
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at_ms = now + self.config.gossip_interval_ms
            self._timer = self.clock.call_at(self._timer_at_ms, self._on_timer)

    # ----------------------------------------------------------------- inputs
    def receive(self, source_id: str, message: Message) -> Message | None:
        """A request from a peer (the peer server's Membership calls). Returns the reply the
        state machine produced for this call, or None. An IndirectPing's Ack or Nack comes
        later: the caller holds a future for it first (hold)."""
        message = self._screen(message)
        if self.unhealthy_reason and isinstance(message, Ping):
            # No ack: the prober sees a failed probe. Its news is still heard.
            self.probes_unanswered += 1
            self._input(lambda now: self.swim.on_message(now, source_id, Gossip(message.updates)))
            return None
        answer: list[Message] = []

        def is_answer(outbound: Outbound) -> bool:
            reply = outbound.message
            match message, reply:
                case (Ping(), Ack()) if reply.sequence_number == message.sequence_number:
                    pass
                case (PushPullRequest(), PushPullReply()) | (JoinRequest(), JoinReply()) | \
                        (LeaveRequest(), LeaveReply()):
                    pass
                case _:
                    return False
            if answer:
                return False
            answer.append(reply)
            return True

        self._input(lambda now: self.swim.on_message(now, source_id, message), is_answer)
        return answer[0] if answer else None

    async def relay(self, source_id: str, message: IndirectPing, *, deadline_s: float | None = None) -> Ack | Nack:
        """An IndirectPing: probe its target for the caller, and answer once the target acked
        (Ack) or the relay timed out (Nack). The caller's call stays open until then, or until
        its deadline (`deadline_s` from now) is near."""
        sequence_number = message.sequence_number
        answer = self.hold(source_id, sequence_number)
        try:
            self.receive(source_id, message)
            # The state machine nacks at probe_timeout_ms; this is only the backstop.
            timeout_s = (message.probe_timeout_ms + 500) / 1000
            if deadline_s is not None:
                timeout_s = max(0.0, min(timeout_s, deadline_s - 0.005))
            await asyncio.wait([answer], timeout=timeout_s)
        finally:
            self.release(source_id, sequence_number)
        reply = answer.result() if answer.done() and not answer.cancelled() else None
        return reply if isinstance(reply, (Ack, Nack)) else Nack(sequence_number)

    async def answer(self, source_id: str, message: Message, *, deadline_s: float | None = None) -> Message | None:
        """Serve one SWIM request from a peer: what node/peer_server.py's MembershipService
        answers, and what the simulator's network carries back. A gossip round has no reply
        (None); a Ping we do not ack raises MembershipUnavailable; a request the state machine
        did not answer gets the empty reply (no members, not accepted)."""
        match message:
            case IndirectPing():
                return await self.relay(source_id, message, deadline_s=deadline_s)
            case Gossip():
                self.receive(source_id, message)
                return None
            case Ping():
                reply = self.receive(source_id, message)
                if not isinstance(reply, Ack):
                    why = f"unhealthy: {self.unhealthy_reason}" if self.unhealthy_reason else "not a member now"
                    raise MembershipUnavailable(f"{self.self_id} is {why}")
                return reply
            case PushPullRequest():
                reply = self.receive(source_id, message)
                return reply if isinstance(reply, PushPullReply) else PushPullReply(())
            case JoinRequest():
                reply = self.receive(source_id, message)
                return reply if isinstance(reply, JoinReply) else JoinReply(False, f"{self.self_id} is not a member now")
            case LeaveRequest():
                reply = self.receive(source_id, message)
                return reply if isinstance(reply, LeaveReply) else LeaveReply(False)
        raise ValueError(f"not a request: {type(message).__name__}")

    def hold(self, source_id: str, sequence_number: int) -> asyncio.Future[Message]:
        """A future for the Ack/Nack the state machine will address to (source_id, sequence_number)."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._held[(source_id, sequence_number)] = future
        return future

    def release(self, source_id: str, sequence_number: int) -> None:
        self._held.pop((source_id, sequence_number), None)

    def ignored(self, problems: list[str], source: str) -> None:
        if problems:
            self.counters.updates_ignored += len(problems)
            log.warning("membership.update.ignored source=%s count=%d reason=%s", source[:64], len(problems),
                        problems[0][:200])

    def _input(self, step: Callable[[int], list[Outbound]],
               is_answer: Callable[[Outbound], bool] | None = None) -> None:
        """Run one input of the state machine, then log, refresh views, and send what it produced."""
        now = self.clock.now_ms()
        outbound = step(now)
        self._after(now)
        if self.swim.self_state() is State.REMOVED or (self.swim.self_state() is State.LEFT
                                                        and not self._left_by_us) \
                or self.swim.dead_boot_generation > self.swim.generation:
            outbound = outbound + self._rejoin(now)
        for item in outbound:
            if is_answer is not None and isinstance(item.message, REPLIES) and is_answer(item):
                continue
            self._dispatch(item)
        self._schedule()

    def _after(self, now: int) -> None:
        for rejection in self.swim.drain_rejected():
            self.counters.updates_rejected += 1
            key = (rejection.node_id, rejection.reporter_id, rejection.reason)
            if now - self._rejected_logged.get(key, -10**12) >= 60_000:  # Once a minute per kind.
                if len(self._rejected_logged) > 1_000:
                    self._rejected_logged.clear()
                self._rejected_logged[key] = now
                log.warning("membership.update.rejected node=%s state=%s reporter=%s reason=%s",
                            rejection.node_id[:64], rejection.state.value, rejection.reporter_id[:64],
                            rejection.reason[:200])
        events = self.swim.drain_events()
        for event in events:
            if event.node_id != self.self_id:
                self.trouble.note(now)
            record = self.swim.record(event.node_id)
            level = logging.INFO if event.new_state in (State.ALIVE, State.LEAVING) else logging.WARNING
            log.log(level, "membership.state node=%s old=%s new=%s generation=%d incarnation=%d reporter=%s",
                    event.node_id, event.old_state.value if event.old_state else "none", event.new_state.value,
                    record.generation if record else 0, record.incarnation if record else 0,
                    (record.reporter_id or "-")[:64] if record else "-")
        if events:
            for observe in self.on_transitions:
                observe(events)
        refused = self.swim.join_refused_reason
        if refused != self._join_refused:
            self._join_refused = refused
            if refused:
                log.error("membership.join.refused node=%s reason=%s", self.self_id, refused)
        held = self.swim.newer_boot_held
        if held != self._newer_boot_logged:
            self._newer_boot_logged = held
            if held:
                log.warning("membership.join.newer_boot_held node=%s generation=%d held_generation=%d: a seed holds a "
                            "newer boot of this id as reachable (data dir wiped or replaced?); probes for it go "
                            "unanswered here until the cluster holds it dead, then this node joins above it",
                            self.self_id, self.swim.generation, held)
        dead_boot = self.swim.dead_boot_record
        if dead_boot is not self._dead_boot_logged:
            self._dead_boot_logged = dead_boot
            if dead_boot is DeadBootRecord.UNVERIFIED:
                log.error("membership.join.dead_boot_record outcome=%s node=%s generation=%d: a seed's record of a "
                          "newer boot of this id did not verify (see membership.update.rejected); not joining "
                          "above it", dead_boot.value, self.self_id, self.swim.generation)
        held_back = self.swim.removal_blocked_reasons()
        for node_id, reason in held_back.items():
            if self._held_back.get(node_id) != reason:
                log.warning("membership.remove.held node=%s rail=%s", node_id, reason)
        self._held_back = held_back
        view = self._build_view(self._view)
        changed = view.ring_key != self._view.ring_key
        if view.ring.version != self._view.ring.version:
            log.info("membership.ring.changed members=%d ring_version=%x nodes=%s", len(view.ring), view.ring.version,
                     ",".join(view.ring.node_ids))
        self._view = view
        if changed:
            for callback in self.on_change:
                try:
                    callback()
                except Exception as error:  # A callback's bug must not stop membership.
                    log.error("membership.on_change.error error=%r", error)

    def _build_view(self, previous: _View | None) -> _View:
        swim = self.swim
        # Every field below is a function of the member records alone, and a record is
        # immutable and replaced on every change: when every record is the one the previous
        # view was built from (most inputs: an ack, a gossip that changed nothing), so is
        # the view.
        records = swim.records()
        if (previous is not None and len(records) == len(previous.records)
                and all(a is b for a, b in zip(records, previous.records))):
            return previous
        in_ring = swim.ring_members()
        # What on_change watches: who owns tokens, which boot of them, and whether each is
        # dead. Alive <-> suspect is left out: a suspicion changes neither placement nor
        # where data can be read, and most end in a refutation.
        ring_key = tuple((m.node_id, m.generation, m.state == State.DEAD.value) for m in in_ring)
        ring_members = tuple(m.as_ring_member() for m in in_ring)
        if previous is not None and tuple(m for m in previous.ring.members) == tuple(sorted(ring_members)):
            ring = previous.ring
        else:
            ring = self._ring_factory(self.cluster_id, tuple(sorted(ring_members)))
        members = {view.info.node_id: view.info for view in swim.members()}
        reachable = frozenset(node_id for node_id in members if swim.is_alive(node_id))
        return _View(ring, members, reachable, ring_key, records)

    def _rejoin(self, now: int) -> list[Outbound]:
        """The cluster removed this generation of us (or made it leave): come back as the next one."""
        old = self.swim
        at_least = max(old.generation, old.dead_boot_generation) + 1
        if old.dead_boot_generation > old.generation:
            log.warning("membership.generation.behind node=%s generation=%d dead_boot_generation=%d: this node's "
                        "generation count started over (data dir wiped or replaced)", self.self_id,
                        old.generation, old.dead_boot_generation)
        generation = max(self._next_generation(at_least), at_least)
        self._retired = self._totals(old.statistics())
        self.counters.rejoins += 1
        log.warning("membership.rejoin node=%s state=%s old_generation=%d new_generation=%d", self.self_id,
                    old.self_state().value, old.generation, generation)
        self._me = replace(self._me, generation=generation, updated_at_ms=self.clock.wall_ms())
        self.swim = Swim(self.config, self._me, self._rng, now, **self._hooks)
        # Keep what we knew of the others (so the ring does not shrink to us meanwhile), then join.
        others = tuple(r for r in (old.record(v.info.node_id) for v in old.members())
                       if r is not None and r.node_id != self.self_id)
        self.swim.on_message(now, "", PushPullReply(others))
        seeds = list(dict.fromkeys(self.seeds + [r.info.peer_address for r in others
                                                 if r.state in (State.ALIVE, State.LEAVING, State.SUSPECT)]))
        out = self.swim.join(now, seeds)
        self._after(now)
        return out

    # ----------------------------------------------------------------- sending
    def _dispatch(self, outbound: Outbound) -> None:
        message = outbound.message
        if isinstance(message, (Ack, Nack)):
            future = self._held.get((outbound.target_id, message.sequence_number))
            if future is not None and not future.done():
                future.set_result(message)
            else:
                self.counters.replies_late += 1
            return
        if isinstance(message, REPLIES):
            return  # A reply whose call is gone: nothing to send it on.
        if self.carrier is None or self._stopped:
            return
        task = asyncio.ensure_future(self._send(outbound))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _deadline_ms(self, message: Message) -> int:
        config = self.config
        scale = self.swim.awareness + 1
        match message:
            case Ping():
                # An ack counts until the round ends; a Ping relayed for another node's
                # IndirectPing, until that node's probe timeout (its nack comes then).
                relay_deadline_ms = self.swim.relay_deadline_ms(message.sequence_number)
                if relay_deadline_ms is not None:
                    return max(1, relay_deadline_ms - self.clock.now_ms())
                return config.probe_interval_ms * scale
            case Gossip():
                return config.probe_timeout_ms * scale
            case IndirectPing():
                return message.probe_timeout_ms + config.probe_timeout_ms * scale
        return max(FULL_STATE_TIMEOUT_MS_MIN, 2 * config.probe_interval_ms)

    async def _send(self, outbound: Outbound) -> None:
        carrier = self.carrier
        assert carrier is not None
        message = outbound.message
        address = outbound.address
        if not address and outbound.target_id:
            member = self.member(outbound.target_id)
            address = member.peer_address if member else ""
        kind = type(message).__name__
        self.counters.by_method[kind] = self.counters.by_method.get(kind, 0) + 1
        try:
            if not address:
                raise PeerError(f"no address for {outbound.target_id!r}")
            source, answer, problems = await carrier.call(outbound.target_id, address, message,
                                                          timeout_ms=self._deadline_ms(message))
            if isinstance(message, Ping) and source != outbound.target_id:
                raise PeerError(f"{address}: answered by {source[:64]!r}, not {outbound.target_id!r}")
        except PeerError as error:
            self.counters.sends_failed += 1
            log.debug("membership.send.failed message=%s target=%s error=%s", kind, outbound.target_id or address,
                      error)
            self._input(lambda now: self.swim.message_failed(now, outbound))
            return
        self.ignored(problems, source)
        if answer is not None:
            screened = self._screen(answer)
            self._input(lambda now: self.swim.on_message(now, source, screened))
