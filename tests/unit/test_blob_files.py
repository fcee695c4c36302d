"""Blobs kept as files beside RocksDB (node/blob_files.py, node/store.py): byte-exact round
trip whole and streamed, conflicts and deletes take their files along, corruption is
detected, and the states a crash can leave (a named file whose batch never committed, a
delete whose unlink never ran, a temp file) are cleaned when the store opens, while every
recorded instance keeps its file.

`blob_file_bytes_min=1` puts every blob in a file, so the small generated instances take
the same path as a 200 MB one.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pacsnode.node import codec
from pacsnode.node.blob_files import MARK_BYTES, POINTER_MAGIC, TEMP_PREFIX, BlobFiles, BlobPointer, WorkerBlob
from pacsnode.node.store import PREFIX_BLOB, SEP, RocksStore, study_prefix
from pacsnode.replication.model import CorruptBlob, Instance, StoreOutcome
from pacsnode.sim.datagen import StudySetSpec, iter_part10
from pacsnode.sim.process import wait_until

OpenStore = Callable[..., RocksStore]

SPEC_A = StudySetSpec(patients=2, studies_per_patient=1, series_per_study=2, instances_per_series=2, rows=16,
                      cols=16, seed=11)
SPEC_B = StudySetSpec(**{**SPEC_A.__dict__, "rows": 20})  # Same UIDs, other bytes.


@pytest.fixture(scope="module")
def versions(make_instance: Callable[[bytes], Instance]) -> tuple[list[Instance], list[Instance]]:
    a = [make_instance(part10) for _entry, part10 in iter_part10(SPEC_A)]
    b = [make_instance(part10) for _entry, part10 in iter_part10(SPEC_B)]
    return a, b


def _files(store: RocksStore) -> list[str]:
    return sorted(store.blob_files.files(empty=False))  # The pool's empty files left out.


def _pointer(store: RocksStore, instance: Instance) -> BlobPointer:
    value = store._db.get(PREFIX_BLOB + study_prefix(instance.study_instance_uid) + SEP
                          + instance.sop_instance_uid.encode())
    pointer = BlobPointer.decode(value)
    assert pointer is not None
    return pointer


def _streamed(store: RocksStore, instance: Instance, fragment: int = 97) -> bytes:
    opened = store.open_part10(instance.study_instance_uid, instance.sop_instance_uid)
    assert not isinstance(opened, bytes)
    payload = opened.payload(instance.dataset_offset)
    try:
        return b"".join(bytes(payload[start:min(start + fragment, len(payload))])
                        for start in range(0, len(payload), fragment))
    finally:
        payload.close()


def test_big_blobs_are_files_read_whole_and_streamed_byte_exact(open_store: OpenStore, versions: Any) -> None:
    instances, _ = versions
    store = open_store(blob_file_bytes_min=1, whole_read_bytes_max=0)  # Every file streamed.
    for instance in instances:
        assert store.put_instance(instance, now_ms=5) == StoreOutcome.STORED
    assert len(_files(store)) == len(instances)
    assert not [name for name in _files(store) if TEMP_PREFIX in name]  # Written under their names.
    total = 0
    for instance in instances:
        pointer = _pointer(store, instance)
        data = (store.blob_files.directory / pointer.name).read_bytes()
        assert len(data) == pointer.size_bytes and zlib.crc32(data) == pointer.crc32
        total += pointer.size_bytes
        assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
        assert _streamed(store, instance) == instance.dataset_bytes
        assert store.read_part10_head(instance.study_instance_uid, instance.sop_instance_uid, 200) == \
            instance.part10[:200]
        stored = store.read_stored(instance.study_instance_uid, instance.sop_instance_uid)
        assert stored is not None and codec.decompress(bytes(stored.blob)) == instance.part10
    assert store.statistics().bytes_stored == total
    # A small-blob store keeps the same instances inside RocksDB: no file, not streamed.
    small = open_store("small")
    assert small.put_instance(instances[0]) == StoreOutcome.STORED
    assert _files(small) == []
    assert small.open_part10(instances[0].study_instance_uid, instances[0].sop_instance_uid) == instances[0].part10


def test_by_default_a_ct_sized_blob_is_a_file_and_a_small_one_a_rocksdb_value(
        open_store: OpenStore, make_instance: Callable[[bytes], Instance]) -> None:
    """The default threshold (64 KiB compressed) puts a 256x256 slice in a file: rocksdict
    holds the GIL while RocksDB copies a value into its log or reads it back, file I/O
    does not (the ingest and retrieve CPU figures in docs/design.md)."""
    slice_spec = StudySetSpec(patients=1, studies_per_patient=1, series_per_study=1, instances_per_series=1,
                              rows=256, cols=256, seed=12)
    big = make_instance(next(iter(iter_part10(slice_spec)))[1])
    small = make_instance(next(iter(iter_part10(SPEC_A)))[1])
    assert len(codec.compress(big.part10)) >= 64 * 1024 > len(codec.compress(small.part10))
    store = open_store()
    assert store.put_instance(big) == StoreOutcome.STORED
    assert _files(store) == [_pointer(store, big).name]
    assert store.put_instance(small) == StoreOutcome.STORED
    assert len(_files(store)) == 1
    assert store.read_part10(big.study_instance_uid, big.sop_instance_uid) == big.part10
    assert store.open_part10(big.study_instance_uid, big.sop_instance_uid) == big.part10  # A slice: read whole.
    assert store.read_part10(small.study_instance_uid, small.sop_instance_uid) == small.part10


def test_in_memory_blobs_go_into_the_pool_s_files_and_without_a_pool_into_new_ones(
        open_store: OpenStore, versions: Any) -> None:
    """The store keeps empty files ready (their directory fsync'ed once per batch) and
    writes an in-memory blob into one: one fsync per blob, not two. Without a pool (a DICOM
    worker's BlobFiles) a blob gets a new file under its content hash."""
    instances, _ = versions
    store = open_store(blob_file_bytes_min=1)
    pool = store.blob_files.pool
    assert pool is not None and wait_until(lambda: pool.made >= 64, 10)
    for instance in instances:
        assert store.put_instance(instance, now_ms=5) == StoreOutcome.STORED
    assert pool.taken == len(instances) and pool.missed == 0
    for instance in instances:
        name = _pointer(store, instance).name
        assert instance.content_hash not in name  # A pool file's name.
        assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
    alone = BlobFiles(store.blob_files.directory.parent / "other-blobs")
    pointer = alone.write_named(codec.compress(instances[0].part10), instances[0].content_hash)
    assert pointer.name.startswith(instances[0].content_hash[:2] + "/" + instances[0].content_hash)
    assert alone.read(pointer, "test") == codec.compress(instances[0].part10)


def test_a_spooled_temp_file_is_renamed_not_copied(open_store: OpenStore, versions: Any) -> None:
    """The front end's compressed temp file (blob_file) becomes the stored file."""
    instance = versions[0][0]
    store = open_store()  # Default threshold: this small blob goes to a file only because it was spooled.
    temp = store.blob_files.write_temp(codec.compress(instance.part10))
    stored = codec.to_stored(instance, now_ms=1)
    stored = type(stored)(record=stored.record, attributes=stored.attributes, blob=stored.blob, blob_file=temp)
    assert store.put_stored(stored) == StoreOutcome.STORED
    assert not temp.path.exists()
    assert _files(store) == [_pointer(store, instance).name]
    assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10


def _worker_copy(store: RocksStore, instance: Instance) -> tuple[Any, WorkerBlob]:
    """What the node's channel makes of a DICOM worker's STORE (node/archive_channel.py
    _instance): the blob written into a pool file (BlobFiles.write_pooled), mapped, and the
    WorkerBlob naming it; with the StoredInstance that carries both."""
    pool = store.blob_files.pool
    assert pool is not None and wait_until(lambda: pool.made >= 1, 10)
    pointer = store.blob_files.write_pooled(codec.compress(instance.part10))
    assert pointer is not None
    worker = WorkerBlob(pointer)
    stored = codec.to_stored(instance, now_ms=1)
    mapped = store.blob_files.map(pointer, "test")
    return type(stored)(record=stored.record, attributes=stored.attributes, blob=mapped, blob_file=worker), worker


def test_a_worker_s_pool_file_is_recorded_as_it_is(open_store: OpenStore, versions: Any) -> None:
    instance = versions[0][0]
    store = open_store()
    stored, worker = _worker_copy(store, instance)
    assert store.put_stored(stored) == StoreOutcome.STORED
    assert worker.kept and _pointer(store, instance).name == worker.pointer.name  # Not copied.
    assert not worker.give_up()  # The channel leaves a claimed file to its write.
    assert (store.blob_files.directory / worker.pointer.name).exists()
    assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10


def test_a_worker_s_file_given_up_before_the_write_claimed_it_is_not_recorded(
        open_store: OpenStore, versions: Any) -> None:
    """In a cluster the entry node's own copy can still be queued when W other owners have
    answered: the channel then gave the worker's file up and removed it. The late write must
    not record a pointer to the removed file (before: it did, and the copy was unreadable:
    'blob file ... is missing'); it writes a file of its own from the mapped bytes."""
    instance = versions[0][0]
    store = open_store()
    stored, worker = _worker_copy(store, instance)
    assert worker.give_up()  # No write claimed it: the channel removes it, as archive_channel does.
    store.blob_files.remove(worker.pointer.name)
    assert store.put_stored(stored) == StoreOutcome.STORED
    assert _pointer(store, instance).name != worker.pointer.name
    assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
    found = store.read_stored(instance.study_instance_uid, instance.sop_instance_uid)
    assert found is not None and bytes(found.blob) == codec.compress(instance.part10)


def test_a_worker_s_file_is_claimed_by_one_write_only(open_store: OpenStore, versions: Any) -> None:
    """A second write of the same StoredInstance (the coordinator sends a write again after a
    DELETED answer) after the first did not keep the file (and removed it) writes its own."""
    instance = versions[0][0]
    store = open_store()
    stored, worker = _worker_copy(store, instance)
    assert worker.claim()  # A first write took it ...
    store.blob_files.remove(worker.pointer.name)  # ... and, not kept, removed it.
    assert store.put_stored(stored) == StoreOutcome.STORED
    assert _pointer(store, instance).name != worker.pointer.name
    assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10


def test_conflicts_and_deletes_take_their_files_along(open_store: OpenStore, versions: Any) -> None:
    first, second = versions[0][0], versions[1][0]
    store = open_store(blob_file_bytes_min=1)
    assert store.put_instance(first, now_ms=10) == StoreOutcome.STORED
    assert store.put_instance(second, now_ms=20) == StoreOutcome.CONFLICT  # Later: set aside, as a file.
    assert len(_files(store)) == 2
    assert store.conflicts(first.study_instance_uid, first.sop_instance_uid) == [second.part10]
    assert store.put_instance(second, now_ms=30) == StoreOutcome.CONFLICT  # Kept once: no new file.
    assert len(_files(store)) == 2
    assert store.put_instance(first) == StoreOutcome.DUPLICATE
    assert len(_files(store)) == 2
    # An earlier copy arriving later wins: the kept one becomes the conflict, no file lost or left.
    other = open_store("other", blob_file_bytes_min=1)
    assert other.put_instance(second, now_ms=20) == StoreOutcome.STORED
    assert other.put_instance(first, now_ms=10) == StoreOutcome.CONFLICT
    assert other.read_part10(first.study_instance_uid, first.sop_instance_uid) == first.part10
    assert other.conflicts(first.study_instance_uid, first.sop_instance_uid) == [second.part10]
    assert len(_files(other)) == 2
    # Deleting the instance removes its blob file and its conflict's.
    record = store.instance_record(first.study_instance_uid, first.sop_instance_uid)
    assert record is not None
    assert store.delete_instances([(first.study_instance_uid, first.sop_instance_uid, record.content_hash)]) == 1
    assert _files(store) == []
    assert store.statistics().bytes_stored == 0
    # A whole study too.
    for instance in versions[0]:
        store.put_instance(instance, now_ms=40)
    study = versions[0][0].study_instance_uid
    in_study = [i for i in versions[0] if i.study_instance_uid == study]
    assert store.delete_study(study) == len(in_study)
    assert len(_files(store)) == len(versions[0]) - len(in_study)


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "read-whole"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_a_damaged_blob_file_is_never_read_as_good(open_store: OpenStore, versions: Any, damage: str,
                                                   whole: bool) -> None:
    instance = versions[0][0]
    store = open_store(blob_file_bytes_min=1, whole_read_bytes_max=(2 << 20) if whole else 0)
    store.put_instance(instance)
    path = store.blob_files.directory / _pointer(store, instance).name
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-9]))
    else:
        path.unlink()
    with pytest.raises(CorruptBlob):
        store.read_part10(instance.study_instance_uid, instance.sop_instance_uid)
    with pytest.raises(CorruptBlob):
        if whole:  # open_part10 reads a slice's file whole and decompresses it at once.
            store.open_part10(instance.study_instance_uid, instance.sop_instance_uid)
        else:
            _streamed(store, instance)
    assert store.read_stored(instance.study_instance_uid, instance.sop_instance_uid) is None or damage == "flip"


