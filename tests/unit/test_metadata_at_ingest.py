"""WADO-RS /metadata kept when an instance is stored (RocksStore's `header_of`, given
node/dicomweb_metadata.py's ingest_header_json): in the instance's own write batch, the
same JSON as the one built from the whole stored instance, gone with the instance, and
left to the first request when the lean reader cannot read the header."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from pacsnode.node.codec import to_stored
from pacsnode.node.dicomweb_metadata import HEADER_READ_BYTES, header_json, ingest_header_json
from pacsnode.node.http_views import StoreHeaders
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import InstanceLocation
from pacsnode.replication.model import Instance
from pacsnode.sim.datagen import StudySetSpec, iter_part10

from .test_dicomweb_pure import _part10


def _open(tmp_path: Path, name: str) -> RocksStore:
    return RocksStore(tmp_path / name, disk_free_bytes_min=0, header_of=ingest_header_json)


def _reference(store: RocksStore, instance: Instance) -> bytes:
    """The JSON built from the whole stored instance (what the first request built before)."""
    return header_json(store.read_part10(instance.study_instance_uid, instance.sop_instance_uid),
                       instance.transfer_syntax_uid, instance.study_instance_uid, instance.series_instance_uid,
                       instance.sop_instance_uid)


def _kept(store: RocksStore, instance: Instance) -> bytes | None:
    return store.instance_header(instance.study_instance_uid, instance.sop_instance_uid, instance.content_hash)


def test_metadata_is_kept_in_the_store_batch(tmp_path: Path, make_instance: Callable[[bytes], Instance]) -> None:
    spec = StudySetSpec(patients=1, series_per_study=2, instances_per_series=2, rows=300, cols=300,
                        modalities=("CT", "MR"), seed=31)
    instances = [make_instance(data) for _entry, data in iter_part10(spec)]
    assert any(len(instance.part10) > HEADER_READ_BYTES for instance in instances)  # Read from the first bytes.
    small = make_instance(_part10(str(ExplicitVRLittleEndian), icon=True, big_private=True))
    assert len(small.part10) < HEADER_READ_BYTES  # Read whole.
    store = _open(tmp_path, "store")
    replica = _open(tmp_path, "replica")
    try:
        for instance in [*instances, small]:
            store.put_instance(instance)
            kept = _kept(store, instance)
            assert kept is not None and kept == _reference(store, instance)
            # A replica (a peer's copy: the compressed blob only) keeps it too.
            replica.put_stored(to_stored(instance))
            assert _kept(replica, instance) == kept
        # Kept for this content only; deleted with the instance.
        assert store.instance_header(small.study_instance_uid, small.sop_instance_uid, "other") is None
        store.delete_study(small.study_instance_uid)
        assert store.instance_header(small.study_instance_uid, small.sop_instance_uid, small.content_hash) is None
        assert all(_kept(store, instance) is not None for instance in instances)
    finally:
        store.close()
        replica.close()


def test_what_the_lean_reader_cannot_read_is_built_when_asked(tmp_path: Path,
                                                              make_instance: Callable[[bytes], Instance]) -> None:
    big_endian = make_instance(_part10(str(ExplicitVRBigEndian)))
    readable = make_instance(_part10(str(ExplicitVRLittleEndian)).replace(b"1.2.3.4\x00", b"1.2.3.5\x00"))
    store = _open(tmp_path, "store")
    try:
        store.put_instance(big_endian)
        store.put_instance(readable)
        assert _kept(store, readable) is not None
        assert _kept(store, big_endian) is None
        location = InstanceLocation(study_instance_uid=big_endian.study_instance_uid,
                                    series_instance_uid=big_endian.series_instance_uid,
                                    sop_instance_uid=big_endian.sop_instance_uid,
                                    sop_class_uid=big_endian.sop_class_uid,
                                    transfer_syntax_uid=big_endian.transfer_syntax_uid)
        built = StoreHeaders(store).header(location)
        assert built is not None and built == _reference(store, big_endian)
        assert _kept(store, big_endian) == built
    finally:
        store.close()


def test_a_copy_that_carries_its_metadata_keeps_it_without_reading_the_header(
        tmp_path: Path, make_instance: Callable[[bytes], Instance]) -> None:
    """A peer's copy whose StoreHeader carries the /metadata entry (built once by the node
    that received the instance, node/runtime.py) is kept as given; the header is not read."""
    import dataclasses

    calls: list[str] = []

    def counting(record: object, blob: bytes) -> bytes | None:
        calls.append("built")
        return ingest_header_json(record, blob)  # type: ignore[arg-type]

    instance = make_instance(_part10(str(ExplicitVRLittleEndian)))
    entry = _open(tmp_path, "entry")
    replica = RocksStore(tmp_path / "replica", disk_free_bytes_min=0, header_of=counting)
    try:
        stored = to_stored(instance)
        built = ingest_header_json(stored.record, stored.blob)
        assert built is not None
        replica.put_stored(dataclasses.replace(stored, metadata_json=built))
        assert calls == [] and _kept(replica, instance) == built
        entry.put_stored(stored)  # Without it: built by the store, the same bytes.
        assert _kept(entry, instance) == built
    finally:
        entry.close()
        replica.close()


def _location(instance: Instance) -> InstanceLocation:
    return InstanceLocation(study_instance_uid=instance.study_instance_uid,
                            series_instance_uid=instance.series_instance_uid,
                            sop_instance_uid=instance.sop_instance_uid, sop_class_uid=instance.sop_class_uid,
                            transfer_syntax_uid=instance.transfer_syntax_uid)


def test_the_node_keeps_metadata_at_ingest_for_big_instances_and_builds_small_ones_when_asked(
        tmp_path: Path, make_instance: Callable[[bytes], Instance]) -> None:
    """node/server.py's policy: a ~2.4 KB entry is kept as a CT slice is stored, but for a
    small image (more than its own compressed copy) it waits for the first /metadata."""
    from pacsnode.node.server import METADATA_AT_INGEST_BLOB_BYTES_MIN, metadata_at_ingest

    spec = StudySetSpec(patients=1, series_per_study=1, instances_per_series=1, rows=256, cols=256,
                        modalities=("CT",), seed=33)
    big = make_instance(next(iter(iter_part10(spec)))[1])
    small = make_instance(_part10(str(ExplicitVRLittleEndian)))
    assert len(to_stored(big).blob) >= METADATA_AT_INGEST_BLOB_BYTES_MIN > len(to_stored(small).blob)
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, header_of=metadata_at_ingest)
    try:
        store.put_instance(big)
        store.put_instance(small)
        assert _kept(store, big) == _reference(store, big)
        assert _kept(store, small) is None
        built = StoreHeaders(store).header(_location(small))
        assert built is not None and built == _reference(store, small)
        assert _kept(store, small) == built  # Kept from the first request on.
    finally:
        store.close()
