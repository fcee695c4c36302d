"""Big data sets go to a temporary file as their P-DATA arrives; the node-wide budget of
instance bytes held in memory.

pynetdicom collects a received data set in a BytesIO; a 200 MB C-STORE was then held
several times over (the BytesIO, the Part-10 copy, the compressed blob, the PDUs...). The
acceptor (node/acceptor.py) gives every DIMSE message a `SpoolBuffer` instead: it is a
BytesIO up to `threshold_bytes`; past that its bytes move to a file under `directory`
(with the Part-10 preamble and file meta in front, so the file is the instance as it will
be stored) and the rest is appended there as it arrives. The C-STORE handler then reads
the header, hashes and compresses the file in chunks (`digest_and_compress`), never the
whole instance in memory.

`InflightBudget` bounds what all associations hold in memory together: every byte kept in
a SpoolBuffer's memory and every compressed blob of a spooled instance is reserved there
first. A data set that cannot reserve its bytes, or that grows over
`instance_size_bytes_max`, is not kept (the rest of it is read and dropped) and the
handler answers 0xA700. Pure bookkeeping and file I/O: no DICOM decoding here.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import BinaryIO, Callable

import zstandard

from pacsnode.node.blob_files import BlobFiles, TempBlob

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # Read, hash and compress a spooled file this much at a time.
SPOOL_PREFIX = "pacsnode-spool-"


class InflightBudget:
    """Bytes of received instances held in memory, node-wide; `reserve` fails past the limit."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._used = 0
        self._peak = 0
        self._lock = threading.Lock()

    def reserve(self, count: int) -> bool:
        with self._lock:
            if self._used + count > self.limit_bytes:
                return False
            self._used += count
            self._peak = max(self._peak, self._used)
            return True

    def release(self, count: int) -> None:
        with self._lock:
            self._used = max(0, self._used - count)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def peak_bytes(self) -> int:
        with self._lock:
            return self._peak


class Refusal(enum.Enum):
    """Why a data set was not kept (the handler answers 0xA700)."""

    TOO_LARGE = "too-large"          # Over instance_size_bytes_max.
    INFLIGHT = "inflight-limit"      # The node-wide in-memory budget is spent.
    SPOOL_FAILED = "spool-failed"    # The temporary file could not be written (disk full...).


class OverBudget(Exception):
    """A spooled instance's compressed blob does not fit in the in-memory budget."""


class SpoolBuffer(io.BytesIO):
    """The data set of one DIMSE message: memory up to `threshold_bytes`, then a file.

    `prefix` is called once, when the buffer spills, for the bytes that go in front of the
    data set in the file (the Part-10 preamble and file meta); it may return None when the
    message is not a C-STORE request, and then the data set stays in memory (within the
    budget). Call `close()` when done: it releases the reservation and removes the file
    (a buffer dropped without it is cleaned up when collected).
    """

    def __init__(self, *, threshold_bytes: int, size_max_bytes: int, budget: InflightBudget,
                 directory: Path | None, prefix: Callable[[], bytes | None]) -> None:
        super().__init__()
        self._threshold = threshold_bytes
        self._size_max = size_max_bytes
        self._budget = budget
        self._directory = directory
        self._prefix = prefix
        self.size_bytes = 0          # Data set bytes received (kept or not).
        self.refusal: Refusal | None = None
        self.path: Path | None = None
        self.dataset_offset = 0      # Where the data set starts in the file.
        self._file: BinaryIO | None = None
        self._state = _State(budget)
        self._finalizer = weakref.finalize(self, self._state.clean)

    # ------------------------------------------------------------------ writing
    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        count = len(data)
        self.size_bytes += count
        if self.refusal is not None:
            return count
        if self.size_bytes > self._size_max:
            self._refuse(Refusal.TOO_LARGE)
            return count
        if self._file is not None:
            try:
                self._file.write(data)
            except OSError:
                self._refuse(Refusal.SPOOL_FAILED)
            return count
        if self.size_bytes > self._threshold and self._spill():
            try:
                spilled = self._file
                assert spilled is not None  # _spill() opened it.
                spilled.write(data)
            except OSError:
                self._refuse(Refusal.SPOOL_FAILED)
            return count
        if not self._budget.reserve(count):
            self._refuse(Refusal.INFLIGHT)
            return count
        self._state.reserved += count
        return super().write(data)

    def _spill(self) -> bool:
        """Move the bytes held so far to a new file; False to stay in memory."""
        if self._directory is None:
            return False
        prefix = self._prefix()
        if prefix is None:
            return False
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            descriptor, name = tempfile.mkstemp(prefix=process_prefix(SPOOL_PREFIX), suffix=".dcm", dir=self._directory)
            self.path = self._state.path = Path(name)
            file = self._file = self._state.file = open(descriptor, "wb", buffering=CHUNK_BYTES)
            file.write(prefix)
            with self.getbuffer() as held:
                file.write(held)
        except OSError:
            self._refuse(Refusal.SPOOL_FAILED)
            return True  # Refused: nothing more is kept.
        self.dataset_offset = len(prefix)
        super().seek(0)
        super().truncate(0)
        self._state.release_reserved()
        return True

    def _refuse(self, refusal: Refusal) -> None:
        self.refusal = refusal
        self._file = None
        self.path = None
        self._state.clean()
        super().seek(0)
        super().truncate(0)

    # ------------------------------------------------------------------ reading
    @property
    def spooled(self) -> bool:
        return self._file is not None

    def finish(self) -> Path:
        """Flush the spool file and return its path (a spooled buffer only)."""
        if self._file is None or self.path is None:
            raise ValueError("the data set is not spooled")
        self._file.flush()
        return self.path

    def getvalue(self) -> bytes:
        """The data set bytes; read back from the file when spooled (memory!)."""
        if self._file is not None and self.path is not None:
            self._file.flush()
            with open(self.path, "rb") as source:
                source.seek(self.dataset_offset)
                return source.read()
        return super().getvalue()

    def close(self) -> None:
        self._finalizer()
        super().close()


