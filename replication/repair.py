"""Anti-entropy and rebalance, with no balancer: every node repairs its own ranges.

Every node, for every token range it owns in the current ring, compares digests with
the range's other live owners and pulls whatever it lacks (pull-only, idempotent,
resumable: a pass that breaks off is simply run again). It runs on a timer and at once
after any ring change, so the same mechanism does anti-entropy, re-replication after a
loss, and filling a node that joined (or whose data dir was wiped).

A range a node owns but has not filled yet is *pending*: reads do not use this node for
it until a pass over it completed against every live source.

A node drops data it holds for ranges it no longer owns instance by instance: it lists
what it holds there, verifies that every current owner holds each of those instances
(same content), and deletes exactly those, each only if it is still identical here, and
only while the ring that made the change is still current (the drop rule). An instance
that arrives during the check is not in the list and stays for a later pass.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

from pacsnode.replication.correction import CORRECTION_SOP, Correction, correction_of_entry, is_correction_entry
from pacsnode.replication.digest import Digest, entry_hash, segment_bounds, segment_of
from pacsnode.replication.hlc import Version, is_mark, wall_ms
from pacsnode.replication.model import StoredInstance, StoreError, StoreOutcome, Tombstone
from pacsnode.replication.planning import RangeSet
from pacsnode.replication.transport import PeerError, StoreReply, cancelled_by_caller
from pacsnode.ring.members import MembershipView
from pacsnode.ring.placement import OwnedRange, Replication, Ring, TokenRange, replica_total
from pacsnode.ring.tokens import TOKEN_SPACE, study_token

log = logging.getLogger(__name__)

Entry = tuple[str, str, str]  # (study uid, sop uid, content hash)


class RepairTransport(Protocol):
    async def range_digest(self, target: str, token_range: TokenRange, *, timeout_ms: int) -> dict[int, Digest]: ...
    async def list_bucket(self, target: str, token_range: TokenRange, segment: int, *,
                          timeout_ms: int) -> list[Entry]: ...
    async def fetch(self, target: str, study_instance_uid: str, sop_instance_uid: str, *, timeout_ms: int,
                    include_hints: bool = False) -> StoredInstance | None: ...
    async def store(self, target: str, stored: StoredInstance, *, hint_for: str, timeout_ms: int) -> StoreReply: ...
    async def tombstone(self, target: str, tombstones: Sequence[Tombstone], *, scope: Any, hint_for: str,
                        timeout_ms: int) -> int: ...
    async def correct(self, target: str, correction: Correction, *, timeout_ms: int) -> bool: ...


class RepairStore(Protocol):
    """Blocking calls on the local store (run in a thread)."""

    def segment_digests(self, intervals: list[tuple[int, int]]) -> dict[int, Digest]: ...
    def entries(self, low: int, high: int) -> Any: ...
    def put_stored(self, stored: StoredInstance, *, hint_for: str = "") -> str: ...
    def studies_in(self, low: int, high: int) -> list[str]: ...
    def delete_instances(self, entries: Sequence[Entry]) -> int: ...
    def is_empty(self) -> bool: ...
    def read_stored(self, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None: ...
    def put_tombstones(self, tombstones: Sequence[Tombstone], *, hint_for: str = "") -> int: ...
    def tombstone(self, study_instance_uid: str, sop_instance_uid: str) -> Tombstone | None: ...
    def tombstones(self, low: int = 0, high: int = (1 << 64) - 1) -> Any: ...
    def purge_tombstones(self, tombstones: Sequence[Tombstone]) -> int: ...
    def put_correction(self, correction: Correction) -> bool: ...
    def correction(self, study_instance_uid: str) -> Correction | None: ...


# Owned ranges a pass compares (and pulls) at the same time.
RANGES_IN_FLIGHT = 8

# In a range this node already holds (not pending), an instance it lacks is pulled only once
# a pass has seen it missing for this long. A copy on its way as a hint (a local-scope
# write's copy for another site, sent at once; a hint replayed after a heal) arrives first,
# and pulling it meanwhile sent the same bytes across the WAN twice (bench/site_bytes.py:
# 0.33 copies more per instance when a pass ran during the stores). What no hint brings is
# pulled by the next pass. Pending ranges (a node filling what it gained) pull at once.
YOUNG_MISSING_MS = 10_000


@dataclass(frozen=True)
class RepairSettings:
    replication_factor: Replication = 3  # N, or N copies per site (ring/placement.py SiteReplicas).
    interval_ms: int = 60_000  # Anti-entropy pass over every owned range.
    rpc_timeout_ms: int = 10_000
    fetch_timeout_ms: int = 60_000
    bytes_per_second_max: int = 50_000_000  # Pull throttle (0 = none).
    fetch_window: int = 8  # Instances fetched from one source at once (one at a time was round-trip bound).
    tombstone_grace_ms: int = 10 * 86_400_000  # Tombstones are purged this long after their delete (0: never).
    young_missing_ms: int = YOUNG_MISSING_MS  # See YOUNG_MISSING_MS (0: pull at once; the simulator's tests).


@dataclass
class Transfer:
    """A range being filled: for `pacsnode status`."""

    token_range: TokenRange
    source: str
    done_bytes: int = 0
    total_bytes: int = 0
    done_instances: int = 0
    total_instances: int = 0


@dataclass
class RepairStats:
    passes: int = 0
    instances_pulled: int = 0
    bytes_pulled: int = 0
    studies_dropped: int = 0
    instances_dropped: int = 0
    last_pass_ms: int = 0
    pending_ranges: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def intervals_of(token_range: TokenRange) -> list[tuple[int, int]]:
    """`RangeSet([token_range]).intervals()` without building one (called per range, per
    pass, per read): the range's sorted inclusive [low, high] pieces, two when it wraps."""
    start, end = token_range.start, token_range.end
    if start == end:  # The whole ring.
        return [(0, TOKEN_SPACE - 1)]
    if start < end:
        return [(start + 1, end)]
    if start + 1 <= TOKEN_SPACE - 1:  # Wraps past the top of the ring.
        return [(0, end), (start + 1, TOKEN_SPACE - 1)]
    return [(0, end)]


