"""NonDurableStore: the simulator's in-memory store, with RocksStore's semantics.

It implements what the real code asks of node/store.py's `RocksStore` (through
node/local_replica.py's `StoreReplica`): replication/store_protocol.py's `ReplicaStore`
(which covers the coordinator's `LocalReplica` and the repairer's `RepairStore`), and
the `IndexReader` that replication/query.py's `LocalQuery` runs C-FIND against. The rules are RocksStore's, one for one:

- an instance is keyed by (study token, study uid, sop uid), so a token range is one
  slice of a sorted key list, as it is one contiguous RocksDB scan;
- same SOP Instance UID and same content hash again: DUPLICATE, nothing written;
  different content: CONFLICT, settled by one rule on every replica whatever the order
  the copies arrive in: the copy with the lowest version (stored_at_ms, the ingest time
  at the coordinator, then content hash) is the instance, the other a conflict record;
- hints are full copies keyed by (intended owner, key); a hint with other content for
  the same key replaces the old one (as RocksStore's put of the same key does);
- the digest of every ring segment (replication/digest.py) is kept up to date on every
  put and delete, and `segment_digests` answers from them plus a scan of the segments a
  range cuts through, exactly as RocksStore does;
- study and series records and the study-level index follow the same rules (records
  made from the first instance's attributes, counters bumped per instance).
tests/unit/test_sim_store.py runs the same operations against both stores and compares.

Durability model (say it plainly, since the simulator's verdicts rest on it): a put is
durable the moment it returns, as RocksStore's synced WriteBatch is. The store keeps no
unsynced state, so a crash of the node loses nothing that a put returned for. What a
crash does lose is whatever had not returned yet: the simulated node applies a write
only when its (simulated) disk latency has elapsed, and a node that crashes before
that never applies it and never answers; a hint replay that the owner acknowledged but
whose `delete_hint` had not run yet leaves the hint in place (it is replayed again, a
harmless duplicate). Disk wipe is a separate fault: the store is replaced by an empty
one. Records are copied in and out, so no two stores ever share a mutable object.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pacsnode.replication.digest import SEGMENT_COUNT, Digest, entry_hash, segment_bounds, segment_of
from pacsnode.replication.hint_index import HintIndex
from pacsnode.replication.matching import Query
from pacsnode.replication.model import (
    INSTANCE_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    Attributes,
    InstanceRecord,
    SeriesRecord,
    StoredInstance,
    StoreFull,
    StoreOutcome,
    StudyRecord,
    Tombstone,
)
from pacsnode.replication.correction import CORRECTION_SOP, Correction, apply, correction_of_entry, is_correction_entry
from pacsnode.replication.hlc import is_mark
from pacsnode.replication.planning import RangeSet
from pacsnode.replication.query import LocalQuery
from pacsnode.ring.placement import TokenRange
from pacsnode.ring.tokens import study_token

Key = tuple[int, str, str]  # (study token, study uid, sop uid): RocksStore's key order.

# RocksStore's INDEXED_STUDY_KEYWORDS (node/store.py): study-level keys with a sorted index.
INDEXED_STUDY_KEYWORDS: tuple[str, ...] = ("PatientID", "PatientName", "AccessionNumber", "StudyDate",
                                           "PatientBirthDate")


def index_value(keyword: str, value: str) -> str:
    """As node/store.py keeps an index value: PN upper-cased, dates without dots."""
    if keyword == "PatientName":
        return value.upper()
    if keyword in ("StudyDate", "PatientBirthDate"):
        return value.replace(".", "")
    return value


@dataclass(frozen=True)
class StoreStats:
    instances: int
    bytes_received: int
    bytes_stored: int
    studies: int
    conflicts: int
    hints: int = 0
    hint_bytes: int = 0
    tombstones: int = 0


class StoreListener(Protocol):
    """Told of every primary copy added or removed (the simulator counts replicas with it)."""

    def instance_added(self, node_id: str, record: InstanceRecord, size_bytes: int) -> None: ...
    def instance_removed(self, node_id: str, study_instance_uid: str, sop_instance_uid: str) -> None: ...


def _copy_record(record: InstanceRecord) -> InstanceRecord:
    return dataclasses.replace(record, attributes=_copy_attributes(record.attributes))


def _copy_attributes(attributes: Attributes) -> Attributes:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in attributes.items()}


def _copy_study(study: StudyRecord) -> StudyRecord:
    return dataclasses.replace(study, attributes=_copy_attributes(study.attributes), modalities=list(study.modalities),
                               sop_classes=list(study.sop_classes))


def _copy_series(series: SeriesRecord) -> SeriesRecord:
    return dataclasses.replace(series, attributes=_copy_attributes(series.attributes))


def _pick(attributes: Attributes, level: str) -> Attributes:
    keywords = {
        "study": PATIENT_KEYWORDS + STUDY_KEYWORDS + ("SpecificCharacterSet",),
        "series": SERIES_KEYWORDS,
        "instance": INSTANCE_KEYWORDS,
    }[level]
    return {k: _copy_value(attributes[k]) for k in keywords if k in attributes}


def _copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [v for v in value if v]
    return [value] if value else []


@dataclass
class _Hint:
    record: InstanceRecord
    attributes: Attributes
    blob: bytes


class NonDurableStore:
    """One node's store, in memory (see the module docstring)."""

    def __init__(self, node_id: str = "", *, capacity_bytes: int | None = None,
                 listener: StoreListener | None = None) -> None:
        self.node_id = node_id
        self.capacity_bytes = capacity_bytes  # None: unlimited. Else puts past it raise StoreFull.
        self.listener = listener
        self._keys: list[Key] = []  # Sorted.
        self._meta: dict[Key, InstanceRecord] = {}
        self._blobs: dict[Key, bytes] = {}
        self._study_keys: list[tuple[int, str]] = []  # Sorted (token, study uid).
        self._studies: dict[str, StudyRecord] = {}
        self._series: dict[str, dict[str, SeriesRecord]] = {}
        self._conflicts: dict[tuple[str, str], dict[str, bytes]] = {}
        self._digests: dict[int, Digest] = {}
        self._segments: list[int] = []  # Sorted segments that ever had a digest.
        self._hints: dict[str, dict[Key, _Hint]] = {}
        self._tombstone_keys: list[Key] = []  # Sorted.
        self._tombstones: dict[Key, Tombstone] = {}
        self._tombstone_hints: dict[str, dict[Key, Tombstone]] = {}
        self._correction_keys: list[tuple[int, str]] = []  # Sorted (token, study uid).
        self._corrections: dict[str, Correction] = {}
        self._correction_hints: dict[str, dict[tuple[int, str], Correction]] = {}
        self._counters = dict.fromkeys(("instances", "bytes_received", "bytes_stored", "studies", "conflicts",
                                        "hints", "hint_bytes", "tombstones"), 0)
        self.puts = 0  # Every put that wrote something (instances, conflicts, hints).

    # ----------------------------------------------------------------- statistics
    def statistics(self) -> StoreStats:
        return StoreStats(**self._counters)

    def is_empty(self) -> bool:
        return self._counters["instances"] == 0

    def bytes_stored(self) -> int:
        return self._counters["bytes_stored"]

    def keys(self) -> list[Key]:
        return list(self._keys)

    def holds(self, study_instance_uid: str, sop_instance_uid: str) -> bool:
        return (study_token(study_instance_uid), study_instance_uid, sop_instance_uid) in self._meta

    def content_of(self, study_instance_uid: str, sop_instance_uid: str) -> str | None:
        record = self._meta.get((study_token(study_instance_uid), study_instance_uid, sop_instance_uid))
        return None if record is None else record.content_hash

    # ----------------------------------------------------------------- writes
    def _check_capacity(self, size_bytes: int) -> None:
        if self.capacity_bytes is None:
            return
        used = self._counters["bytes_stored"] + self._counters["hint_bytes"]
        if used + size_bytes > self.capacity_bytes:
            raise StoreFull(f"store of {self.node_id} is full: {used} + {size_bytes} > {self.capacity_bytes} bytes")

    def put_stored(self, stored: StoredInstance, *, hint_for: str = "") -> str:
        """RocksStore.put_stored: durable on return; DUPLICATE / CONFLICT as it decides them."""
        record = stored.record
        key = (study_token(record.study_instance_uid), record.study_instance_uid, record.sop_instance_uid)
        if not hint_for:
            existing = self._meta.get(key)
            if existing is not None and existing.content_hash == record.content_hash:
                return StoreOutcome.DUPLICATE
        self._check_capacity(len(stored.blob) + 4096)
        if hint_for:
            return self._put_hint(hint_for, key, stored)
        existing = self._meta.get(key)
        if existing is not None:  # Other content (same content returned above).
            return self._resolve_conflict(key, stored, existing)
        tombstone = self._tombstones.get(key)
        if tombstone is not None:
            if tombstone.version >= record.version:
                return StoreOutcome.DELETED  # Deleted after this write: the delete wins.
            self._drop_tombstone(key)  # Stored after the delete: a new instance.
        self.puts += 1
        bisect.insort(self._keys, key)
        self._meta[key] = _copy_record(record)
        self._blobs[key] = stored.blob
        segment = segment_of(key[0])
        if segment not in self._digests:
            bisect.insort(self._segments, segment)
        self._digests[segment] = self._digests.get(segment, Digest()).add(
            entry_hash(record.sop_instance_uid, record.content_hash))
        new_study = self._update_series_and_study(stored, key[0])
        self._counters["instances"] += 1
        self._counters["bytes_received"] += record.size_bytes
        self._counters["bytes_stored"] += len(stored.blob)
        self._counters["studies"] += 1 if new_study else 0
        if self.listener is not None:
            self.listener.instance_added(self.node_id, record, len(stored.blob))
        return StoreOutcome.STORED

    def _resolve_conflict(self, key: Key, stored: StoredInstance, current: InstanceRecord) -> str:
        """RocksStore._resolve_conflict: the lowest (version, content hash) is the instance."""
        record = stored.record
        aside = self._conflicts.setdefault((record.study_instance_uid, record.sop_instance_uid), {})
        if (record.version, record.content_hash) < (current.version, current.content_hash):
            old_blob = self._blobs[key]
            if current.content_hash not in aside:
                aside[current.content_hash] = old_blob
                self._counters["conflicts"] += 1
            if aside.pop(record.content_hash, None) is not None:
                self._counters["conflicts"] -= 1
            self._blobs[key] = stored.blob
            self._meta[key] = _copy_record(record)
            segment = segment_of(key[0])
            self._digests[segment] = self._digests[segment].remove(
                entry_hash(record.sop_instance_uid, current.content_hash)).add(
                entry_hash(record.sop_instance_uid, record.content_hash))
            self._counters["bytes_stored"] += len(stored.blob) - len(old_blob)
            self._counters["bytes_received"] += record.size_bytes - current.size_bytes
            self.puts += 1
            return StoreOutcome.CONFLICT
        if record.content_hash not in aside:
            aside[record.content_hash] = stored.blob
            self._counters["conflicts"] += 1
            self.puts += 1
        return StoreOutcome.CONFLICT

    def _put_hint(self, owner: str, key: Key, stored: StoredInstance) -> str:
        held = self._hints.setdefault(owner, {})
        existing = held.get(key)
        if existing is not None and existing.record.content_hash == stored.content_hash:
            return StoreOutcome.DUPLICATE
        held[key] = _Hint(_copy_record(stored.record), _copy_attributes(stored.attributes), stored.blob)
        self.puts += 1
        if existing is None:
            self._counters["hints"] += 1
            self._counters["hint_bytes"] += len(stored.blob)
        return StoreOutcome.STORED

    def _update_series_and_study(self, stored: StoredInstance, token: int) -> bool:
        record = stored.record
        study_series = self._series.setdefault(record.study_instance_uid, {})
        series = study_series.get(record.series_instance_uid)
        new_series = series is None
        if series is None:
            series = study_series[record.series_instance_uid] = SeriesRecord(
                study_instance_uid=record.study_instance_uid,
                series_instance_uid=record.series_instance_uid,
                attributes=_pick(stored.attributes, "series"),
                first_sop_instance_uid=record.sop_instance_uid,
            )
        series.instance_count += 1
        study = self._studies.get(record.study_instance_uid)
        new_study = study is None
        if study is None:
            study = self._studies[record.study_instance_uid] = StudyRecord(
                study_instance_uid=record.study_instance_uid,
                attributes=_pick(stored.attributes, "study"),
                first_sop_instance_uid=record.sop_instance_uid,
            )
            correction = self._corrections.get(record.study_instance_uid)
            if correction is not None:  # Corrected before this instance came: it applies too.
                study.attributes = apply(study.attributes, correction)
                study.correction = correction.dumps()
            bisect.insort(self._study_keys, (token, record.study_instance_uid))
        study.instance_count += 1
        study.series_count += 1 if new_series else 0
        study.size_bytes += record.size_bytes
        study.updated_at_ms = record.stored_at_ms
        modality = stored.attributes.get("Modality")
        if isinstance(modality, str) and modality and modality not in study.modalities:
            study.modalities.append(modality)
        if record.sop_class_uid not in study.sop_classes:
            study.sop_classes.append(record.sop_class_uid)
        return new_study

    def delete_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> None:
        held = self._hints.get(owner)
        if not held:
            return
        hint = held.pop((study_token(study_instance_uid), study_instance_uid, sop_instance_uid), None)
        if hint is None:
            return
        if not held:
            del self._hints[owner]
        self._counters["hints"] -= 1
        self._counters["hint_bytes"] -= len(hint.blob)

    def delete_study(self, study_instance_uid: str) -> int:
        """Remove a whole study (the drop rule allowed it); hints are kept. Returns instances removed."""
        study = self._studies.pop(study_instance_uid, None)
        if study is None:
            return 0
        token = study_token(study_instance_uid)
        self._study_keys.remove((token, study_instance_uid))
        low = bisect.bisect_left(self._keys, (token, study_instance_uid))
        high = bisect.bisect_left(self._keys, (token, study_instance_uid + "\x00"))
        removed = self._keys[low:high]
        del self._keys[low:high]
        segment = segment_of(token)
        digest = self._digests.get(segment, Digest())
        for key in removed:
            record = self._meta.pop(key)
            blob = self._blobs.pop(key)
            digest = digest.remove(entry_hash(record.sop_instance_uid, record.content_hash))
            self._counters["bytes_stored"] -= len(blob)
            self._counters["bytes_received"] -= record.size_bytes
            self._counters["instances"] -= 1
            if self.listener is not None:
                self.listener.instance_removed(self.node_id, study_instance_uid, record.sop_instance_uid)
        self._digests[segment] = digest
        self._series.pop(study_instance_uid, None)
        if study_instance_uid in self._corrections:
            self._drop_correction(study_instance_uid)
        for conflict_key in [k for k in self._conflicts if k[0] == study_instance_uid]:
            del self._conflicts[conflict_key]
        self._counters["studies"] -= 1
        self.puts += 1
        return len(removed)

    def delete_instances(self, entries: Sequence[tuple[str, str, str]]) -> int:
        """RocksStore.delete_instances: remove exactly these (study uid, sop uid, content hash),
        each only if still held with that content (a version mark: that tombstone);
        records, digests and counters follow."""
        removed = 0
        changed = False
        for study_uid, sop_uid, content_hash in entries:
            token = study_token(study_uid)
            key = (token, study_uid, sop_uid)
            if is_correction_entry(content_hash):
                held = self._corrections.get(study_uid)
                if held is not None and held.entry_content() == content_hash:
                    self._drop_correction(study_uid)
                    changed = True
                continue
            if is_mark(content_hash):
                tombstone = self._tombstones.get(key)
                if tombstone is not None and tombstone.version.mark() == content_hash:
                    self._drop_tombstone(key)
                    changed = True
                continue
            record = self._meta.get(key)
            if record is None or record.content_hash != content_hash:
                continue
            self._remove_instance(key, record)
            removed += 1
        if removed or changed:
            self.puts += 1
        return removed

    def _remove_instance(self, key: Key, record: InstanceRecord) -> None:
        token, study_uid, sop_uid = key
        del self._meta[key]
        blob = self._blobs.pop(key)
        del self._keys[bisect.bisect_left(self._keys, key)]
        segment = segment_of(token)
        self._digests[segment] = self._digests.get(segment, Digest()).remove(
            entry_hash(sop_uid, record.content_hash))
        self._counters["bytes_stored"] -= len(blob)
        self._counters["bytes_received"] -= record.size_bytes
        self._counters["instances"] -= 1
        aside = self._conflicts.pop((study_uid, sop_uid), None)
        if aside:
            self._counters["conflicts"] -= len(aside)
        series_gone = 0
        study_series = self._series.get(study_uid, {})
        series = study_series.get(record.series_instance_uid)
        if series is not None:
            series.instance_count -= 1
            if series.instance_count <= 0:
                del study_series[record.series_instance_uid]
                series_gone = 1
        study = self._studies.get(study_uid)
        if study is not None:
            study.instance_count -= 1
            study.series_count -= series_gone
            study.size_bytes -= record.size_bytes
            if study.instance_count <= 0:
                del self._studies[study_uid]
                self._study_keys.remove((token, study_uid))
                self._series.pop(study_uid, None)
                self._counters["studies"] -= 1
        if self.listener is not None:
            self.listener.instance_removed(self.node_id, study_uid, sop_uid)

    # ----------------------------------------------------------------- tombstones
    def put_tombstones(self, tombstones: Sequence[Tombstone], *, hint_for: str = "") -> int:
        """RocksStore.put_tombstones: older instances go, the tombstone stays in the digest;
        a newer instance stays; with `hint_for`, kept as hints for that owner."""
        removed = 0
        for tombstone in tombstones:
            key = (study_token(tombstone.study_instance_uid), tombstone.study_instance_uid,
                   tombstone.sop_instance_uid)
            if hint_for:
                held = self._tombstone_hints.setdefault(hint_for, {})
                if key not in held or held[key].version < tombstone.version:
                    held[key] = tombstone
                    self.puts += 1
                continue
            existing = self._tombstones.get(key)
            if existing is not None and existing.version >= tombstone.version:
                continue
            record = self._meta.get(key)
            if record is not None:
                if record.version > tombstone.version:
                    continue
                self._remove_instance(key, record)
                removed += 1
            if existing is not None:
                self._drop_tombstone(key)
            bisect.insort(self._tombstone_keys, key)
            self._tombstones[key] = tombstone
            segment = segment_of(key[0])
            if segment not in self._digests:
                bisect.insort(self._segments, segment)
            self._digests[segment] = self._digests.get(segment, Digest()).add(
                entry_hash(tombstone.sop_instance_uid, tombstone.version.mark()))
            self._counters["tombstones"] += 1
            self.puts += 1
        return removed

    def _drop_tombstone(self, key: Key) -> None:
        tombstone = self._tombstones.pop(key)
        del self._tombstone_keys[bisect.bisect_left(self._tombstone_keys, key)]
        segment = segment_of(key[0])
        self._digests[segment] = self._digests[segment].remove(
            entry_hash(tombstone.sop_instance_uid, tombstone.version.mark()))
        self._counters["tombstones"] -= 1

    # ----------------------------------------------------------------- corrections
    def put_correction(self, correction: Correction, *, hint_for: str = "") -> bool:
        """RocksStore.put_correction: merged into the one held (newer version wins per
        keyword), applied to the study record; True if anything changed. With `hint_for`,
        merged into the hint held for that owner."""
        study_uid = correction.study_instance_uid
        token = study_token(study_uid)
        if hint_for:
            hints = self._correction_hints.setdefault(hint_for, {})
            was = hints.get((token, study_uid))
            now = was.merge(correction) if was is not None else correction
            if was is not None and now.fields == dict(was.fields):
                return False
            hints[(token, study_uid)] = now
            self.puts += 1
            return True
        held = self._corrections.get(study_uid)
        merged = held.merge(correction) if held is not None else correction
        if held is not None and merged.fields == dict(held.fields):
            return False
        segment = segment_of(token)
        if segment not in self._digests:
            bisect.insort(self._segments, segment)
        digest = self._digests.get(segment, Digest())
        if held is not None:
            digest = digest.remove(entry_hash(CORRECTION_SOP, held.entry_content()))
        else:
            bisect.insort(self._correction_keys, (token, study_uid))
        self._digests[segment] = digest.add(entry_hash(CORRECTION_SOP, merged.entry_content()))
        self._corrections[study_uid] = merged
        study = self._studies.get(study_uid)
        if study is not None:
            study.attributes = apply(study.attributes, merged)
            study.correction = merged.dumps()
        self.puts += 1
        return True

    def _drop_correction(self, study_uid: str) -> None:
        correction = self._corrections.pop(study_uid)
        token = study_token(study_uid)
        del self._correction_keys[bisect.bisect_left(self._correction_keys, (token, study_uid))]
        segment = segment_of(token)
        self._digests[segment] = self._digests[segment].remove(entry_hash(CORRECTION_SOP, correction.entry_content()))

    def correction(self, study_instance_uid: str) -> Correction | None:
        return self._corrections.get(study_instance_uid)

    def corrections(self, low: int = 0, high: int = (1 << 64) - 1) -> Iterator[Correction]:
        start = bisect.bisect_left(self._correction_keys, (low,))
        stop = bisect.bisect_left(self._correction_keys, (high + 1,))
        for _token, uid in self._correction_keys[start:stop]:
            yield self._corrections[uid]

    def correction_hint_owners(self) -> list[str]:
        return sorted(owner for owner, held in self._correction_hints.items() if held)

    def correction_hints(self, owner: str) -> Iterator[Correction]:
        held = self._correction_hints.get(owner, {})
        for key in sorted(held):
            yield held[key]

    def delete_correction_hints(self, owner: str, corrections: Sequence[Correction]) -> None:
        held = self._correction_hints.get(owner)
        if not held:
            return
        for correction in corrections:
            key = (study_token(correction.study_instance_uid), correction.study_instance_uid)
            if key in held and held[key].fields == dict(correction.fields):
                del held[key]
        if not held:
            del self._correction_hints[owner]

    def tombstone(self, study_instance_uid: str, sop_instance_uid: str) -> Tombstone | None:
        return self._tombstones.get((study_token(study_instance_uid), study_instance_uid, sop_instance_uid))

    def tombstones(self, low: int = 0, high: int = (1 << 64) - 1) -> Iterator[Tombstone]:
        start = bisect.bisect_left(self._tombstone_keys, (low,))
        stop = bisect.bisect_left(self._tombstone_keys, (high + 1,))
        for key in self._tombstone_keys[start:stop]:
            yield self._tombstones[key]

    def deleted(self, record: InstanceRecord) -> bool:
        tombstone = self.tombstone(record.study_instance_uid, record.sop_instance_uid)
        return tombstone is not None and tombstone.version >= record.version

    def tombstone_hint_owners(self) -> list[str]:
        return sorted(owner for owner, held in self._tombstone_hints.items() if held)

    def tombstone_hints(self, owner: str) -> Iterator[Tombstone]:
        held = self._tombstone_hints.get(owner, {})
        for key in sorted(held):
            yield held[key]

    def delete_tombstone_hints(self, owner: str, tombstones: Sequence[Tombstone]) -> None:
        held = self._tombstone_hints.get(owner)
        if not held:
            return
        for tombstone in tombstones:
            key = (study_token(tombstone.study_instance_uid), tombstone.study_instance_uid,
                   tombstone.sop_instance_uid)
            if key in held and held[key].version == tombstone.version:
                del held[key]
        if not held:
            del self._tombstone_hints[owner]

    def purge_tombstones(self, tombstones: Sequence[Tombstone]) -> int:
        purged = 0
        for tombstone in tombstones:
            key = (study_token(tombstone.study_instance_uid), tombstone.study_instance_uid,
                   tombstone.sop_instance_uid)
            held = self._tombstones.get(key)
            if held is not None and held.version == tombstone.version:
                self._drop_tombstone(key)
                purged += 1
        return purged

    # ----------------------------------------------------------------- ranges (RepairStore)
    def _slice(self, low: int, high: int) -> list[Key]:
        start = bisect.bisect_left(self._keys, (low,))
        stop = bisect.bisect_left(self._keys, (high + 1,))
        return self._keys[start:stop]

    def entries(self, low: int, high: int) -> Iterator[tuple[str, str, str]]:
        """RocksStore.entries: every instance with low <= token <= high, then every tombstone."""
        for key in self._slice(low, high):
            yield key[1], key[2], self._meta[key].content_hash
        for tombstone in self.tombstones(low, high):
            yield tombstone.study_instance_uid, tombstone.sop_instance_uid, tombstone.version.mark()
        for correction in self.corrections(low, high):
            yield correction.study_instance_uid, CORRECTION_SOP, correction.entry_content()

    def segment_digests(self, intervals: list[tuple[int, int]]) -> dict[int, Digest]:
        """RocksStore.segment_digests: kept digests for whole segments, a scan for cut ones."""
        result: dict[int, Digest] = {}
        for low, high in intervals:
            first, last = segment_of(low), segment_of(high)
            for segment in (first, last) if first != last else (first,):
                seg_low, seg_high = segment_bounds(segment)
                if low <= seg_low and seg_high <= high:
                    continue
                held = self._digests.get(segment)
                if held is None or not held.count:
                    continue  # Nothing in the segment, so nothing in the cut part: no scan.
                digest = Digest()
                for _study, sop, content_hash in self.entries(max(low, seg_low), min(high, seg_high)):
                    digest = digest.add(entry_hash(sop, content_hash))
                result[segment] = result.get(segment, Digest()).combine(digest)
            full_low = first if low <= segment_bounds(first)[0] else first + 1
            full_high = last if segment_bounds(last)[1] <= high else last - 1
            if full_low > full_high:
                continue
            start = bisect.bisect_left(self._segments, full_low)
            stop = bisect.bisect_right(self._segments, min(full_high, SEGMENT_COUNT - 1))
            for segment in self._segments[start:stop]:
                digest = self._digests[segment]
                if digest.count:
                    result[segment] = result.get(segment, Digest()).combine(digest)
        return {segment: digest for segment, digest in result.items() if digest.count or digest.xor}

    def studies_in(self, low: int, high: int) -> list[str]:
        start = bisect.bisect_left(self._study_keys, (low,))
        stop = bisect.bisect_left(self._study_keys, (high + 1,))
        return [uid for _token, uid in self._study_keys[start:stop]]

    # ----------------------------------------------------------------- reads (LocalReplica)
    def read_stored(self, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None:
        key = (study_token(study_instance_uid), study_instance_uid, sop_instance_uid)
        record = self._meta.get(key)
        if record is None:
            return None
        attributes: Attributes = {}
        study = self._studies.get(study_instance_uid)
        if study is not None:
            attributes.update(_copy_attributes(study.attributes))
        series = self._series.get(study_instance_uid, {}).get(record.series_instance_uid)
        if series is not None:
            attributes.update(_copy_attributes(series.attributes))
        attributes.update(_copy_attributes(record.attributes))
        return StoredInstance(record=_copy_record(record), attributes=attributes, blob=self._blobs[key])

    def read_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None:
        hint = self._hints.get(owner, {}).get((study_token(study_instance_uid), study_instance_uid,
                                               sop_instance_uid))
        if hint is None or self.deleted(hint.record):
            return None
        return StoredInstance(record=_copy_record(hint.record), attributes=_copy_attributes(hint.attributes),
                              blob=hint.blob)

    def hint_owners(self) -> dict[str, tuple[int, int]]:
        return {owner: (len(held), sum(len(h.blob) for h in held.values()))
                for owner, held in sorted(self._hints.items()) if held}

    def hints(self, owner: str) -> Iterator[StoredInstance]:
        held = self._hints.get(owner, {})
        for key in sorted(held):
            hint = held[key]
            yield StoredInstance(record=_copy_record(hint.record), attributes=_copy_attributes(hint.attributes),
                                 blob=hint.blob)

    def all_hints(self) -> Iterator[tuple[str, InstanceRecord]]:
        for owner, held in sorted(self._hints.items()):
            for key in sorted(held):
                yield owner, held[key].record

    def query_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]:
        study_filter: Callable[[str], bool] | None = None
        if ranges is not None:
            range_set = RangeSet(ranges)
            study_filter = lambda uid: study_token(uid) in range_set  # noqa: E731
        return LocalQuery(self, query, _no_header, study_filter=study_filter).rows()

    def query_hint_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]:
        held = HintIndex((hint.record, hint.attributes) for by_key in self._hints.values() for hint in by_key.values()
                         if not self.deleted(hint.record))
        if not len(held):
            return iter(())
        study_filter: Callable[[str], bool] | None = None
        if ranges is not None:
            range_set = RangeSet(ranges)
            study_filter = lambda uid: study_token(uid) in range_set  # noqa: E731
        return LocalQuery(held, query, _no_header, study_filter=study_filter).rows()

    # ----------------------------------------------------------------- IndexReader (LocalQuery)
    def study(self, study_instance_uid: str) -> StudyRecord | None:
        study = self._studies.get(study_instance_uid)
        return None if study is None else _copy_study(study)

    def studies(self) -> Iterator[StudyRecord]:
        for _token, uid in list(self._study_keys):
            yield _copy_study(self._studies[uid])

    def studies_by_index(self, keyword: str, low: str, high: str | None) -> Iterator[str]:
        if keyword not in INDEXED_STUDY_KEYWORDS:
            return
        found: list[tuple[bytes, int, bytes, str]] = []
        low_bytes = index_value(keyword, low).encode("utf-8")
        high_bytes = None if high is None else index_value(keyword, high).encode("utf-8")
        for token, uid in self._study_keys:
            for value in _values(self._studies[uid].attributes.get(keyword)):
                encoded = index_value(keyword, value).encode("utf-8")
                if high_bytes is None:
                    hit = encoded.startswith(low_bytes)
                else:
                    hit = low_bytes <= encoded <= high_bytes
                if hit:
                    found.append((encoded, token, uid.encode("ascii"), uid))
        for _encoded, _token, _raw, uid in sorted(found):
            yield uid

    def series(self, study_instance_uid: str) -> Iterator[SeriesRecord]:
        held = self._series.get(study_instance_uid, {})
        for uid in sorted(held, key=lambda u: u.encode("ascii")):
            yield _copy_series(held[uid])

    def instances(self, study_instance_uid: str) -> Iterator[InstanceRecord]:
        token = study_token(study_instance_uid)
        start = bisect.bisect_left(self._keys, (token, study_instance_uid))
        stop = bisect.bisect_left(self._keys, (token, study_instance_uid + "\x00"))
        for key in self._keys[start:stop]:
            yield _copy_record(self._meta[key])

    def all_instances(self) -> Iterator[InstanceRecord]:
        for key in list(self._keys):
            yield _copy_record(self._meta[key])

    def conflicts(self, study_instance_uid: str, sop_instance_uid: str) -> list[bytes]:
        """Compressed blobs of the copies that lost first-writer-wins (RocksStore returns them decompressed)."""
        held = self._conflicts.get((study_instance_uid, sop_instance_uid), {})
        return [held[content] for content in sorted(held)]


def _no_header(_study_uid: str, _sop_uid: str, _keywords: tuple[str, ...]) -> Attributes:
    """The simulator's payloads are not DICOM: keys the index lacks read as absent."""
    return {}
