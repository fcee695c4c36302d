"""What the HTTP front end needs of a running node: readiness, the cluster view and the
figures behind /metrics. Kept apart from node/server.py so that the wiring there is a
few lines."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import zstandard

from pacsnode.node import acceptor
from pacsnode.node.http_guard import HttpAccess
from pacsnode.node.http_server import HttpServer
from pacsnode.node.metrics import Metrics
from pacsnode.node.dicomweb import instance_header_json
from pacsnode.node.dicomweb_metadata import HEADER_READ_BYTES, HeaderTruncated
from pacsnode.node.blob_files import CHUNK_BYTES, BlobPointer
from pacsnode.node.codec import crc32_of, decompress, decompress_crc_checked
from pacsnode.node.dicomweb_zstd import WindowTooLarge, check_frame_header
from pacsnode.node.store import WHOLE_READ_BYTES_MAX, RocksStore
from pacsnode.replication.archive import InstanceLocation
from pacsnode.replication.model import CorruptBlob, StoreError, StoreFull

if TYPE_CHECKING:
    from pacsnode.node.server import Node



def readiness(node: "Node") -> dict[str, Any]:
    """Ready = joined its cluster, a live member (not leaving), and not refusing stores."""
    joined = node.coordinator.joined()
    me = node.membership.member(node.config.node_id)
    state = str(getattr(me, "state", "unknown")) if me is not None else "unknown"
    reasons = []
    if not joined:
        reasons.append("still joining its cluster")
    if state != "alive":
        reasons.append(f"member state is {state}")
    try:
        node.store.check_capacity(0)
    except StoreFull as error:
        reasons.append(f"refusing stores: {error}")
    return {"ready": not reasons, "node_id": node.config.node_id, "joined": joined, "state": state,
            "reasons": reasons}


def cluster_view(node: "Node") -> dict[str, Any]:
    """The same data as `pacsnode status --json`, asked of this node's own peer port; on a
    TLS node with the node's own certificate, as the node (the peer guard's rule for node
    certificates), so the view needs no admin certificate on the node."""
    from pacsnode.cli.status import collect  # The one implementation of the status view.

    me = node.membership.member(node.config.node_id)
    host = node.config.host if node.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    port = me.peer_port if me is not None else node.config.peer_port
    return collect(f"{host}:{port}", node.config.cluster_id, timeout_s=3.0, tls_dir=node.config.tls_dir or None,
                   sender_id=node.config.node_id)


def local_gauges(node: "Node") -> dict[str, float]:
    """Gauges /metrics adds to Node.metrics(): disk free and studies lacking a full copy."""
    return {
        "pacsnode_store_disk_free_bytes": float(shutil.disk_usage(node.store.path).free),
        "pacsnode_repair_under_replicated_studies": float(node.under_replicated_studies()),
    }


def http_server_for(node: "Node") -> HttpServer:
    metrics = Metrics(node.metrics, lambda: local_gauges(node))
    node.write_watch.observers.append(metrics.observe_store_write)
    config = node.config
    security = node.security
    return HttpServer(
        host=config.http_host or config.host,
        port=config.http_port,
        archive=node.archive,
        metrics=metrics,
        ready=lambda: readiness(node),
        cluster=lambda: cluster_view(node),
        instance_size_bytes_max=config.instance_size_bytes_max,
        stow_bytes_max=config.stow_bytes_max,  # STOW-RS bytes held by all requests (node/dicomweb_stow_budget.py),
        stow_wait_s=config.store_timeout_ms / 1000,  # and how long one waits for its share.
        qido_result_max=config.qido_result_max,
        ssl_context=security.http_context(),
        access=HttpAccess(tls=security.peer_tls, mode=config.access_mode, loopback_trusted=config.loopback_trusted),
        audit=security.audit,
        viewer_dir=Path(config.viewer_dir) if config.viewer_dir else None,
        local_headers=StoreHeaders(node.store),
        owns=node.coordinator.owns,  # WADO-RS reads of own copies: fewer at once (node/dicomweb.py).
        local_reads=StoreReads(node.store, config.blob_file_bytes_min),  # WADO-RS: own blob files read whole, CRC-32 checked.
    )




@dataclasses.dataclass(frozen=True)
class KeptFile:
    """An instance's blob file as StoreReads.kept found it."""

    location: InstanceLocation
    pointer: BlobPointer
    part10_bytes: int


