"""The local channel between DIMSE worker processes and the node process (Unix socket).

A worker (node/dicom_worker.py) does the association handling, the header read and the
compression; the node owns the store and the coordinator. The worker's front end calls a
`ChannelArchive`, which has the Archive methods the front end uses (store, find, locate,
read) and sends each call over this channel; `ChannelServer` answers them with the real
Archive. Success of a C-STORE therefore still means what the node's Archive says:
durable on W replicas.

Framing (every frame, both ways):

    u32 big-endian  length of what follows (1 + 4 + header + body)
    u8              Kind
    u32 big-endian  header length
    header          UTF-8 JSON object (typed fields only, never a pickled object)
    body            raw bytes (instance bytes, blobs), may be empty

One connection carries one request at a time; a worker's threads share a few idle
connections (each call takes one and gives it back once its answer is read). A C-FIND
answer is a stream of ROW frames ended by FIND_END, INCOMPLETE or ERROR; a worker that
stops reading closes the connection and the node's sender stops. An AUDIT frame (worker to node) carries one audit message line
(node/audit.py) for the node's audit trail and gets no answer.

A STORE frame carries the instance's compressed copy (its zstd blob) as its body, or,
for a blob of `blob_file_bytes_min` or more (and every spooled instance), the
name of a temp file the worker wrote and fsync'ed in the store's blobs directory
(node/blob_files.py) and no body: the node's store then names that file instead of
putting the bytes through RocksDB's write (which holds the node process's GIL while it
copies them into its log), and the node never receives the bytes. The Part-10 bytes
themselves never cross: the node needs only their length. The worker removes its temp
file once the node has answered (kept files were renamed by then); a temp file left by a
worker that died is removed when the store next opens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import json
import logging
import os
import re
import socket
import struct
import threading
from typing import Any, Callable, Iterator

from pacsnode.node.blob_files import (
    TEMP_PREFIX,
    WHOLE_READ_BYTES_MAX,
    WORKER_POOL_PREFIX,
    BlobFiles,
    BlobPointer,
    Part10Stream,
    TempBlob,
    WorkerBlob,
    decode_marks,
    encode_marks,
)
from pacsnode.node.codec import decompress
from pacsnode.replication.model import CorruptBlob

from pacsnode.replication.archive import (
    IncompleteAnswer,
    InstanceLocation,
    ReadError,
    RetrievePlan,
    Shortfall,
    WriteResult,
    WriteStatus,
)
from pacsnode.replication.commitment import CommitResult, CommitSettings, FailureReason, Reference
from pacsnode.replication.delete_coordinator import DeleteResult, DeleteScope, DeleteStatus
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import Attributes, Instance

log = logging.getLogger(__name__)

_PREFIX = struct.Struct(">IBI")
DIMSE_SERVICES = frozenset({"C-STORE", "C-GET", "C-FIND", "C-MOVE", "C-ECHO"})  # node/metrics.py's services.
FRAME_BYTES_MAX = 8 * 1024**3  # Larger than any instance the front end accepts (instance_size_bytes_max).
COMMITS_AT_ONCE = 4  # Storage Commitment checks one worker waits for at once (node/commitment.py reporters).
IDLE_CONNECTIONS_MAX = 16  # A worker's idle channel connections kept for the next call.
AUDIT_LINE_MAX = 64 * 1024  # One audit message (node/audit.py caps its free text at 200 characters).


class Kind(enum.IntEnum):
    # worker -> node
    HELLO = 1
    STORE = 2
    FIND = 3
    LOCATE = 4
    READ = 5
    AUDIT = 6  # One audit message line for the node's audit trail; not answered.
    METRICS = 7  # Answered DIMSE requests, [service, status, seconds] each, for /metrics; not answered.
    DELETE = 8  # A study, series or instance to delete (an IOCM rejection note's reference).
    COMMIT = 9  # A Storage Commitment check: answered when every instance is decided.
    SLOT = 10  # May this worker accept one more association? (max_associations, shared)
    SLOT_FREE = 11  # An association that had a slot ended; not answered.
    # This connection now carries the DICOM connections the node accepts for this worker
    # (node/workers.py ConnectionHandOff): node -> worker one byte with the socket
    # (SCM_RIGHTS: SLOT_GIVEN or NO_SLOT), worker -> node one byte per handed connection
    # that ended (ENDED_WITH_SLOT or ENDED). No frames.
    HANDOFF = 12
    # node -> worker
    STORED = 20
    ROW = 21
    FIND_END = 22
    INCOMPLETE = 23
    PLAN = 24
    DATA = 25
    READ_FAILED = 26
    ERROR = 27
    WELCOME = 28
    DATA_ZSTD = 29  # An own copy's zstd blob: the worker decompresses (and checks) it.
    DATA_FILE = 30  # An own copy kept as a blob file (name, size, CRC-32 and marks): the worker reads it (a slice whole).
    DELETED = 31  # How a DELETE ended.
    COMMITTED = 32  # A COMMIT's result: committed and failed references.
    SLOT_GRANTED = 33
    SLOT_REFUSED = 34


# The bytes of a HANDOFF connection (node/workers.py ConnectionHandOff).
SLOT_GIVEN = b"C"  # node -> worker, with the socket: a max_associations slot is held for it.
NO_SLOT = b"B"  # node -> worker, with the socket: none was left; the worker rejects it busy.
ENDED_WITH_SLOT = b"D"  # worker -> node: a handed connection that held a slot ended.
ENDED = b"E"  # worker -> node: a handed connection without a slot ended.


class StoreFrameError(Exception):
    """A STORE frame whose instance the node cannot take (answered as an ERROR frame: the
    worker answers the C-STORE with a failure; the connection stays)."""


class ChannelError(Exception):
    """The channel broke or the other side sent something unexpected."""


class RemoteError(Exception):
    """The node raised an unexpected exception answering a request (a bug or an operating error)."""


# ----------------------------------------------------------------------------- framing
def send_frame(sock: socket.socket, kind: Kind, header: dict[str, Any], *bodies: bytes) -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    body_len = sum(len(b) for b in bodies)
    prefix = _PREFIX.pack(1 + 4 + len(encoded) + body_len, int(kind), len(encoded))
    sock.sendall(prefix + encoded)
    for body in bodies:
        if body:
            sock.sendall(body)


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    buffer = bytearray(count)
    view = memoryview(buffer)
    received = 0
    while received < count:
        n = sock.recv_into(view[received:], count - received)
        if n == 0:
            raise ChannelError("channel closed")
        received += n
    return bytes(buffer)


def recv_frame(sock: socket.socket) -> tuple[Kind, dict[str, Any], bytes]:
    length, kind_value, header_len = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if length > FRAME_BYTES_MAX or header_len > length - 5:
        raise ChannelError(f"bad frame: length={length} header={header_len}")
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise ChannelError(f"unknown frame kind {kind_value}") from None
    payload = _recv_exact(sock, length - 5)
    try:
        header = json.loads(payload[:header_len])
    except ValueError:
        raise ChannelError("undecodable frame header") from None
    if not isinstance(header, dict):
        raise ChannelError("frame header is not an object")
    return kind, header, payload[header_len:]


# ----------------------------------------------------------------------------- typed payloads
def query_to_json(query: Query) -> dict[str, Any]:
    return {"level": query.level, "model": query.model, "return_keys": list(query.return_keys),
            "conditions": [[c.keyword, c.vr, c.value] for c in query.conditions]}


def query_from_json(data: dict[str, Any]) -> Query:
    return Query(level=str(data["level"]), model=str(data["model"]),
                 return_keys=tuple(str(k) for k in data["return_keys"]),
                 conditions=tuple(Condition(str(k), str(vr), str(v)) for k, vr, v in data["conditions"]))


def location_to_json(location: InstanceLocation) -> list[str]:
    return [location.study_instance_uid, location.series_instance_uid, location.sop_instance_uid,
            location.sop_class_uid, location.transfer_syntax_uid, location.correction]


def location_from_json(data: list[Any]) -> InstanceLocation:
    study, series, sop, sop_class, syntax = (str(v) for v in data[:5])
    correction = str(data[5]) if len(data) > 5 else ""  # The study's correction: the node applies it on READ.
    return InstanceLocation(study, series, sop, sop_class, syntax, correction=correction)


def _attributes(data: Any) -> Attributes:
    if not isinstance(data, dict):
        raise ChannelError("attributes are not an object")
    return {str(k): (list(map(str, v)) if isinstance(v, list) else str(v)) for k, v in data.items()}


class AssociationSlots:
    """The node's `max_associations`, shared by its DICOM workers: a worker takes a slot
    for each association it would accept and gives it back when the association ends;
    the slots a channel connection holds are given back when it closes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[socket.socket, int] = {}
        self._lock = threading.Lock()

    def in_use(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def acquire(self, holder: socket.socket) -> bool:
        with self._lock:
            if sum(self._held.values()) >= self.limit:
                return False
            self._held[holder] = self._held.get(holder, 0) + 1
            return True

    def release(self, holder: socket.socket) -> None:
        with self._lock:
            held = self._held.get(holder, 0)
            if held <= 1:
                self._held.pop(holder, None)
            else:
                self._held[holder] = held - 1

    def release_all(self, holder: socket.socket) -> None:
        with self._lock:
            self._held.pop(holder, None)


# ----------------------------------------------------------------------------- worker side
class SlotClient:
    """A worker's side of the shared association slots: one connection of its own (the
    node counts slots per connection), used by one thread at a time. A broken channel
    refuses (no slot: the association is rejected as busy, never accepted uncounted)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._sock.connect(self._path)
                send_frame(self._sock, Kind.SLOT, {})
                kind, _, _ = recv_frame(self._sock)
            except (OSError, ChannelError) as error:
                self._close()
                log.error("dicom.worker.slot_unavailable error=%s", type(error).__name__)
                return False
            return kind == Kind.SLOT_GRANTED

    def release(self) -> None:
        with self._lock:
            if self._sock is None:
                return  # Its connection closed: the node gave back everything it held.
            try:
                send_frame(self._sock, Kind.SLOT_FREE, {})
            except (OSError, ChannelError):
                self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ChannelArchive:
    """The Archive calls of the DICOM front end, answered by the node over the channel.

    With `blob_files` (the node store's blobs directory), a blob of `blob_file_bytes_min`
    or more is written there by this process and sent by name (the module's docstring).
    An own copy kept as a blob file is read from there: one of up to `whole_read_bytes_max`
    whole (BlobFiles.read_whole), a bigger one streamed."""

    def __init__(self, path: str, blob_files: BlobFiles | None = None, blob_file_bytes_min: int = 0,
                 whole_read_bytes_max: int = WHOLE_READ_BYTES_MAX) -> None:
        self._path = path
        # Connections not in use, shared by every thread: a call takes one (or connects) and
        # gives it back when its answer is read. One per association thread, as before,
        # was a connect and a thread started in the node (and ended) per association.
        self._idle: list[socket.socket] = []
        self._idle_lock = threading.Lock()
        self._blob_files = blob_files
        self._blob_file_bytes_min = blob_file_bytes_min
        self._whole_read_bytes_max = whole_read_bytes_max
        self._lock = threading.Lock()
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None  # Made at the first commit.

    def _take(self) -> socket.socket:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        return sock

    def _give_back(self, sock: socket.socket) -> None:
        with self._idle_lock:
            if len(self._idle) < IDLE_CONNECTIONS_MAX:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close the idle connections (one in use is closed by its call when it ends)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _send(self, kind: Kind, header: dict[str, Any]) -> None:
        """A frame the node does not answer (AUDIT, METRICS)."""
        sock = self._take()
        try:
            send_frame(sock, kind, header)
        except (OSError, ChannelError):
            sock.close()
            raise
        self._give_back(sock)

    def _call(self, kind: Kind, header: dict[str, Any], *bodies: bytes) -> tuple[Kind, dict[str, Any], bytes]:
        sock = self._take()
        try:
            send_frame(sock, kind, header, *bodies)
            answer = recv_frame(sock)
        except (OSError, ChannelError):
            sock.close()
            raise
        self._give_back(sock)
        if answer[0] == Kind.ERROR:
            raise RemoteError(str(answer[1].get("error", "")))
        return answer

    def store(self, instance: Instance) -> WriteResult:
        header: dict[str, Any] = {
            "study": instance.study_instance_uid, "series": instance.series_instance_uid,
            "sop_instance": instance.sop_instance_uid, "sop_class": instance.sop_class_uid,
            "transfer_syntax": instance.transfer_syntax_uid, "dataset_offset": instance.dataset_offset,
            "content_hash": instance.content_hash, "attributes": instance.attributes,
            "part10_bytes": instance.size_bytes + instance.dataset_offset,
        }
        written: TempBlob | None = None  # A temp file this call wrote (and so removes).
        temp = instance.blob_file if isinstance(instance.blob_file, TempBlob) else None
        pooled: BlobPointer | None = None
        if temp is None and self._blob_files is not None and instance.blob \
                and len(instance.blob) >= self._blob_file_bytes_min:
            # Into an empty file of this worker's pool, under its final name (the node keeps
            # or removes it); a temp file (renamed by the node) when the pool has none ready.
            pooled = self._blob_files.write_pooled(instance.blob)
            if pooled is None:
                temp = written = self._blob_files.write_temp(instance.blob)
        try:
            if pooled is not None:
                header["blob_file"] = {"name": pooled.name, "size_bytes": pooled.size_bytes, "crc32": pooled.crc32,
                                       "pooled": True, **_marks_field(pooled.crc32_marks)}
                kind, answer, _ = self._call(Kind.STORE, header)
            elif temp is not None:
                header["blob_file"] = {"name": temp.path.name, "size_bytes": temp.size_bytes, "crc32": temp.crc32,
                                       **_marks_field(temp.crc32_marks)}
                kind, answer, _ = self._call(Kind.STORE, header)
            else:
                if not instance.blob:
                    raise ChannelError("STORE needs the instance's compressed copy")
                kind, answer, _ = self._call(Kind.STORE, header, instance.blob)
        finally:
            if written is not None:  # Renamed by the node's store when kept; else no longer needed.
                try:
                    written.path.unlink()
                except FileNotFoundError:
                    pass
        if kind != Kind.STORED:
            raise ChannelError(f"unexpected answer {kind.name} to STORE")
        return WriteResult(status=WriteStatus(answer["status"]), outcome=str(answer.get("outcome", "")),
                           message=str(answer.get("message", "")), latency_ms=int(answer.get("latency_ms", 0)))

    def find(self, query: Query, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Attributes]:
        sock = self._take()  # The stream's own until it ends.
        finished = False
        try:
            send_frame(sock, Kind.FIND, {"query": query_to_json(query)})
            while True:
                kind, header, _ = recv_frame(sock)
                if kind == Kind.ROW:
                    yield _attributes(header["row"])
                    if is_cancelled():
                        return
                elif kind == Kind.FIND_END:
                    finished = True
                    return
                elif kind == Kind.INCOMPLETE:
                    finished = True
                    raise IncompleteAnswer(Shortfall(ranges=int(header["ranges"]), studies=int(header["studies"])))
                elif kind == Kind.ERROR:
                    finished = True
                    raise RemoteError(str(header.get("error", "")))
                else:
                    raise ChannelError(f"unexpected answer {kind.name} to FIND")
        finally:
            if finished:
                self._give_back(sock)  # Whole answer read: reuse the connection.
            else:
                sock.close()  # Stopped early: closing tells the node to stop sending.

    def audit(self, line: str) -> None:
        """Send one audit message line to the node (node/audit.py AuditLog.forward); never raises:
        a broken channel is logged, as a failed audit write is."""
        try:
            self._send(Kind.AUDIT, {"line": line})
        except (OSError, ChannelError) as error:
            log.error("audit.forward_failed error=%s", type(error).__name__)

    def metrics(self, observations: list[list[Any]], refused: int = 0) -> None:
        """Send answered DIMSE requests, and this worker's total of refused associations, to
        the node's /metrics (node/metrics.py DimseForwarder); on a broken channel they are
        dropped, and that is logged."""
        try:
            self._send(Kind.METRICS, {"observations": observations, "pid": os.getpid(), "refused": refused})
        except (OSError, ChannelError) as error:
            log.error("metrics.forward_failed error=%s", type(error).__name__)

    def commit(self, references: list[Reference], settings: CommitSettings) -> "concurrent.futures.Future[CommitResult]":
        """A Storage Commitment check by the node (node/runtime.py ClusterArchive.commit):
        the node answers once every instance is decided (up to the settings' timeout); the
        future ends then, on a thread of this process (node/commitment.py CommitmentScp)."""
        with self._lock:
            if self._committer is None:
                self._committer = concurrent.futures.ThreadPoolExecutor(max_workers=COMMITS_AT_ONCE,
                                                                        thread_name_prefix="pacsnode-commit")
            committer = self._committer
        return committer.submit(self._commit, list(references), settings)

    def _commit(self, references: list[Reference], settings: CommitSettings) -> CommitResult:
        kind, answer, _ = self._call(Kind.COMMIT, {
            "references": [[r.sop_class_uid, r.sop_instance_uid] for r in references],
            "settings": dataclasses.asdict(settings)})
        if kind != Kind.COMMITTED:
            raise ChannelError(f"unexpected answer {kind.name} to COMMIT")
        return CommitResult(
            committed=tuple(Reference(str(c), str(i)) for c, i in answer["committed"]),
            failed=tuple((Reference(str(c), str(i)), FailureReason(reason)) for c, i, reason in answer["failed"]),
            rounds=int(answer.get("rounds", 0)))

    def delete(self, scope: DeleteScope) -> DeleteResult:
        """Delete through the node (node/runtime.py ClusterArchive.delete): what an IOCM
        rejection note received by this worker asks (node/iocm.py RejectionNotes)."""
        kind, answer, _ = self._call(Kind.DELETE, {"study": scope.study_instance_uid, "series": scope.series_instance_uid,
                                                   "sop_instance": scope.sop_instance_uid})
        if kind != Kind.DELETED:
            raise ChannelError(f"unexpected answer {kind.name} to DELETE")
        return DeleteResult(DeleteStatus(answer["status"]), instances=int(answer.get("instances", 0)),
                            acked=int(answer.get("acked", 0)), message=str(answer.get("message", "")))

    def locate(self, query: Query) -> RetrievePlan:
        kind, answer, _ = self._call(Kind.LOCATE, {"query": query_to_json(query)})
        if kind != Kind.PLAN:
            raise ChannelError(f"unexpected answer {kind.name} to LOCATE")
        return RetrievePlan(locations=[location_from_json(item) for item in answer["locations"]],
                            shortfall=Shortfall(ranges=int(answer["ranges"]), studies=int(answer["studies"])))

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        opened, offset = self.open_streamed(location)
        if isinstance(opened, Part10Stream):
            with opened:
                return opened.read_all(), offset
        return opened, offset

    def open_streamed(self, location: InstanceLocation) -> tuple[bytes | Part10Stream, int]:
        """An instance to send. The node's own uncorrected copy comes as kept: a zstd blob,
        decompressed here (the node process does not), or the name of its blob file (with
        its pointer's CRC-32 marks), read from it here as in one process: a slice whole,
        checked by its CRC-32 before any byte is sent, a bigger file streamed and checked
        at each 1 MiB mark as the reads pass it (node/blob_files.py CheckedReader). A copy that fails its check here is asked again
        whole, through the node's read (which reads another owner's copy when it has one)."""
        kind, answer, body = self._call(Kind.READ, {"location": location_to_json(location)})
        what = location.sop_instance_uid
        try:
            if kind == Kind.DATA_ZSTD:
                return decompress(body, what), int(answer["dataset_offset"])
            if kind == Kind.DATA_FILE:
                if self._blob_files is None:
                    raise ChannelError("DATA_FILE needs the store's blobs directory")
                pointer = BlobPointer(str(answer["name"]), int(answer["size_bytes"]), int(answer["crc32"]),
                                      _marks_of(answer, ChannelError))
                part10_bytes = int(answer["part10_bytes"])
                if part10_bytes <= self._whole_read_bytes_max and pointer.size_bytes <= self._whole_read_bytes_max:
                    return self._blob_files.read_whole(pointer, part10_bytes, what), int(answer["dataset_offset"])
                return self._blob_files.stream(pointer, part10_bytes, what), int(answer["dataset_offset"])
        except CorruptBlob as error:
            log.error("channel.read.corrupt_own_copy error=%s", type(error).__name__)
            kind, answer, body = self._call(Kind.READ, {"location": location_to_json(location), "whole": True})
        if kind == Kind.READ_FAILED:
            raise ReadError(str(answer.get("reason", "")))
        if kind != Kind.DATA:
            raise ChannelError(f"unexpected answer {kind.name} to READ")
        return body, int(answer["dataset_offset"])


# ----------------------------------------------------------------------------- node side
class ChannelServer:
    """Serves the channel on a Unix socket with the node's Archive: one thread per connection."""

    def __init__(self, path: str, archive: Any, blob_files: BlobFiles | None = None) -> None:
        self.path = path
        self._archive = archive
        self._blob_files = blob_files  # The store's blobs directory: where workers' temp blob files are.
        if os.path.exists(path):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        os.chmod(path, 0o600)
        self._listener.listen(128)
        self._closed = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.on_hello: Callable[[socket.socket, dict[str, Any]], None] | None = None
        self.on_audit: Callable[[str], None] | None = None  # A worker's audit message line.
        self.on_metrics: Callable[[str, int, float], None] | None = None  # A worker's answered request.
        self.on_refused: Callable[[int, int], None] | None = None  # A worker's (pid) refused associations so far.
        # A worker's HANDOFF connection: called on that connection's thread, returns when it ends.
        self.on_handoff: Callable[[socket.socket, dict[str, Any]], None] | None = None
        # Association slots (node/workers.py AssociationSlots): taken and given back per
        # connection; a connection's slots are given back when it closes (its worker died).
        self.slots: "AssociationSlots | None" = None
        self._thread = threading.Thread(target=self._accept_forever, name="pacsnode-channel", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for sock in list(self._connections):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept_forever(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections.add(sock)
            threading.Thread(target=self._serve, args=(sock,), name="pacsnode-channel-conn", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                kind, header, body = recv_frame(sock)
                self._answer(sock, kind, header, body)
        except (ChannelError, OSError):
            pass
        finally:
            with self._lock:
                self._connections.discard(sock)
            if self.slots is not None:
                self.slots.release_all(sock)
            sock.close()

    def _answer(self, sock: socket.socket, kind: Kind, header: dict[str, Any], body: bytes) -> None:
        if kind == Kind.HELLO:
            send_frame(sock, Kind.WELCOME, {})
            if self.on_hello is not None:
                self.on_hello(sock, header)
            return
        if kind == Kind.AUDIT:
            line = header.get("line")
            if not isinstance(line, str) or not line.endswith("\n") or "\n" in line[:-1] or len(line) > AUDIT_LINE_MAX:
                raise ChannelError("an audit frame carries one message line")
            if self.on_audit is not None:
                self.on_audit(line)
            return
        if kind == Kind.HANDOFF:
            if self.on_handoff is None:
                raise ChannelError("this node hands no connections over")
            self.on_handoff(sock, header)
            raise ChannelError("hand-off connection ended")  # Nothing more is read from it.
        if kind == Kind.SLOT:
            granted = self.slots.acquire(sock) if self.slots is not None else True
            send_frame(sock, Kind.SLOT_GRANTED if granted else Kind.SLOT_REFUSED, {})
            return
        if kind == Kind.SLOT_FREE:
            if self.slots is not None:
                self.slots.release(sock)
            return
        if kind == Kind.METRICS:
            observations = header.get("observations")
            if not isinstance(observations, list):
                raise ChannelError("a metrics frame carries a list of observations")
            for item in observations:
                if not (isinstance(item, list) and len(item) == 3 and item[0] in DIMSE_SERVICES
                        and isinstance(item[1], int) and isinstance(item[2], (int, float))):
                    raise ChannelError("a metrics observation is [service, status, seconds]")
                if self.on_metrics is not None:
                    self.on_metrics(item[0], item[1], float(item[2]))
            pid, refused = header.get("pid", 0), header.get("refused", 0)
            if not (isinstance(pid, int) and isinstance(refused, int) and refused >= 0):
                raise ChannelError("a metrics frame's pid and refused are integers")
            if self.on_refused is not None and pid:
                self.on_refused(pid, refused)
            return
        try:
            if kind == Kind.STORE:
                instance = _instance(header, body, self._blob_files)
                try:
                    result = self._archive.store(instance)
                finally:
                    # A worker's pool file no store write claimed (a duplicate, a failure, a
                    # copy kept by peers only, or the own copy's write still queued: it then
                    # writes a file of its own) is of no more use; a claimed one is its
                    # write's to keep or remove (WorkerBlob).
                    if isinstance(instance.blob_file, WorkerBlob) and instance.blob_file.give_up() \
                            and self._blob_files is not None:
                        self._blob_files.remove(instance.blob_file.pointer.name)
                send_frame(sock, Kind.STORED, {"status": result.status.value, "outcome": str(result.outcome),
                                               "message": result.message, "latency_ms": result.latency_ms})
            elif kind == Kind.FIND:
                self._find(sock, query_from_json(header["query"]))
            elif kind == Kind.COMMIT:
                settings = CommitSettings(**{k: v for k, v in header["settings"].items()
                                             if k in CommitSettings.__dataclass_fields__})
                references = [Reference(str(c), str(i)) for c, i in header["references"]]
                # This connection's worker thread waits for it (one per commitment there).
                decided: CommitResult = self._archive.commit(references, settings).result()
                send_frame(sock, Kind.COMMITTED, {
                    "committed": [[r.sop_class_uid, r.sop_instance_uid] for r in decided.committed],
                    "failed": [[r.sop_class_uid, r.sop_instance_uid, reason.value] for r, reason in decided.failed],
                    "rounds": decided.rounds})
            elif kind == Kind.DELETE:
                deleted = self._archive.delete(DeleteScope(str(header["study"]), str(header.get("series", "")),
                                                           str(header.get("sop_instance", ""))))
                send_frame(sock, Kind.DELETED, {"status": deleted.status.value, "instances": deleted.instances,
                                                "acked": deleted.acked, "message": deleted.message})
            elif kind == Kind.LOCATE:
                plan = self._archive.locate(query_from_json(header["query"]))
                send_frame(sock, Kind.PLAN, {"locations": [location_to_json(l) for l in plan.locations],
                                             "ranges": plan.shortfall.ranges, "studies": plan.shortfall.studies})
            elif kind == Kind.READ:
                location = location_from_json(header["location"])
                open_compressed = getattr(self._archive, "open_compressed", None)
                copy = open_compressed(location) if open_compressed is not None and not header.get("whole") \
                    and self._blob_files is not None else None
                if copy is not None:
                    offsets = {"dataset_offset": copy.dataset_offset, "part10_bytes": copy.part10_bytes}
                    if isinstance(copy.kept, BlobPointer):
                        # With its CRC-32 marks: a worker's streamed read checks mark by mark.
                        send_frame(sock, Kind.DATA_FILE, {**offsets, "name": copy.kept.name,
                                                          "size_bytes": copy.kept.size_bytes, "crc32": copy.kept.crc32,
                                                          **_marks_field(copy.kept.crc32_marks)})
                    else:
                        send_frame(sock, Kind.DATA_ZSTD, offsets, copy.kept)
                    return
                try:
                    data, offset = self._archive.read(location)
                except ReadError as error:
                    send_frame(sock, Kind.READ_FAILED, {"reason": str(error)})
                    return
                send_frame(sock, Kind.DATA, {"dataset_offset": offset}, data)
            else:
                raise ChannelError(f"unexpected request {kind.name}")
        except (ChannelError, OSError):
            raise
        except Exception as error:  # Answered as an error; the worker's handler maps it to a failure status.
            log.error("channel.request.failed kind=%s error=%s", kind.name, type(error).__name__)
            send_frame(sock, Kind.ERROR, {"error": type(error).__name__})

    def _find(self, sock: socket.socket, query: Query) -> None:
        closed = threading.Event()
        rows = self._archive.find(query, closed.is_set)
        try:
            for row in rows:
                send_frame(sock, Kind.ROW, {"row": row})
            send_frame(sock, Kind.FIND_END, {})
        except IncompleteAnswer as error:
            send_frame(sock, Kind.INCOMPLETE, {"ranges": error.shortfall.ranges, "studies": error.shortfall.studies})
        except OSError:
            closed.set()  # The worker stopped reading (cancel, abort, capped): stop the query.
            raise
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()


_TEMP_NAME = re.compile(r"^" + re.escape(TEMP_PREFIX) + r"[A-Za-z0-9_]+\.zst$")
# A worker's pool file (BlobPool with WORKER_POOL_PREFIX): never a name the store makes.
_POOLED_NAME = re.compile(r"^[0-9a-f]{2}/" + re.escape(WORKER_POOL_PREFIX) + r"[0-9]+_[0-9a-f]{24}\.zst$")


def _marks_field(marks: tuple[int, ...] | None) -> dict[str, str]:
    return {} if marks is None else {"marks": encode_marks(marks)}


def _marks_of(named: dict[str, Any], error: type[Exception] = StoreFrameError) -> tuple[int, ...] | None:
    """The CRC-32 marks a frame names (STORE's blob file, READ's DATA_FILE answer); None
    when it names none; `error` when they are not base64 CRC-32 values."""
    text = named.get("marks")
    if text is None:
        return None
    try:
        return decode_marks(str(text))
    except ValueError:  # binascii.Error is one.
        raise error("the blob file's marks are not base64 CRC-32 values") from None


def _instance(header: dict[str, Any], body: bytes, blob_files: BlobFiles | None) -> Instance:
    """The Instance a STORE frame carries: its blob in the body, or a worker's temp blob
    file in the store's blobs directory (mapped, never read into memory here)."""
    part10_bytes = int(header["part10_bytes"])
    blob: Any = body
    temp: TempBlob | WorkerBlob | None = None
    named = header.get("blob_file")
    if named is not None:
        if blob_files is None or body:
            raise StoreFrameError("STORE names a blob file the node cannot take")
        name, size, crc = str(named["name"]), int(named["size_bytes"]), int(named["crc32"])
        pooled = named.get("pooled") is True
        # Only a temp file directly in the blobs directory, or a worker's pool file.
        if not (_POOLED_NAME if pooled else _TEMP_NAME).match(name):
            raise StoreFrameError("STORE names a blob file that is not a worker's temp or pool file")
        try:
            blob = blob_files.map(BlobPointer(name, size, crc), "a worker's instance")
        except CorruptBlob as error:
            raise StoreFrameError(f"STORE's blob file is unusable: {error}") from None
        marks = _marks_of(named)  # The CRC-32 marks for the pointer (node/blob_files.py), when sent.
        temp = WorkerBlob(BlobPointer(name, size, crc, marks)) if pooled \
            else TempBlob(blob_files.directory / name, size, crc, marks)
    elif not body:
        raise StoreFrameError("STORE carries no blob")
    return Instance(
        study_instance_uid=str(header["study"]), series_instance_uid=str(header["series"]),
        sop_instance_uid=str(header["sop_instance"]), sop_class_uid=str(header["sop_class"]),
        transfer_syntax_uid=str(header["transfer_syntax"]), part10=b"", part10_size=part10_bytes,
        dataset_offset=int(header["dataset_offset"]), attributes=_attributes(header["attributes"]),
        content_hash=str(header["content_hash"]), blob=blob, blob_file=temp,
    )
