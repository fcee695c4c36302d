"""The replication coordinator: every node runs one, and any node coordinates any request.

- store: send the instance to the study's N owners in parallel; answer once W of them
  made it durable (strict quorum, the default; in sloppy mode a stand-in's hint counts
  too). An owner that is down or does not answer within its deadline is replaced by the
  next node on the ring, which keeps the instance as a hint for it, so every owner gets
  its copy. Fewer than W durable copies: failure, never a false Success. The remaining
  copies finish in the background.
- find and locate (replication/gather.py): a query that names studies asks only their
  owners, nearest live one first; any other scatters over one live owner per token
  range. Merged and de-duplicated; a piece moves to its next owner when one breaks off;
  what no owner answered for ends the answer as IncompleteAnswer (never a silent
  Success), and the stand-ins of those pieces are asked for the hints they hold.
- read: fetch an instance from the nearest live owner, fall through on error, then the
  study's stand-ins (hints); repair a live owner that did not have it (read repair).
- hints: replay held hints to their owners when they answer again; delete a hint only
  after the owner acknowledged a durable copy.

Async; reaches peers, the local store and time only through the injected Transport,
LocalReplica, MembershipView and clock.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Protocol, Sequence, TypeVar, \
    runtime_checkable

from pacsnode.replication.archive import (
    IncompleteAnswer,
    InstanceLocation,
    ReadError,
    RetrievePlan,
    Shortfall,
    WriteResult,
    WriteStatus,
)
from pacsnode.replication.commitment import CommitmentCheck, CommitResult, CommitSettings, Reference
from pacsnode.replication.correction import Correction
from pacsnode.replication.gather import Gather, ReadContext, RoutedGather, pump_rows
from pacsnode.replication.hlc import HybridClock, Version
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import (
    Attributes,
    StoredInstance,
    StoreError,
    StoreFull,
    StoreOutcome,
    Tombstone,
    with_version,
)
from pacsnode.replication.planning import RangeSet, range_pieces, read_order, study_keys, study_pieces, study_range
from pacsnode.replication.query import aggregate_patients, exact_lookup, wants_patient_counts, with_patient_counts
from pacsnode.replication.transport import (
    FrameTransport,
    FramesNotHeld,
    FramesUnavailable,
    FramesUnsupported,
    LocalReplica,
    PeerError,
    PeerRefused,
    RefusalReason,
    StoreReply,
    Transport,
)
from pacsnode.ring.members import MembershipView
from pacsnode.ring.placement import Replication, Ring, replica_total
from pacsnode.ring.tokens import study_token

log = logging.getLogger(__name__)

# DELETED: the replica holds a newer tombstone; its state for the UID is final and durable.
DURABLE_OUTCOMES = frozenset({StoreOutcome.STORED, StoreOutcome.DUPLICATE, StoreOutcome.CONFLICT,
                              StoreOutcome.DELETED})


# A fresh write re-stamped after a DELETED answer at most this often (each re-stamp is
# newer than the tombstone seen; only deletes racing the write again need another).
RESTAMPS_MAX = 3


def restamped(stored: StoredInstance, version: Version) -> StoredInstance:
    return StoredInstance(record=with_version(stored.record, version), attributes=stored.attributes,
                          blob=stored.blob, blob_file=stored.blob_file)


class WriteScope(enum.Enum):
    """Where the W durable copies of a C-STORE are counted (`--write-quorum-scope`)."""

    GLOBAL = "global"  # Any of the study's owners (or their stand-ins), in any site.
    LOCAL = "local"  # Owners in the receiving node's site; other sites' copies follow as hints.


class WriteQuorumMode(enum.Enum):
    """What counts toward W (`write_quorum_mode`)."""

    # Only durable copies on the study's owners (its current preference list, or in local
    # scope its owners in this site). Hints are still written for owners that are down,
    # for durability and handoff, but never count: an acknowledged instance is on W
    # owners, so R owners with R + W > N always include one that has it.
    STRICT = "strict"
    # A stand-in's hint counts as a copy (Dynamo's sloppy quorum): writes succeed with
    # fewer than W owners reachable, but R + W > N then says nothing about the owners a
    # read asks, and reads must ask stand-ins (read_fault_window_ms) to see such writes.
    SLOPPY = "sloppy"


# Copies for other sites sent at once after a local-scope Success: at most this many at a
# time per node, and at most this many bytes queued behind them; past that they wait for
# the hint replay pass (serial per owner, so RTT-bound: ~12 instances/s over 40 ms links).
REMOTE_SENDS_MAX = 16
REMOTE_QUEUE_BYTES_MAX = 64 * 1024 * 1024

# Hint replay: per owner, at most this many hints (and bytes) in flight at once, and at most
# HINT_REPLAY_PASS_MAX per pass; owners are replayed at the same time.
HINT_REPLAY_WINDOW = 8
HINT_REPLAY_WINDOW_BYTES = 16 * 1024 * 1024
HINT_REPLAY_PASS_MAX = 64


@dataclass(frozen=True)
class CoordinatorSettings:
    replication_factor: Replication = 3  # N, or N copies per site (ring/placement.py SiteReplicas).
    write_quorum: int = 2  # W
    write_scope: WriteScope = WriteScope.GLOBAL  # LOCAL: W counted in this node's site.
    write_mode: WriteQuorumMode = WriteQuorumMode.STRICT  # SLOPPY: stand-ins' hints count toward W.
    replica_timeout_ms: int = 2_000  # Per-replica deadline on a write (LAN).
    store_timeout_ms: int = 30_000  # Whole C-STORE inside the node.
    fetch_timeout_ms: int = 30_000  # One instance from a peer.
    query_timeout_ms: int = 60_000  # One peer's query stream.
    replica_start_timeout_ms: int = 2_000  # A replica silent this long on a query or fetch is passed over.
    read_quorum: int = 2  # R: owners asked by a request that names a study (R + W > N: reads see acked writes).
    scatter_read_quorum: int = 2  # R per token range of a query with no study key (NodeConfig has the why).
    read_fault_window_ms: int = 60_000  # Sloppy mode: after a membership change, named reads also ask stand-ins.
    reconcile_instances_max: int = 256  # A read repairs at most this many instances before it answers.
    bytes_per_second_min: int = 20_000_000  # Deadlines grow with size at this rate.
    hint_max_age_ms: int = 0  # Hints older than this are dropped, not replayed (the tombstone grace); 0: never.


@dataclass
class CoordinatorStats:
    writes: int = 0
    writes_failed: int = 0
    hints_written: int = 0
    hints_replayed: int = 0
    read_repairs: int = 0
    query_replans: int = 0
    extra: dict[str, int] = field(default_factory=dict)


BlockingRunner = Callable[..., Awaitable[Any]]
T = TypeVar("T")


class Coordinator:
    def __init__(
        self,
        self_id: str,
        membership: MembershipView,
        transport: Transport,
        local: LocalReplica,
        settings: CoordinatorSettings,
        *,
        decode: Callable[[StoredInstance], bytes],
        run_blocking: BlockingRunner = asyncio.to_thread,
        hlc: HybridClock | None = None,
    ) -> None:
        self.self_id = self_id
        # This node's hybrid logical clock: it stamps the version of every write and delete
        # this node coordinates (replication/hlc.py).
        self.hlc = hlc if hlc is not None else HybridClock(self_id)
        self._membership = membership
        self._transport = transport
        self._local = local
        # The node's store lists a study as a retrieve sends it (locate_here); the simulator's does not.
        self._locator = local if isinstance(local, StudyLocator) else None
        self._settings = settings
        self._decode = decode
        self._run_blocking = run_blocking
        self._background: set[asyncio.Task[Any]] = set()
        self.stats = CoordinatorStats()
        self._last_effective_n: tuple[Replication, int] | None = None
        self._slow_until: dict[str, float] = {}  # Peer -> loop time until which reads ask it last.
        # Writes tombstones W-durably on their study's owners (DeleteCoordinator.supersede; set
        # by the node): a write that met a newer tombstone makes the delete final first.
        self.supersede: Callable[[list[Tombstone]], Awaitable[bool]] | None = None
        # Sends a study's correction to the given owners (ModifyCoordinator.send_correction;
        # set by the node): a named read that saw an owner answer without the newest
        # correction hands it over (read repair for corrections; anti-entropy would later).
        self.send_correction: Callable[[Correction, Sequence[str]], Awaitable[int]] | None = None
        self._remote_sends: set[tuple[str, str]] = set()  # (owner, sop) a local-scope write sends (or queued).
        self._remote_queued_bytes = 0
        # (owner, sop) whose hint a local-scope send delivered (and deleted) since the replay
        # pass before last began: a pass works from the hints it listed at its start, and
        # must not send one of those again after the send above delivered it meanwhile.
        self._remote_delivered: set[tuple[str, str]] = set()
        self._remote_delivered_before: set[tuple[str, str]] = set()
        self._remote_slots: asyncio.Semaphore | None = None  # Made on the loop, at first use.
        # Ranges this node is still filling (set by the node to its Repairer's view).
        self.pending: Callable[[], RangeSet] = lambda: RangeSet([])

    # ----------------------------------------------------------------- helpers
    def _replicas(self) -> tuple[Replication, int]:
        """(effective replication, effective W): N capped by the node count (per-site copies
        capped by each site's nodes); said loudly when capped. The first is what the ring's
        placement methods take; W is capped by the copies there really are."""
        ring = self._membership.ring()
        configured = self._settings.replication_factor
        n = ring.effective(configured)
        copies = ring.effective_replicas(configured)
        if (n, copies) != self._last_effective_n:
            self._last_effective_n = (n, copies)
            if copies < replica_total(configured) and len(ring) == 1:
                log.info("replication.single_node configured_n=%s: a one-node archive keeps one copy of "
                         "each study; join more nodes for replicas", configured)
            elif copies < replica_total(configured):
                log.warning(
                    "replication.effective_n n=%d configured=%s members=%d: fewer nodes than copies, "
                    "some studies are on every node (of their site)",
                    copies, configured, len(ring),
                )
        return n, min(self._settings.write_quorum, max(copies, 1))

    def _site_of(self, node_id: str) -> str:
        member = self._membership.member(node_id)
        return member.site if member else ""

    def _deadline_ms(self, base_ms: int, size_bytes: int) -> int:
        return base_ms + int(1000 * size_bytes / self._settings.bytes_per_second_min)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _put(self, node_id: str, stored: StoredInstance, hint_for: str, timeout_ms: int) -> StoreReply:
        if node_id == self.self_id:
            try:
                outcome = str(await self._run_blocking(self._local.put_stored, stored, hint_for=hint_for))
                if outcome == StoreOutcome.DELETED:  # As a peer's reply: the clock observes the tombstone.
                    tombstone = await self._run_blocking(self._local.tombstone, stored.study_instance_uid,
                                                         stored.sop_instance_uid)
                    if tombstone is not None:
                        self.hlc.observe(tombstone.version)
                        return StoreReply(outcome, tombstone.version)
                return StoreReply(outcome)
            except StoreFull as error:
                raise PeerRefused(f"local store full: {error}", RefusalReason.FULL) from error
            except StoreError as error:
                raise PeerError(f"local store failed: {error}") from error
        return await self._transport.store(node_id, stored, hint_for=hint_for, timeout_ms=timeout_ms)

    # ----------------------------------------------------------------- store
    def joined(self) -> bool:
        """False while this node waits for its seeds to answer its join: its ring then holds
        only itself, and acknowledging a store on that ring would cap N and W at 1."""
        joined = getattr(self._membership, "joined", True)
        return bool(joined() if callable(joined) else joined)

    def alone(self) -> bool:
        """True when this node is the whole ring (every study's only owner)."""
        ring = self._membership.ring()
        return len(ring) == 1 and self.self_id in ring and self.joined()

    def store_alone(self, stored: StoredInstance) -> WriteResult:
        """store() for a ring of one, called from a blocking thread."""
        started = time.monotonic()
        self.stats.writes += 1
        self._replicas()  # Says so (once) when the node count caps N.
        try:
            outcome = self._local.put_stored(stored)
            if outcome == StoreOutcome.DELETED:  # A newer tombstone: re-stamped past it, a new instance.
                tombstone = self._local.tombstone(stored.study_instance_uid, stored.sop_instance_uid)
                if tombstone is not None:
                    self.hlc.observe(tombstone.version)
                self.stats.extra["writes_restamped"] = self.stats.extra.get("writes_restamped", 0) + 1
                outcome = self._local.put_stored(restamped(stored, self.hlc.now()))
        except StoreFull as error:
            self.stats.writes_failed += 1
            log.warning("archive.store.refused sop_instance_uid=%s reason=%s", stored.sop_instance_uid, error)
            return WriteResult(WriteStatus.OUT_OF_RESOURCES, message=str(error))
        except StoreError as error:
            self.stats.writes_failed += 1
            log.error("archive.store.failed sop_instance_uid=%s reason=%s", stored.sop_instance_uid, error)
            return WriteResult(WriteStatus.FAILED, message=str(error))
        if outcome == StoreOutcome.CONFLICT:
            log.warning("archive.store.conflict sop_instance_uid=%s rule=first-wins kept=first",
                        stored.sop_instance_uid)
        return WriteResult(WriteStatus.SUCCESS, outcome=outcome, latency_ms=int((time.monotonic() - started) * 1000))

    async def store(self, stored: StoredInstance) -> WriteResult:
        """A fresh write. A replica holding a newer tombstone for the UID answers DELETED: that
        is never a durable copy of this write (anti-entropy would bring the tombstone to the
        other copies and delete them). This node's clock has then observed the tombstone's
        version (the reply carries it), so the write is re-stamped, newer than the delete,
        and sent again: a re-store after a delete is a new instance."""
        restamps = 0
        for _attempt in range(RESTAMPS_MAX):
            result = await self._store_once(stored, duplicates_count=restamps == 0)
            if result.outcome != StoreOutcome.DELETED:
                return result
            self.stats.extra["writes_restamped"] = self.stats.extra.get("writes_restamped", 0) + 1
            log.info("replication.write.restamped sop_instance_uid=%s old_version=%s", stored.sop_instance_uid,
                     stored.record.version.mark())
            restamped_copy = await self._after_delete(stored)
            if restamped_copy is None:
                break
            stored, restamps = restamped_copy, restamps + 1
        self.stats.writes_failed += 1
        return WriteResult(WriteStatus.QUORUM_FAILED, message="a newer delete of this SOP Instance UID kept winning")

    async def _after_delete(self, stored: StoredInstance) -> StoredInstance | None:
        """A fresh write met a newer tombstone. Owners that missed the delete may still hold an
        older copy of the same bytes: they would answer DUPLICATE and keep that copy, which the
        tombstone deletes once it reaches them. So a tombstone stamped now (newer than the one
        met) is made W-durable on the owners first, deleting such copies, and the write is
        re-stamped after it; its DUPLICATE answers do not count (None: the tombstone failed)."""
        marker = self.hlc.now()
        if self.supersede is not None:
            tombstone = Tombstone(stored.study_instance_uid, stored.sop_instance_uid, marker,
                                  stored.record.series_instance_uid)
            if not await self.supersede([tombstone]):
                log.warning("replication.write.supersede_failed sop_instance_uid=%s", stored.sop_instance_uid)
                return None
        return restamped(stored, self.hlc.now())

    async def _store_again(self, stored: StoredInstance) -> None:
        again = await self._after_delete(stored)
        if again is not None:
            await self._store_once(again, duplicates_count=False)

    def _superseded_late(self, task: "asyncio.Task[Any]", stored: StoredInstance, state: "_WriteState") -> None:
        """A copy that answered DELETED after the write was quorum-acknowledged."""
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        if result is not None and result[2] == StoreOutcome.DELETED and state.acked_at is not None:
            newest = max(state.tombstones, default=None)
            if self._deleted_after_ack(stored, newest, state.acked_at):
                return
            self._count("writes_restamped_late")
            log.warning("replication.write.superseded_late sop_instance_uid=%s: sent again with a newer version",
                        stored.sop_instance_uid)
            self._spawn(self._store_again(stored))

    def _deleted_after_ack(self, stored: StoredInstance, tombstone: Version | None, acked_at: Version) -> bool:
        """A late copy of an acknowledged write met a newer tombstone. Stamped after this node
        acknowledged the write, it is a delete that came after the store (the client, told
        the instance was stored, deleted it): that delete wins, and the tombstone deletes the
        other copies. Stamped before (a delete the write overtook, e.g. a re-store after a
        delete whose tombstone reached no owner this write counted, or a deleting node's clock
        ahead of ours), it would delete an acknowledged write: the caller sends the write again
        with a newer version. No version in the answer: the latter, as before this rule.
        Between nodes the order is as good as their clocks (the hybrid clocks' physical part):
        a delete within the clocks' skew of the acknowledgment may be taken for either."""
        if tombstone is None or tombstone < acked_at:
            return False
        self._count("writes_deleted_after_ack")
        log.info("replication.write.deleted_after_ack sop_instance_uid=%s: a late copy met a delete stamped after "
                 "the acknowledgment; not sent again", stored.sop_instance_uid)
        return True

    async def _store_once(self, stored: StoredInstance, *, duplicates_count: bool = True) -> WriteResult:
        clock = asyncio.get_running_loop().time  # Virtual time under the simulator.
        started = clock()
        self.stats.writes += 1
        if not self.joined():
            self.stats.writes_failed += 1
            log.warning("replication.write.refused sop_instance_uid=%s reason=not-joined", stored.sop_instance_uid)
            return WriteResult(WriteStatus.QUORUM_FAILED, message="node is still joining its cluster; retry")
        ring = self._membership.ring()
        n, w = self._replicas()
        token = study_token(stored.study_instance_uid)
        owners = ring.preference_list(token, n)
        timeout_ms = self._deadline_ms(self._settings.replica_timeout_ms, len(stored.blob))
        state = _WriteState(owners, ring_version=ring.version)
        written, remote = self._write_targets(owners)
        if remote:
            w = min(w, len(written))
        hints_kept = asyncio.ensure_future(self._keep_remote_hints(remote, stored)) if remote else None
        tasks = [asyncio.ensure_future(self._replicate(owner, stored, token, n, state, timeout_ms))
                 for owner in written]
        acked: list[tuple[str, str, str]] = []  # (owner, holder, outcome)
        strict = self._settings.write_mode is WriteQuorumMode.STRICT
        not_counted = 0  # Strict: copies that ended as a hint, or not at all.
        superseded = False
        pending = set(tasks)
        deadline = clock() + self._settings.store_timeout_ms / 1000
        while pending and len(acked) < w and len(tasks) - not_counted >= w:
            remaining = deadline - clock()
            if remaining <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():  # A library call cancelled underneath: that copy failed.
                    state.errors.append("a replica call was cancelled")
                    not_counted += 1
                    continue
                result = task.result()
                if result is not None and result[2] == StoreOutcome.DELETED:
                    superseded = True  # A newer tombstone there: not a copy of this write.
                elif result is not None and strict and result[0] != result[1]:
                    # A hint on a stand-in: kept for its owner, never one of the W copies.
                    not_counted += 1
                    self._count("hints_not_counted")
                elif result is not None and (duplicates_count or result[2] != StoreOutcome.DUPLICATE):
                    acked.append(result)
                else:
                    not_counted += 1
            if superseded:
                break
        if len(acked) >= w and not superseded:
            state.acked_at = self.hlc.now()  # Before any late copy's answer is looked at.
        for task in pending:  # The other copies finish in the background.
            if not superseded:
                task.add_done_callback(functools.partial(self._superseded_late, stored=stored, state=state))
            self._spawn(task)
        if hints_kept is not None:
            kept = await hints_kept  # Durable here before Success: they survive a restart.
            if len(acked) >= w and not superseded:
                for owner in remote:
                    self._send_remote_soon(owner, stored, kept, state.acked_at or self.hlc.now())
        latency_ms = int((clock() - started) * 1000)
        if superseded:
            return WriteResult(WriteStatus.QUORUM_FAILED, outcome=StoreOutcome.DELETED,
                               message="a newer tombstone holds this SOP Instance UID", latency_ms=latency_ms)
        if len(acked) >= w:
            outcome = next((o for owner, holder, o in acked if holder == owner), acked[0][2])
            if outcome == StoreOutcome.CONFLICT:
                log.warning("archive.store.conflict sop_instance_uid=%s rule=first-wins kept=first",
                            stored.sop_instance_uid)
            return WriteResult(WriteStatus.SUCCESS, outcome=outcome, latency_ms=latency_ms)
        self.stats.writes_failed += 1
        reasons = "; ".join(state.errors[-3:]) or "no replica answered"
        log.error(
            "replication.write.failed sop_instance_uid=%s acked=%d write_quorum=%d owners=%s reasons=%s",
            stored.sop_instance_uid, len(acked), w, ",".join(owners), reasons,
        )
        status = WriteStatus.OUT_OF_RESOURCES if state.full else WriteStatus.QUORUM_FAILED
        where = "owners (hints kept for the others do not count)" if strict else "replicas"
        return WriteResult(status, message=f"stored on {len(acked)} of {w} required {where}",
                           latency_ms=latency_ms)

    def _write_targets(self, owners: Sequence[str]) -> tuple[list[str], list[str]]:
        """(owners a store writes and counts W among, owners of other sites it leaves to
        hints). Global scope: all owners, none left. Local scope: the owners in this node's
        site; when the ring names none there (a site with no copies), all of them."""
        if self._settings.write_scope is not WriteScope.LOCAL:
            return list(owners), []
        site = self._site_of(self.self_id)
        local = [o for o in owners if self._site_of(o) == site]
        if not local:
            return list(owners), []
        return local, [o for o in owners if o not in local]

    async def _keep_remote_hints(self, remote: Sequence[str], stored: StoredInstance) -> set[str]:
        """Keep, durably on this node, a hint for each owner of another site: the hint
        replay pass delivers what the immediate send below does not. Returns the owners
        whose hint is kept; a hint that cannot be kept (disk full) is said and left to
        anti-entropy, which copies from this site's owners once the links allow."""
        async def keep(owner: str) -> str:
            try:
                await self._run_blocking(functools.partial(self._local.put_stored, stored, hint_for=owner))
            except (StoreError, StoreFull) as error:
                self._count("remote_hints_failed")
                log.warning("replication.remote_hint.failed owner=%s error=%s", owner, error)
                return ""
            self._count("remote_hints_written")
            return owner

        # At once, so that the store's group commit syncs them with this site's copy.
        return {owner for owner in await asyncio.gather(*(keep(owner) for owner in remote)) if owner}

    def _send_remote_soon(self, owner: str, stored: StoredInstance, kept: set[str], acked_at: Version) -> None:
        """Send a local-scope write's copy to `owner` (another site) now, in the background,
        and drop its hint once durable there. REMOTE_SENDS_MAX at once, the others queued
        up to REMOTE_QUEUE_BYTES_MAX; past that, or when the owner is down, the hint replay
        pass sends it."""
        size = len(stored.blob)
        if owner not in kept or not self._membership.is_alive(owner) or self._slow(owner) or \
                self._remote_queued_bytes + size > REMOTE_QUEUE_BYTES_MAX:
            self._count("remote_sends_deferred")
            return
        key = (owner, stored.sop_instance_uid)
        if key in self._remote_sends:
            return
        if self._remote_slots is None:
            self._remote_slots = asyncio.Semaphore(REMOTE_SENDS_MAX)
        self._remote_sends.add(key)
        self._remote_queued_bytes += size
        self._spawn(self._send_remote(owner, stored, key, self._remote_slots, acked_at))

    async def _send_remote(self, owner: str, stored: StoredInstance, key: tuple[str, str],
                           slots: asyncio.Semaphore, acked_at: Version) -> None:
        try:
            async with slots:
                if self._slow(owner):  # A send to it just failed (a cut site): leave it to the replay.
                    self._count("remote_sends_deferred")
                    return
                await self._send_remote_now(owner, stored, acked_at)
        finally:
            self._remote_sends.discard(key)
            self._remote_queued_bytes -= len(stored.blob)

    async def _send_remote_now(self, owner: str, stored: StoredInstance, acked_at: Version) -> None:
        try:
            reply = await self._transport.store(
                owner, stored, hint_for="",
                timeout_ms=self._deadline_ms(self._settings.replica_timeout_ms, len(stored.blob)))
            outcome = reply.outcome
            if outcome in DURABLE_OUTCOMES:
                await self._run_blocking(self._local.delete_hint, owner, stored.study_instance_uid,
                                         stored.sop_instance_uid)
                self._remote_delivered.add((owner, stored.sop_instance_uid))
                self._count("remote_sends")
                if outcome == StoreOutcome.DELETED and \
                        not self._deleted_after_ack(stored, reply.tombstone_version, acked_at):  # As _superseded_late.
                    self._count("writes_restamped_late")
                    log.warning("replication.write.superseded_late sop_instance_uid=%s: sent again with a newer "
                                "version", stored.sop_instance_uid)
                    self._spawn(self._store_once(restamped(stored, self.hlc.now())))
            else:
                self._count("remote_sends_deferred")
        except PeerError as error:  # Replay tries again; NOT_OWNER is re-targeted there.
            self._count("remote_sends_deferred")
            if not isinstance(error, PeerRefused):
                self._mark_slow(owner)  # The copies queued behind this one go to the replay at once.
            log.info("replication.remote_send.deferred owner=%s error=%s", owner, error)

    async def _replicate(self, owner: str, stored: StoredInstance, token: int, n: Replication, state: "_WriteState",
                         timeout_ms: int) -> tuple[str, str, str] | None:
        """One copy: on its owner, or else as a hint on a stand-in. Returns (owner, holder, outcome)."""
        silent_owner = False
        if self._membership.is_alive(owner):
            try:
                outcome = state.answered(await self._put(owner, stored, "", timeout_ms))
                if outcome in DURABLE_OUTCOMES:
                    return owner, owner, outcome
                state.errors.append(f"{owner}: {outcome}")
            except PeerRefused as error:
                state.full = state.full or error.reason is RefusalReason.FULL
                state.errors.append(f"{owner}: {error}")
                if error.reason is RefusalReason.NOT_OWNER:
                    # Its ring is not ours and it does not own the study there. Re-plan on our
                    # ring as it is now (the refusal came with a push-pull); if that names no
                    # other owner (our view is the newer one, or has not caught up yet), the
                    # copy becomes a hint for it below, replayed once the views agree.
                    self.stats.extra["writes_not_owner"] = self.stats.extra.get("writes_not_owner", 0) + 1
                    replanned = await self._new_owner_copy(owner, stored, token, n, state, timeout_ms)
                    if replanned is not None:
                        return replanned
            except PeerError as error:
                state.errors.append(f"{owner}: {error}")
                silent_owner = True
        else:
            state.errors.append(f"{owner}: down")
        ring = self._membership.ring()
        while True:
            stand_in = self._next_stand_in(ring, token, n, owner, state)
            if stand_in is None:
                state.errors.append(f"no stand-in left for {owner}")
                await self._keep_hint_here(owner, stored)
                return None
            state.used.add(stand_in)
            if stand_in != self.self_id and not self._membership.is_alive(stand_in):
                continue
            batch = [stand_in]
            if silent_owner:
                # The owner did not answer and is not known dead: its whole site may be cut
                # off. Ask a stand-in in another site at the same time as the one in the
                # owner's site (kept first so that one node down does not move its site's
                # copy across the WAN); the first durable ack counts, a second hint is
                # replayed and deleted like any other. Otherwise a site cut cost a store one
                # deadline per node of the cut site.
                silent_owner = False
                other = self._next_stand_in(ring, token, n, owner, state, avoid_site=self._site_of(stand_in),
                                            prefer_site=self._site_of(self.self_id))
                if other is not None and (other == self.self_id or self._membership.is_alive(other)):
                    state.used.add(other)
                    batch.append(other)
            result = await self._first_hint(batch, stored, owner, timeout_ms, state)
            if result is not None:
                return result

    async def _new_owner_copy(self, refused_by: str, stored: StoredInstance, token: int, n: Replication,
                              state: "_WriteState", timeout_ms: int) -> tuple[str, str, str] | None:
        """`refused_by` is not an owner under its ring. If our ring changed since the write was
        planned, the study's owner under it that this write has not asked yet takes a primary
        copy in its place. Returns (owner, holder, outcome), or None when there is no such
        owner or it did not make the copy durable."""
        ring = self._membership.ring()
        if ring.version == state.ring_version:
            return None
        for candidate in ring.preference_list(token, n):
            if candidate in state.owners or candidate in state.used or not self._membership.is_alive(candidate):
                continue
            state.used.add(candidate)
            try:
                outcome = state.answered(await self._put(candidate, stored, "", timeout_ms))
            except PeerError as error:
                state.errors.append(f"{candidate} (re-planned for {refused_by}): {error}")
                return None
            if outcome not in DURABLE_OUTCOMES:
                return None
            self.stats.extra["writes_replanned"] = self.stats.extra.get("writes_replanned", 0) + 1
            log.info("replication.write.replanned sop_instance_uid=%s refused_by=%s owner=%s",
                     stored.sop_instance_uid, refused_by, candidate)
            return candidate, candidate, outcome
        return None

    def _next_stand_in(self, ring: Ring, token: int, n: Replication, owner: str, state: "_WriteState", *,
                       avoid_site: str | None = None, prefer_site: str | None = None) -> str | None:
        """The next stand-in for `owner` not yet taken by this write. Nodes of a site where a
        stand-in did not answer (probably cut off as a whole) come last; `avoid_site`'s
        nodes not at all; `prefer_site`'s first (this node's site: whatever else is cut
        off, it reaches its own site)."""
        others = set(state.owners) - {owner}  # Marking another owner unavailable would give it our stand-in.
        if prefer_site is not None:
            elsewhere = {node_id for node_id in ring.node_ids if self._site_of(node_id) != prefer_site} - others
            found = next((s.node_id for s in ring.stand_ins(token, n, {owner} | state.used | elsewhere)
                          if s.owner == owner), None)
            if found is not None and self._site_of(found) not in state.silent_sites and \
                    self._site_of(found) != avoid_site:
                return found
        skipped = {node_id for node_id in ring.node_ids
                   if self._site_of(node_id) in state.silent_sites or self._site_of(node_id) == avoid_site} - others
        found = next((s.node_id for s in ring.stand_ins(token, n, {owner} | state.used | skipped)
                      if s.owner == owner), None)
        if found is None and avoid_site is None and skipped - state.used:
            found = next((s.node_id for s in ring.stand_ins(token, n, {owner} | state.used)
                          if s.owner == owner), None)
        return found

    async def _first_hint(self, batch: list[str], stored: StoredInstance, owner: str, timeout_ms: int,
                          state: "_WriteState") -> tuple[str, str, str] | None:
        """Hints for `owner` on every stand-in of `batch` at once; the first durable one."""
        if len(batch) == 1:
            return await self._hint_on(batch[0], stored, owner, timeout_ms, state)
        tasks = [asyncio.ensure_future(self._hint_on(s, stored, owner, timeout_ms, state)) for s in batch]
        try:
            for next_done in asyncio.as_completed(tasks):
                result = await next_done
                if result is not None:
                    return result
            return None
        finally:
            for task in tasks:
                if not task.done():
                    self._spawn(task)

    async def _hint_on(self, stand_in: str, stored: StoredInstance, owner: str, timeout_ms: int,
                       state: "_WriteState") -> tuple[str, str, str] | None:
        try:
            outcome = state.answered(await self._put(stand_in, stored, owner, timeout_ms))
        except PeerRefused as error:
            state.errors.append(f"{stand_in} (hint for {owner}): {error}")
            return None
        except PeerError as error:
            state.errors.append(f"{stand_in} (hint for {owner}): {error}")
            state.silent_sites.add(self._site_of(stand_in))
            return None
        if outcome not in DURABLE_OUTCOMES:
            state.errors.append(f"{stand_in} (hint for {owner}): {outcome}")
            return None
        self.stats.hints_written += 1
        log.info("replication.hint.written sop_instance_uid=%s owner=%s holder=%s",
                 stored.sop_instance_uid, owner, stand_in)
        return owner, stand_in, outcome

    async def _keep_hint_here(self, owner: str, stored: StoredInstance) -> None:
        """No stand-in could take the copy meant for `owner`: this node keeps it as a hint
        (as Cassandra's coordinator does), so the owner gets it as soon as it answers
        again instead of at the next anti-entropy pass. It never counts towards W: it
        is not a distinct replica."""
        if owner == self.self_id:
            return
        try:
            await self._run_blocking(functools.partial(self._local.put_stored, stored, hint_for=owner))
        except Exception as error:  # Best effort: anti-entropy still repairs the owner.
            log.warning("replication.hint.keep_failed owner=%s error=%s", owner, error)
            return
        self.stats.hints_written += 1
        log.info("replication.hint.kept_here sop_instance_uid=%s owner=%s", stored.sop_instance_uid, owner)

    # ----------------------------------------------------------------- find
    def _read_context(self, *, pending: RangeSet | None = None) -> ReadContext:
        n, _w = self._replicas()
        sloppy = self._settings.write_mode is WriteQuorumMode.SLOPPY
        return ReadContext(
            self_id=self.self_id, ring=self._membership.ring(), n=n, is_alive=self._membership.is_alive,
            site_of=self._site_of, pending=self.pending() if pending is None else pending, local=self._local,
            transport=self._transport,
            run_blocking=self._run_blocking, answering=self._answering,
            query_timeout_ms=self._settings.query_timeout_ms, count=self._count, slow=self._slow,
            troubled=sloppy and self._membership.troubled_within(self._settings.read_fault_window_ms),
            local_reads=self._settings.write_scope is WriteScope.LOCAL, sloppy_writes=sloppy)

    def _slow(self, node_id: str) -> bool:
        """True for a peer that failed to answer this node recently: until membership
        suspects it (a paused or cut-off node looks alive for seconds), reads ask it last
        instead of paying replica_start_timeout_ms on every instance of a retrieve."""
        until = self._slow_until.get(node_id)
        if until is None:
            return False
        if asyncio.get_running_loop().time() >= until:
            del self._slow_until[node_id]
            return False
        return True

    def _count(self, name: str) -> None:
        if name == "query_replans":
            self.stats.query_replans += 1
            return
        self.stats.extra[name] = self.stats.extra.get(name, 0) + 1

    def _gather(self, query: Query, *, counted: bool = True,
                context: ReadContext | None = None) -> Gather | RoutedGather:
        """The fan-out for `query`: only the owners of the studies it names, else
        scatter_read_quorum live owners per token range."""
        context = self._read_context() if context is None else context
        uids = study_keys(query)
        if uids is not None:
            if counted:
                self.stats.extra["reads_routed"] = self.stats.extra.get("reads_routed", 0) + 1
            return RoutedGather(context, query, study_pieces(context.ring, context.n, uids),
                                read_quorum=self._settings.read_quorum, reconcile=self.reconcile_study,
                                repair_correction=self.repair_correction)
        if counted:
            self.stats.extra["reads_scattered"] = self.stats.extra.get("reads_scattered", 0) + 1
        return Gather(context, query, range_pieces(context.ring, context.n), routed=False,
                      read_quorum=self._settings.scatter_read_quorum, reconcile=self.reconcile_study,
                      repair_correction=self.repair_correction)

    def _not_joined(self, query: Query) -> Shortfall | None:
        """What a read through a node still joining its cluster cannot vouch for (None once
        joined): all it would ask. Until a seed accepts the join the ring holds only this
        node (a new one, or one whose data dir was wiped), so its own store would be the
        whole answer: a Success without the archive's studies. Writes are refused then too."""
        if self.joined():
            return None
        self.stats.extra["reads_not_joined"] = self.stats.extra.get("reads_not_joined", 0) + 1
        log.info("replication.read.refused reason=not-joined level=%s", query.level)
        uids = study_keys(query)
        if uids is not None:
            return Shortfall(studies=max(1, len(uids)))
        context = self._read_context()
        return Shortfall(ranges=max(1, len(range_pieces(context.ring, context.n))))

    async def find(self, query: Query) -> AsyncGenerator[Attributes, None]:
        """Rows matching `query` across the cluster, each exactly once. Raises
        IncompleteAnswer after the last row when part of the archive could not be asked
        (all of it, before any row, while this node is still joining its cluster)."""
        not_joined = self._not_joined(query)
        if not_joined is not None:
            raise IncompleteAnswer(not_joined)
        if query.level == "PATIENT" or wants_patient_counts(query):
            study_rows: list[Attributes] = []
            shortfall: IncompleteAnswer | None = None
            try:
                async for row in self._gather(query).rows():
                    study_rows.append(row)
            except IncompleteAnswer as error:
                shortfall = error
            fold = aggregate_patients if query.level == "PATIENT" else with_patient_counts
            for row in fold(study_rows):
                yield row
            if shortfall is not None:
                raise shortfall
            return
        async for row in self._gather(query).rows():
            yield row

    def find_here(self, query: Query, rows_max: int) -> list[Attributes] | None:
        """find()'s whole answer read from this node's own store on the calling (blocking)
        thread, without the loop and its I/O threads, for a query an index bounds (a
        StudyInstanceUID key or one exact value of an indexed key: query.exact_lookup) on
        a ring of this node alone (gather.py rows_here / rows_of_one, no range planning);
        at most rows_max rows. None otherwise: use find(). Callable from any thread but the
        loop. Not in a cluster (not even as an owner with R = 1): which ranges this node
        still fills is the repairer's view (`pending`), built and changed on the loop;
        a ring of one keeps none pending (replication/repair.py _note_ring)."""
        if not exact_lookup(query) or not self._alone_here():
            return None
        context = self._read_context(pending=RangeSet([]))
        gather = None if study_keys(query) is None else self._gather(query, counted=False, context=context)
        if isinstance(gather, RoutedGather):
            rows = gather.rows_here(rows_max)
            routed = True
        else:
            rows = Gather.rows_of_one(context, query, rows_max)  # No range planning.
            routed = False
        if rows is None:
            return None
        self._count_read_here("reads_routed" if routed else "reads_scattered")
        if query.level == "PATIENT":
            return list(aggregate_patients(rows))
        if wants_patient_counts(query):
            return list(with_patient_counts(rows))
        return rows

    def repair_correction(self, correction: Correction, nodes: Sequence[str]) -> None:
        """Read repair for corrections: send `correction` (the newest a read saw for its
        study) to `nodes`, owners that answered with an older one or none. In the
        background: the read's answer already carries the newest (merged over every row)."""
        if self.send_correction is None or not nodes:
            return
        self.stats.extra["read_correction_repairs"] = self.stats.extra.get("read_correction_repairs", 0) + len(nodes)
        self._spawn(self.send_correction(correction, list(nodes)))

    async def reconcile_study(self, study_uid: str, nodes: Sequence[str], hint_holders: Sequence[str] = (), *,
                              deleted: set[str] | None = None, missed_deletes: set[str] | None = None) -> bool:
        """Make the owners in `nodes`, which answered a read differently, each hold every
        instance of the study any of them holds, and every instance `hint_holders` keep
        as hints for it (blocking read repair; a hint delivered early is one replay will
        find already done). True when they now agree; False when a copy failed or the
        difference is over reconcile_instances_max (then the repair goes on in the
        background). `deleted` receives the instances an owner answered DELETED for (a
        newer tombstone there: another owner listed a copy that was deleted), and
        `missed_deletes` the owners in `nodes` that listed one of them (they missed the
        delete; the tombstone reaches them by hint replay or anti-entropy)."""
        context = self._read_context()
        image = Query("IMAGE", (Condition("StudyInstanceUID", "UI", study_uid),), ())

        async def instances(node_id: str, hints: bool) -> dict[str, InstanceLocation] | None:
            queue: asyncio.Queue[tuple[int, list[Attributes] | None, str | None]] = asyncio.Queue()
            await pump_rows(context, queue, 0, node_id, image, [study_range(study_uid)], hints)
            found: dict[str, InstanceLocation] = {}
            while not queue.empty():
                _key, batch, error = queue.get_nowait()
                if error is not None:
                    return None
                for row in batch or []:
                    location = _location(row)
                    found[location.sop_instance_uid] = location
            return found

        held: dict[str, dict[str, InstanceLocation]] = {}
        for node_id in nodes:
            found = await instances(node_id, False)
            if found is None:
                return False
            held[node_id] = found
        hinted: dict[str, dict[str, InstanceLocation]] = {}
        for node_id in hint_holders:
            found = await instances(node_id, True)
            if found is None:  # A holder gone since: what it holds cannot be vouched for.
                return False
            hinted[node_id] = found
        union: dict[str, InstanceLocation] = {}
        for found in [*held.values(), *hinted.values()]:
            union.update(found)
        missing = [(node_id, sop) for node_id, found in held.items() for sop in union if sop not in found]
        if not missing:
            return True
        log.info("replication.read_repair.study study_instance_uid=%s owners=%d hint_holders=%d missing=%d",
                 study_uid, len(nodes), len(hinted), len(missing))
        if len(missing) > self._settings.reconcile_instances_max:
            self._spawn(self._copy_missing(missing, held, union, hinted))
            return False
        found_deleted: set[str] = set()
        ok = await self._copy_missing(missing, held, union, hinted, found_deleted)
        if deleted is not None:
            deleted |= found_deleted
        if missed_deletes is not None:
            missed_deletes |= {node_id for node_id, found in held.items() if not found_deleted.isdisjoint(found)}
        return ok

    async def _copy_missing(self, missing: list[tuple[str, str]], held: dict[str, dict[str, InstanceLocation]],
                            union: dict[str, InstanceLocation],
                            hinted: dict[str, dict[str, InstanceLocation]] | None = None,
                            deleted: set[str] | None = None) -> bool:
        ok = True
        for node_id, sop in missing:
            location = union[sop]
            sources = [(other, False) for other, found in held.items() if sop in found]
            sources += [(other, True) for other, found in (hinted or {}).items() if sop in found]
            stored = None
            for source, as_hint in sources:
                try:
                    stored = await self._fetch(source, location, include_hints=as_hint)
                except PeerError:
                    continue
                if stored is not None:
                    break
            if stored is None:
                ok = False
                continue
            try:
                outcome = (await self._put(node_id, stored, "", self._deadline_ms(
                    self._settings.replica_timeout_ms, len(stored.blob)))).outcome
            except PeerError as error:
                log.info("replication.read_repair.failed node=%s error=%s", node_id, error)
                ok = False
                continue
            if outcome == StoreOutcome.DELETED and deleted is not None:
                deleted.add(sop)
            if outcome in DURABLE_OUTCOMES:
                self.stats.read_repairs += 1
            else:
                ok = False
        return ok

    # ----------------------------------------------------------------- storage commitment
    async def commitment(self, references: Sequence[Reference], settings: CommitSettings,
                         known: dict[str, str] | None = None) -> CommitResult:
        """Storage Commitment: each referenced instance committed once every one of its
        study's N owners holds it (replication/commitment.py); `known` maps SOP Instance
        UIDs to their studies where the caller knows them (saves a scatter)."""
        return await CommitmentCheck(self._read_context, self.find, settings).check(references, known)

    # ----------------------------------------------------------------- retrieve
    async def locate(self, query: Query) -> RetrievePlan:
        """The instances a C-GET/C-MOVE identifier selects, and what could not be asked."""
        image_query = _image_query(query)
        not_joined = self._not_joined(image_query)
        if not_joined is not None:
            return RetrievePlan([], not_joined)
        locations = []
        shortfall = Shortfall()
        try:
            async for row in self._gather(image_query).rows():
                locations.append(_location(row))
        except IncompleteAnswer as error:
            shortfall = error.shortfall
        return RetrievePlan(locations, shortfall)

    def locate_here(self, query: Query, instances_max: int) -> RetrievePlan | None:
        """locate()'s whole plan read from this node's own store on the calling (blocking)
        thread when find_here answers its IMAGE query (an exact key on a ring of this node
        alone: nothing else would be asked, so nothing can be unreachable); an identifier
        that names one study is listed by the store itself (_study_here). None otherwise,
        or past `instances_max` instances: use locate(). Callable from any thread but the loop."""
        image_query = _image_query(query)
        whole = self._study_here(image_query, instances_max)
        if whole is not None:
            return whole
        rows = self.find_here(image_query, instances_max)
        if rows is None:
            return None
        return RetrievePlan([_location(row) for row in rows], Shortfall())

    def _study_here(self, image_query: Query, instances_max: int) -> RetrievePlan | None:
        """locate_here's plan for an identifier that names one study (and at most series or
        SOP instance UIDs in it), under find_here's conditions (joined, a ring of this node
        alone, alive), listed by the store as a retrieve sends it (node/store.py
        study_locations) instead of one query row per instance built, matched and turned
        into a location: 1.4-1.8 ms for 80 instances (bench/README.md, stop 32 helper I).
        None otherwise (find_here's way, which also answers a study not held here)."""
        if self._locator is None:
            return None
        study_uid = ""
        wanted: dict[str, set[str]] = {}
        for condition in image_query.conditions:
            if condition.keyword == "StudyInstanceUID" and not study_uid and "\\" not in condition.value:
                study_uid = condition.value.strip()
            elif condition.keyword in ("SeriesInstanceUID", "SOPInstanceUID") and condition.keyword not in wanted:
                wanted[condition.keyword] = {value.strip() for value in condition.value.split("\\")}
            else:  # PatientID (matched against the study's patient), a second key, a UID list of studies.
                return None
        if not study_uid or not self._alone_here() or not self._membership.is_alive(self.self_id):
            return None
        try:
            locations = self._locator.study_locations(study_uid, instances_max)
        except Exception as error:  # An operating error of the store (or a UID it cannot key): find_here's way.
            log.warning("replication.locate.here_failed error=%s", type(error).__name__)
            return None
        if locations is None:
            return None
        series, sops = wanted.get("SeriesInstanceUID"), wanted.get("SOPInstanceUID")
        if series is not None or sops is not None:
            locations = [location for location in locations
                         if (series is None or location.series_instance_uid in series)
                         and (sops is None or location.sop_instance_uid in sops)]
        self._count_read_here("reads_routed")
        return RetrievePlan(locations, Shortfall())

    def _alone_here(self) -> bool:
        """Joined, on a ring of this node alone: what find_here and _study_here need to
        answer from the own store on the calling thread (nothing else would be asked)."""
        return self.joined() and list(self._membership.ring().node_ids) == [self.self_id]

    def _count_read_here(self, kind: str) -> None:
        """A read answered on the calling thread from the own store (find_here, _study_here)."""
        self._count(kind)
        self.stats.extra["reads_here"] = self.stats.extra.get("reads_here", 0) + 1

    def owns(self, study_instance_uid: str) -> bool:
        """Whether this node is one of the study's owners (reads the ring only: callable
        from any thread). A read then may take this node's own copy first, as read() does."""
        n, _w = self._replicas()
        return self.self_id in self._membership.ring().owners_of_study(study_instance_uid, n)

    async def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        """Part-10 bytes and dataset offset, from the nearest replica that has them intact."""
        n, _w = self._replicas()
        owners = self._membership.ring().owners_of_study(location.study_instance_uid, n)
        order = read_order(owners, self.self_id, self._membership.is_alive, self._site_of, self._slow)
        missing: list[str] = []
        errors: list[str] = []
        my_site = self._site_of(self.self_id)
        for node_id in order:
            if self._settings.write_scope is WriteScope.LOCAL and self._site_of(node_id) != my_site:
                self._count("reads_other_site")  # No owner in this site could return it.
            try:
                stored = await self._fetch(node_id, location)
            except PeerError as error:
                errors.append(f"{node_id}: {error}")
                continue
            if stored is None:
                missing.append(node_id)
                continue
            try:
                part10 = await self._run_blocking(self._decode, stored)
            except StoreError as error:  # Corrupt blob: never send it; try the next replica.
                errors.append(f"{node_id}: {error}")
                continue
            for target in missing:
                if self._membership.is_alive(target):
                    self._spawn(self._repair(target, stored))
            return part10, stored.record.dataset_offset
        # No owner has it: a stand-in may hold it as a hint (owners down when it was
        # stored). Only the study's stand-ins and this node are asked, never the cluster.
        ring = self._membership.ring()
        holders = [self.self_id] + [s.node_id for s in ring.stand_ins(study_token(location.study_instance_uid),
                                                                       n, set(owners))]
        for node_id in dict.fromkeys(holders):
            if node_id in owners or not (node_id == self.self_id or self._membership.is_alive(node_id)):
                continue
            try:
                stored = await self._fetch(node_id, location, include_hints=True)
            except PeerError:
                continue
            if stored is not None:
                # Held outside the owners: a hint, or the copy a former owner keeps until its
                # drop rule runs. The owners that answered without it may hold a newer
                # tombstone: hand it to them first, as read repair does; one answering
                # DELETED means it was deleted, so it is not served.
                if await self._deleted_at(missing, stored):
                    raise ReadError(f"{location.sop_instance_uid} was deleted (an owner holds a newer tombstone)")
                try:
                    return await self._run_blocking(self._decode, stored), stored.record.dataset_offset
                except StoreError:
                    continue
        raise ReadError(f"no replica could return {location.sop_instance_uid}: "
                        + ("; ".join(errors) or f"not found on {','.join(order)}"))

    async def read_frames(self, location: InstanceLocation, numbers: Sequence[int]) -> AsyncIterator[int | bytes]:
        """Some frames of an instance this node does not hold, from the nearest owner that
        answers Data.FetchFrames (FrameTransport), in the order `read` asks them: only the
        frames' bytes travel. Each frame's number as it starts, then its bytes as stored.

        Owners are asked one at a time, each with a deadline, and the next is asked when one
        is down, silent (replica_start_timeout_ms), predates FetchFrames, does not hold it or
        breaks off before its first frame; an owner that holds it and has no such frame
        (FrameNotFound) or refuses the list (FrameListRefused) gives the final answer.
        FramesUnavailable when no owner could answer so (the caller then reads the
        instance whole with `read`, which also asks stand-ins and repairs); PeerError when
        an answer breaks after frames were handed on (the caller breaks its answer off).
        Closing the iterator cancels the call in flight."""
        transport = self._transport
        if not isinstance(transport, FrameTransport):
            raise FramesUnavailable("this node's transport has no FetchFrames")
        n, _w = self._replicas()
        owners = self._membership.ring().owners_of_study(location.study_instance_uid, n)
        order = [node_id for node_id in read_order(owners, self.self_id, self._membership.is_alive, self._site_of,
                                                   self._slow) if node_id != self.self_id]
        size_guess = location.part10_bytes or 64 * 1024 * 1024
        timeout_ms = self._deadline_ms(self._settings.fetch_timeout_ms, size_guess)
        reasons: list[str] = []
        for node_id in order:
            if not self._membership.is_alive(node_id):
                reasons.append(f"{node_id}: down")
                continue
            streams: list[AsyncIterator[int | bytes]] = []

            async def first_piece(started: Callable[[], None], node_id: str = node_id) -> int | bytes:
                stream = transport.fetch_frames(node_id, location.study_instance_uid, location.sop_instance_uid,
                                                numbers, timeout_ms=timeout_ms, started=started)
                streams.append(stream)
                try:
                    return await stream.__anext__()
                except StopAsyncIteration:
                    raise PeerError(f"{node_id}: a frames answer without frames") from None

            try:
                first = await self._answering(node_id, first_piece)
            except FramesUnsupported as error:
                self._count("frames_unsupported")
                reasons.append(str(error))
                await _close_stream(streams)
                continue
            except (FramesNotHeld, PeerError) as error:
                reasons.append(str(error))
                await _close_stream(streams)
                continue
            except BaseException:
                await _close_stream(streams)
                raise
            self._count("frames_reads")
            try:
                yield first
                async for piece in streams[0]:
                    yield piece
            finally:
                await _close_stream(streams)
            return
        self._count("frames_unavailable")
        raise FramesUnavailable("; ".join(reasons) or "no owner to ask")

    async def _fetch(self, node_id: str, location: InstanceLocation, *,
                     include_hints: bool = False) -> StoredInstance | None:
        if node_id == self.self_id:
            stored: StoredInstance | None = await self._run_blocking(
                self._local.read_stored, location.study_instance_uid, location.sop_instance_uid)
            if stored is None and include_hints:
                for owner in (await self._run_blocking(self._local.hint_owners)):
                    stored = await self._run_blocking(self._local.read_hint, owner,
                                                      location.study_instance_uid, location.sop_instance_uid)
                    if stored is not None:
                        break
            return stored
        self.stats.extra["fetch_peers"] = self.stats.extra.get("fetch_peers", 0) + 1
        size_guess = 64 * 1024 * 1024
        timeout_ms = self._deadline_ms(self._settings.fetch_timeout_ms, size_guess)
        return await self._answering(node_id, lambda started: self._transport.fetch(
            node_id, location.study_instance_uid, location.sop_instance_uid, timeout_ms=timeout_ms,
            include_hints=include_hints, started=started))

    async def _answering(self, node_id: str, call: Callable[[Callable[[], None]], Awaitable[T]]) -> T:
        """Run `call(started)`; a replica that has not begun answering (called `started`)
        within replica_start_timeout_ms is given up with PeerError, so a partitioned or
        paused replica costs a reader two seconds, not the whole query or fetch deadline.
        A replica that has begun keeps the call's own deadline, however long it takes."""
        began = asyncio.Event()
        task = asyncio.ensure_future(call(began.set))
        waiter = asyncio.ensure_future(began.wait())
        try:
            await asyncio.wait((task, waiter), timeout=self._settings.replica_start_timeout_ms / 1000,
                               return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not began.is_set():
                self.stats.extra["replica_start_timeouts"] = self.stats.extra.get("replica_start_timeouts", 0) + 1
                self._mark_slow(node_id)
                raise PeerError(f"{node_id}: no answer within {self._settings.replica_start_timeout_ms} ms")
            try:
                return await task
            except PeerError:
                self._mark_slow(node_id)
                raise
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()

    def _mark_slow(self, node_id: str) -> None:
        window_s = 5 * self._settings.replica_start_timeout_ms / 1000
        self._slow_until[node_id] = asyncio.get_running_loop().time() + window_s

    async def _deleted_at(self, owners: Sequence[str], stored: StoredInstance) -> bool:
        """Store `stored` on each live owner of `owners` (as read repair does); True as soon
        as one answers DELETED (it holds a newer tombstone). An owner that cannot be reached
        says nothing either way."""
        for node_id in owners:
            if node_id != self.self_id and not self._membership.is_alive(node_id):
                continue
            if await self._repair(node_id, stored) == StoreOutcome.DELETED:
                return True
        return False

    async def _repair(self, node_id: str, stored: StoredInstance) -> str | None:
        """Read repair of one copy: the owner's outcome, None when it could not be asked."""
        try:
            outcome = (await self._put(node_id, stored, "", self._deadline_ms(self._settings.replica_timeout_ms,
                                                                              len(stored.blob)))).outcome
        except PeerError as error:
            log.info("replication.read_repair.failed node=%s error=%s", node_id, error)
            return None
        if outcome == StoreOutcome.STORED:
            self.stats.read_repairs += 1
            log.info("replication.read_repair sop_instance_uid=%s node=%s", stored.sop_instance_uid, node_id)
        return outcome

    # ----------------------------------------------------------------- hints
    async def replay_hints(self) -> int:
        """One pass: send every hint whose owner answers again; returns how many were handed over.

        Owners are replayed at the same time, and each owner gets up to HINT_REPLAY_WINDOW
        hints (HINT_REPLAY_WINDOW_BYTES) in flight, at most HINT_REPLAY_PASS_MAX per pass; an
        owner's first failure ends its part of the pass. (One hint at a time, one owner after
        another, a pass over 40 ms links took ~28 s on 6 nodes after a site cut.)"""
        self.stats.extra["hint_replay_passes"] = self.stats.extra.get("hint_replay_passes", 0) + 1
        self._remote_delivered_before, self._remote_delivered = self._remote_delivered, set()
        owners = await self._run_blocking(self._local.hint_owners)
        ring = self._membership.ring()
        parts: list[Awaitable[int]] = []
        for owner in owners:
            if owner not in ring:
                parts.append(self._retarget_hints(owner, ring))
            elif self._membership.is_alive(owner):
                parts.append(self._replay_owner(owner, ring))
        return sum(await asyncio.gather(*parts))

    async def _replay_owner(self, owner: str, ring: Ring) -> int:
        stored_list: list[StoredInstance] = await self._run_blocking(
            lambda: list(_take(self._local.hints(owner), HINT_REPLAY_PASS_MAX)))
        handed = 0
        index = 0
        while index < len(stored_list):
            window = [stored_list[index]]
            size = len(stored_list[index].blob)
            index += 1
            while index < len(stored_list) and len(window) < HINT_REPLAY_WINDOW and \
                    size + len(stored_list[index].blob) <= HINT_REPLAY_WINDOW_BYTES:
                window.append(stored_list[index])
                size += len(stored_list[index].blob)
                index += 1
            results = await asyncio.gather(*(self._replay_one(owner, stored, ring) for stored in window))
            handed += sum(1 for result in results if result is True)
            if any(result is None for result in results):
                break  # The owner failed one: the rest wait for the next pass.
        if handed:
            log.info("replication.hint.replayed owner=%s instances=%d", owner, handed)
        return handed

    async def _replay_one(self, owner: str, stored: StoredInstance, ring: Ring) -> bool | None:
        """Hand one hint to its owner: True when handed over (and deleted here), False when
        skipped, None when the owner failed it (the hint stays)."""
        key = (owner, stored.sop_instance_uid)
        if key in self._remote_sends:
            return False  # A local-scope write is sending it right now.
        if key in self._remote_delivered or key in self._remote_delivered_before:
            # Delivered by that send after this pass listed it: the hint is gone, the copy is there.
            self._count("hints_replay_already_delivered")
            return False
        if self._expired(stored):
            # Older than the tombstone grace: a delete of it may be purged everywhere by
            # now, so replaying it could bring a deleted instance back. Its owner gets
            # it from the other replicas (anti-entropy) if it is still current.
            await self._run_blocking(self._local.delete_hint, owner, stored.study_instance_uid,
                                     stored.sop_instance_uid)
            self.stats.extra["hints_expired"] = self.stats.extra.get("hints_expired", 0) + 1
            log.warning("replication.hint.expired owner=%s age_s=%d", owner,
                        (self.hlc.peek().ms - stored.record.version.ms) // 1000)
            return False
        try:
            outcome = (await self._transport.store(
                owner, stored, hint_for="",
                timeout_ms=self._deadline_ms(self._settings.replica_timeout_ms, len(stored.blob)))).outcome
        except PeerRefused as error:
            n, _w = self._replicas()
            if error.reason is RefusalReason.NOT_OWNER and \
                    owner not in ring.owners_of_study(stored.study_instance_uid, n):
                # The ring moved the study away from the hint's owner: its owners now get it.
                if await self._deliver_to_owners(stored, ring):
                    await self._run_blocking(self._local.delete_hint, owner, stored.study_instance_uid,
                                             stored.sop_instance_uid)
                    self.stats.extra["hints_retargeted"] = self.stats.extra.get("hints_retargeted", 0) + 1
                    return True
            log.info("replication.hint.replay_failed owner=%s error=%s", owner, error)
            return None
        except PeerError as error:
            log.info("replication.hint.replay_failed owner=%s error=%s", owner, error)
            return None
        if outcome not in DURABLE_OUTCOMES:
            return None
        await self._run_blocking(self._local.delete_hint, owner, stored.study_instance_uid,
                                 stored.sop_instance_uid)
        self.stats.hints_replayed += 1
        return True

    def _expired(self, stored: StoredInstance) -> bool:
        max_age_ms = self._settings.hint_max_age_ms
        return bool(max_age_ms) and stored.record.version.ms < self.hlc.peek().ms - max_age_ms

    async def _retarget_hints(self, gone: str, ring: Ring) -> int:
        """Hints held for a member that is out of the ring (removed, or left) go to their
        study's current owners instead (DESIGN: re-targeted to the new owner); each is
        deleted once every current owner holds it durably. An owner that is down keeps
        the hint here for the next pass."""
        moved = 0
        stored_list = await self._run_blocking(lambda: list(_take(self._local.hints(gone), HINT_REPLAY_PASS_MAX)))
        for stored in stored_list:
            if not await self._deliver_to_owners(stored, ring, gone=gone):
                continue
            await self._run_blocking(self._local.delete_hint, gone, stored.study_instance_uid, stored.sop_instance_uid)
            moved += 1
        if moved:
            self.stats.extra["hints_retargeted"] = self.stats.extra.get("hints_retargeted", 0) + moved
            log.info("replication.hint.retargeted gone=%s instances=%d", gone, moved)
        return moved

    async def _deliver_to_owners(self, stored: StoredInstance, ring: Any, *, gone: str = "") -> bool:
        """A durable copy of `stored` on every current owner of its study (ourselves
        included); False as soon as one is down or does not make it durable."""
        n, _w = self._replicas()
        for owner in ring.owners_of_study(stored.study_instance_uid, n):
            if owner == self.self_id:
                await self._run_blocking(functools.partial(self._local.put_stored, stored))
                continue
            if not self._membership.is_alive(owner):
                return False
            try:
                outcome = (await self._transport.store(
                    owner, stored, hint_for="",
                    timeout_ms=self._deadline_ms(self._settings.replica_timeout_ms, len(stored.blob)))).outcome
            except PeerError as error:
                log.info("replication.hint.retarget_failed gone=%s owner=%s error=%s", gone, owner, error)
                return False
            if outcome not in DURABLE_OUTCOMES:
                return False
        return True


async def _close_stream(streams: Sequence[AsyncIterator[int | bytes]]) -> None:
    """Close a frames answer's stream (its call is cancelled). One still running in a task
    `_answering` cancelled ends (and cancels its call) as that cancellation reaches it."""
    for stream in streams:
        aclose = getattr(stream, "aclose", None)
        if aclose is None:
            continue
        try:
            await aclose()
        except RuntimeError:  # "already running": the cancelled task closes it.
            pass


def _take(iterator: Any, count: int) -> Any:
    for index, item in enumerate(iterator):
        if index >= count:
            return
        yield item


def _image_query(query: Query) -> Query:
    """The IMAGE-level query of a C-GET/C-MOVE identifier: its unique keys only."""
    return Query(
        level="IMAGE",
        model=query.model,
        conditions=tuple(c for c in query.conditions if c.keyword in _RETRIEVE_KEYS),
        return_keys=(),
    )


def _location(row: Attributes) -> InstanceLocation:
    return InstanceLocation(
        study_instance_uid=str(row["StudyInstanceUID"]),
        series_instance_uid=str(row.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(row["SOPInstanceUID"]),
        sop_class_uid=str(row.get("SOPClassUID", "")),
        transfer_syntax_uid=str(row.get("_transfer_syntax_uid", "")),
        # A corrected study's headers are rewritten on the way out: the length is not known first.
        part10_bytes=0 if row.get("_correction") else _int(row.get("_part10_bytes")),
        correction=str(row.get("_correction", "") or ""),
    )


def _int(value: object) -> int:
    """A row's internal count (a string across peers); 0 when absent (an older peer) or bad."""
    try:
        return max(0, int(str(value)))
    except ValueError:
        return 0


@runtime_checkable
class StudyLocator(Protocol):
    """A local store that lists one study's instances as a retrieve sends them (None: not
    held here, or more than `instances_max`): node/store.py study_locations."""

    def study_locations(self, study_instance_uid: str, instances_max: int) -> list[InstanceLocation] | None: ...


_RETRIEVE_KEYS = frozenset({"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"})


@dataclass
class _WriteState:
    owners: Sequence[str]
    ring_version: int = 0  # The ring the write was planned on.
    used: set[str] = field(default_factory=set)  # Stand-ins taken (or found down) by this write.
    silent_sites: set[str] = field(default_factory=set)  # A stand-in there did not answer: likely cut off.
    errors: list[str] = field(default_factory=list)
    full: bool = False
    tombstones: list[Version] = field(default_factory=list)  # Newer tombstones copies met (DELETED answers).
    acked_at: Version | None = None  # This node's clock when the write was acknowledged (None: it was not).

    def answered(self, reply: StoreReply) -> str:
        """Notes the tombstone a DELETED answer carries; returns the outcome."""
        if reply.tombstone_version is not None:
            self.tombstones.append(reply.tombstone_version)
        return reply.outcome


__all__ = ["Coordinator", "CoordinatorSettings", "Condition", "PeerError", "WriteQuorumMode", "WriteScope"]