@pytest.mark.parametrize("position, bit", [(4, 0x04), (-1, 0x01), (-4, 0x80)],
                         ids=["checksum-flag", "checksum-byte-last", "checksum-byte-first"])
def test_a_whole_read_checks_every_stored_byte_by_the_pointers_crc32(open_store: OpenStore, versions: Any,
                                                                     position: int, bit: int) -> None:
    """open_part10's whole read of a blob file (a slice, as C-GET and C-MOVE send it)
    checks the file by the CRC-32 its pointer records, in place of zstd's checksum, which it
    leaves out of the decompression: a flipped checksum flag in the frame header (after
    which zstd ignores the checksum; the content is intact, so zstd's own check lets it
    through) and a flipped bit in the checksum bytes (which zstd no longer reads) are both
    CorruptBlob, logged, before any byte is handed on. The intact file is read whole, twice
    (its header is changed only in the thread's read buffer, never on disk)."""
    if codec._isal_crc32 is None:
        pytest.skip("isal is not installed in this venv (pip install -e . installs it)")
    instance = versions[0][0]
    store = open_store(blob_file_bytes_min=1, whole_read_bytes_max=2 << 20)
    store.put_instance(instance)
    path = store.blob_files.directory / _pointer(store, instance).name
    stored = path.read_bytes()
    assert store.open_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
    assert store.open_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
    assert path.read_bytes() == stored
    damaged = bytearray(stored)
    damaged[position] ^= bit
    path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptBlob, match="CRC-32"):
        store.open_part10(instance.study_instance_uid, instance.sop_instance_uid)
    path.write_bytes(stored)
    assert store.open_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10


