"""Tombstones in both stores (RocksStore and the simulator's): a delete wins over every
write it saw, in whatever order a replica receives them; a write after it is a new instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from pacsnode.node.local_replica import StoreReplica
from pacsnode.node.store import RocksStore
from pacsnode.replication.hlc import HybridClock, Version
from pacsnode.replication.model import StoredInstance, StoreOutcome, Tombstone, with_version
from pacsnode.ring.tokens import TOKEN_SPACE
from pacsnode.sim.store import NonDurableStore
from pacsnode.sim.workload import DataGenerator


@pytest.fixture(params=["rocks", "sim"])
def make_store(request: Any, tmp_path: Path) -> Iterator[Any]:
    opened: list[RocksStore] = []

    def make(name: str = "a") -> Any:
        if request.param == "sim":
            return NonDurableStore(name)
        store = RocksStore(tmp_path / name, disk_free_bytes_min=0)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def _stamped(stored: StoredInstance, version: Version) -> StoredInstance:
    return StoredInstance(record=with_version(stored.record, version), attributes=stored.attributes, blob=stored.blob)


def _state(store: Any) -> tuple[Any, ...]:
    return (sorted((r.sop_instance_uid, r.content_hash) for r in store.all_instances()),
            store.segment_digests([(0, TOKEN_SPACE - 1)]), list(store.entries(0, TOKEN_SPACE - 1)))


def _tombstone(stored: StoredInstance, version: Version) -> Tombstone:
    return Tombstone(stored.study_instance_uid, stored.sop_instance_uid, version, stored.record.series_instance_uid)


def test_a_delete_racing_a_write_ends_the_same_on_two_replicas_in_either_order(make_store: Any) -> None:
    data = DataGenerator(7)
    study = data.new_study()
    writer, deleter = HybridClock("w", wall=lambda: 1_000), HybridClock("d", wall=lambda: 500)
    kept = _stamped(data.instance(study, now_ms=0), writer.now())
    written = _stamped(data.instance(study, now_ms=0), writer.now())
    deleter.observe(written.record.version)  # The delete's coordinator read the write.
    delete = _tombstone(written, deleter.now())
    assert delete.version > written.record.version  # Although the deleter's wall clock is behind.

    first, second = make_store("a"), make_store("b")
    for stored in (kept, written):
        assert first.put_stored(stored) == StoreOutcome.STORED
    assert first.put_tombstones([delete]) == 1
    assert second.put_tombstones([delete]) == 0  # Before the write: nothing to remove yet.
    assert second.put_stored(kept) == StoreOutcome.STORED
    assert second.put_stored(written) == StoreOutcome.DELETED  # A late replica write, hint or repair.
    assert _state(first) == _state(second)
    assert first.read_stored(written.study_instance_uid, written.sop_instance_uid) is None
    assert [r.sop_instance_uid for r in first.instances(study.study_instance_uid)] == [kept.sop_instance_uid]
    assert first.statistics().instances == 1 and first.statistics().tombstones == 1


def test_a_write_newer_than_the_delete_survives_it_and_a_restore_is_a_new_instance(make_store: Any) -> None:
    data = DataGenerator(8)
    study = data.new_study()
    old = _stamped(data.instance(study, now_ms=0), Version(1_000, 0, "w"))
    delete = _tombstone(old, Version(2_000, 0, "d"))
    restored = _stamped(data.instance(study, now_ms=0, sop_instance_uid=old.sop_instance_uid), Version(3_000, 0, "w"))
    store = make_store()
    assert store.put_stored(old) == StoreOutcome.STORED
    assert store.put_tombstones([delete]) == 1
    assert store.put_tombstones([delete]) == 0  # Idempotent.
    assert store.put_stored(old) == StoreOutcome.DELETED
    assert store.put_stored(restored) == StoreOutcome.STORED  # After the delete: a new instance.
    assert store.tombstone(old.study_instance_uid, old.sop_instance_uid) is None
    held = store.read_stored(old.study_instance_uid, old.sop_instance_uid)
    assert held is not None and held.content_hash == restored.content_hash
    assert store.put_tombstones([delete]) == 0  # The old delete does not touch the newer instance.
    assert store.put_stored(restored) == StoreOutcome.DUPLICATE  # A retry of the same bytes stays idempotent.
    assert [e[2] for e in store.entries(0, TOKEN_SPACE - 1)] == [restored.content_hash]


def test_deleted_hints_are_not_served_and_tombstone_hints_are_kept_per_owner(make_store: Any) -> None:
    data = DataGenerator(9)
    study = data.new_study()
    stored = _stamped(data.instance(study, now_ms=0), Version(1_000, 0, "w"))
    delete = _tombstone(stored, Version(2_000, 0, "d"))
    store = make_store()
    replica = store if isinstance(store, NonDurableStore) else StoreReplica(store)
    assert store.put_stored(stored, hint_for="owner-1") == StoreOutcome.STORED
    assert replica.read_hint("owner-1", stored.study_instance_uid, stored.sop_instance_uid) is not None
    store.put_tombstones([delete])
    assert replica.read_hint("owner-1", stored.study_instance_uid, stored.sop_instance_uid) is None
    store.put_tombstones([delete], hint_for="owner-2")
    assert store.tombstone_hint_owners() == ["owner-2"]
    assert list(store.tombstone_hints("owner-2")) == [delete]
    store.delete_tombstone_hints("owner-2", [delete])
    assert store.tombstone_hint_owners() == []


def test_purge_forgets_only_the_version_named_and_the_digest_follows(make_store: Any) -> None:
    data = DataGenerator(10)
    study = data.new_study()
    stored = _stamped(data.instance(study, now_ms=0), Version(1_000, 0, "w"))
    delete = _tombstone(stored, Version(2_000, 0, "d"))
    newer = _tombstone(stored, Version(2_500, 0, "d"))
    store, empty = make_store("a"), make_store("b")
    store.put_stored(stored)
    store.put_tombstones([delete])
    store.put_tombstones([newer])
    assert store.statistics().tombstones == 1
    assert store.purge_tombstones([delete]) == 0  # Not the version held.
    assert store.purge_tombstones([newer]) == 1
    assert _state(store) == _state(empty)
    assert list(store.entries(0, TOKEN_SPACE - 1)) == []
