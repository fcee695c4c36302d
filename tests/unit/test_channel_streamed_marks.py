"""A DICOM worker's streamed read of the node's blob file checks it at each 1 MiB CRC-32
mark (node/archive_channel.py hands the pointer's marks over with the file's name), as a
streamed read in the node process does: a damaged byte is found at the next mark, before
the pieces after it are handed out, not by the whole-file CRC-32 before the last piece.

The real channel (ChannelArchive in this process standing for a worker, ChannelServer on a
Unix socket) in front of a real RocksStore, as tests/unit/test_channel_blob_files.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pacsnode.node import codec
from pacsnode.node.archive_channel import ChannelArchive, ChannelServer
from pacsnode.node.blob_files import CHUNK_BYTES, MARK_BYTES, BlobFiles, BlobPointer, Part10Stream
from pacsnode.node.store import PREFIX_BLOB, SEP, RocksStore, study_prefix
from pacsnode.replication.archive import WriteStatus
from pacsnode.replication.model import CorruptBlob, Instance
from pacsnode.sim.datagen import StudySetSpec, iter_part10

from .test_channel_blob_files import StoreArchive, _location

# 16-bit noise does not compress: the blob file is ~8.4 MB, its zstd blocks kept raw (a
# changed byte inside one is not seen by zstd's block decoding).
NOISE = StudySetSpec(patients=1, series_per_study=1, instances_per_series=1, rows=2048, cols=2048, seed=31,
                     pixel_fill="random")


@pytest.fixture
def stored(tmp_path: Path, make_instance: Callable[[bytes], Instance]
           ) -> Iterator[tuple[ChannelArchive, RocksStore, Instance, BlobPointer]]:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    directory = tempfile.mkdtemp(prefix="pacsnode-ch-test-")
    server = ChannelServer(os.path.join(directory, "archive.sock"), StoreArchive(store), store.blob_files)
    server.start()
    # whole_read_bytes_max=0: every blob file is streamed, as one over 2 MiB is.
    worker_files = BlobFiles(store.blob_files.directory)  # As a worker process has them.
    worker = ChannelArchive(server.path, worker_files, 4096, whole_read_bytes_max=0)
    try:
        _entry, part10 = next(iter_part10(NOISE))
        made = make_instance(part10)
        instance = Instance(**{**made.__dict__, "blob": codec.compress(made.part10)})
        assert worker.store(instance).status is WriteStatus.SUCCESS
        value = store._db.get(PREFIX_BLOB + study_prefix(instance.study_instance_uid) + SEP
                              + instance.sop_instance_uid.encode())
        pointer = BlobPointer.decode(value)
        assert pointer is not None and pointer.crc32_marks is not None and len(pointer.crc32_marks) >= 4
        yield worker, store, instance, pointer
    finally:
        worker.close()
        worker_files.close()
        server.close()
        store.close()
        os.rmdir(directory)


def _handed_out_before_the_error(worker: ChannelArchive, instance: Instance) -> int:
    """Part-10 bytes the worker's stream handed out before it raised CorruptBlob."""
    opened, _offset = worker.open_streamed(_location(instance))
    assert isinstance(opened, Part10Stream)
    handed = 0
    with opened, pytest.raises(CorruptBlob):
        while chunk := opened.read_chunk(CHUNK_BYTES):
            handed += len(chunk)
    return handed


def test_an_undamaged_file_streams_whole(stored) -> None:
    worker, _store, instance, _pointer = stored
    opened, offset = worker.open_streamed(_location(instance))
    assert isinstance(opened, Part10Stream) and offset == instance.dataset_offset
    with opened:
        assert opened.read_all() == instance.part10


@pytest.mark.parametrize("damaged_at", [100_000, 2 * MARK_BYTES + 500_000])
def test_a_damaged_byte_is_found_at_the_next_mark(stored, damaged_at: int) -> None:
    worker, store, instance, pointer = stored
    path = store.blob_files.path(pointer)
    data = bytearray(path.read_bytes())
    assert len(data) > damaged_at + 4 * MARK_BYTES  # Marks after the damaged one, and the end further on.
    data[damaged_at] ^= 0x01
    path.write_bytes(bytes(data))
    handed = _handed_out_before_the_error(worker, instance)
    next_mark = (damaged_at // MARK_BYTES + 1) * MARK_BYTES
    # Nothing past the next mark went out (the decompressor reads a chunk ahead of what it
    # hands out, so at most what the file's bytes up to that mark decompress to)...
    assert handed <= next_mark
    # ...and the bytes before the damaged mark did: the check is per mark, not up front.
    assert handed >= damaged_at // MARK_BYTES * MARK_BYTES - CHUNK_BYTES
    assert handed < len(instance.part10) - CHUNK_BYTES