def test_stream_slices_must_come_in_order(open_store: OpenStore, versions: Any) -> None:
    instance = versions[0][0]
    store = open_store(blob_file_bytes_min=1, whole_read_bytes_max=0)
    store.put_instance(instance)
    opened = store.open_part10(instance.study_instance_uid, instance.sop_instance_uid)
    assert not isinstance(opened, bytes)
    with opened:
        payload = opened.payload(instance.dataset_offset)
        assert bytes(payload[0:10]) == instance.dataset_bytes[:10]
        with pytest.raises(ValueError):
            payload[0:10]


def test_what_a_crash_leaves_is_cleaned_at_open_and_records_keep_their_files(tmp_path: Path, versions: Any) -> None:
    instances = versions[0]
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1)
    kept = instances[0]
    assert store.put_instance(kept, now_ms=1) == StoreOutcome.STORED
    # 1. Killed while compressing: a temp file.
    with store.blob_files.temp_writer() as writer:
        writer.write(b"partial")
        leftover_temp = writer.path
        writer.finish()
    # 2. Killed after the file got its name, before the batch that records it.
    unrecorded = store.blob_files.commit(store.blob_files.write_temp(codec.compress(instances[1].part10)),
                                         instances[1].content_hash)
    # 2b. The same for a blob that was in memory, written straight under its final name.
    unrecorded_named = store.blob_files.write_named(codec.compress(instances[3].part10), instances[3].content_hash)
    assert (store.blob_files.directory / unrecorded_named.name).exists()
    # 3. Killed after a delete's batch, before its unlink: the file is left, its record gone.
    doomed = instances[2]
    store.put_instance(doomed, now_ms=1)
    doomed_file = _pointer(store, doomed).name
    record = store.instance_record(doomed.study_instance_uid, doomed.sop_instance_uid)
    assert record is not None
    doomed_path = store.blob_files.directory / doomed_file
    doomed_bytes = doomed_path.read_bytes()
    store.delete_instances([(doomed.study_instance_uid, doomed.sop_instance_uid, record.content_hash)])
    doomed_path.write_bytes(doomed_bytes)  # As if the process died before the unlink ran.
    assert doomed_path.exists()
    # 4. The pool's empty files, never taken.
    assert wait_until(lambda: set(store.blob_files.files()) - set(store.blob_files.files(empty=False)), 10)
    pool_files = set(store.blob_files.files()) - set(store.blob_files.files(empty=False))
    store.close()

    reopened = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1)
    try:
        assert not leftover_temp.exists()
        assert not (reopened.blob_files.directory / unrecorded.name).exists()
        assert not (reopened.blob_files.directory / unrecorded_named.name).exists()
        assert not (reopened.blob_files.directory / doomed_file).exists()
        assert not [name for name in pool_files if (reopened.blob_files.directory / name).exists()]
        assert _files(reopened) == [_pointer(reopened, kept).name]
        assert reopened.read_part10(kept.study_instance_uid, kept.sop_instance_uid) == kept.part10
        assert reopened.instance_record(instances[1].study_instance_uid, instances[1].sop_instance_uid) is None
        # Every recorded instance has its file.
        for record in reopened.all_instances():
            pointer = _pointer(reopened, next(i for i in instances if i.sop_instance_uid == record.sop_instance_uid))
            assert (reopened.blob_files.directory / pointer.name).exists()
        assert reopened.missing_blob_files == 0
    finally:
        reopened.close()