class StoreReads:
    """DicomWeb's LocalReads over this node's RocksStore. `kept` + `read_cached` (the HTTP
    loop's reads): an instance kept as a blob file of up to WHOLE_READ_BYTES_MAX, read only
    when all of it is in the page cache (RWF_NOWAIT) into the calling thread's buffer,
    kept for its next read, checked against the CRC-32 its pointer records (all its bytes,
    in place of zstd's XXH64 of the content: node/codec.py's decompress_crc_checked), then
    decompressed, its length checked. `part10`
    (the reader threads'): an instance kept as a blob file of
    up to WHOLE_READ_BYTES_MAX (a CT or MR slice) read as C-GET reads it (BlobFiles.read_whole:
    into the reader thread's buffer, waiting on the disk if it must, checked by its pointer's
    CRC-32, decompressed whole, its length checked against its record); the record and the pointer come in one
    call. An instance of about
    `blob_file_bytes_min` that turns out to be a RocksDB value is decompressed from the value
    read (handing it back would read it again). None (the archive's read then) for smaller
    instances, a bigger blob file (streamed), an instance not here, and a copy that fails a
    check (`read_cached`: CorruptBlob). A copy that fails a check is not logged here: the
    archive's read that follows reads it again, logs it (store.blob.corrupt) and reads
    another owner's copy, so that an operator sees one line per corrupt copy read."""

    def __init__(self, store: RocksStore, blob_file_bytes_min: int) -> None:
        self._store = store
        # Instances this much smaller than the store's blob_file_bytes_min are RocksDB values
        # for sure (zstd adds a few bytes at most): left to the archive, whose single-key get
        # skips RocksDB's CRC-32C, which compressed_copy's batch get computes (in software)
        # on a value read back from RocksDB's own blob files.
        self._value_bytes_max = blob_file_bytes_min - 1024
        self._buffers = threading.local()

    def _buffer(self, size: int) -> memoryview:
        """This thread's read buffer, at least `size` bytes (at most WHOLE_READ_BYTES_MAX:
        bigger blob files are streamed), kept for its next read."""
        buffer: memoryview | None = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._buffers.buffer = memoryview(bytearray(max(size, 1024 * 1024)))
        return buffer

    def kept(self, location: InstanceLocation) -> KeptFile | None:
        """The blob file `read_cached` reads for `location` (a lookup: on a reader thread),
        or None: not here, a RocksDB value, or a file too big to read whole."""
        kept = self.blob_file(location)
        if kept is None or kept.part10_bytes > WHOLE_READ_BYTES_MAX or kept.pointer.size_bytes > WHOLE_READ_BYTES_MAX:
            return None
        return kept

    def read_cached(self, kept: KeptFile) -> bytes | None:
        """The Part-10 bytes of a file `kept` found, read only if all of it is in the page
        cache (no wait on the disk: the HTTP loop may call this) into this thread's buffer,
        checked by its pointer's CRC-32 and decompressed, its length checked. None when it is not cached (then
        a reader thread reads it); CorruptBlob, not logged, when it fails a check (then the
        archive's read, which logs it)."""
        what = kept.location.sop_instance_uid
        blob = self._store.blob_files.read_into(kept.pointer, self._buffer(kept.pointer.size_bytes), what,
                                                cached_only=True)
        if blob is None:
            return None
        part10 = decompress_crc_checked(blob, kept.pointer.crc32, what)
        if len(part10) != kept.part10_bytes:
            raise CorruptBlob(f"blob of {what} holds {len(part10)} bytes, not {kept.part10_bytes}")
        return part10

    def blob_file(self, location: InstanceLocation) -> KeptFile | None:
        """The blob file of an instance kept here as one, of any size (WADO-RS streams the
        frames of a big one: node/frame_stream.py), or None: not here, or a RocksDB value."""
        if 0 < location.part10_bytes < self._value_bytes_max:
            return None
        found = self._store.compressed_copy(location.study_instance_uid, location.sop_instance_uid)
        if found is None:
            return None
        pointer, record = found
        if not isinstance(pointer, BlobPointer):
            return None
        return KeptFile(location, pointer, record.size_bytes + record.dataset_offset)

    def open_blob(self, kept: KeptFile) -> BinaryIO:
        """The file `blob_file` found, open for reading (its bytes unchecked: the reader
        checks them against the pointer's size and CRC-32); CorruptBlob when it is missing."""
        try:
            return open(self._store.blob_files.path(kept.pointer), "rb")
        except FileNotFoundError:
            raise CorruptBlob(f"blob file of {kept.location.sop_instance_uid} is missing") from None

    def stored_bytes(self, location: InstanceLocation) -> int | None:
        """The stored frame's bytes: a blob file's size from its pointer, else the value's
        length (DicomWeb._zstd_saves); None when the instance is not here."""
        found = self._store.compressed_copy(location.study_instance_uid, location.sop_instance_uid)
        if found is None:
            return None
        kept, _record = found
        return kept.size_bytes if isinstance(kept, BlobPointer) else len(kept)

    def stored_frame(self, location: InstanceLocation) -> bytes | memoryview | StoredFrameFile | None:
        """The instance's stored zstd frame, to go out as it is kept (Content-Encoding: zstd),
        after the check its read gets today, and never decompressed when it is a blob file:
        a blob file of up to WHOLE_READ_BYTES_MAX read whole and checked by its pointer's
        CRC-32; a bigger one as a StoredFrameFile (checked as it is read, the caller closes
        it); a RocksDB value decompressed (its zstd checksum and its length checked, as the
        archive's read of it checks them) and the frame sent, not what it decompressed to.
        The frame's header must say it has its checksum and the record's length. None: not
        here, or a frame whose window is over RFC 9659's 8 MB (its part is then read and
        compressed anew). CorruptBlob, not logged, when a check fails (the archive's read then
        logs it and reads another owner's copy)."""
        found = self._store.compressed_copy(location.study_instance_uid, location.sop_instance_uid)
        if found is None:
            return None
        kept, record = found
        part10_bytes = record.size_bytes + record.dataset_offset
        what = location.sop_instance_uid
        if not isinstance(kept, BlobPointer):
            if not _check_header(kept, part10_bytes, what):
                return None
            if len(decompress(kept, what)) != part10_bytes:
                raise CorruptBlob(f"blob of {what} does not hold {part10_bytes} bytes")
            return kept
        if kept.size_bytes > WHOLE_READ_BYTES_MAX:
            streamed = StoredFrameFile(self.open_blob(KeptFile(location, kept, part10_bytes)), kept, what)
            try:
                started = streamed.start(part10_bytes)
            except BaseException:
                streamed.close()
                raise
            if not started:
                streamed.close()
                return None
            return streamed
        blob = self._read_file(kept, what)
        if crc32_of(blob) != kept.crc32:
            raise CorruptBlob(f"blob file of {what} failed its CRC-32 check")
        return blob if _check_header(blob, part10_bytes, what) else None

    def _read_file(self, pointer: BlobPointer, what: str) -> bytes:
        """A blob file's bytes, one pread into a new bytes object (not a zero-filled buffer
        copied out: it goes out as it is, so it cannot be a reused buffer); CorruptBlob when
        it is missing or not of the pointer's size."""
        try:
            fd = os.open(self._store.blob_files.path(pointer), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptBlob(f"blob file of {what} is missing") from None
        try:
            data = os.pread(fd, pointer.size_bytes + 1, 0)  # One more: a longer file shows.
            while len(data) < pointer.size_bytes:  # A short read (rare for a regular file).
                more = os.pread(fd, pointer.size_bytes + 1 - len(data), len(data))
                if not more:
                    break
                data += more
        finally:
            os.close(fd)
        if len(data) != pointer.size_bytes:
            raise CorruptBlob(f"blob file of {what} holds {len(data)}+ bytes, not {pointer.size_bytes}")
        return data

    def part10(self, location: InstanceLocation) -> tuple[bytes, int] | None:
        if 0 < location.part10_bytes < self._value_bytes_max:
            return None
        found = self._store.compressed_copy(location.study_instance_uid, location.sop_instance_uid)
        if found is None:
            return None
        kept, record = found
        part10_bytes = record.size_bytes + record.dataset_offset
        if isinstance(kept, BlobPointer) and (part10_bytes > WHOLE_READ_BYTES_MAX
                                              or kept.size_bytes > WHOLE_READ_BYTES_MAX):
            return None
        what = location.sop_instance_uid
        try:
            if isinstance(kept, BlobPointer):
                # Into this thread's buffer, checked by its pointer's CRC-32 as read_cached
                # does (C-GET and C-MOVE read a slice's file the same way).
                part10 = self._store.blob_files.read_whole(kept, part10_bytes, what)
            else:  # A RocksDB value, already read: asking the archive would read it again.
                part10 = decompress(kept, what)
                if len(part10) != part10_bytes:
                    raise CorruptBlob(f"blob of {what} holds {len(part10)} bytes, not {part10_bytes}")
        except CorruptBlob:
            # None, so that the archive's read is tried: it logs this copy and reads another.
            return None
        return part10, record.dataset_offset


def _check_header(frame: bytes | memoryview, part10_bytes: int, what: str) -> bool:
    """Whether a stored frame may go out as stored (False: its window is over RFC 9659's
    bound); CorruptBlob when its header is not what the record says."""
    try:
        check_frame_header(frame, part10_bytes)
    except WindowTooLarge:
        return False
    except (ValueError, zstandard.ZstdError) as error:
        raise CorruptBlob(f"blob of {what} is not the frame its record says: {error}") from None
    return True


class StoredFrameFile:
    """A blob file of more than WHOLE_READ_BYTES_MAX sent as stored (Content-Encoding:
    zstd), CHUNK_BYTES at a time, every byte checked by the CRC-32 its pointer records as
    it is read: the last chunk is handed out only after the whole file matched its size and
    CRC-32, so that a file that fails the check breaks the body off before its end (as a
    Part10Stream's last chunk does with zstd's checksum). Blocking reads: reader threads."""

    def __init__(self, source: BinaryIO, pointer: BlobPointer, what: str) -> None:
        self._source = source
        self._pointer = pointer
        self._what = what
        self._held: bytes | None = None
        self._crc = 0
        self._read = 0

    def start(self, part10_bytes: int) -> bool:
        """Read the first chunk and check the frame's header: False when its window is
        over the bound (then close it); CorruptBlob when the file or the header is wrong."""
        held = os.fstat(self._source.fileno()).st_size
        if held != self._pointer.size_bytes:
            raise CorruptBlob(f"blob file of {self._what} holds {held} bytes, not {self._pointer.size_bytes}")
        first = self._source.read(CHUNK_BYTES)
        if not _check_header(first, part10_bytes, self._what):
            return False
        self._take(first)
        self._held = first
        return True

    def _take(self, chunk: bytes) -> None:
        self._crc = crc32_of(chunk, self._crc)
        self._read += len(chunk)

    def next_chunk(self) -> bytes:
        """The next chunk of the stored frame; b"" after the last. CorruptBlob (not logged)
        instead of the last one when the file fails its size or CRC-32 check."""
        if self._held is None:
            return b""
        following = self._source.read(CHUNK_BYTES)
        if following:
            self._take(following)
            chunk, self._held = self._held, following
            return chunk
        if self._read != self._pointer.size_bytes or self._crc != self._pointer.crc32:
            raise CorruptBlob(f"blob file of {self._what} failed its size or CRC-32 check")
        chunk, self._held = self._held, None
        return chunk

    def close(self) -> None:
        self._source.close()


class StoreHeaders:
    """DicomWeb's LocalHeaders over this node's RocksStore: the /metadata JSON of an
    instance held here, read back when kept, else built from its header and kept. The
    header is read from the first HEADER_READ_BYTES of the instance, decompressed only that
    far (not checksum-verified: the checksum covers the whole; a retrieve verifies it);
    a smaller instance, a longer header or a deflated one is read whole and verified."""

    def __init__(self, store: RocksStore) -> None:
        self._store = store

    def header(self, location: InstanceLocation) -> bytes | None:
        study, sop = location.study_instance_uid, location.sop_instance_uid
        record = self._store.instance_record(study, sop)
        if record is None:
            return None
        kept = self._store.instance_header(study, sop, record.content_hash)
        if kept is not None:
            return kept
        try:
            if record.dataset_offset + record.size_bytes < HEADER_READ_BYTES:
                # A small instance is read whole, checksum-verified, and once (not its head
                # first: most instances whose entry is built here are small, node/server.py).
                header = instance_header_json(self._store.read_part10(study, sop), location)
            else:
                # The first HEADER_READ_BYTES only (decompressed that far): a header almost
                # always ends there; else (or deflated) the whole instance, checksum-verified.
                head = self._store.read_part10_head(study, sop, HEADER_READ_BYTES)
                try:
                    if len(head) < HEADER_READ_BYTES:
                        raise HeaderTruncated("a small instance is read whole, checksum-verified")
                    header = instance_header_json(head, location, whole=False)
                except HeaderTruncated:
                    header = instance_header_json(self._store.read_part10(study, sop), location)
        except (KeyError, StoreError):
            return None  # Deleted meanwhile, or corrupt here (logged): the archive reads another copy.
        again = self._store.instance_record(study, sop)
        if again is not None and again.content_hash == record.content_hash:  # Not replaced while we read.
            self._store.put_header(study, sop, record.content_hash, header)
        return header


def bind_dimse_metrics(node: "Node", server: HttpServer) -> None:
    """Count and time the DICOM front end's requests (pynetdicom notification events)."""
    dicom_server = getattr(node.front_end, "_server", None)
    if dicom_server is None:
        return
    for event, handler in server.metrics.dimse_handlers():
        dicom_server.bind(event, handler)
    ae = getattr(node.front_end, "ae", None)
    if isinstance(ae, acceptor.NodeAE):
        ae.store_response_hook = acceptor.StoreResponseHook(server.metrics.on_sent, server.metrics.response_sent,
                                                             server.metrics.on_received,
                                                             server.metrics.request_received)
