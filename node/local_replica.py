"""This node's store as the replication code sees it (the ReplicaStore seam, replication/store_protocol.py)."""

from __future__ import annotations

import json
from typing import Callable, Iterator, Sequence

from pacsnode.node.codec import decompress
from pacsnode.node.ingest import header_attributes
from pacsnode.node.store import PREFIX_HINT, RocksStore, _hint_key, _split_hint
from pacsnode.replication.archive import InstanceLocation
from pacsnode.replication.correction import Correction
from pacsnode.replication.digest import Digest
from pacsnode.replication.hint_index import HintIndex
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes, InstanceRecord, StoreError, StoredInstance, Tombstone
from pacsnode.replication.planning import RangeSet
from pacsnode.replication.query import LocalQuery
from pacsnode.ring.placement import TokenRange
from pacsnode.ring.tokens import study_token


class StoreReplica:
    """Adapts RocksStore to replication.store_protocol.ReplicaStore (so also to the
    coordinator's LocalReplica and the repairer's RepairStore)."""

    def __init__(self, store: RocksStore) -> None:
        self.store = store

    def put_stored(self, stored: StoredInstance, *, hint_for: str = "") -> str:
        return self.store.put_stored(stored, hint_for=hint_for)

    def read_stored(self, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None:
        return self.store.read_stored(study_instance_uid, sop_instance_uid)

    def read_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None:
        value = self.store._db.get(_hint_key(owner, study_instance_uid, sop_instance_uid))
        if value is None:
            return None
        header, blob = _split_hint(value)
        record = InstanceRecord(**header["record"])
        if self.store.deleted(record):
            return None  # A delete held here supersedes this hinted copy.
        return StoredInstance(record=record, attributes=header["attributes"], blob=blob)

    def query_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]:
        return LocalQuery(self.store, query, self.header_reader, study_filter=_in_ranges(ranges)).rows()

    def query_hint_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]:
        """Rows from the instances held here as hints (for owners that could not take them)."""
        held = HintIndex(self.store.hint_records())
        if not len(held):
            return iter(())
        return LocalQuery(held, query, self._hint_header_reader, study_filter=_in_ranges(ranges)).rows()

    def _hint_header_reader(self, study_uid: str, sop_uid: str, keywords: tuple[str, ...]) -> Attributes:
        for owner in self.store.hint_owners():
            stored = self.read_hint(owner, study_uid, sop_uid)
            if stored is not None:
                try:
                    return header_attributes(decompress(stored.blob, sop_uid), keywords)
                except StoreError:
                    return {}
        return {}

    def header_reader(self, study_uid: str, sop_uid: str, keywords: tuple[str, ...]) -> Attributes:
        try:
            return header_attributes(self.store.read_part10(study_uid, sop_uid), keywords)
        except (KeyError, StoreError):
            return {}

    def hint_owners(self) -> dict[str, tuple[int, int]]:
        return self.store.hint_owners()

    def hints(self, owner: str) -> Iterator[StoredInstance]:
        return self.store.hints(owner)

    def delete_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> None:
        self.store.delete_hint(owner, study_instance_uid, sop_instance_uid)

    def delete_study(self, study_instance_uid: str) -> int:
        return self.store.delete_study(study_instance_uid)

    def delete_instances(self, entries: Sequence[tuple[str, str, str]]) -> int:
        return self.store.delete_instances(entries)

    def segment_digests(self, intervals: list[tuple[int, int]]) -> dict[int, Digest]:
        return self.store.segment_digests(intervals)

    def entries(self, low: int, high: int) -> Iterator[tuple[str, str, str]]:
        return self.store.entries(low, high)

    def studies_in(self, low: int, high: int) -> list[str]:
        return self.store.studies_in(low, high)

    def is_empty(self) -> bool:
        return self.store.is_empty()

    def instances(self, study_instance_uid: str) -> Iterator[InstanceRecord]:
        return self.store.instances(study_instance_uid)

    def all_instances(self) -> Iterator[InstanceRecord]:
        return self.store.all_instances()

    def study_locations(self, study_instance_uid: str, instances_max: int) -> list[InstanceLocation] | None:
        return self.store.study_locations(study_instance_uid, instances_max)

    def put_tombstones(self, tombstones: Sequence[Tombstone], *, hint_for: str = "") -> int:
        return self.store.put_tombstones(tombstones, hint_for=hint_for)

    def tombstone(self, study_instance_uid: str, sop_instance_uid: str) -> Tombstone | None:
        return self.store.tombstone(study_instance_uid, sop_instance_uid)

    def tombstones(self, low: int = 0, high: int = (1 << 64) - 1) -> Iterator[Tombstone]:
        return self.store.tombstones(low, high)

    def deleted(self, record: InstanceRecord) -> bool:
        return self.store.deleted(record)

    def tombstone_hint_owners(self) -> list[str]:
        return self.store.tombstone_hint_owners()

    def tombstone_hints(self, owner: str) -> Iterator[Tombstone]:
        return self.store.tombstone_hints(owner)

    def delete_tombstone_hints(self, owner: str, tombstones: Sequence[Tombstone]) -> None:
        self.store.delete_tombstone_hints(owner, tombstones)

    def purge_tombstones(self, tombstones: Sequence[Tombstone]) -> int:
        return self.store.purge_tombstones(tombstones)

    def put_correction(self, correction: Correction, *, hint_for: str = "") -> bool:
        return self.store.put_correction(correction, hint_for=hint_for)

    def correction_hint_owners(self) -> list[str]:
        return self.store.correction_hint_owners()

    def correction_hints(self, owner: str) -> Iterator[Correction]:
        return self.store.correction_hints(owner)

    def delete_correction_hints(self, owner: str, corrections: Sequence[Correction]) -> None:
        self.store.delete_correction_hints(owner, corrections)

    def correction(self, study_instance_uid: str) -> Correction | None:
        return self.store.correction(study_instance_uid)

    def corrections(self, low: int = 0, high: int = (1 << 64) - 1) -> Iterator[Correction]:
        return self.store.corrections(low, high)


def _in_ranges(ranges: Sequence[TokenRange] | None) -> Callable[[str], bool] | None:
    """A study filter: its token is in `ranges` (None: every study)."""
    if ranges is None:
        return None
    range_set = RangeSet(ranges)
    return lambda uid: study_token(uid) in range_set


def decode(stored: StoredInstance) -> bytes:
    """Decompress and verify a stored instance (CorruptBlob when its checksum fails)."""
    return decompress(stored.blob, stored.sop_instance_uid)


__all__ = ["StoreReplica", "decode", "PREFIX_HINT", "json"]