def test_records_whose_blob_file_is_gone_are_counted_and_reported_at_open(
        tmp_path: Path, versions: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A record pointing at a file that is gone (a store written before 3453a8f by an entry
    node with DICOM workers in a cluster, or a lost file) is reported when the store opens."""
    instances = versions[0]
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1)
    for instance in instances[:3]:
        assert store.put_instance(instance, now_ms=1) == StoreOutcome.STORED
    lost = _pointer(store, instances[1]).name
    store.close()
    (tmp_path / "store" / "blobs" / lost).unlink()
    with caplog.at_level("ERROR", logger="pacsnode.node.store"):
        reopened = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1)
    try:
        assert reopened.missing_blob_files == 1
        lines = [r.getMessage() for r in caplog.records if "store.blob_files.missing" in r.getMessage()]
        assert len(lines) == 1 and "files=1" in lines[0]
        assert instances[1].sop_instance_uid not in lines[0] and instances[1].study_instance_uid not in lines[0]
        assert reopened.read_part10(instances[0].study_instance_uid, instances[0].sop_instance_uid) == instances[0].part10
    finally:
        reopened.close()


def test_a_pointer_is_never_taken_for_a_zstd_frame() -> None:
    pointer = BlobPointer(name="ab/abc-0.zst", size_bytes=12, crc32=7)
    assert BlobPointer.decode(pointer.encode()) == pointer
    assert BlobPointer.decode(codec.compress(POINTER_MAGIC)) is None
    assert not codec.compress(b"x").startswith(POINTER_MAGIC)
    assert TEMP_PREFIX.startswith(".")


def _evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache (Linux: as memory pressure would)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_read_into_fills_the_caller_s_buffer_and_with_cached_only_never_waits_on_the_disk(tmp_path: Path) -> None:
    """read_into reads a blob whole into a reused buffer (its size checked against the
    pointer); with `cached_only` it reads only what is in the page cache: None for a file
    whose pages were dropped, the bytes again once they are back."""
    files = BlobFiles(tmp_path / "blobs")
    blob = os.urandom(300_000)
    pointer = files.write_named(blob, "ab" * 16)
    buffer = memoryview(bytearray(400_000))
    assert bytes(files.read_into(pointer, buffer, "x") or b"") == blob
    assert bytes(files.read_into(pointer, buffer, "x", cached_only=True) or b"") == blob
    _evict(files.path(pointer))
    assert bytes(files.read_into(pointer, buffer, "x") or b"") == blob  # Waits on the disk, reads it back in.
    _evict(files.path(pointer))
    if files.read_into(pointer, buffer, "x", cached_only=True) is not None:
        pytest.skip("this file system keeps the file's pages (tmpfs?): cannot drop them")
    assert bytes(files.read_into(pointer, buffer, "x") or b"") == blob
    assert bytes(files.read_into(pointer, buffer, "x", cached_only=True) or b"") == blob
    with pytest.raises(CorruptBlob):
        files.read_into(BlobPointer(pointer.name, pointer.size_bytes + 1, pointer.crc32), buffer, "x")
    files.remove(pointer.name)
    with pytest.raises(CorruptBlob):
        files.read_into(pointer, buffer, "x", cached_only=True)


def test_read_into_cached_only_gives_way_where_the_file_system_cannot_read_without_waiting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without RWF_NOWAIT reads answers EOPNOTSUPP (and a disk can answer
    EIO): the page-cache-only read then says "not here" (None) and the caller's reader
    thread reads the file its usual way; a plain read still raises."""
    import errno

    files = BlobFiles(tmp_path / "blobs")
    pointer = files.write_named(os.urandom(10_000), "cd" * 16)
    buffer = memoryview(bytearray(20_000))

    def unsupported(*args: Any) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", unsupported)
    assert files.read_into(pointer, buffer, "x", cached_only=True) is None
    with pytest.raises(OSError):
        files.read_into(pointer, buffer, "x")


@pytest.mark.parametrize("position, bit", [(4, 0x04), (-1, 0x01), (-4, 0x80)],
                         ids=["checksum-flag", "checksum-byte-last", "checksum-byte-first"])
def test_a_streamed_read_checks_every_stored_byte_by_the_pointers_crc32(open_store: OpenStore, versions: Any,
                                                                        position: int, bit: int) -> None:
    """open_part10's streamed read (a C-GET of more than 2 MiB) checks the file by the CRC-32
    its pointer records, as the whole read does, in place of zstd's checksum: a flipped
    checksum flag (zstd then ignores the checksum, the content being intact) is CorruptBlob
    too. The file on disk is never changed by a read."""
    instance = versions[0][0]
    store = open_store(blob_file_bytes_min=1, whole_read_bytes_max=0)
    store.put_instance(instance)
    path = store.blob_files.directory / _pointer(store, instance).name
    stored = path.read_bytes()
    assert _streamed(store, instance) == instance.dataset_bytes
    assert path.read_bytes() == stored
    damaged = bytearray(stored)
    damaged[position] ^= bit
    path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptBlob, match="CRC-32"):
        _streamed(store, instance)
    path.write_bytes(stored)
    assert _streamed(store, instance) == instance.dataset_bytes