def _covers(ranges: RangeSet, token_range: TokenRange) -> bool:
    """Whether every token of `token_range` is in `ranges`."""
    intervals = ranges.intervals()
    lows = [low for low, _high in intervals]
    for low, high in intervals_of(token_range):
        index = bisect.bisect_right(lows, low) - 1
        if index < 0 or intervals[index][1] < high:
            return False
    return True


def _meets(ranges: RangeSet, token_range: TokenRange) -> bool:
    """Whether `token_range` and `ranges` share a token."""
    intervals = ranges.intervals()
    lows = [low for low, _high in intervals]
    for low, high in intervals_of(token_range):
        index = bisect.bisect_right(lows, high) - 1  # The last interval starting at or below `high`.
        if index >= 0 and intervals[index][1] >= low:
            return True
    return False


def _digest_of(entries: Sequence[Entry]) -> Digest:
    """The segment digest a store keeps for exactly these entries."""
    digest = Digest()
    for _study, sop, content in entries:
        digest = digest.add(entry_hash(sop, content))
    return digest


class Repairer:
    def __init__(
        self,
        self_id: str,
        membership: MembershipView,
        transport: RepairTransport,
        store: RepairStore,
        settings: RepairSettings,
        *,
        run_blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread,
        wall_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.self_id = self_id
        self._wall_ms = wall_ms  # The clock tombstone versions are on (the node's; virtual in the simulator).
        self._membership = membership
        self._transport = transport
        self._store = store
        self._settings = settings
        self._run_blocking = run_blocking
        self._pending: set[TokenRange] = set()
        self._pending_set: RangeSet | None = RangeSet([])  # `_pending` as a RangeSet; None: build when asked.
        self._last_ring: Ring | None = None
        self._previous_ring: Ring | None = None
        self._wake = asyncio.Event()
        self.transfers: dict[TokenRange, Transfer] = {}
        self.stats = RepairStats()
        self._bucket_started = 0.0
        self._bucket_bytes = 0
        self._round_trip_ms: dict[str, float] = {}  # Digest call round trips per peer (nearest_first).
        # (sop, content hash) a pass found missing here, in a range not pending: when first seen
        # (loop time); kept for what the last pass saw missing (YOUNG_MISSING_MS).
        self._missing_since: dict[tuple[str, str], float] = {}
        self._missing_seen: set[tuple[str, str]] = set()
        self._deferred: set[TokenRange] = set()  # Ranges with an instance too young to pull this pass.

    # ----------------------------------------------------------------- views
    def pending(self) -> RangeSet:
        """Ranges this node owns but has not filled yet (reads avoid it there)."""
        if self._pending_set is None:
            # Built when first asked after a change, not on each range filled: a pass that
            # fills P ranges would build it P times (quadratic in the ranges pending).
            self._pending_set = RangeSet(self._pending)
        return self._pending_set

    def is_pending(self, ranges: Sequence[TokenRange]) -> bool:
        """Whether any token of `ranges` is in a pending range (`pending()` is `_pending` as a
        RangeSet: a bisect per piece instead of a walk over every pending range)."""
        if not self._pending:
            return False
        pending = self.pending()
        return any(pending.overlaps(low, high) for token_range in ranges for low, high in intervals_of(token_range))

    def ring_changed(self) -> None:
        """Run a pass now (called by membership on every ring change). The ranges gained
        are marked pending at once: a pass in flight may take a while to notice the change,
        and until then this node would answer reads for them as if it held them."""
        ring = self._membership.ring()
        self._note_ring(ring, ring.effective(self._settings.replication_factor))
        self._wake.set()

    # ----------------------------------------------------------------- main loop
    async def run_forever(self) -> None:
        while True:
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                if cancelled_by_caller():
                    raise
                log.error("repair.pass.error error=CancelledError from inside the pass")
            except Exception as error:  # Never let repair die; say why and go on.
                log.error("repair.pass.error error=%r", error)
            try:
                await asyncio.wait_for(self._wake.wait(), self._settings.interval_ms / 1000)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _note_ring(self, ring: Ring, n: Replication) -> None:
        """Mark ranges newly owned in this ring as pending (all of them if our store is empty)."""
        previous = self._last_ring
        if previous is not None and previous.version == ring.version:
            return
        self._last_ring = ring
        self._previous_ring = previous
        mine = [owned.token_range for owned in ring.ranges(n) if self.self_id in owned.owners]
        if len(ring) <= 1:
            self._pending.clear()
        elif previous is None or len(previous) <= 1:
            # First look at the ring: a node with an empty store (new, or its data dir was
            # wiped) must fill everything it owns before it serves reads.
            if self._store.is_empty():
                self._pending = set(mine)
        else:
            # By token coverage, not by range identity: a removed vnode's range merges into
            # its successor's, so a range we owned "at its end" can have grown a part we did
            # not own; and a pending range reshaped by a second change must stay pending.
            old_n = previous.effective(self._settings.replication_factor)
            held = RangeSet(o.token_range for o in previous.ranges(old_n) if self.self_id in o.owners)
            unfilled = RangeSet(self._pending)
            newly = []
            kept = []
            for token_range in mine:
                if not _covers(held, token_range):
                    newly.append(token_range)
                elif unfilled and _meets(unfilled, token_range):
                    kept.append(token_range)
            self._pending = set(kept) | set(newly)
            if newly:
                log.info("repair.ranges.pending count=%d ring_version=%x", len(newly), ring.version)
        self._pending_set = None
        self.stats.pending_ranges = len(self._pending)

    async def run_pass(self) -> None:
        clock = asyncio.get_running_loop().time  # Virtual time under the simulator.
        started = clock()
        ring = self._membership.ring()
        n = ring.effective(self._settings.replication_factor)
        self._note_ring(ring, n)
        if len(ring) <= 1:
            return
        owned = [o for o in ring.ranges(n) if self.self_id in o.owners]
        # Pending ranges first: they are what reads are waiting for.
        owned.sort(key=lambda o: o.token_range not in self._pending)
        self._missing_seen = set()
        self._deferred = set()
        await self._sync_all(owned, ring)
        if self._deferred and self._membership.ring().version == ring.version:
            # Instances too young to pull (YOUNG_MISSING_MS): look at those ranges once more
            # when they are old enough; what a hint delivered meanwhile is no longer missing.
            try:
                await asyncio.wait_for(self._wake.wait(), self._settings.young_missing_ms / 1000)
                return  # The ring changed (the wake stays set): the next pass starts at once.
            except asyncio.TimeoutError:
                pass
            await self._sync_all([o for o in owned if o.token_range in self._deferred], ring)
        if self._membership.ring().version != ring.version:
            return  # The ring changed under us: the next pass starts from the new one.
        # Forget what this whole pass no longer saw missing (it arrived, or went).
        self._missing_since = {key: at for key, at in self._missing_since.items() if key in self._missing_seen}
        await self._drop_unowned(ring, n)
        await self._purge_tombstones(ring, n)
        self.stats.passes += 1
        self.stats.last_pass_ms = int((clock() - started) * 1000)
        log.info("repair.pass.done ranges=%d pending=%d duration_ms=%d", len(owned), len(self._pending),
                 self.stats.last_pass_ms)

    async def _sync_all(self, owned: list[OwnedRange], ring: Ring) -> None:
        """Sync `owned`, RANGES_IN_FLIGHT ranges at once (one at a time, a pass was a chain of
        digest round trips, two per range with three owners: ~30 s over 40 ms links with 6
        nodes); a range not started before the ring changes is left to the next pass."""
        slots = asyncio.Semaphore(RANGES_IN_FLIGHT)

        async def one(item: OwnedRange) -> None:
            async with slots:
                if self._membership.ring().version == ring.version:
                    await self._sync_owned(item)

        tasks = [asyncio.ensure_future(one(item)) for item in owned]
        try:
            for task in tasks:
                await task
        finally:
            for task in tasks:
                task.cancel()

    async def _sync_owned(self, item: OwnedRange) -> None:
        sources = [o for o in item.owners if o != self.self_id and self._membership.is_alive(o)]
        if item.token_range in self._pending and self._last_ring is not None:
            # Old owners of a range we just gained are sources too (they may be the only ones).
            sources += [s for s in self._previous_sources(item.token_range) if s not in sources]
        complete = await self.sync_range(item.token_range, self.nearest_first(sources))
        if complete and item.token_range in self._pending:
            all_owners_alive = all(self._membership.is_alive(o) for o in item.owners)
            if all_owners_alive or sources:
                self._pending.discard(item.token_range)
                self._pending_set = None
                self.stats.pending_ranges = len(self._pending)

    def nearest_first(self, sources: Sequence[str]) -> list[str]:
        """`sources` in the order to pull from: this node's site first, then the other sites,
        nearest first by the round trip this node measured on its digest calls to their nodes
        (a site not measured yet last); ring order within a site. The first source that holds
        what we lack is where the bytes come from (the later ones then compare equal), so a
        rebuild after a loss crosses the WAN only for what this site has no copy of."""
        def site(node_id: str) -> str:
            member = self._membership.member(node_id)
            return member.site if member is not None else ""

        mine = site(self.self_id)
        distance: dict[str, float] = {}
        for node_id, round_trip_ms in self._round_trip_ms.items():
            node_site = site(node_id)
            distance[node_site] = min(distance.get(node_site, float("inf")), round_trip_ms)

        def key(node_id: str) -> tuple[int, float]:
            node_site = site(node_id)
            return (0, 0.0) if node_site == mine else (1, distance.get(node_site, float("inf")))

        return sorted(sources, key=key)

    def _previous_sources(self, token_range: TokenRange) -> list[str]:
        """Owners of the range in the ring before the last change (they still hold it)."""
        previous = self._previous_ring
        if previous is None or len(previous) <= 1:
            return []
        old_n = previous.effective(self._settings.replication_factor)
        return [o for o in previous.preference_list(token_range.end, old_n)
                if o != self.self_id and self._membership.is_alive(o)]

    def former_owners(self, token: int) -> list[str]:
        """The token's owners in the ring before the last change that own it no more (they
        keep their copies until their drop pass has seen every new owner hold them)."""
        previous, current = self._previous_ring, self._last_ring
        if previous is None or current is None or len(previous) <= 1:
            return []
        now = set(current.preference_list(token, current.effective(self._settings.replication_factor)))
        old_n = previous.effective(self._settings.replication_factor)
        return [o for o in previous.preference_list(token, old_n) if o not in now and o in current]

    def under_replicated_ranges(self) -> list[TokenRange]:
        """Owned ranges that may have fewer than N full copies: pending here, or an owner down."""
        ring = self._membership.ring()
        if len(ring) <= 1:
            return []  # A one-node archive: one copy is what it has, nothing to catch up.
        n = ring.effective(self._settings.replication_factor)
        result = []
        for owned in ring.ranges(n):
            if self.self_id not in owned.owners:
                continue
            if owned.token_range in self._pending or not all(self._membership.is_alive(o) for o in owned.owners):
                result.append(owned.token_range)
        if ring.effective_replicas(n) < replica_total(self._settings.replication_factor):
            result = [o.token_range for o in ring.ranges(n) if self.self_id in o.owners]
        return result

    # ----------------------------------------------------------------- one range
    async def sync_range(self, token_range: TokenRange, sources: Sequence[str]) -> bool:
        """Pull what we lack in `token_range` from each source; True if every source answered."""
        intervals = intervals_of(token_range)
        complete = True
        clock = asyncio.get_running_loop().time
        for source in sources:
            asked = clock()
            try:
                theirs = await self._transport.range_digest(source, token_range,
                                                            timeout_ms=self._settings.rpc_timeout_ms)
            except PeerError as error:
                log.info("repair.digest.failed source=%s error=%s", source, error)
                complete = False
                continue
            self._note_round_trip(source, (clock() - asked) * 1000)
            mine = await self._run_blocking(self._store.segment_digests, intervals)
            if mine == theirs:  # Equal segment digests (their totals would be equal too).
                continue
            segments = sorted(s for s in set(mine) | set(theirs) if mine.get(s) != theirs.get(s))
            try:
                await self._pull_segments(token_range, source, segments,
                                          defer_young=token_range not in self._pending)
            except PeerError as error:
                log.info("repair.pull.failed source=%s error=%s", source, error)
                complete = False
        return complete

    def _note_round_trip(self, node_id: str, elapsed_ms: float) -> None:
        """A digest call's round trip to `node_id` (moving average): how near its site is."""
        before = self._round_trip_ms.get(node_id)
        self._round_trip_ms[node_id] = elapsed_ms if before is None else 0.8 * before + 0.2 * elapsed_ms

    def _old_enough(self, missing: list[Entry]) -> list[Entry]:
        """Of `missing` (in a range not pending), what has been seen missing for
        YOUNG_MISSING_MS; the rest waits for a later pass (see YOUNG_MISSING_MS)."""
        now = asyncio.get_running_loop().time()
        kept = []
        for entry in missing:
            key = (entry[1], entry[2])
            self._missing_seen.add(key)
            if now - self._missing_since.setdefault(key, now) >= self._settings.young_missing_ms / 1000:
                kept.append(entry)
        if len(kept) < len(missing):
            self.stats.extra["pulls_deferred"] = self.stats.extra.get("pulls_deferred", 0) + len(missing) - len(kept)
        return kept

    async def _pull_segments(self, token_range: TokenRange, source: str, segments: list[int], *,
                             defer_young: bool = False) -> None:
        transfer = self.transfers.setdefault(token_range, Transfer(token_range, source))
        transfer.source = source
        # This pass's own count: every instance it listed as missing ends pulled, gone at the
        # source, or deleted here (a newer tombstone); the range is filled when all did. (The
        # transfer's totals add up over passes: a pass after a failed one lists again what
        # the failed one did not get, so they are for `pacsnode status`, not for this.)
        listed = settled = 0
        try:
            for segment in segments:
                their_entries = await self._transport.list_bucket(source, token_range, segment,
                                                                  timeout_ms=self._settings.rpc_timeout_ms)
                low, high = self._clip(token_range, segment)
                mine_entries: list[Entry] = []
                for interval_low, interval_high in [(low, high)] if low <= high else []:
                    mine_entries = await self._run_blocking(
                        lambda: list(self._store.entries(interval_low, interval_high)))
                mine = {(sop, content) for _study, sop, content in mine_entries}
                missing = [e for e in their_entries if (e[1], e[2]) not in mine and not is_mark(e[2])
                           and not is_correction_entry(e[2])]
                if defer_young and missing and self._settings.young_missing_ms:
                    young = len(missing)
                    missing = self._old_enough(missing)
                    if len(missing) < young:
                        self._deferred.add(token_range)
                # Their study corrections we lack (or hold an older state of) are merged as
                # listed: the entry carries the whole correction, nothing to fetch.
                corrections = [correction_of_entry(e[2]) for e in their_entries
                               if (e[1], e[2]) not in mine and is_correction_entry(e[2])]
                for correction in corrections:
                    if await self._run_blocking(self._store.put_correction, correction):
                        self.stats.extra["corrections_applied"] = self.stats.extra.get("corrections_applied", 0) + 1
                        log.info("repair.correction.applied source=%s", source)
                # Their tombstones we lack are applied as listed, never fetched: an older copy
                # held here goes, a newer one (a re-store) stays and the source pulls it from us.
                deletes = [_tombstone_of(e) for e in their_entries if (e[1], e[2]) not in mine and is_mark(e[2])]
                if deletes and self._settings.tombstone_grace_ms:
                    # Past the grace the source is about to purge it: taken only where it still
                    # deletes something here (else a purged tombstone would come back forever).
                    cutoff = self._wall_ms() - self._settings.tombstone_grace_ms
                    held = {sop for _study, sop, content in mine_entries if not is_mark(content)}
                    deletes = [t for t in deletes if t.version.ms > cutoff or t.sop_instance_uid in held]
                if deletes:
                    removed = await self._run_blocking(self._store.put_tombstones, deletes)
                    self.stats.extra["tombstones_applied"] = self.stats.extra.get("tombstones_applied", 0) + len(deletes)
                    log.info("repair.tombstones.applied source=%s tombstones=%d removed=%d", source, len(deletes),
                             removed)
                transfer.total_instances += len(missing)
                listed += len(missing)

                async def pull(study_uid: str, sop_uid: str) -> None:
                    nonlocal settled
                    stored = await self._transport.fetch(source, study_uid, sop_uid,
                                                         timeout_ms=self._settings.fetch_timeout_ms)
                    if stored is None:
                        settled += 1
                        return  # Gone meanwhile (dropped or never there); the next pass rechecks.
                    try:
                        outcome = await self._run_blocking(self._store.put_stored, stored)
                    except StoreError as error:
                        log.warning("repair.store.failed sop_instance_uid=%s error=%s", sop_uid, error)
                        raise PeerError(f"local store: {error}") from error
                    settled += 1
                    if outcome == StoreOutcome.DELETED:  # A newer tombstone here: it stays deleted.
                        self.stats.extra["pulls_deleted"] = self.stats.extra.get("pulls_deleted", 0) + 1
                        return
                    transfer.done_instances += 1
                    transfer.done_bytes += len(stored.blob)
                    self.stats.instances_pulled += 1
                    self.stats.bytes_pulled += len(stored.blob)
                    await self._throttle(len(stored.blob))

                await _in_window([(study_uid, sop_uid) for study_uid, sop_uid, _content in missing], pull,
                                 max(1, self._settings.fetch_window))
            if transfer.done_instances:
                log.info("repair.range.pulled source=%s instances=%d bytes=%d", source, transfer.done_instances,
                         transfer.done_bytes)
        finally:
            if settled >= listed:
                self.transfers.pop(token_range, None)

    @staticmethod
    def _clip(token_range: TokenRange, segment: int) -> tuple[int, int]:
        """The part of `segment` inside `token_range` (one interval: ranges here are small)."""
        seg_low, seg_high = segment_bounds(segment)
        for low, high in intervals_of(token_range):
            if not (high < seg_low or seg_high < low):
                return max(low, seg_low), min(high, seg_high)
        return 1, 0

    async def _throttle(self, size: int) -> None:
        limit = self._settings.bytes_per_second_max
        if not limit:
            return
        now = asyncio.get_running_loop().time()
        if not self._bucket_started:
            self._bucket_started = now
        self._bucket_bytes += size
        elapsed = now - self._bucket_started
        expected = self._bucket_bytes / limit
        if expected > elapsed:
            await asyncio.sleep(expected - elapsed)
        if elapsed > 5:
            self._bucket_started = asyncio.get_running_loop().time()
            self._bucket_bytes = 0

    # ----------------------------------------------------------------- drop rule
    async def _drop_unowned(self, ring: Ring, n: Replication) -> None:
        """Drop what we hold in ranges we no longer own: exactly the instances that every
        current owner was seen to hold, never one that arrived after the check.

        Per range: list our entries first (study, sop, content hash); ask every owner for
        its digest, and list the buckets where it differs; an entry is verified when every
        owner holds the same (sop, content hash). What an owner lacks is handed to it (and
        dropped in a later pass, once seen there). Then one batch deletes the verified
        entries, each only if it is still here with that content (`delete_instances`), and
        only if the ring that made the change is still current. A write that lands here
        while the owners are asked is not in the list, so it stays until a later pass has
        seen it on every owner."""
        held = await self._run_blocking(self._store.segment_digests, [(0, TOKEN_SPACE - 1)])
        if not held:
            return
        owned = RangeSet([o.token_range for o in ring.ranges(n) if self.self_id in o.owners])
        held_segments = sorted(held)

        def holds_any(low: int, high: int) -> bool:  # A held segment within [segment_of(low), segment_of(high)].
            index = bisect.bisect_left(held_segments, segment_of(low))
            return index < len(held_segments) and held_segments[index] <= segment_of(high)

        for owned_range in ring.ranges(n):
            if self.self_id in owned_range.owners:
                continue
            token_range = owned_range.token_range
            intervals = intervals_of(token_range)
            if not any(holds_any(low, high) for low, high in intervals):
                continue

            def listing(intervals: list[tuple[int, int]] = intervals) -> list[Entry]:
                return [entry for low, high in intervals for entry in self._store.entries(low, high)]

            listed = [e for e in await self._run_blocking(listing) if study_token(e[0]) not in owned]
            if not listed:
                continue
            verified = await self._verified_on_owners(token_range, owned_range.owners, listed)
            if not verified:
                continue
            if self._membership.ring().version != ring.version:
                return
            dropped = await self._run_blocking(self._store.delete_instances, verified)
            if dropped:
                studies = len({study for study, _sop, _content in verified})
                self.stats.studies_dropped += studies
                self.stats.instances_dropped += dropped
                log.info("repair.range.dropped studies=%d instances=%d kept=%d owners=%s", studies, dropped,
                         len(listed) - dropped, ",".join(owned_range.owners))

    async def _purge_tombstones(self, ring: Ring, n: Replication) -> None:
        """Forget the tombstones of our ranges older than the grace once every other owner
        (all of them alive) holds the same tombstone or nothing under that SOP Instance UID
        (it purged it already); the store then compacts the study's keys. An owner holding
        an instance or another tombstone under that UID keeps ours until anti-entropy has
        settled it. Older copies cannot come back afterwards: anti-entropy and replicas have
        had the grace to apply the tombstone, hints older than it are dropped, and a node out
        longer than it starts empty (node/staleness.py)."""
        grace_ms = self._settings.tombstone_grace_ms
        if not grace_ms:
            return
        cutoff = self._wall_ms() - grace_ms
        for owned in ring.ranges(n):
            if self.self_id not in owned.owners:
                continue
            others = [o for o in owned.owners if o != self.self_id]
            if not all(self._membership.is_alive(o) for o in others):
                continue
            intervals = intervals_of(owned.token_range)

            def expired(intervals: list[tuple[int, int]] = intervals) -> list[Tombstone]:
                return [t for low, high in intervals for t in self._store.tombstones(low, high)
                        if t.version.ms <= cutoff]

            candidates = await self._run_blocking(expired)
            if not candidates:
                continue
            by_segment: dict[int, list[Tombstone]] = {}
            for tombstone in candidates:
                by_segment.setdefault(segment_of(study_token(tombstone.study_instance_uid)), []).append(tombstone)
            kept: set[tuple[str, str]] = set()
            try:
                for other in others:
                    for segment, group in by_segment.items():
                        entries = await self._transport.list_bucket(other, owned.token_range, segment,
                                                                    timeout_ms=self._settings.rpc_timeout_ms)
                        theirs = {(study, sop): content for study, sop, content in entries}
                        for t in group:
                            content = theirs.get((t.study_instance_uid, t.sop_instance_uid))
                            if content is not None and content != t.version.mark():
                                kept.add((t.study_instance_uid, t.sop_instance_uid))
            except PeerError as error:
                log.info("repair.purge.skipped error=%s", error)
                continue
            if self._membership.ring().version != ring.version:
                return
            chosen = [t for t in candidates if (t.study_instance_uid, t.sop_instance_uid) not in kept]
            if not chosen:
                continue
            purged = await self._run_blocking(self._store.purge_tombstones, chosen)
            self.stats.extra["tombstones_purged"] = self.stats.extra.get("tombstones_purged", 0) + int(purged)
            log.info("repair.tombstones.purged count=%d kept=%d grace_s=%d", purged, len(kept), grace_ms // 1000)

    async def _verified_on_owners(self, token_range: TokenRange, owners: Sequence[str],
                                  listed: list[Entry]) -> list[Entry]:
        """The entries of `listed` that every owner holds with the same content. What an
        owner lacks is handed to it (a copy only we hold, e.g. taken while we were cut off
        and alone, would otherwise never reach its owners: they only pull from owners).
        Any owner down or not answering: nothing is verified (keep our copies)."""
        by_segment: dict[int, list[Entry]] = {}
        for entry in listed:
            by_segment.setdefault(segment_of(study_token(entry[0])), []).append(entry)
        lacked: set[Entry] = set()
        for owner in owners:
            if not self._membership.is_alive(owner):
                return []  # Cannot confirm: keep our copies.
            try:
                theirs = await self._transport.range_digest(owner, token_range, timeout_ms=self._settings.rpc_timeout_ms)
            except PeerError:
                return []
            for segment, entries in by_segment.items():
                if theirs.get(segment) == _digest_of(entries):
                    continue  # The owner holds exactly what we listed there.
                try:
                    their_entries = await self._transport.list_bucket(owner, token_range, segment,
                                                                      timeout_ms=self._settings.rpc_timeout_ms)
                except PeerError:
                    return []
                their_set = {(sop, content) for _study, sop, content in their_entries}
                # A study's correction is verified when the owner's covers ours (it merged it,
                # with later changes: its entry then differs from ours, and always would).
                their_corrections = {study: correction_of_entry(content) for study, sop, content in their_entries
                                     if sop == CORRECTION_SOP and is_correction_entry(content)}
                lacking = [e for e in entries if (e[1], e[2]) not in their_set
                           and not _covered(their_corrections, e)]
                if lacking:
                    final = await self._hand_over(owner, [(study, sop) for study, sop, _content in lacking])
                    # An owner that answered DELETED holds a newer tombstone: its state for that
                    # UID is final, so our (deleted) copy counts as verified and is dropped.
                    lacked.update(e for e in lacking if (e[0], e[1]) not in final)
        return [entry for entry in listed if entry not in lacked]

    async def _hand_over(self, owner: str, lacking: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Give `owner` what it lacks; the (study, sop) it answered DELETED for (a newer tombstone there)."""
        handed = 0
        deleted: set[tuple[str, str]] = set()
        for study_uid, sop_uid in lacking:
            if sop_uid == CORRECTION_SOP:  # The study's correction: its entry names no instance.
                correction = await self._run_blocking(self._store.correction, study_uid)
                if correction is not None:
                    try:
                        await self._transport.correct(owner, correction, timeout_ms=self._settings.rpc_timeout_ms)
                    except PeerError as error:
                        log.info("repair.handover.failed owner=%s error=%s", owner, error)
                        return deleted
                    handed += 1
                continue
            tombstone = await self._run_blocking(self._store.tombstone, study_uid, sop_uid)
            if tombstone is not None:  # A delete only we hold for this owner: it gets the tombstone.
                try:
                    await self._transport.tombstone(owner, [tombstone], scope=None, hint_for="",
                                                    timeout_ms=self._settings.rpc_timeout_ms)
                except PeerError as error:
                    log.info("repair.handover.failed owner=%s error=%s", owner, error)
                    return deleted
                handed += 1
                continue
            stored = await self._run_blocking(self._store.read_stored, study_uid, sop_uid)
            if stored is None:
                continue
            try:
                outcome = (await self._transport.store(owner, stored, hint_for="",
                                                       timeout_ms=self._settings.fetch_timeout_ms)).outcome
            except PeerError as error:
                log.info("repair.handover.failed owner=%s error=%s", owner, error)
                return deleted
            if outcome == StoreOutcome.DELETED:
                deleted.add((study_uid, sop_uid))
                continue
            handed += 1
            await self._throttle(len(stored.blob))
        if handed:
            self.stats.extra["instances_handed_over"] = self.stats.extra.get("instances_handed_over", 0) + handed
            log.info("repair.handover owner=%s instances=%d", owner, handed)
        return deleted


def _covered(corrections: dict[str, Correction], entry: Entry) -> bool:
    """Whether `entry` is a study's correction that the one in `corrections` covers."""
    study_uid, sop_uid, content = entry
    held = corrections.get(study_uid)
    return held is not None and sop_uid == CORRECTION_SOP and is_correction_entry(content) \
        and held.covers(correction_of_entry(content))


def _tombstone_of(entry: Entry) -> Tombstone:
    study_uid, sop_uid, mark = entry
    return Tombstone(study_uid, sop_uid, Version.from_mark(mark))


async def _in_window(items: list[tuple[str, str]], work: Callable[[str, str], Awaitable[None]], window: int) -> None:
    """`work(*item)` for every item, at most `window` at a time; the first error cancels
    the rest and is raised."""
    pending: set[asyncio.Future[None]] = set()
    try:
        for item in items:
            if len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            pending.add(asyncio.ensure_future(work(*item)))
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    finally:
        for task in pending:
            task.cancel()
