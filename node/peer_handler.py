"""PeerHandler: what a node does with a request from a peer, whatever carried it.

node/peer_server.py is the gRPC adapter over it (envelopes, chunking, status codes) and
sim/cluster.py the simulator's network adapter; both run this code, so the simulator's
verdicts are about the node's own peer-request handling. Store work blocks (RocksDB):
it runs through the injected `run_blocking` (a thread on the node, inline on the
simulator's virtual loop) and writes through `run_write` (the same on the node; the
simulator adds its disk latency there).

Failures are typed: a store the node will not take raises PeerRefused with a
RefusalReason; a Query over ranges this node is still filling raises RangesPending.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Awaitable, Callable, Iterator, Protocol, Sequence

from pacsnode.node import write_trace
from pacsnode.node.codec import check_payload
from pacsnode.replication.correction import Correction
from pacsnode.replication.delete_coordinator import DeleteScope, apply_tombstones
from pacsnode.replication.digest import Digest, segment_bounds
from pacsnode.replication.hlc import Version
from pacsnode.replication.matching import Query
from pacsnode.replication.model import (
    Attributes,
    CorruptBlob,
    InstanceRecord,
    StoredInstance,
    StoreError,
    StoreFull,
    Tombstone,
)
from pacsnode.replication.ownership import refuses_not_owner
from pacsnode.replication.repair import intervals_of
from pacsnode.replication.store_protocol import Entry, ReplicaStore
from pacsnode.replication.transport import PeerRefused, RefusalReason
from pacsnode.ring.placement import Replication, Ring, TokenRange

log = logging.getLogger(__name__)

RunBlocking = Callable[..., Awaitable[Any]]


class RingView(Protocol):
    def ring(self) -> Ring: ...


class PendingRanges(Protocol):
    def is_pending(self, ranges: Sequence[TokenRange]) -> bool: ...


class RangesPending(Exception):
    """This node is still filling (some of) the asked ranges: the caller asks another replica."""


class PeerHandler:
    """The peer-request logic of one node: Store, Fetch, Query, ListStudy, Tombstone, RangeDigest,
    ListBucket."""

    def __init__(self, node_id: str, store: ReplicaStore, membership: RingView, pending: PendingRanges, *,
                 replication_factor: Replication, run_blocking: RunBlocking, run_write: RunBlocking | None = None) -> None:
        self.node_id = node_id
        self.store = store
        self.membership = membership
        self.pending = pending
        self.replication_factor = replication_factor
        self._run_blocking = run_blocking
        self._run_write = run_write or run_blocking
        self.not_owner_refusals = 0

    async def store_instance(self, stored: StoredInstance, *, hint_for: str, sender_id: str,
                             sender_ring_version: int, crc32: int | None = None) -> str:
        """Store a copy (or a hint for `hint_for`); the StoreOutcome value once it is durable.
        Raises PeerRefused (NOT_OWNER, INVALID, FULL, ERROR) and stores nothing then."""
        record = stored.record
        if refuses_not_owner(self.membership.ring(), self.node_id, record.study_instance_uid, hint_for=hint_for,
                             sender_ring_version=sender_ring_version, replication_factor=self.replication_factor):
            self.not_owner_refusals += 1
            log.info("peer.store.not_owner sop_instance_uid=%s sender=%s", record.sop_instance_uid, sender_id[:64])
            raise PeerRefused("not an owner of this study under this node's ring", RefusalReason.NOT_OWNER)
        try:
            # One thread hop for the check and the write (each hop costs a thread wake-up
            # and a wait for the GIL, on the path of every acknowledged write).
            outcome: str = await self._run_write(self._checked_put, stored, hint_for, crc32)
        except CorruptBlob as error:
            log.warning("peer.store.corrupt sop_instance_uid=%s error=%s", record.sop_instance_uid, error)
            raise PeerRefused("payload failed its checksum", RefusalReason.INVALID) from None
        except StoreFull as error:
            raise PeerRefused(str(error), RefusalReason.FULL) from None
        except StoreError as error:
            raise PeerRefused(str(error), RefusalReason.ERROR) from None
        return outcome

    def _checked_put(self, stored: StoredInstance, hint_for: str, crc32: int | None) -> str:
        """Never acknowledge a copy that would not read back: with the sender's CRC-32 the
        compressed bytes are checked as they are (zstd's own checksum is checked on every
        read); without it (an older sender) by decompressing them. Then the durable write."""
        record = stored.record
        check_payload(stored.blob, record.size_bytes + record.dataset_offset, crc32, record.sop_instance_uid)
        write_trace.mark("peer.checked", record.sop_instance_uid)
        return self.store.put_stored(stored, hint_for=hint_for)

    async def tombstone_version(self, study_instance_uid: str, sop_instance_uid: str) -> Version | None:
        """The version of the tombstone held for this SOP Instance UID (after a DELETED store:
        the sender observes it, so what it stamps next is newer)."""
        tombstone: Tombstone | None = await self._run_blocking(self.store.tombstone, study_instance_uid,
                                                               sop_instance_uid)
        return tombstone.version if tombstone is not None else None

    async def apply_tombstones(self, tombstones: Sequence[Tombstone], *, scope: DeleteScope | None,
                               hint_for: str) -> int:
        """A Tombstone request: the listed tombstones (and, as an owner with a `scope`, one for
        every older instance held in it), or hints for `hint_for`; durable when this returns.
        How many instances it removed here. Raises PeerRefused (ERROR) when it could not."""
        try:
            removed: int = await self._run_write(apply_tombstones, self.store, list(tombstones), scope=scope,
                                                 hint_for=hint_for)
        except StoreError as error:
            raise PeerRefused(str(error), RefusalReason.ERROR) from None
        return removed

    async def apply_correction(self, correction: Correction, *, hint_for: str = "") -> bool:
        """A Correct request: merge the study's correction into the one held (with
        `hint_for`, into the hint held for that owner; durable when this returns); True if it
        changed anything. Raises PeerRefused (ERROR) when it could not."""
        try:
            changed: bool = await self._run_write(self.store.put_correction, correction, hint_for=hint_for)
        except StoreError as error:
            raise PeerRefused(str(error), RefusalReason.ERROR) from None
        return changed

    async def fetch(self, study_instance_uid: str, sop_instance_uid: str, *,
                    include_hints: bool) -> StoredInstance | None:
        """The instance as held here (with `include_hints`, also as a hint for any owner)."""
        found: StoredInstance | None = await self._run_blocking(self.store.read_stored, study_instance_uid,
                                                                sop_instance_uid)
        if found is None and include_hints:
            owners = await self._run_blocking(self.store.hint_owners)
            for owner in owners:
                found = await self._run_blocking(self.store.read_hint, owner, study_instance_uid, sop_instance_uid)
                if found is not None:
                    break
        return found

    def query_rows(self, query: Query, ranges: Sequence[TokenRange] | None, *,
                   include_hints: bool) -> Iterator[Attributes]:
        """Matching rows, lazily (the caller reads them in batches off the loop); with
        `include_hints`, the rows of the hints held here follow. RangesPending when this
        node is still filling some of `ranges`."""
        if ranges is not None and self.pending.is_pending(ranges):
            raise RangesPending("ranges still being filled here")
        sources = [self.store.query_rows(query, ranges)]
        if include_hints:
            sources.append(self.store.query_hint_rows(query, ranges))
        return itertools.chain.from_iterable(sources)

    async def list_study(self, study_instance_uid: str) -> list[InstanceRecord]:
        records: list[InstanceRecord] = await self._run_blocking(self._instances, study_instance_uid)
        return records

    def _instances(self, study_instance_uid: str) -> list[InstanceRecord]:
        return list(self.store.instances(study_instance_uid))

    async def range_digest(self, token_range: TokenRange) -> dict[int, Digest]:
        """Segment -> digest of what is held in the range, by segment."""
        digests: dict[int, Digest] = await self._run_blocking(self.store.segment_digests, intervals_of(token_range))
        return dict(sorted(digests.items()))

    async def list_bucket(self, token_range: TokenRange, segment: int) -> list[Entry]:
        """The entries held in one segment of the range."""
        seg_low, seg_high = segment_bounds(int(segment))
        entries: list[Entry] = []
        for low, high in intervals_of(token_range):
            low, high = max(low, seg_low), min(high, seg_high)
            if low <= high:
                entries.extend(await self._run_blocking(self._entries, low, high))
        return entries

    def _entries(self, low: int, high: int) -> list[Entry]:
        return list(self.store.entries(low, high))