def test_a_pointer_records_crc32_marks_that_a_streamed_read_checks_as_it_goes(
        open_store: OpenStore, make_instance: Callable[[bytes], Instance], tmp_path: Path) -> None:
    """Every way a blob file is written (in memory, a temp file written in odd pieces)
    records the running CRC-32 at each MARK_BYTES of the file; the pointer keeps them
    through RocksDB, and an older pointer without them still decodes (None: the whole
    file is checked). A byte flipped in the second MiB stops a streamed read at the
    second mark, with the frame's end (and zstd's checksum) not yet read."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid
    import io

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), "M1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 1024, 1024, 1, 32
    ds.PixelData = np.random.default_rng(1).integers(0, 2**32 - 1, 1024 * 1024, dtype=np.uint32).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    instance = make_instance(out.getvalue())
    store = open_store(blob_file_bytes_min=1, whole_read_bytes_max=0)
    store.put_instance(instance)
    pointer = _pointer(store, instance)
    stored = (store.blob_files.directory / pointer.name).read_bytes()
    expected = tuple(zlib.crc32(stored[:end]) for end in range(MARK_BYTES, len(stored), MARK_BYTES))
    assert len(expected) == 4 and pointer.crc32_marks == expected
    with BlobFiles(tmp_path / "other").temp_writer() as writer:
        for start in range(0, len(stored), 300_007):
            writer.write(stored[start:start + 300_007])
        temp = writer.finish()
    assert temp.crc32_marks == expected and temp.crc32 == pointer.crc32
    older = BlobPointer(pointer.name, pointer.size_bytes, pointer.crc32)
    assert BlobPointer.decode(older.encode()) == older and BlobPointer.decode(pointer.encode()) == pointer

    damaged = bytearray(stored)
    damaged[MARK_BYTES + 1000] ^= 0x01
    (store.blob_files.directory / pointer.name).write_bytes(bytes(damaged))
    opened = store.open_part10(instance.study_instance_uid, instance.sop_instance_uid)
    assert not isinstance(opened, bytes)
    with opened:
        assert opened.read_chunk(MARK_BYTES // 2) == instance.part10[:MARK_BYTES // 2]
        with pytest.raises(CorruptBlob, match="before byte 2097152"):
            opened.read_chunk(MARK_BYTES)