class _State:
    """What a SpoolBuffer must give back (kept apart so that its finalizer can run)."""

    def __init__(self, budget: InflightBudget) -> None:
        self.budget = budget
        self.reserved = 0
        self.path: Path | None = None
        self.file: BinaryIO | None = None

    def release_reserved(self) -> None:
        if self.reserved:
            self.budget.release(self.reserved)
            self.reserved = 0

    def clean(self) -> None:
        self.release_reserved()
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
        path, self.path = self.path, None
        if path is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def digest_and_compress(path: Path, dataset_offset: int, transfer_syntax_uid: str, budget: InflightBudget,
                        level: int) -> tuple[str, bytes, int]:
    """One pass over a spooled Part-10 file: (content hash of its data set, as
    replication/model.content_hash computes it; zstd frame of the whole file with its
    content size and checksum; bytes reserved in `budget` for that frame -- the caller
    releases them). Raises OverBudget when the frame does not fit in the budget."""
    out = io.BytesIO()
    reserved = 0

    def sink(data: bytes) -> None:
        nonlocal reserved
        reserved += _write_reserved(out, data, budget)

    try:
        content_hash = _digest_and_compress(path, dataset_offset, transfer_syntax_uid, level, sink)
    except BaseException:
        budget.release(reserved)
        raise
    return content_hash, out.getvalue(), reserved


def digest_and_compress_to_file(path: Path, dataset_offset: int, transfer_syntax_uid: str, level: int,
                                blob_files: BlobFiles) -> tuple[str, TempBlob]:
    """digest_and_compress, with the zstd frame written to a temp file in the store's blobs
    directory (fsync'ed) instead of memory: (content hash, the temp blob). The store names
    it when it records the instance (node/blob_files.py); the caller removes it if not."""
    with blob_files.temp_writer() as writer:
        content_hash = _digest_and_compress(path, dataset_offset, transfer_syntax_uid, level, writer.write)
        return content_hash, writer.finish()


def _digest_and_compress(path: Path, dataset_offset: int, transfer_syntax_uid: str, level: int,
                         sink: Callable[[bytes], None]) -> str:
    total = os.path.getsize(path)
    digest = hashlib.sha256()
    digest.update(transfer_syntax_uid.encode("ascii"))
    digest.update(b"\x00")
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj(size=total)
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    position = 0
    with open(path, "rb", buffering=0) as source:
        while True:
            count = source.readinto(buffer)
            if not count:
                break
            chunk = view[:count]
            if position + count > dataset_offset:
                digest.update(chunk[max(0, dataset_offset - position):])
            position += count
            data = compressor.compress(chunk)
            if data:
                sink(data)
        data = compressor.flush()
        if data:
            sink(data)
    return digest.hexdigest()[:32]


def _write_reserved(out: io.BytesIO, data: bytes, budget: InflightBudget) -> int:
    if not data:
        return 0
    if not budget.reserve(len(data)):
        raise OverBudget(f"the compressed instance does not fit in the in-memory budget of {budget.limit_bytes} bytes")
    out.write(data)
    return len(data)


def spool_directory(data_dir: Path) -> Path:
    """Where a node's front end (or its DICOM workers) spools received data sets."""
    return data_dir / "spool"


def process_prefix(prefix: str, pid: int | None = None) -> str:
    """A temp file name's start that says which process writes it (`<prefix><pid>_`): the
    node removes what a DICOM worker that died left (node/workers.py) and nothing else."""
    return f"{prefix}{os.getpid() if pid is None else pid}_"


def clear_directory(directory: Path, pid: int | None = None) -> int:
    """Remove spool files a previous run left behind (a crash mid-transfer), or with `pid`
    those of that (dead) process only; their count."""
    removed = 0
    if not directory.is_dir():
        return 0
    for path in directory.glob((SPOOL_PREFIX if pid is None else process_prefix(SPOOL_PREFIX, pid)) + "*"):
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed
