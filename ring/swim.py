"""Membership: SWIM failure detection and gossip with the Lifeguard refinements. Pure code.

A Sans-IO state machine in the manner of HashiCorp memberlist (DESIGN "Membership",
research/distributed.md §2.2, §6.4): events in, effects out. The caller supplies time
(`now_ms`, monotonic milliseconds) and randomness (a `random.Random`); nothing here reads
a clock, touches the network or uses the global random. The same inputs and seed give
the same outputs, so sim/ can replay a run exactly.

Inputs
    tick(now_ms)                         timers: probe rounds, probe timeouts, indirect
                                         probes, suspicion timeouts, gossip rounds,
                                         push-pull, dead -> removed, join retries.
                                         Call it at `next_tick_ms()` (or earlier).
    on_message(now_ms, source_id, m)     a message from a peer.
    message_failed(now_ms, outbound)     the transport could not deliver one of ours.
    join(now_ms, seeds) / leave(now_ms) / remove(now_ms, node_id)
Every input returns `list[Outbound]`: messages for the caller to send.

Failure detection (SWIM + Lifeguard)
    Each probe interval one member is pinged, in round-robin order over a list shuffled
    at every wrap (new members go in at a random offset), as memberlist does. No ack by
    `probe_timeout_ms`: `indirect_checks` random alive members are asked to ping it (an
    IndirectPing); they answer with the target's ack or, when it stays silent, a Nack.
    No ack from anyone by the end of the interval: the member becomes SUSPECT, with this
    node as accuser. Every node that hears of a suspicion runs its own timer, which
    starts at `suspicion_max_timeout_mult` x the base timeout and shrinks towards the
    base (`suspicion_mult` x max(1, log10(n)) x probe interval) as distinct accusers
    confirm it (memberlist suspicion.go); `suspicion_confirmations` (k, 3 = the number
    of indirect checks; memberlist takes suspicion_mult - 2 = 2) confirmations bring it
    to the base, and k is 0 (the base at once) when fewer than k members could confirm.
    When it runs out the member is DEAD. A member that hears it is suspected or dead
    refutes by raising its incarnation.
    Local health (Lifeguard "awareness", 0 .. awareness_max_multiplier - 1): a failed
    probe adds the nacks that did not come (or 1 when nobody could be asked), a
    refutation adds 1, a successful probe takes 1 off; probe interval and probe timeout
    are multiplied by (awareness + 1) (memberlist scales only the interval). A probe that was in flight while this node
    itself stalled (no tick for more than a probe interval) is dropped, not held against
    its target.

Dissemination
    Every state change goes into a broadcast queue (one entry per member, newest wins)
    and is piggybacked on pings, acks, nacks and dedicated gossip messages (to
    `gossip_nodes` random members every `gossip_interval_ms`), fewest-sent and newest
    first, up to `piggyback_bytes_max`, each entry `retransmit_mult x ceil(log10(n+1))`
    times. Updates about the message's target go first (Lifeguard's buddy system), so a
    suspect learns of it from the very probe. A full-state push-pull with one random
    member runs every `push_pull_interval_ms` (stretched above 32 members as memberlist
    does); with probability dead/(alive+dead) it goes to a dead member instead, which is
    how two sides of a healed partition find each other again (Serf's reconnect).

Merge rules (`newer`, a total order, so merging is commutative, associative and
idempotent): higher generation wins; LEFT and REMOVED are terminal within a generation
(REMOVED over LEFT, then higher Lamport clock); otherwise higher incarnation wins, and at
the same incarnation DEAD > SUSPECT > ALIVE. Remaining ties break on the reporter and
the member's fields, so any two nodes holding the same updates hold the same records.
One exception, memberlist's: in a full-state exchange (push-pull, join reply) a DEAD
record about a member this node holds alive or suspect only makes it SUSPECT here; this
node's own suspicion timer then decides, and the member, if alive, refutes meanwhile.
Without it, the two sides of a healed partition would declare each other dead.

Dead -> removed (DESIGN): after `dead_grace_ms` in DEAD, subject to two rails evaluated
on the local view: never while fewer than `ring_min_fraction` (75%) of the ring members
(alive + suspect + dead) are alive or suspect, i.e. while removing the dead would take the
ring below 75% of its members; and never a member whose whole site is dead (that is a WAN
partition more likely than a dead site). A member a rail held back gets a fresh grace
once the rail lets go: when a cut heals its links come back one at a time, and the first
member heard alive again lifts the rails for the others of its side, which are as alive
but not yet heard (a real run, stop 22: both sides of a healed site cut removed a member
of the other at the heal). The first node whose timer fires gossips
REMOVED with a Lamport clock, and the merge rules make everyone adopt it, whatever their
own rails say. Operator `remove` bypasses the rails. REMOVED and LEFT are final for a
generation: a node that learns it was removed (say it was cut off for longer than the
grace period) reports `self_state() == REMOVED` and must restart with a higher
generation, as it also must to rejoin after `leave`.

Leaving (`pacsnode leave`, DESIGN "Repair and rebalance"): `start_leaving` makes a member
LEAVING with a bumped incarnation. It gives up its tokens at once (the new owners pull its
ranges) but keeps answering, probing and gossiping until it has handed everything over;
then `leave` makes it LEFT. LEAVING ranks between ALIVE and SUSPECT at one incarnation, so
a leaving member is probed, suspected and declared dead like any other. So that a
suspicion does not put it back into the ring, every record derived from a LEAVING one
(SUSPECT, DEAD, REMOVED, the member's own refutation) carries `leaving=True`: a record at
or above the LEAVING incarnation can only have come from it, so every node that holds a
record that new knows the member is leaving, whatever its state.

Views for the data path: alive, leaving and suspect members are reachable (`is_alive`);
alive, suspect and dead members keep their tokens (`ring_members`) unless they are
leaving; left and removed ones do not. `events` collects every state transition for
logging and for measuring detection.

Mapping onto proto/pacsnode.proto (the node does this): Ping -> PingRequest (reply Ack),
IndirectPing -> IndirectPingRequest (reply Ack, or Ack with nack=true for `Nack`),
Gossip -> PingRequest with sequence_number 0 (the proto has no gossip RPC; the reply is
an empty Ack), PushPullRequest/Reply, JoinRequest/Reply, LeaveRequest/Reply. Ack, Nack,
PushPullReply, JoinReply and LeaveReply are replies: the node returns each on the open
call it answers (same source, same sequence number or message kind). An IndirectPing's
reply comes later, from `on_message` (the target's ack) or `tick` (the nack), so the
node holds that call open until then.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import NamedTuple, TypeAlias

from pacsnode.ring.members import MemberInfo

__all__ = [
    "Ack",
    "DeadBootRecord",
    "Gossip",
    "IndirectPing",
    "JoinReply",
    "JoinRequest",
    "LeaveReply",
    "LeaveRequest",
    "MemberUpdate",
    "MemberView",
    "Message",
    "Nack",
    "Outbound",
    "Ping",
    "PushPullReply",
    "PushPullRequest",
    "Rejection",
    "Signer",
    "State",
    "Swim",
    "SwimConfig",
    "SwimStatistics",
    "Transition",
    "Verifier",
    "merge",
    "merge_all",
    "message_bytes",
    "newer",
    "push_pull_interval_ms",
    "removal_blocked",
    "remaining_suspicion_ms",
    "retransmit_limit",
    "suspicion_timeout_ms",
]


class State(StrEnum):
    """A member's state. The values are MemberInfo.state strings (node/peer_wire.py)."""

    ALIVE = "alive"  # Answering probes.
    LEAVING = "leaving"  # Handing its ranges over (`pacsnode leave`): answering, owns no tokens. Then LEFT.
    SUSPECT = "suspect"  # Missed a probe; dead unless it refutes before the timeout.
    DEAD = "dead"  # Not answering. Keeps its tokens; hints accumulate for it.
    LEFT = "left"  # Announced a graceful leave. Out of the ring.
    REMOVED = "removed"  # Dead past the grace period, or removed by the operator. Out of the ring.


