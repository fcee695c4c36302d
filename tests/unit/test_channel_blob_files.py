"""A DICOM worker's big instances reach the node's store as blob files, and come back as
kept (node/archive_channel.py).

The real channel (ChannelArchive in this process standing for a worker, ChannelServer on a
Unix socket) in front of a real RocksStore: a blob of `blob_file_bytes_min` or more
is written by the worker side into the store's blobs directory and named in the STORE
frame; the store keeps that file (a pointer in RocksDB, no copy of the bytes through its
write) and reads back the same Part-10 bytes. Smaller blobs travel in the frame. No temp
file outlives a store, kept or duplicate. A frame that names anything but a temp file of
the blobs directory is answered with an error, stores nothing, and the connection serves on.
Reads give the worker the node's own copy as kept (a blob file to stream, a zstd blob to
decompress); a copy that fails its check on the worker's side is asked again whole.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pacsnode.node import codec
from pacsnode.node.archive_channel import ChannelArchive, ChannelServer, Kind, RemoteError, recv_frame, send_frame
from pacsnode.node.blob_files import MARK_BYTES, TEMP_PREFIX, WORKER_POOL_PREFIX, BlobFiles, BlobPointer
from pacsnode.node.store import PREFIX_BLOB, SEP, RocksStore, study_prefix
from pacsnode.node.blob_files import Part10Stream
from pacsnode.node.runtime import CompressedCopy, own_compressed_reader, own_copy_reader
from pacsnode.replication.archive import InstanceLocation, ReadError, WriteResult, WriteStatus
from pacsnode.replication.model import Instance, StoreOutcome
from pacsnode.sim.datagen import StudySetSpec, iter_part10

THRESHOLD = 4096
# 64x64 random-ish pixels compress to well over THRESHOLD; 8x8 to well under it.
BIG = StudySetSpec(patients=1, studies_per_patient=1, series_per_study=1, instances_per_series=3, rows=64, cols=64,
                   seed=21)
SMALL = StudySetSpec(patients=1, studies_per_patient=1, series_per_study=1, instances_per_series=2, rows=8, cols=8,
                     seed=22)


class StoreArchive:
    """The node's side of a STORE as the node does it for one node alone: the instance as
    replicas keep it (node/codec.py to_stored), put into the real store."""

    def __init__(self, rocks: RocksStore) -> None:
        self.rocks = rocks
        self.received: list[Instance] = []

        self.whole_reads = 0
        self._compressed = own_compressed_reader(rocks)
        self._own_copy = own_copy_reader(rocks)

    def store(self, instance: Instance) -> WriteResult:
        self.received.append(instance)
        outcome = self.rocks.put_stored(codec.to_stored(instance))
        return WriteResult(WriteStatus.SUCCESS, outcome=outcome)

    # Reads as ClusterArchive does them for an owner (node/runtime.py's readers of its store).
    def open_compressed(self, location: InstanceLocation) -> CompressedCopy | None:
        return self._compressed(location)

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        self.whole_reads += 1
        found = self._own_copy(location)
        if found is None:
            raise ReadError("no readable copy")
        return found


def _worker_files(store: RocksStore, pooled: bool) -> BlobFiles:
    """The blobs directory as a worker process has it: with its own pool of empty files
    (node/dicom_worker.py), or without (every big blob then goes through a temp file)."""
    files = BlobFiles(store.blob_files.directory)
    if pooled:
        files.start_pool(batch=8, prefix=f"{WORKER_POOL_PREFIX}{os.getpid()}_")
        assert files.pool is not None
        pool = files.pool
        deadline = time.monotonic() + 10
        while pool.made == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    return files


@pytest.fixture(params=["pooled", "temp"])
def channel(request: pytest.FixtureRequest, tmp_path: Path,
            make_instance: Callable[[bytes], Instance]) -> Iterator[tuple[ChannelArchive, StoreArchive]]:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    archive = StoreArchive(store)
    directory = tempfile.mkdtemp(prefix="pacsnode-ch-test-")
    server = ChannelServer(os.path.join(directory, "archive.sock"), archive, store.blob_files)
    server.start()
    worker_files = _worker_files(store, request.param == "pooled")
    worker = ChannelArchive(server.path, worker_files, THRESHOLD)
    try:
        yield worker, archive
    finally:
        worker_files.close()
        server.close()
        store.close()
        os.rmdir(directory)


def _compressed(make_instance: Callable[[bytes], Instance], spec: StudySetSpec) -> list[Instance]:
    instances = []
    for _entry, part10 in iter_part10(spec):
        instance = make_instance(part10)
        instances.append(Instance(**{**instance.__dict__, "blob": codec.compress(instance.part10)}))
    return instances


def _pointer(store: RocksStore, instance: Instance) -> BlobPointer | None:
    value = store._db.get(PREFIX_BLOB + study_prefix(instance.study_instance_uid) + SEP
                          + instance.sop_instance_uid.encode())
    assert value is not None
    return BlobPointer.decode(value)


def _marks_of_file(store: RocksStore, pointer: BlobPointer) -> tuple[int, ...]:
    """The CRC-32 marks of a blob file (node/blob_files.py MARK_BYTES), from its bytes."""
    data = store.blob_files.path(pointer).read_bytes()
    return tuple(zlib.crc32(data[:end]) for end in range(MARK_BYTES, len(data), MARK_BYTES))


def _temp_files(store: RocksStore) -> list[str]:
    return [name for name in store.blob_files.files() if name.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)]


def test_big_blobs_arrive_as_files_small_ones_in_the_frame(channel, make_instance) -> None:
    worker, archive = channel
    store = archive.rocks
    big = _compressed(make_instance, BIG)
    small = _compressed(make_instance, SMALL)
    assert all(len(i.blob) >= THRESHOLD for i in big) and all(len(i.blob) < THRESHOLD for i in small)
    for instance in big + small:
        assert worker.store(instance).status is WriteStatus.SUCCESS
    for instance in big:
        pointer = _pointer(store, instance)
        assert pointer is not None and pointer.size_bytes == len(instance.blob)
        assert pointer.crc32_marks == _marks_of_file(store, pointer)  # Carried from the worker.
        assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
    for instance in small:
        assert _pointer(store, instance) is None
        assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
    # The node never received the Part-10 bytes, only their length.
    assert all(received.part10 == b"" for received in archive.received)
    assert [r.size_bytes for r in archive.received] == [i.size_bytes for i in big + small]
    assert _temp_files(store) == []
    assert len(list(store.blob_files.files(empty=False))) == len(big)


def test_a_duplicate_leaves_no_temp_file(channel, make_instance) -> None:
    worker, archive = channel
    store = archive.rocks
    instance = _compressed(make_instance, BIG)[0]
    assert worker.store(instance).outcome == StoreOutcome.STORED
    assert worker.store(instance).outcome == StoreOutcome.DUPLICATE
    assert _temp_files(store) == []
    assert len(list(store.blob_files.files(empty=False))) == 1


@pytest.mark.parametrize("name", ["../../escape.zst", "ab/" + TEMP_PREFIX + "x.zst", "kept.zst",
                                  TEMP_PREFIX + "missing.zst"])
def test_a_frame_naming_anything_but_a_temp_file_of_the_blobs_directory_stores_nothing(channel, make_instance,
                                                                                       name: str) -> None:
    worker, archive = channel
    store = archive.rocks
    instance = _compressed(make_instance, BIG)[0]
    header = {"study": instance.study_instance_uid, "series": instance.series_instance_uid,
              "sop_instance": instance.sop_instance_uid, "sop_class": instance.sop_class_uid,
              "transfer_syntax": instance.transfer_syntax_uid, "dataset_offset": instance.dataset_offset,
              "content_hash": instance.content_hash, "attributes": instance.attributes,
              "part10_bytes": len(instance.part10),
              "blob_file": {"name": name, "size_bytes": len(instance.blob), "crc32": 0}}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(worker._path)
    try:
        send_frame(sock, Kind.STORE, header)
        kind, answer, _ = recv_frame(sock)
        assert kind is Kind.ERROR and answer["error"] == "StoreFrameError"
        assert archive.received == []
        # The same connection still serves: the real instance is stored after the refusal.
        send_frame(sock, Kind.STORE, {**{k: v for k, v in header.items() if k != "blob_file"}}, instance.blob)
        kind, answer, _ = recv_frame(sock)
        assert kind is Kind.STORED and answer["status"] == WriteStatus.SUCCESS.value
    finally:
        sock.close()
    assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10


@pytest.mark.parametrize("pooled", [True, False])
def test_a_store_the_node_refuses_still_removes_the_worker_s_temp_file(tmp_path: Path, make_instance,
                                                                        pooled: bool) -> None:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    directory = tempfile.mkdtemp(prefix="pacsnode-ch-test-")

    class Failing:
        def store(self, instance: Instance) -> WriteResult:
            raise RuntimeError("the node's archive failed")

    server = ChannelServer(os.path.join(directory, "archive.sock"), Failing(), store.blob_files)
    server.start()
    worker_files = _worker_files(store, pooled)
    try:
        worker = ChannelArchive(server.path, worker_files, THRESHOLD)
        def worker_pool_files() -> set[str]:
            return {name for name in store.blob_files.files() if name.split("/")[-1].startswith(WORKER_POOL_PREFIX)}

        before = worker_pool_files()
        with pytest.raises(RemoteError):
            worker.store(_compressed(make_instance, BIG)[0])
        assert list(store.blob_files.files(empty=False)) == []
        after = worker_pool_files()  # The pool file it took is gone too.
        assert after <= before and len(after) == len(before) - (1 if pooled else 0)
    finally:
        worker_files.close()
        server.close()
        store.close()
        os.rmdir(directory)


def _location(instance: Instance) -> InstanceLocation:
    return InstanceLocation(instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid,
                            instance.sop_class_uid, instance.transfer_syntax_uid)


def test_reads_come_as_kept_a_file_streamed_a_blob_decompressed_by_the_worker(channel, make_instance) -> None:
    worker, archive = channel
    big = _compressed(make_instance, BIG)[0]
    small = _compressed(make_instance, SMALL)[0]
    for instance in (big, small):
        assert worker.store(instance).status is WriteStatus.SUCCESS
    opened, offset = worker.open_streamed(_location(big))
    assert opened == big.part10 and offset == big.dataset_offset  # A slice's file: read whole.
    streaming = ChannelArchive(worker._path, archive.rocks.blob_files, THRESHOLD, whole_read_bytes_max=0)
    opened, offset = streaming.open_streamed(_location(big))  # A file over whole_read_bytes_max: streamed.
    assert isinstance(opened, Part10Stream) and offset == big.dataset_offset
    with opened:
        assert opened.read_all() == big.part10
    streaming.close()
    opened, offset = worker.open_streamed(_location(small))
    assert opened == small.part10 and offset == small.dataset_offset
    assert worker.read(_location(big)) == (big.part10, big.dataset_offset)
    assert archive.whole_reads == 0  # The node process decompressed nothing.


def test_a_copy_that_fails_its_check_in_the_worker_is_asked_again_whole(channel, make_instance) -> None:
    worker, archive = channel
    small = _compressed(make_instance, SMALL)[0]
    assert worker.store(small).status is WriteStatus.SUCCESS
    key = PREFIX_BLOB + study_prefix(small.study_instance_uid) + SEP + small.sop_instance_uid.encode()
    kept = archive.rocks._db.get(key)
    archive.rocks._db[key] = kept[:-4] + bytes(b ^ 0xFF for b in kept[-4:])  # Its checksum no longer matches.
    with pytest.raises(ReadError):
        worker.open_streamed(_location(small))
    assert archive.whole_reads == 1  # Asked again through the node's read, which found no good copy.


def test_a_slice_s_file_is_checked_by_its_crc32_in_the_worker_before_any_byte_is_sent(channel, make_instance) -> None:
    """A worker reads a slice's blob file whole and checks it by the CRC-32 its pointer
    records before handing any byte on: a flipped checksum flag in the zstd frame header
    (which zstd's own check lets through: it then ignores the checksum) is found there, and
    the instance asked again whole through the node's read (which finds no good copy here).
    Streamed, as before, the copy went out as good."""
    if codec._isal_crc32 is None:
        pytest.skip("isal is not installed in this venv (pip install -e . installs it)")
    worker, archive = channel
    big = _compressed(make_instance, BIG)[0]
    assert worker.store(big).status is WriteStatus.SUCCESS
    pointer = _pointer(archive.rocks, big)
    assert pointer is not None
    path = archive.rocks.blob_files.path(pointer)
    damaged = bytearray(path.read_bytes())
    damaged[4] ^= 0x04  # The frame header's checksum flag.
    path.write_bytes(bytes(damaged))
    with pytest.raises(ReadError):
        worker.open_streamed(_location(big))
    assert archive.whole_reads == 1


def test_a_pooled_blob_is_recorded_under_the_worker_s_name_without_a_rename(tmp_path: Path, make_instance) -> None:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    archive = StoreArchive(store)
    directory = tempfile.mkdtemp(prefix="pacsnode-ch-test-")
    server = ChannelServer(os.path.join(directory, "archive.sock"), archive, store.blob_files)
    server.start()
    worker_files = _worker_files(store, pooled=True)
    try:
        worker = ChannelArchive(server.path, worker_files, THRESHOLD)
        first, second = _compressed(make_instance, BIG)[:2]
        assert worker.store(first).outcome == StoreOutcome.STORED
        pointer = _pointer(store, first)
        assert pointer is not None
        assert pointer.name.split("/")[1].startswith(f"{WORKER_POOL_PREFIX}{os.getpid()}_")
        assert pointer.crc32_marks == _marks_of_file(store, pointer)  # Carried from the worker.
        # A frame naming a file another record already points at: refused, that file untouched.
        header = {"study": second.study_instance_uid, "series": second.series_instance_uid,
                  "sop_instance": second.sop_instance_uid, "sop_class": second.sop_class_uid,
                  "transfer_syntax": second.transfer_syntax_uid, "dataset_offset": second.dataset_offset,
                  "content_hash": second.content_hash, "attributes": second.attributes,
                  "part10_bytes": len(second.part10),
                  "blob_file": {"name": pointer.name, "size_bytes": pointer.size_bytes, "crc32": pointer.crc32,
                                "pooled": True}}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server.path)
        try:
            send_frame(sock, Kind.STORE, header)
            kind, _, _ = recv_frame(sock)
            assert kind is Kind.ERROR
        finally:
            sock.close()
        assert store.read_part10(first.study_instance_uid, first.sop_instance_uid) == first.part10
        with pytest.raises(KeyError):
            store.read_part10(second.study_instance_uid, second.sop_instance_uid)
    finally:
        worker_files.close()
        server.close()
        store.close()
        os.rmdir(directory)