REACHABLE = frozenset({State.ALIVE, State.LEAVING, State.SUSPECT})
IN_RING = frozenset({State.ALIVE, State.SUSPECT, State.DEAD})  # Unless the record says `leaving`.
TERMINAL = frozenset({State.LEFT, State.REMOVED})
RUNNING = frozenset({State.ALIVE, State.LEAVING})  # What a running member says about itself.
_RANK = {State.ALIVE: 0, State.LEAVING: 1, State.SUSPECT: 2, State.DEAD: 3, State.LEFT: 4, State.REMOVED: 5}


# ===================================================================== configuration


@dataclass(frozen=True, kw_only=True)
class SwimConfig:
    """SWIM/Lifeguard timers and limits. Defaults are memberlist's DefaultLANConfig."""

    probe_interval_ms: int = 1_000  # One probe per interval; lower = faster detection, more traffic.
    probe_timeout_ms: int = 500  # Direct ack wait before indirect probes: about p99 RTT.
    indirect_checks: int = 3  # k members asked to probe a silent target.
    suspicion_mult: int = 4  # Base suspicion timeout: mult * max(1, log10(n)) * probe interval.
    suspicion_max_timeout_mult: int = 6  # A suspicion timer starts at this multiple of the base.
    suspicion_confirmations: int = 3  # Distinct accusers that shrink the timer to the base (0 if n-2 < this).
    gossip_interval_ms: int = 200  # Dedicated gossip round period.
    gossip_nodes: int = 3  # Members sent each gossip round.
    gossip_to_dead_ms: int = 30_000  # Keep gossiping to a member this long after it died (so it can refute).
    retransmit_mult: int = 4  # Each update is sent retransmit_mult * ceil(log10(n+1)) times.
    piggyback_bytes_max: int = 1_400  # Update bytes piggybacked on one message (memberlist: one UDP packet).
    push_pull_interval_ms: int = 30_000  # Full-state exchange with one random member.
    awareness_max_multiplier: int = 8  # Lifeguard local health: probe interval/timeout scale up to 8x.
    dead_grace_ms: int = 600_000  # Dead this long -> removed (Ceph mon_osd_down_out_interval), rails permitting.
    ring_min_fraction: float = 0.75  # Rail: no automatic removal while under 75% of the ring is alive/suspect.
    join_retry_interval_ms: int = 5_000  # Until a seed answered a join, ask the seeds again this often.

    def __post_init__(self) -> None:  # A bad config is an operating error: raise, don't assert.
        positive = ("probe_interval_ms", "probe_timeout_ms", "suspicion_mult", "suspicion_max_timeout_mult",
                    "gossip_interval_ms", "retransmit_mult", "piggyback_bytes_max", "push_pull_interval_ms",
                    "awareness_max_multiplier", "join_retry_interval_ms")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"SwimConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("indirect_checks", "suspicion_confirmations", "gossip_nodes", "gossip_to_dead_ms",
                     "dead_grace_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"SwimConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.probe_timeout_ms >= self.probe_interval_ms:
            raise ValueError(f"need probe_timeout_ms < probe_interval_ms, got {self.probe_timeout_ms} "
                             f">= {self.probe_interval_ms}")
        if not 0.0 <= self.ring_min_fraction <= 1.0:
            raise ValueError(f"ring_min_fraction must be in [0, 1], got {self.ring_min_fraction}")

    @classmethod
    def lan(cls) -> SwimConfig:
        """memberlist DefaultLANConfig (the default)."""
        return cls()

    @classmethod
    def local(cls, *, dead_grace_ms: int = 10_000) -> SwimConfig:
        """Loopback tests and sim: same shape, fast timers (a 2 s stall can look like death)."""
        return cls(probe_interval_ms=200, probe_timeout_ms=100, gossip_interval_ms=50,
                   push_pull_interval_ms=2_000, gossip_to_dead_ms=6_000, join_retry_interval_ms=1_000,
                   dead_grace_ms=dead_grace_ms)

    @classmethod
    def wan(cls) -> SwimConfig:
        """memberlist DefaultWANConfig, between sites."""
        return cls(probe_interval_ms=5_000, probe_timeout_ms=3_000, suspicion_mult=6, gossip_interval_ms=500,
                   gossip_nodes=4, push_pull_interval_ms=60_000, join_retry_interval_ms=15_000)


# ===================================================================== pure rules


def suspicion_timeout_ms(suspicion_mult: int, n: int, probe_interval_ms: int) -> int:
    """The base (minimum) suspicion timeout: mult * max(1, log10(max(1, n))) * interval (util.go)."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return int(suspicion_mult * node_scale * probe_interval_ms)


def remaining_suspicion_ms(confirmations: int, k: int, elapsed_ms: int, min_ms: int, max_ms: int) -> int:
    """Time left on a suspicion timer after `confirmations` of `k` wanted (suspicion.go).

    timeout = max - log(c+1)/log(k+1) * (max - min), never below min; k < 1 means min.
    May be negative: the timer has already run out.
    """
    if k < 1:
        timeout = min_ms
    else:
        fraction = math.log(confirmations + 1.0) / math.log(k + 1.0)
        timeout = max(min_ms, math.floor(max_ms - fraction * (max_ms - min_ms)))
    return int(timeout) - elapsed_ms


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times each update is piggybacked: mult * ceil(log10(n + 1)) (util.go)."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


def push_pull_interval_ms(base_ms: int, n: int) -> int:
    """memberlist pushPullScale: the interval grows with log2(n) above 32 members."""
    if n <= 32:
        return base_ms
    multiplier = math.ceil(math.log2(n) - math.log2(32)) + 1
    return base_ms * multiplier


def removal_blocked(ring: Mapping[str, tuple[str, State]], node_id: str, ring_min_fraction: float) -> str | None:
    """Why automatic dead -> removed of `node_id` must wait, or None when it may go ahead.

    `ring` maps each ring member (alive, suspect or dead) to (site, state). Rails (DESIGN):
    - "ring": the members not dead are under `ring_min_fraction` of the ring, so removing
      the dead would take the ring below 75% of its members (a partition or a mass
      failure, not independent deaths);
    - "site": every ring member of the node's site is dead: removing them would remove
      the whole site, which is a WAN partition more likely than a dead site.
    """
    if node_id not in ring:
        return "not in ring"
    live = sum(1 for _, state in ring.values() if state in REACHABLE)
    if live < ring_min_fraction * len(ring):
        return "ring"
    site = ring[node_id][0]
    if not any(s == site and state in REACHABLE for other, (s, state) in ring.items() if other != node_id):
        return "site"
    return None


# ===================================================================== messages


@dataclass(frozen=True, slots=True)
class MemberUpdate:
    """One member's state as some node knows it: the unit of gossip and of full state.

    `info` is the member's identity and addresses (MemberInfo); its `generation` is the
    member's boot generation and its `state` is kept equal to `state` here.
    """

    info: MemberInfo
    state: State
    incarnation: int = 0  # Raised only by the member itself, to refute.
    reporter_id: str = ""  # Who set this state; for SUSPECT the accuser (counts confirmations).
    lamport: int = 0  # Lamport clock of a LEFT or REMOVED event (Serf); 0 otherwise.
    leaving: bool = False  # The member announced LEAVING in this generation: it owns no tokens.
    # Opaque proof of who set this record (node/member_signing.py: an ECDSA signature and the
    # signer's certificate). Carried unchanged when the record is relayed; checked by the
    # Swim's injected verifier; empty without one. Not part of the merge order.
    signature: bytes = b""
    certificate: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.state, State):
            object.__setattr__(self, "state", State(self.state))
        if self.state is State.LEAVING and not self.leaving:
            object.__setattr__(self, "leaving", True)
        if self.info.state != self.state.value:
            object.__setattr__(self, "info", replace(self.info, state=self.state.value))

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def generation(self) -> int:
        return self.info.generation

    @property
    def in_ring(self) -> bool:
        """Owns ring tokens: alive, suspect or dead, and not leaving."""
        return self.state in IN_RING and not self.leaving

    def restate(self, state: State, *, reporter_id: str, lamport: int = 0) -> "MemberUpdate":
        """This member's record in another state, as `reporter_id` says (same incarnation, leaving kept)."""
        return MemberUpdate(self.info, state, self.incarnation, reporter_id=reporter_id, lamport=lamport,
                            leaving=self.leaving)


def _primary(update: MemberUpdate) -> tuple[int, int, int, int, int]:
    if update.state in TERMINAL:
        return (update.generation, 1, _RANK[update.state], update.lamport, update.incarnation)
    return (update.generation, 0, update.incarnation, _RANK[update.state], update.lamport)


# MemberInfo's fields in order: the tuple dataclasses.astuple gives (every field is a str or
# an int, so nothing to copy), without its deep copy on every tie.
_INFO_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(MemberInfo)))


def _tiebreak(update: MemberUpdate) -> tuple[object, ...]:
    return (update.reporter_id, update.leaving, _INFO_FIELDS(update.info))


def newer(candidate: MemberUpdate, current: MemberUpdate) -> bool:
    """True when `candidate` supersedes `current` (both about the same member)."""
    a, b = _primary(candidate), _primary(current)
    if a != b:
        return a > b
    return _tiebreak(candidate) > _tiebreak(current)


def merge(a: MemberUpdate, b: MemberUpdate) -> MemberUpdate:
    """The winner of two updates about one member (a join: commutative, idempotent)."""
    return b if newer(b, a) else a


def merge_all(updates: Iterable[MemberUpdate], into: Mapping[str, MemberUpdate] | None = None
              ) -> dict[str, MemberUpdate]:
    """Fold updates into a member table, by node id."""
    table = dict(into or {})
    for update in updates:
        current = table.get(update.node_id)
        if current is None or newer(update, current):
            table[update.node_id] = update
    return table


Updates: TypeAlias = tuple[MemberUpdate, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    """A direct probe; answered with Ack(sequence_number)."""

    sequence_number: int
    target_id: str  # Who the sender thinks it is probing; anyone else stays silent.
    updates: Updates = ()


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Please probe `target` for me; answer Ack when it acks, Nack after probe_timeout_ms."""

    sequence_number: int
    target: MemberInfo
    probe_timeout_ms: int
    updates: Updates = ()


@dataclass(frozen=True, slots=True)
class Ack:
    sequence_number: int
    updates: Updates = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """An intermediary's answer to IndirectPing: the target did not ack in time (I am alive)."""

    sequence_number: int
    updates: Updates = ()


@dataclass(frozen=True, slots=True)
class Gossip:
    """A dedicated gossip round's message: updates only, no reply needed."""

    updates: Updates


@dataclass(frozen=True, slots=True)
class PushPullRequest:
    members: Updates  # Every record the sender holds, itself included.


@dataclass(frozen=True, slots=True)
class PushPullReply:
    members: Updates  # Every record the receiver held before merging the request.


@dataclass(frozen=True, slots=True)
class JoinRequest:
    member: MemberUpdate  # The joiner, ALIVE.


class JoinRefusal(StrEnum):
    """Why a seed refused a join, as far as the joiner can act on it."""

    NONE = "none"  # Accepted, or a refusal that may clear up (an id in use, a dead generation): retried.
    PLACEMENT = "placement"  # The cluster places studies otherwise (site_replicas / N): asking again cannot help.


class DeadBootRecord(StrEnum):
    """What the joiner made of a record of its own id that came with a join refusal (a seed
    holds a newer boot of this id that no process answers for: the joiner's data dir lost
    its generation count)."""

    NONE = "none"  # No such record came (yet).
    TAKEN = "taken"  # The record verified (or no verifier): the node joins again above its generation.
    UNVERIFIED = "unverified"  # The verifier refused it (unsigned, badly signed): ignored, joins keep failing.


@dataclass(frozen=True, slots=True)
class JoinReply:
    accepted: bool
    reason: str = ""
    members: Updates = ()
    refusal: JoinRefusal = JoinRefusal.NONE


@dataclass(frozen=True, slots=True)
class LeaveRequest:
    member: MemberUpdate  # The leaver, LEFT, with a bumped incarnation and a Lamport clock.


@dataclass(frozen=True, slots=True)
class LeaveReply:
    accepted: bool


Message: TypeAlias = (Ping | IndirectPing | Ack | Nack | Gossip | PushPullRequest | PushPullReply | JoinRequest
                      | JoinReply | LeaveRequest | LeaveReply)
REPLIES = (Ack, Nack, PushPullReply, JoinReply, LeaveReply)


class Outbound(NamedTuple):
    """A message to send. `target_id` is "" for a seed known only by address; `address`
    is the target's peer address ("" for a reply to a sender this node does not know:
    the reply goes back on the sender's own call)."""

    target_id: str
    address: str
    message: Message


class MemberView(NamedTuple):
    info: MemberInfo
    state: State
    incarnation: int
    generation: int


class Rejection(NamedTuple):
    """A record from a peer that the verifier refused (the node logs these): ignored."""

    node_id: str
    state: State
    reporter_id: str
    reason: str


Signer: TypeAlias = Callable[[MemberUpdate], MemberUpdate]  # Returns the record with its proof.
Verifier: TypeAlias = Callable[[MemberUpdate], "str | None"]  # Why a peer's record may not be used, or None.


class Transition(NamedTuple):
    """A member's state changed in this node's view (old_state None: newly learned)."""

    at_ms: int
    node_id: str
    old_state: State | None
    new_state: State


ENVELOPE_BYTES = 64  # Envelope (cluster id, ids, versions, clocks) and call framing, roughly.


def update_bytes(update: MemberUpdate) -> int:
    """Rough protobuf size of one MemberUpdate: strings plus ~40 bytes of numbers and tags."""
    info = update.info
    return (40 + len(info.node_id) + len(info.peer_host) + len(info.dicom_host) + len(info.ae_title)
            + len(info.site) + len(info.host) + len(update.reporter_id) + len(update.signature)
            + len(update.certificate))


def message_bytes(message: Message) -> int:
    """Rough wire size of a message, for statistics and budgets."""
    size = ENVELOPE_BYTES + 12
    match message:
        case Ping() | Ack() | Nack() | Gossip() | IndirectPing():
            size += sum(update_bytes(u) for u in message.updates)
            if isinstance(message, IndirectPing):
                size += len(message.target.node_id) + len(message.target.peer_host) + 8
        case PushPullRequest() | PushPullReply() | JoinReply():
            size += sum(update_bytes(u) for u in message.members)
        case JoinRequest() | LeaveRequest():
            size += update_bytes(message.member)
        case LeaveReply():
            pass
    return size


# ===================================================================== statistics


@dataclass(frozen=True)
class SwimStatistics:
    probes_sent: int  # Direct pings of our own probe rounds.
    probe_acks: int  # Our probes answered (directly or through an intermediary).
    indirect_probes_sent: int  # IndirectPing requests we sent.
    indirect_acks: int  # Acks that reached us through an intermediary.
    nacks_received: int
    probe_failures: int  # Rounds that ended without any ack.
    probes_abandoned: int  # Rounds dropped because this node itself stalled.
    relays: int  # IndirectPings we carried out for others.
    suspicions_raised: int  # Members we accused (our own failed probes).
    suspicions_refuted: int  # Times we refuted a suspicion (or death) about ourselves.
    suspicions_cleared: int  # Members we held suspect that came back alive.
    deaths_declared: int  # Suspicion timers of ours that ran out.
    removals: int  # Automatic dead -> removed we decided.
    removals_blocked: int  # Times a removal was held back by a rail (once per member and episode).
    removal_graces_restarted: int  # Held members given a fresh grace when their rail let go.
    operator_removals: int
    updates_rejected: int  # Records the verifier refused (unsigned, wrongly signed): ignored.
    pings_for_a_newer_boot: int  # Pings for our id left unanswered while a newer boot of it is held (newer_boot_held).
    joins_withdrawn: int  # Joins taken back or not taken: a seed let us in while another held a newer boot of our id reachable.
    awareness: int  # Current local health score (0 = healthy).
    members_by_state: Mapping[str, int]
    broadcast_queue_depth: int
    messages_sent: Mapping[str, int]  # By message type name.
    bytes_sent: Mapping[str, int]  # Estimates, by message type name (message_bytes).
    messages_received: Mapping[str, int]
    bytes_received: Mapping[str, int]


# ===================================================================== internals


@dataclass(slots=True)
class _Probe:
    target_id: str
    sequence_number: int
    timeout_ms: int  # Ask for indirect probes at this time.
    deadline_ms: int  # The round ends here.
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    generation: int = 0  # The boot probed: a failed round accuses that boot only.


@dataclass(slots=True)
class _Relay:
    requester_id: str
    requester_address: str
    requester_sequence_number: int
    deadline_ms: int


@dataclass(slots=True)
class _Suspicion:
    generation: int
    incarnation: int
    start_ms: int
    k: int
    min_ms: int
    max_ms: int
    confirmers: set[str] = field(default_factory=set)  # The first accuser is in here but does not count.
    confirmations: int = 0

    def deadline_ms(self) -> int:
        return self.start_ms + remaining_suspicion_ms(self.confirmations, self.k, 0, self.min_ms, self.max_ms)


@dataclass(slots=True)
class _Broadcast:
    update: MemberUpdate
    transmits: int
    order: int
    size: int


class _BroadcastQueue:
    """memberlist's TransmitLimitedQueue: one entry per member, fewest-sent then newest first."""

    def __init__(self) -> None:
        self._items: dict[str, _Broadcast] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def enqueue(self, update: MemberUpdate) -> None:
        self._order += 1
        self._items[update.node_id] = _Broadcast(update, 0, self._order, update_bytes(update))

    def take(self, bytes_max: int, limit: int, exclude: str = "") -> list[MemberUpdate]:
        if not self._items:
            return []
        chosen: list[MemberUpdate] = []
        used = 0
        for item in sorted(self._items.values(), key=lambda b: (b.transmits, -b.order)):
            if item.update.node_id == exclude:
                continue
            if used + item.size > bytes_max:
                continue
            used += item.size
            chosen.append(item.update)
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.update.node_id]
        return chosen


# ===================================================================== the state machine


class Swim:
    """SWIM + Lifeguard membership of one node. See the module docstring."""

    def __init__(self, config: SwimConfig, self_member: MemberInfo, rng: random.Random, now_ms: int, *,
                 signer: Signer | None = None, verifier: Verifier | None = None) -> None:
        """`signer` and `verifier` (node/member_signing.py; both or neither) make every record
        this node sets carry a proof, and every record from a peer need one: a record the
        verifier refuses is ignored and listed in `rejected`. Without them (the simulator,
        a node without TLS) records carry no proof and are all taken."""
        self.config = config
        self.self_id = self_member.node_id
        self._rng = rng
        self._signer = signer
        self._verifier = verifier
        self.rejected: list[Rejection] = []
        me = self._sign(MemberUpdate(self_member, State.ALIVE, 0, reporter_id=self.self_id))
        self._records: dict[str, MemberUpdate] = {self.self_id: me}
        self._state_since_ms: dict[str, int] = {self.self_id: now_ms}
        self._suspicions: dict[str, _Suspicion] = {}
        self._blocked: dict[str, str] = {}  # Dead members whose removal a rail holds back, and why.
        # Dead members a rail has held back in this death (the rail may have let go since),
        # and when a held member's fresh grace began: the rail let go then.
        self._rail_held: set[str] = set()
        self._grace_from_ms: dict[str, int] = {}
        self._queue = _BroadcastQueue()
        self._lamport = 0
        self._awareness = 0
        self._sequence_number = 0
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._relays: dict[int, _Relay] = {}
        self._seeds: tuple[str, ...] = ()
        self._joined = True  # Until join() is called there is nothing to join.
        self.join_refused_reason = ""
        # PLACEMENT once a seed refused us for placement settings: join retries stop, and the
        # node shell stops the process (node/server.py) instead of asking forever.
        self.join_refusal = JoinRefusal.NONE
        # The generation of a boot of this node id, newer than ours and no longer running, for
        # which a seed refused our join (0: none): our data dir lost the generation count
        # (wiped, replaced). The node shell (node/swim_membership.py) then joins again above it.
        self.dead_boot_generation = 0
        # What the last such record came to: TAKEN sets dead_boot_generation; UNVERIFIED
        # (signing on, a record the verifier refused) leaves it, and the record is listed in
        # `rejected`, so a lying seed cannot push this node to a made-up generation.
        self.dead_boot_record = DeadBootRecord.NONE
        # The generation of a newer boot of this id that a seed holds reachable (alive,
        # suspect, leaving) and refused our join for (0: none). Until we are joined we then
        # do not ack a Ping for our id: it can only be meant for that boot, and it reached
        # us because we hold that boot's address now (a restart that lost its generation
        # count: a wiped data dir). Acking it would keep a dead boot alive in every view,
        # and our join refused, for good; silent, that boot is suspected and then dead, and
        # the next refusal carries its record (dead_boot_generation).
        self.newer_boot_held = 0
        self._newer_boot_judged: MemberUpdate | None = None  # The last such record verified.
        # Timers start at random phases so that nodes started together do not beat in step.
        self._next_probe_ms = now_ms + rng.randrange(config.probe_interval_ms)
        self._next_gossip_ms = now_ms + rng.randrange(config.gossip_interval_ms)
        self._next_push_pull_ms = now_ms + rng.randrange(config.push_pull_interval_ms)
        self._next_join_ms: int | None = None
        self._last_tick_ms = now_ms
        self.events: list[Transition] = [Transition(now_ms, self.self_id, None, State.ALIVE)]
        self._counts: dict[str, int] = dict.fromkeys(
            ("probes_sent", "probe_acks", "indirect_probes_sent", "indirect_acks", "nacks_received",
             "probe_failures", "probes_abandoned", "relays", "suspicions_raised", "suspicions_refuted",
             "suspicions_cleared", "deaths_declared", "removals", "removals_blocked", "removal_graces_restarted",
             "operator_removals",
             "updates_rejected", "pings_for_a_newer_boot", "joins_withdrawn"), 0)
        self._sent: dict[str, list[int]] = {}
        self._received: dict[str, list[int]] = {}

    # ----------------------------------------------------------------- views

    @property
    def me(self) -> MemberUpdate:
        return self._records[self.self_id]

    @property
    def incarnation(self) -> int:
        return self.me.incarnation

    @property
    def generation(self) -> int:
        return self.me.generation

    @property
    def awareness(self) -> int:
        return self._awareness

    @property
    def lamport(self) -> int:
        return self._lamport

    @property
    def joined(self) -> bool:
        """False from join() until a seed accepted (True when there was nothing to join)."""
        return self._joined

    def self_state(self) -> State:
        """ALIVE normally; LEAVING after start_leaving(); LEFT after leave(); REMOVED (or LEFT)
        when the cluster removed this generation of the node, which then must restart with a
        higher generation."""
        return self.me.state

    def members(self) -> list[MemberView]:
        """Every member this node knows, itself included, sorted by node id."""
        return [MemberView(u.info, u.state, u.incarnation, u.generation)
                for _, u in sorted(self._records.items())]

    def records(self) -> tuple[MemberUpdate, ...]:
        """Every record this node holds, itself included, in no set order. Records are
        immutable and replaced whenever they change, so when nothing changed two calls
        return the same objects (node/swim_membership.py rebuilds its view only otherwise)."""
        return tuple(self._records.values())

    def ring_members(self) -> list[MemberInfo]:
        """Members that own tokens: alive, suspect and dead, unless leaving (left and removed do not)."""
        return [u.info for _, u in sorted(self._records.items()) if u.in_ring]

    def member(self, node_id: str) -> MemberInfo | None:
        update = self._records.get(node_id)
        return None if update is None else update.info

    def record(self, node_id: str) -> MemberUpdate | None:
        return self._records.get(node_id)

    def state_of(self, node_id: str) -> State | None:
        update = self._records.get(node_id)
        return None if update is None else update.state

    def is_alive(self, node_id: str) -> bool:
        """Reachable for data: alive or suspect (a suspect usually is alive, only slow)."""
        return self.state_of(node_id) in REACHABLE

    def relay_deadline_ms(self, sequence_number: int) -> int | None:
        """When this node nacks the IndirectPing it relays with its own Ping `sequence_number`
        (None when that Ping is not a relay): the transport keeps that Ping open until then."""
        relay = self._relays.get(sequence_number)
        return None if relay is None else relay.deadline_ms

    def drain_events(self) -> list[Transition]:
        events, self.events = self.events, []
        return events

    def drain_rejected(self) -> list[Rejection]:
        rejected, self.rejected = self.rejected, []
        return rejected

    @property
    def signing(self) -> bool:
        return self._verifier is not None

    def statistics(self) -> SwimStatistics:
        by_state: dict[str, int] = {state.value: 0 for state in State}
        for update in self._records.values():
            by_state[update.state.value] += 1
        return SwimStatistics(
            **self._counts,
            awareness=self._awareness,
            members_by_state=by_state,
            broadcast_queue_depth=len(self._queue),
            messages_sent={name: v[0] for name, v in sorted(self._sent.items())},
            bytes_sent={name: v[1] for name, v in sorted(self._sent.items())},
            messages_received={name: v[0] for name, v in sorted(self._received.items())},
            bytes_received={name: v[1] for name, v in sorted(self._received.items())},
        )

    def next_tick_ms(self) -> int:
        """The earliest time at which tick() has something to do."""
        times = [self._next_gossip_ms]
        if self.me.state in RUNNING:
            times.append(self._next_probe_ms)
            times.append(self._next_push_pull_ms)
            if self._next_join_ms is not None:
                times.append(self._next_join_ms)
        probe = self._probe
        if probe is not None:
            times.append(probe.deadline_ms if probe.indirect_sent else probe.timeout_ms)
        times.extend(relay.deadline_ms for relay in self._relays.values())
        times.extend(s.deadline_ms() for s in self._suspicions.values())
        grace = self.config.dead_grace_ms
        for node_id, update in self._records.items():
            if update.state is State.DEAD and node_id not in self._blocked:
                times.append(self._grace_start_ms(node_id) + grace)
        return min(times)

    # ----------------------------------------------------------------- inputs

    def join(self, now_ms: int, seed_addresses: Iterable[str]) -> list[Outbound]:
        """Ask every seed (peer addresses, host:port) to let this node in; retried until one answers."""
        own = self.me.info.peer_address
        self._seeds = tuple(dict.fromkeys(a for a in seed_addresses if a and a != own))
        if not self._seeds:
            self._joined = True
            self._next_join_ms = None
            return []
        self._joined = False
        self._next_join_ms = now_ms + self.config.join_retry_interval_ms
        return self._join_requests()

    def start_leaving(self, now_ms: int) -> list[Outbound]:
        """Start a graceful leave (`pacsnode leave`): LEAVING with a bumped incarnation, sent to
        every reachable member. This node gives up its tokens but keeps answering, probing and
        gossiping while the new owners pull its ranges; call leave() once it has handed over."""
        me = self.me
        if me.state is not State.ALIVE:
            return []
        leaving = self._sign(MemberUpdate(me.info, State.LEAVING, me.incarnation + 1, reporter_id=self.self_id))
        self._set_record(now_ms, leaving)
        self._queue.enqueue(leaving)
        return [self._send(u.node_id, Gossip((leaving,))) for u in self._others() if u.state in REACHABLE]

    def reannounce(self, now_ms: int) -> list[Outbound]:
        """Set our own record again with a bumped incarnation (a new signature: the node's
        certificate was renewed, and records signed by the old one stop being valid when it
        expires). Gossiped like a refutation."""
        me = self.me
        if me.state not in RUNNING:
            return []
        record = self._sign(MemberUpdate(me.info, me.state, me.incarnation + 1, reporter_id=self.self_id,
                                         leaving=me.leaving))
        self._records[self.self_id] = record
        self._queue.enqueue(record)
        return []

    def leave(self, now_ms: int) -> list[Outbound]:
        """Announce a graceful leave: LEFT with a bumped incarnation, sent to every reachable member.

        Keep ticking for a few gossip rounds afterwards so the news spreads; probes stop.
        """
        me = self.me
        if me.state in TERMINAL:
            return []
        self._lamport += 1
        left = self._sign(MemberUpdate(me.info, State.LEFT, me.incarnation + 1, reporter_id=self.self_id,
                                       lamport=self._lamport, leaving=me.leaving))
        self._set_record(now_ms, left)
        self._queue.enqueue(left)
        self._probe = None
        self._next_join_ms = None
        out = [self._send(u.node_id, LeaveRequest(left)) for u in self._others() if u.state in REACHABLE]
        return out

    def remove(self, now_ms: int, node_id: str) -> list[Outbound]:
        """Operator removal (`pacsnode remove`): REMOVED at once, no grace, no rails, gossiped."""
        if node_id == self.self_id:
            raise ValueError("a node cannot remove itself: use leave()")
        current = self._records.get(node_id)
        if current is None:
            raise KeyError(f"unknown member {node_id!r}")
        if current.state is State.REMOVED:
            return []
        self._lamport += 1
        removed = self._sign(current.restate(State.REMOVED, reporter_id=self.self_id, lamport=self._lamport))
        self._counts["operator_removals"] += 1
        self._apply(now_ms, removed, local=True)
        return self._gossip_round(now_ms)

    def tick(self, now_ms: int) -> list[Outbound]:
        """Run every timer that is due at `now_ms`."""
        out: list[Outbound] = []
        config = self.config
        stalled = now_ms - self._last_tick_ms > config.probe_interval_ms
        self._last_tick_ms = now_ms
        alive = self.me.state in RUNNING

        # Indirect probes we carry out for others: the target stayed silent -> nack.
        for sequence_number, relay in list(self._relays.items()):
            if now_ms >= relay.deadline_ms:
                del self._relays[sequence_number]
                out.append(self._to(relay.requester_id, relay.requester_address,
                                    Nack(relay.requester_sequence_number, self._piggyback(relay.requester_id))))

        # Our own probe round.
        probe = self._probe
        if probe is not None and stalled:
            self._probe = None
            self._counts["probes_abandoned"] += 1
            self._adjust_awareness(+1)
        elif probe is not None:
            if not probe.indirect_sent and now_ms >= probe.timeout_ms:
                out.extend(self._send_indirect(now_ms, probe))
            if now_ms >= probe.deadline_ms:
                out.extend(self._probe_failed(now_ms, probe))
        if alive and self._probe is None and now_ms >= self._next_probe_ms:
            out.extend(self._start_probe(now_ms))

        # Suspicion timers.
        for node_id, suspicion in list(self._suspicions.items()):
            if now_ms >= suspicion.deadline_ms():
                out.extend(self._suspicion_expired(now_ms, node_id, suspicion))

        # Dead -> removed after the grace period, rails permitting.
        self._reap_dead(now_ms)

        # Gossip, push-pull, join retries.
        if now_ms >= self._next_gossip_ms:
            self._next_gossip_ms = _next_after(self._next_gossip_ms, config.gossip_interval_ms, now_ms)
            out.extend(self._gossip_round(now_ms))
        if alive and now_ms >= self._next_push_pull_ms:
            interval = push_pull_interval_ms(config.push_pull_interval_ms, self._ring_size())
            self._next_push_pull_ms = _next_after(self._next_push_pull_ms, interval, now_ms)
            out.extend(self._push_pull())
        if alive and self._next_join_ms is not None and now_ms >= self._next_join_ms:
            self._next_join_ms = _next_after(self._next_join_ms, config.join_retry_interval_ms, now_ms)
            out.extend(self._join_requests())
        return out

    def on_message(self, now_ms: int, source_id: str, message: Message) -> list[Outbound]:
        """A message from peer `source_id` ("" when unknown)."""
        self._count(self._received, message)
        out: list[Outbound] = []
        match message:
            case Ping():
                if message.target_id != self.self_id:
                    return []  # Not us (a reused address): stay silent, the caller sees a failure.
                self._apply_all(now_ms, message.updates)
                if not self._joined and self.newer_boot_held > self.generation:
                    self._counts["pings_for_a_newer_boot"] += 1
                    return []  # Meant for the newer boot the cluster holds (see newer_boot_held).
                out.append(self._reply(source_id, Ack(message.sequence_number, self._piggyback(source_id))))
            case Gossip():
                self._apply_all(now_ms, message.updates)
            case IndirectPing():
                self._apply_all(now_ms, message.updates)
                out.extend(self._relay(now_ms, source_id, message))
            case Ack():
                self._apply_all(now_ms, message.updates)
                out.extend(self._on_ack(source_id, message.sequence_number))
            case Nack():
                self._apply_all(now_ms, message.updates)
                probe = self._probe
                if probe is not None and probe.sequence_number == message.sequence_number:
                    probe.nacks += 1
                    self._counts["nacks_received"] += 1
            case PushPullRequest():
                out.append(self._reply(source_id, PushPullReply(self._snapshot())))
                self._apply_all(now_ms, message.members, full_state=True)
            case PushPullReply():
                self._apply_all(now_ms, message.members, full_state=True)
            case JoinRequest():
                out.append(self._on_join(now_ms, source_id, message.member))
            case JoinReply():
                if message.accepted and self.newer_boot_held > self.generation:
                    # A seed that has not heard of the newer boot of our id another seed
                    # showed us alive (wipe-restarted seed 551): not joined; we wait until the
                    # cluster holds that boot dead, then join above it.
                    self._counts["joins_withdrawn"] += 1
                elif message.accepted:
                    self._joined = True
                    self._next_join_ms = None
                    self.join_refused_reason = ""
                elif not self._joined:
                    self.join_refused_reason = message.reason
                    for update in message.members:
                        if update.node_id != self.self_id or update.generation <= self.generation:
                            continue
                        self._newer_boot_judged = update
                        # A newer boot of our id: checked as every peer's record is (signed by
                        # whoever set it), acted on only when it verifies.
                        if not self._verify(update):
                            self.dead_boot_record = DeadBootRecord.UNVERIFIED
                        elif update.state not in REACHABLE:
                            self.dead_boot_record = DeadBootRecord.TAKEN
                            self.dead_boot_generation = max(self.dead_boot_generation, update.generation)
                        else:
                            self.newer_boot_held = max(self.newer_boot_held, update.generation)
                    if message.refusal is JoinRefusal.PLACEMENT:
                        self.join_refusal = JoinRefusal.PLACEMENT
                        self._next_join_ms = None  # Asking again cannot help.
                self._apply_all(now_ms, message.members, full_state=True)
            case LeaveRequest():
                self._apply(now_ms, message.member)
                out.append(self._reply(source_id or message.member.node_id, LeaveReply(True)))
            case LeaveReply():
                pass
        return out

    def message_failed(self, now_ms: int, outbound: Outbound) -> list[Outbound]:
        """The transport could not deliver `outbound` (refused, unreachable, deadline)."""
        message = outbound.message
        probe = self._probe
        if isinstance(message, Ping) and probe is not None and probe.sequence_number == message.sequence_number:
            if not probe.indirect_sent:  # As memberlist: straight on to the indirect probes.
                return self._send_indirect(now_ms, probe)
            return []
        if isinstance(message, Ping):
            relay = self._relays.pop(message.sequence_number, None)
            if relay is not None:  # We were probing for someone: tell them now.
                return [self._to(relay.requester_id, relay.requester_address,
                                 Nack(relay.requester_sequence_number, self._piggyback(relay.requester_id)))]
        return []

    # ----------------------------------------------------------------- probing

    def _start_probe(self, now_ms: int) -> list[Outbound]:
        scale = self._awareness + 1
        self._next_probe_ms = now_ms + self.config.probe_interval_ms * scale
        target = self._next_probe_target()
        if target is None:
            return []
        self._sequence_number += 1
        record = self._records.get(target)
        self._probe = _Probe(target, self._sequence_number, timeout_ms=now_ms + self.config.probe_timeout_ms * scale,
                             deadline_ms=now_ms + self.config.probe_interval_ms * scale,
                             generation=record.generation if record is not None else 0)
        self._counts["probes_sent"] += 1
        return [self._send(target, Ping(self._sequence_number, target, self._piggyback(target)))]

    def _next_probe_target(self) -> str | None:
        checked = 0
        while True:
            if self._probe_index >= len(self._probe_order):
                self._probe_order = [u.node_id for u in self._others() if u.state in REACHABLE]
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            node_id = self._probe_order[self._probe_index]
            self._probe_index += 1
            if self.state_of(node_id) in REACHABLE:
                return node_id
            checked += 1
            if checked > len(self._probe_order) + 1:
                return None

    def _send_indirect(self, now_ms: int, probe: _Probe) -> list[Outbound]:
        probe.indirect_sent = True
        target = self._records.get(probe.target_id)
        if target is None:
            return []
        candidates = [u.node_id for u in self._others() if u.state in RUNNING and u.node_id != probe.target_id]
        chosen = self._rng.sample(candidates, min(self.config.indirect_checks, len(candidates)))
        probe.expected_nacks = len(chosen)
        self._counts["indirect_probes_sent"] += len(chosen)
        # The intermediaries' nack must come back before our round ends (proto: kept below
        # the caller's deadline): they wait at most 4/5 of what is left of it.
        relay_timeout_ms = max(1, min(self.config.probe_timeout_ms * (self._awareness + 1),
                                      (probe.deadline_ms - now_ms) * 4 // 5))
        return [self._send(peer, IndirectPing(probe.sequence_number, target.info, relay_timeout_ms,
                                              self._piggyback(peer)))
                for peer in chosen]

    def _probe_failed(self, now_ms: int, probe: _Probe) -> list[Outbound]:
        self._probe = None
        current = self._records.get(probe.target_id)
        if current is None or current.state not in REACHABLE:
            return []  # It died or left meanwhile: nothing learned about us or it.
        if current.generation != probe.generation:
            # A new boot of it joined meanwhile (a restart, or a wiped node joining above the
            # boot it replaced, which left the pings for that boot unanswered): the round
            # said nothing about this boot.
            return []
        self._counts["probe_failures"] += 1
        if probe.expected_nacks > 0:
            self._adjust_awareness(probe.expected_nacks - probe.nacks)
        else:
            self._adjust_awareness(+1)
        self._counts["suspicions_raised"] += 1
        self._apply(now_ms, self._sign(current.restate(State.SUSPECT, reporter_id=self.self_id)), local=True)
        return []

    def _on_ack(self, source_id: str, sequence_number: int) -> list[Outbound]:
        relay = self._relays.pop(sequence_number, None)
        if relay is not None:
            return [self._to(relay.requester_id, relay.requester_address,
                             Ack(relay.requester_sequence_number, self._piggyback(relay.requester_id)))]
        probe = self._probe
        if probe is not None and probe.sequence_number == sequence_number:
            self._probe = None
            self._counts["probe_acks"] += 1
            if source_id != probe.target_id:
                self._counts["indirect_acks"] += 1
            self._adjust_awareness(-1)
        return []

    def _relay(self, now_ms: int, source_id: str, request: IndirectPing) -> list[Outbound]:
        self._counts["relays"] += 1
        if request.target.node_id == self.self_id:
            return [self._reply(source_id, Ack(request.sequence_number, self._piggyback(source_id)))]
        self._sequence_number += 1
        source = self._records.get(source_id)
        self._relays[self._sequence_number] = _Relay(source_id, source.info.peer_address if source else "",
                                                     request.sequence_number, now_ms + request.probe_timeout_ms)
        target = request.target
        ping = Ping(self._sequence_number, target.node_id, self._piggyback(target.node_id))
        return [self._to(target.node_id, target.peer_address, ping)]

    def _adjust_awareness(self, delta: int) -> None:
        self._awareness = min(max(self._awareness + delta, 0), self.config.awareness_max_multiplier - 1)

    # ----------------------------------------------------------------- suspicion, death, removal

    def _start_suspicion(self, now_ms: int, update: MemberUpdate) -> None:
        config = self.config
        n = self._ring_size()
        live = sum(1 for u in self._records.values() if u.state in REACHABLE)
        k = config.suspicion_confirmations if live - 2 >= config.suspicion_confirmations else 0
        minimum = suspicion_timeout_ms(config.suspicion_mult, n, config.probe_interval_ms)
        self._suspicions[update.node_id] = _Suspicion(
            update.generation, update.incarnation, now_ms, k, minimum, minimum * config.suspicion_max_timeout_mult,
            confirmers={update.reporter_id})

    def _confirm(self, update: MemberUpdate, *, verified: bool) -> bool:
        suspicion = self._suspicions.get(update.node_id)
        if suspicion is None or (suspicion.generation, suspicion.incarnation) != (update.generation,
                                                                                   update.incarnation):
            return False
        if suspicion.confirmations >= suspicion.k or update.reporter_id in suspicion.confirmers:
            return False
        if not verified and not self._verify(update):  # A forged accuser must not shorten the timer.
            return False
        suspicion.confirmers.add(update.reporter_id)
        suspicion.confirmations += 1
        return True

    def _suspicion_expired(self, now_ms: int, node_id: str, suspicion: _Suspicion) -> list[Outbound]:
        del self._suspicions[node_id]
        current = self._records.get(node_id)
        if current is None or current.state is not State.SUSPECT:
            return []
        self._counts["deaths_declared"] += 1
        self._apply(now_ms, self._sign(current.restate(State.DEAD, reporter_id=self.self_id)), local=True)
        return []

    def _grace_start_ms(self, node_id: str) -> int:
        """When the dead member's grace began: its death, or the moment a rail that held it let go."""
        return max(self._state_since_ms[node_id], self._grace_from_ms.get(node_id, 0))

    def _reap_dead(self, now_ms: int) -> None:
        grace = self.config.dead_grace_ms
        for node_id in [n for n in self._rail_held if self.state_of(n) is not State.DEAD]:
            self._rail_held.discard(node_id)
            self._grace_from_ms.pop(node_id, None)
        due = [u for node_id, u in self._records.items()
               if u.state is State.DEAD and now_ms >= self._grace_start_ms(node_id) + grace]
        if not due:
            self._blocked.clear()
            return
        for update in due:
            ring = {u.node_id: (u.info.site, u.state) for u in self._records.values() if u.state in IN_RING}
            reason = removal_blocked(ring, update.node_id, self.config.ring_min_fraction)
            if reason is not None:
                if update.node_id not in self._blocked:
                    self._counts["removals_blocked"] += 1
                self._blocked[update.node_id] = reason
                self._rail_held.add(update.node_id)
                continue
            self._blocked.pop(update.node_id, None)
            if update.node_id in self._rail_held:
                # The rail let go (a member of its side is heard again): a fresh grace, in
                # which this one, if alive, is heard too.
                self._rail_held.discard(update.node_id)
                self._grace_from_ms[update.node_id] = now_ms
                self._counts["removal_graces_restarted"] += 1
                continue
            self._lamport += 1
            self._counts["removals"] += 1
            self._apply(now_ms, self._sign(update.restate(State.REMOVED, reporter_id=self.self_id,
                                                          lamport=self._lamport)), local=True)
        for node_id in [n for n in self._blocked if self.state_of(n) is not State.DEAD]:
            del self._blocked[node_id]

    def removal_blocked_reasons(self) -> dict[str, str]:
        """Dead members past their grace period that a rail keeps in the ring, with the rail."""
        return dict(self._blocked)

    # ----------------------------------------------------------------- merging

    def _apply_all(self, now_ms: int, updates: Iterable[MemberUpdate], *, full_state: bool = False) -> None:
        for update in updates:
            if full_state and update.state is State.DEAD and update.node_id != self.self_id:
                current = self._records.get(update.node_id)
                if (current is not None and current.state in REACHABLE and current.generation == update.generation
                        and update.incarnation >= current.incarnation):
                    # memberlist mergeState: a peer's full state may be stale (the other side of
                    # a healed partition), so its "dead" only makes us suspect, and our own timer
                    # decides. The member meanwhile hears of it and refutes. Signed, the
                    # suspicion is ours (we cannot sign for the peer's accuser).
                    if not newer(update, current) or not self._verify(update):
                        continue
                    reporter_id = update.reporter_id if self._signer is None else self.self_id
                    self._apply(now_ms, self._sign(update.restate(State.SUSPECT, reporter_id=reporter_id)),
                                local=True)
                    continue
            self._apply(now_ms, update)

    def _see_lamport(self, update: MemberUpdate) -> None:
        if update.lamport > self._lamport:
            self._lamport = update.lamport

    def _sign(self, update: MemberUpdate) -> MemberUpdate:
        return update if self._signer is None else self._signer(update)

    def _verify(self, update: MemberUpdate) -> bool:
        """True when a peer's record may be used (always, without a verifier)."""
        if self._verifier is None:
            return True
        reason = self._verifier(update)
        if reason is None:
            return True
        self._counts["updates_rejected"] += 1
        if len(self.rejected) < 1_000:  # The node drains these after every input.
            self.rejected.append(Rejection(update.node_id, update.state, update.reporter_id, reason))
        return False

    def _apply(self, now_ms: int, update: MemberUpdate, *, local: bool = False) -> bool:
        """Merge one update; True when it changed this node's view (and was queued for gossip).
        A peer's record (not `local`) is verified only when it would change something; its
        Lamport clock counts only once verified (unsigned, every record's counts)."""
        if self._verifier is None or local:
            self._see_lamport(update)
        node_id = update.node_id
        if node_id == self.self_id:
            return self._apply_about_self(now_ms, update)
        current = self._records.get(node_id)
        if current is not None and not newer(update, current):
            # Not newer, but maybe one more accuser of a suspicion we are timing.
            if (update.state is State.SUSPECT and current.state is State.SUSPECT
                    and self._confirm(update, verified=local)):
                self._queue.enqueue(update)
            return False
        if not local:
            if not self._verify(update):
                return False
            self._see_lamport(update)
        same_phase = current is not None and (current.generation, current.state, current.incarnation) == (
            update.generation, update.state, update.incarnation)
        self._records[node_id] = update
        if same_phase:  # Another reporter of a state we hold: only a suspicion cares.
            if update.state is State.SUSPECT and self._confirm(update, verified=True):
                self._queue.enqueue(update)
            return False
        old_state = current.state if current is not None else None
        self._queue.enqueue(update)
        if current is None or current.generation != update.generation or old_state is not update.state:
            self._state_since_ms[node_id] = now_ms
            self.events.append(Transition(now_ms, node_id, old_state, update.state))
        if update.state in REACHABLE and (old_state is None or old_state not in REACHABLE):
            # memberlist: a new (or returning) member goes in at a random place of the probe order.
            if node_id not in self._probe_order[self._probe_index:]:
                position = self._rng.randrange(self._probe_index, len(self._probe_order) + 1)
                self._probe_order.insert(position, node_id)
        if old_state is State.SUSPECT and update.state in RUNNING:
            self._counts["suspicions_cleared"] += 1
        self._suspicions.pop(node_id, None)
        if update.state is State.SUSPECT:
            self._start_suspicion(now_ms, update)
        self._blocked.pop(node_id, None)
        return True

    def _apply_about_self(self, now_ms: int, update: MemberUpdate) -> bool:
        me = self.me
        if update.generation != me.generation:
            # An older boot of ours is history; a newer one is not ours to judge, except that
            # one no longer running, heard before a seed accepted us: the gossip the cluster
            # still sends a dead member (gossip_to_dead_ms) reaches us at that boot's address
            # (our data dir lost the generation count). We join above it at once, as from a
            # refusal carrying its record, instead of at the next join retry.
            if (update.generation > max(me.generation, self.dead_boot_generation) and not self._joined
                    and self._next_join_ms is not None and update.state not in REACHABLE
                    and update != self._newer_boot_judged):
                self._newer_boot_judged = update  # Verified once (a join refusal's record comes here too).
                if self._verify(update):
                    self.dead_boot_record = DeadBootRecord.TAKEN
                    self.dead_boot_generation = update.generation
            elif (update.generation > me.generation and self._joined and self._seeds
                  and update.state in REACHABLE and update != self._newer_boot_judged):
                # A newer boot of our id held reachable, heard after a seed let us in: that seed
                # still held our older generation (a quick restart before the wipe, not yet
                # spread to it), the others hold the newer boot alive, and our acks kept it so
                # (seen: wipe-restarted seed 551). Not joined after all: we stop answering
                # probes meant for that boot and ask the seeds again; once the cluster holds
                # it dead, we join above it (dead_boot_record), as from a refusal.
                self._newer_boot_judged = update
                if self._verify(update):
                    self._joined = False
                    self.newer_boot_held = max(self.newer_boot_held, update.generation)
                    self._counts["joins_withdrawn"] += 1
                    self._next_join_ms = now_ms + self.config.join_retry_interval_ms
            return False
        if me.state in TERMINAL:
            if update.state in TERMINAL and newer(update, me) and self._verify(update):
                self._set_record(now_ms, update)
                self._queue.enqueue(update)
                return True
            return False
        if update.state in TERMINAL:
            # Removed (or made to leave) by the cluster: terminal for this generation.
            if not self._verify(update):
                return False
            self._see_lamport(update)
            self._set_record(now_ms, update)
            self._queue.enqueue(update)
            self._probe = None
            self._next_join_ms = None
            return True
        if (update.state is not me.state and update.incarnation >= me.incarnation) or (
                update.incarnation > me.incarnation):
            # Refute: only we may raise our incarnation, and a higher one beats any accusation.
            # A leaving member refutes as leaving. (A forged accusation is not worth one.)
            if not self._verify(update):
                return False
            refuted = self._sign(MemberUpdate(me.info, me.state, update.incarnation + 1, reporter_id=self.self_id,
                                              leaving=me.leaving))
            self._records[self.self_id] = refuted
            self._queue.enqueue(refuted)
            if update.state not in RUNNING:
                self._counts["suspicions_refuted"] += 1
                self._adjust_awareness(+1)
            return True
        return False

    def _set_record(self, now_ms: int, update: MemberUpdate) -> None:
        current = self._records.get(update.node_id)
        self._records[update.node_id] = update
        if current is None or current.state is not update.state:
            self._state_since_ms[update.node_id] = now_ms
            self.events.append(Transition(now_ms, update.node_id, current.state if current else None, update.state))

    def _on_join(self, now_ms: int, source_id: str, member: MemberUpdate) -> Outbound:
        current = self._records.get(member.node_id)
        reason = ""
        if member.node_id == self.self_id:
            reason = f"node id {member.node_id!r} is this node's own id"
        elif current is not None and current.generation > member.generation:
            reason = (f"node id {member.node_id!r} is in use by generation {current.generation}, "
                      f"newer than {member.generation}")
            # The record goes with the refusal. No process answers for that boot (dead,
            # removed or left): the joiner's generation count started over (its data dir
            # was wiped or replaced) and it comes back above it. Reachable: the joiner stops
            # answering probes meant for that boot (newer_boot_held) until it is dead.
            return self._to(source_id or member.node_id, member.info.peer_address,
                            JoinReply(False, reason, (current,)))
        elif current is not None and current.generation == member.generation and current.state in TERMINAL:
            reason = (f"node {member.node_id!r} generation {member.generation} is {current.state.value}: "
                      f"restart it with a higher generation")
        if not reason and not self._verify(member):
            reason = f"the join record of {member.node_id!r} is not signed by its own certificate"
        if reason:
            return self._to(source_id or member.node_id, member.info.peer_address, JoinReply(False, reason))
        reply = JoinReply(True, "", self._snapshot())
        self._apply(now_ms, member, local=True)  # Verified above.
        return self._to(member.node_id, member.info.peer_address, reply)

    # ----------------------------------------------------------------- dissemination

    def _piggyback(self, target_id: str) -> Updates:
        """Updates for a message to `target_id`: its own non-alive record first (buddy system)."""
        config = self.config
        first: list[MemberUpdate] = []
        budget = config.piggyback_bytes_max
        about_target = self._records.get(target_id)
        if about_target is not None and about_target.state not in RUNNING:
            first.append(about_target)
            budget -= update_bytes(about_target)
        taken = self._queue.take(budget, retransmit_limit(config.retransmit_mult, self._ring_size()),
                                 exclude=target_id if first else "")
        return tuple(first + taken)

    def _gossip_round(self, now_ms: int) -> list[Outbound]:
        if not len(self._queue):
            return []
        candidates = [u.node_id for u in self._others()
                      if u.state in REACHABLE or (u.state is State.DEAD and now_ms - self._state_since_ms[u.node_id]
                                                  < self.config.gossip_to_dead_ms)]
        out = []
        for target in self._rng.sample(candidates, min(self.config.gossip_nodes, len(candidates))):
            updates = self._piggyback(target)
            if not updates:
                break
            out.append(self._send(target, Gossip(updates)))
        return out

    def _push_pull(self) -> list[Outbound]:
        live = [u.node_id for u in self._others() if u.state in RUNNING]
        dead = [u.node_id for u in self._others() if u.state is State.DEAD]
        request = PushPullRequest(self._snapshot())
        if dead and self._rng.random() < len(dead) / (len(live) + len(dead)):
            return [self._send(self._rng.choice(dead), request)]
        if live:
            return [self._send(self._rng.choice(live), request)]
        if self._seeds and self._joined:  # Alone: go back to the seeds.
            # Not before a seed accepted our join: a push-pull would bring this node into
            # the seed's view past a refused join (other placement settings, a newer
            # generation of this id); the join retries ask the seeds meanwhile.
            return [self._send_address(self._rng.choice(self._seeds), request)]
        return []

    def _join_requests(self) -> list[Outbound]:
        request = JoinRequest(self.me)
        return [self._send_address(address, request) for address in self._seeds]

    def _snapshot(self) -> Updates:
        return tuple(u for _, u in sorted(self._records.items()))

    # ----------------------------------------------------------------- helpers

    def _others(self) -> Iterable[MemberUpdate]:
        self_id = self.self_id
        return (u for u in self._records.values() if u.node_id != self_id)

    def _ring_size(self) -> int:
        return sum(1 for u in self._records.values() if u.state in IN_RING or u.state is State.LEAVING)

    def _to(self, target_id: str, address: str, message: Message) -> Outbound:
        self._count(self._sent, message)
        return Outbound(target_id, address, message)

    def _send(self, target_id: str, message: Message) -> Outbound:
        return self._to(target_id, self._records[target_id].info.peer_address, message)

    def _send_address(self, address: str, message: Message) -> Outbound:
        return self._to("", address, message)

    def _reply(self, source_id: str, message: Message) -> Outbound:
        source = self._records.get(source_id)
        return self._to(source_id, source.info.peer_address if source else "", message)

    @staticmethod
    def _count(table: dict[str, list[int]], message: Message) -> None:
        entry = table.get(type(message).__name__)
        if entry is None:
            entry = table[type(message).__name__] = [0, 0]
        entry[0] += 1
        entry[1] += message_bytes(message)


def _next_after(previous_ms: int, interval_ms: int, now_ms: int) -> int:
    """The next period boundary after now (missed periods are skipped, not caught up)."""
    following = previous_ms + interval_ms
    if following <= now_ms:
        following = now_ms + interval_ms
    return following
