"""Big blobs as files beside RocksDB, and reading them back in chunks.

A stored instance's blob (its zstd-compressed Part-10 bytes) of `blob_file_bytes_min` or
more is not put into RocksDB as one value: it is a file under `<store>/blobs/<aa>/`, durable
before the RocksDB WriteBatch that records the instance. A blob that was spooled (or written
by a DICOM worker) is a temp file, fsync'ed, renamed to `<aa>/<content hash>-<unique>.zst`,
the directory fsync'ed. A blob in memory goes into an empty file taken from the pool
(`BlobPool`: files made in batches of 64 ahead of need, their directory fsync'ed once per
batch), then the file is fsync'ed: one device flush per instance instead of two (the
directory's fsync flushes the device even when nothing is left to commit); with the pool
empty, it is written straight under a new name and both are fsync'ed. The batch puts, in
the blob's place, a small pointer (`BlobPointer`: the file's name, size, CRC-32 and CRC-32 marks) and a
`f <file name>` key saying the file is referenced. So after a crash:

- a record always has its file (the file was durable before the batch was written);
- a file without its `f` key (the batch never committed, or a delete committed and the
  unlink did not happen) is an orphan: `RocksStore` removes those, and every temporary
  file, when it opens (`orphans`).

Reading: `read` gives the whole blob, CRC-checked (peers, conflicts); `Part10Stream` gives
the Part-10 bytes in order, decompressed a chunk at a time, so retrieval sends a 200 MB
instance without holding it. A stream's compressed bytes are checked as they are read
(`CheckedReader`): at every CRC-32 mark the pointer records (`crc32_marks`, each
MARK_BYTES), and the whole file's CRC-32 and size before the last fragment goes out (a
mismatch raises CorruptBlob); zstd's own checksum is left out. A pointer written before
the marks has none: the whole-file check alone, at the end.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import mmap
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, cast

import zstandard

from pacsnode.node.codec import ZSTD_CHECKSUM_FLAG, ZSTD_MAGIC, crc32_of, decompress_crc_checked
from pacsnode.replication.model import CorruptBlob

_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # Linux 4.14 and later.

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
WORKER_POOL_PREFIX = "w"  # + "<pid>_": the pool files of a DICOM worker (write_pooled).
POOL_BATCH = 64  # Empty blob files made at a time (one directory fsync each batch).
SUFFIX = ".zst"
CHUNK_BYTES = 1 << 20  # Written and read this much at a time.
# A blob file's pointer records the running CRC-32 of its bytes at every multiple of this
# many bytes (`BlobPointer.crc32_marks`): a read from the start that stops early (a frame
# of a big instance) checks what it read up to the next mark, not the whole file.
MARK_BYTES = CHUNK_BYTES
# A RocksDB blob value that starts with this is a pointer, not a zstd frame (a zstd frame
# starts with the magic 28 B5 2F FD).
POINTER_MAGIC = b"\x00pacsnode-blob-file\x00"


@dataclass(frozen=True)
class BlobPointer:
    """What RocksDB holds in place of a blob kept as a file."""

    name: str       # Relative to the blobs directory: "<aa>/<content hash>-<unique>.zst".
    size_bytes: int  # Compressed bytes in the file.
    crc32: int      # Of the file's bytes.
    # The running CRC-32 of the file's bytes at MARK_BYTES, 2 x MARK_BYTES, ... (each offset
    # below size_bytes; the CRC-32 at the end is `crc32`). None in pointers written before
    # the marks were (a read then checks the whole file).
    crc32_marks: tuple[int, ...] | None = None

    def encode(self) -> bytes:
        fields: dict[str, object] = {"name": self.name, "size_bytes": self.size_bytes, "crc32": self.crc32}
        if self.crc32_marks is not None:
            fields["marks"] = encode_marks(self.crc32_marks)
        return POINTER_MAGIC + json.dumps(fields, separators=(",", ":")).encode()

    @staticmethod
    def decode(value: bytes) -> "BlobPointer | None":
        """The pointer in a blob value; None when the value is the blob itself."""
        if not value.startswith(POINTER_MAGIC):
            return None
        fields = json.loads(bytes(value[len(POINTER_MAGIC):]))
        marks = fields.get("marks")
        return BlobPointer(name=str(fields["name"]), size_bytes=int(fields["size_bytes"]), crc32=int(fields["crc32"]),
                           crc32_marks=None if marks is None else decode_marks(str(marks)))


def encode_marks(marks: tuple[int, ...]) -> str:
    """CRC-32 marks as text (base64 of little-endian 32-bit values): 1.4 KB for 1 GB."""
    return base64.b64encode(b"".join(mark.to_bytes(4, "little") for mark in marks)).decode("ascii")


def decode_marks(text: str) -> tuple[int, ...]:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError("CRC-32 marks of a length that is not a multiple of 4")
    return tuple(int.from_bytes(raw[start:start + 4], "little") for start in range(0, len(raw), 4))


def marks_fit(marks: tuple[int, ...] | None, size_bytes: int) -> bool:
    """Whether `marks` has one CRC-32 per MARK_BYTES boundary below `size_bytes`."""
    return marks is None or len(marks) == max(0, (size_bytes - 1) // MARK_BYTES)


class RunningCrc:
    """The CRC-32 of bytes written in order (codec.crc32_of), and its value at every
    MARK_BYTES boundary: what a BlobPointer records."""

    def __init__(self) -> None:
        self.value = 0
        self.size = 0
        self._marks: list[int] = []

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            # A mark at a boundary only once bytes follow it: the CRC-32 at the end of the
            # file is the pointer's crc32, not a mark.
            if self.size and self.size % MARK_BYTES == 0 and len(self._marks) < self.size // MARK_BYTES:
                self._marks.append(self.value)
            piece = view[:MARK_BYTES - self.size % MARK_BYTES]
            self.value = crc32_of(piece, self.value)
            self.size += len(piece)
            view = view[len(piece):]

    @property
    def marks(self) -> tuple[int, ...]:
        return tuple(self._marks)


def stored_size(value: bytes) -> int:
    """Compressed bytes of a blob value (the file's size for a pointer)."""
    pointer = BlobPointer.decode(value)
    return len(value) if pointer is None else pointer.size_bytes


@dataclass
class WorkerBlob:
    """A blob a DICOM worker wrote into an empty file of its own pool (`BlobFiles.write_pooled`):
    under its final name, its directory entry durable since the pool made it, its bytes
    fsync'ed. The node's store records it as it is (no rename, no directory fsync) and sets
    `kept` when a batch recorded it (or another record already points at it).

    Who may remove the file is decided once, under a lock: the first store write that
    `claim`s it owns it (RocksStore._put_with_blob_file removes it when its batch did not
    keep it); the node's channel, once the write it was sent for has been answered, `give_up`s
    it and removes it only if no write claimed it (a duplicate, a failure, a copy kept by
    peers only). A write that comes after that (the node's own copy still queued when W other
    owners had answered: the cluster's write goes on in the background) finds the claim
    refused and writes a file of its own from the mapped bytes, which outlive the unlink.
    Before this, the channel removed the file whenever `kept` was not yet set, and such a
    late write then recorded a pointer to a file already gone: an acknowledged instance whose
    copy on the entry node could not be read (test_cluster_workers, 1 run in 10-20 under load)."""

    pointer: BlobPointer
    kept: bool = False
    _claimed: bool = field(default=False, repr=False, compare=False)
    _given_up: bool = field(default=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def claim(self) -> bool:
        """For a store write: True once (the file is this write's to record or remove);
        False after another claim or after the channel gave the file up."""
        with self._lock:
            if self._claimed or self._given_up:
                return False
            self._claimed = True
            return True

    def give_up(self) -> bool:
        """For the channel, after the answer: True when no write claimed the file (the caller
        removes it; no write may claim it after this); False when one did (it decides)."""
        with self._lock:
            if self._claimed:
                return False
            self._given_up = True
            return True


@dataclass(frozen=True)
class TempBlob:
    """A blob written and fsync'ed to a temporary file, not yet named."""

    path: Path
    size_bytes: int
    crc32: int
    crc32_marks: tuple[int, ...] | None = None  # As BlobPointer's (None: not known, e.g. a worker's older header).


class BlobPool:
    """Empty files whose directory entries are already durable, made `batch` at a time by a
    thread of its own (one directory fsync per batch) and taken one per stored blob. Files
    never taken are orphans (no `f` key) that the store removes when it next opens."""

    def __init__(self, directory: Path, batch: int = POOL_BATCH, prefix: str = "") -> None:
        self._directory = directory
        self._batch = batch
        self._prefix = prefix  # Of each file's name (a DICOM worker's: `w<pid>_`).
        self._ready: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._stopping = False
        self.made = 0
        self.taken = 0
        self.missed = 0  # Asked while empty: the caller wrote a new file itself.
        self._wanted.set()
        self._thread = threading.Thread(target=self._run, name="pacsnode-blob-pool", daemon=True)
        self._thread.start()

    def take(self) -> str | None:
        """The name of an empty file to write a blob into, or None when none is ready."""
        with self._lock:
            name = self._ready.popleft() if self._ready else None
            if name is None:
                self.missed += 1
            else:
                self.taken += 1
            if len(self._ready) <= self._batch // 2:
                self._wanted.set()
        return name

    def close(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join(10)

    def _run(self) -> None:
        failing = False
        while True:
            self._wanted.wait()
            if self._stopping:
                return
            self._wanted.clear()
            try:
                names = self._make_batch()
            except OSError as error:  # A full or read-only disk: writers make their own files.
                if not failing:  # Once per streak, not once a second.
                    log.warning("store.blob_pool.failed error=%s", type(error).__name__)
                failing = True
                time.sleep(1.0)
                self._wanted.set()
                continue
            failing = False
            with self._lock:
                self._ready.extend(names)
                self.made += len(names)
                if len(self._ready) <= self._batch // 2:
                    self._wanted.set()

    def _make_batch(self) -> list[str]:
        folder = secrets.token_hex(1)
        _ensure_directory(self._directory / folder)
        names: list[str] = []
        try:
            for _ in range(self._batch):
                name = f"{folder}/{self._prefix}{secrets.token_hex(12)}{SUFFIX}"
                os.close(os.open(self._directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                names.append(name)
            _fsync_directory(self._directory / folder)
        except BaseException:
            for name in names:
                try:
                    (self._directory / name).unlink()
                except OSError:
                    pass
            raise
        return names


# A blob file whose Part-10 bytes are this many or fewer (a CT, MR or CR slice) is read and
# decompressed whole by retrieval (BlobFiles.read_whole); a bigger one is streamed (bounded
# memory: a 200 MB instance).
WHOLE_READ_BYTES_MAX = 2 * 1024**2


class BlobFiles:
    """The blobs directory of one store. Thread-safe (every operation is one file's)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._directory_name = str(self.directory)  # read_into's paths without pathlib's.
        self._read_buffers = threading.local()  # read_whole's: one buffer per thread.
        self.pool: BlobPool | None = None

    def start_pool(self, batch: int = POOL_BATCH, prefix: str = "") -> None:
        """Keep empty files ready for write_named (the node's store) or write_pooled (a
        DICOM worker, whose files' names start with `prefix`, WORKER_POOL_PREFIX)."""
        if self.pool is None:
            self.pool = BlobPool(self.directory, batch, prefix)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    # ------------------------------------------------------------------ writing
    def temp_writer(self) -> "TempWriter":
        return TempWriter(self.directory)

    def write_temp(self, blob: bytes) -> TempBlob:
        """A blob that is in memory (from a peer, or from an in-memory C-STORE) to a temp file."""
        with self.temp_writer() as writer:
            view = memoryview(blob)
            for start in range(0, len(view), CHUNK_BYTES):
                writer.write(view[start:start + CHUNK_BYTES])
            return writer.finish()

    def write_named(self, blob: bytes, content_hash: str) -> BlobPointer:
        """A blob in memory written to a file of its own, durably, without a temp file and
        rename: into an empty file from the pool (its directory entry already durable: only
        the file is fsync'ed), else straight under a new name (the file fsync'ed, then its
        directory). A crash before the batch that records it leaves an orphan, removed
        when the store opens (a file without its `f` key)."""
        pooled = self.pool.take() if self.pool is not None else None
        name = pooled or _final_name(content_hash)
        if pooled is None:
            _ensure_directory((self.directory / name).parent)
        crc = self._write_file(name, blob, create=pooled is None)
        if pooled is None:
            try:
                _fsync_directory((self.directory / name).parent)
            except BaseException:
                self.remove(name)
                raise
        return BlobPointer(name=name, size_bytes=len(blob), crc32=crc.value, crc32_marks=crc.marks)

    def write_pooled(self, blob: bytes) -> BlobPointer | None:
        """A blob in memory written into an empty file of the pool and fsync'ed (one device
        flush: the pool made the name durable); None when the pool has no file ready (the
        caller writes a temp file instead). A DICOM worker's STORE names the file (WorkerBlob)."""
        name = self.pool.take() if self.pool is not None else None
        if name is None:
            return None
        crc = self._write_file(name, blob, create=False)
        return BlobPointer(name=name, size_bytes=len(blob), crc32=crc.value, crc32_marks=crc.marks)

    def _write_file(self, name: str, blob: bytes, *, create: bool) -> RunningCrc:
        """Write `blob` into the file `name` (a new one with `create`, else an empty one that
        exists) and fsync it; its CRC-32 and marks. The file is removed when this fails."""
        descriptor = os.open(self.directory / name, os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        crc = RunningCrc()
        try:
            try:
                view = memoryview(blob)
                for start in range(0, len(view), CHUNK_BYTES):
                    piece = view[start:start + CHUNK_BYTES]
                    _write_all(descriptor, piece)
                    crc.update(piece)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except BaseException:
            self.remove(name)
            raise
        return crc

    def commit(self, temp: TempBlob, content_hash: str) -> BlobPointer:
        """Give a temp file its final name, durably (rename, then fsync the directory)."""
        name = _final_name(content_hash)
        target = self.directory / name
        _ensure_directory(target.parent)
        os.rename(temp.path, target)
        _fsync_directory(target.parent)
        marks = temp.crc32_marks if marks_fit(temp.crc32_marks, temp.size_bytes) else None
        return BlobPointer(name=name, size_bytes=temp.size_bytes, crc32=temp.crc32, crc32_marks=marks)

    def remove(self, name: str) -> None:
        try:
            (self.directory / name).unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ reading
    def path(self, pointer: BlobPointer) -> Path:
        return self.directory / pointer.name

    def read(self, pointer: BlobPointer, what: str) -> bytes:
        """The whole blob, checked against the pointer's size and CRC-32 (CorruptBlob)."""
        try:
            data = self.path(pointer).read_bytes()
        except FileNotFoundError:
            raise CorruptBlob(f"blob file of {what} is missing") from None
        if len(data) != pointer.size_bytes or crc32_of(data) != pointer.crc32:
            raise CorruptBlob(f"blob file of {what} failed its size or CRC-32 check")
        return data

    def map(self, pointer: BlobPointer, what: str) -> bytes:
        """The blob as a read-only memory map (file-backed pages, not heap): for shipping
        to a peer, who checks it before acknowledging. Raises CorruptBlob when missing or
        of the wrong size."""
        try:
            with open(self.path(pointer), "rb") as source:
                size = os.fstat(source.fileno()).st_size
                if size != pointer.size_bytes or size == 0:
                    raise CorruptBlob(f"blob file of {what} holds {size} bytes, not {pointer.size_bytes}")
                mapped: bytes = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)  # type: ignore[assignment]
                return mapped
        except FileNotFoundError:
            raise CorruptBlob(f"blob file of {what} is missing") from None

    def read_into(self, pointer: BlobPointer, buffer: memoryview, what: str, *,
                  cached_only: bool = False) -> memoryview | None:
        """The whole blob read into `buffer` (at least `pointer.size_bytes` long, reused by
        the caller: no new buffer, no mapping), its size checked but not its CRC-32 (the
        caller checks it: node/codec.py's decompress_crc_checked, or zstd's frame checksum).
        The view of `buffer` that holds it. With `cached_only`, read only from the page cache
        (Linux's RWF_NOWAIT): None when any of it would wait for the disk. Raises
        CorruptBlob when missing or of the wrong size."""
        if cached_only and _RWF_NOWAIT is None:
            return None  # No way to ask for the page cache only here (not Linux).
        flags = (_RWF_NOWAIT or 0) if cached_only else 0
        size = pointer.size_bytes
        try:
            fd = os.open(os.path.join(self._directory_name, pointer.name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptBlob(f"blob file of {what} is missing") from None
        try:
            held = os.fstat(fd).st_size
            if held != size or size == 0:
                raise CorruptBlob(f"blob file of {what} holds {held} bytes, not {size}")
            view = buffer[:size]
            done = 0
            while done < size:
                try:
                    got = os.preadv(fd, [view[done:]], done, flags)
                except BlockingIOError:  # Only with RWF_NOWAIT: not (all) in the page cache.
                    return None
                except OSError:
                    if cached_only:
                        # A file system that cannot read without waiting (EOPNOTSUPP), or an
                        # I/O error: the caller's other way (a reader thread) reads it, or
                        # reports it, as for any file.
                        return None
                    raise
                if got == 0:
                    raise CorruptBlob(f"blob file of {what} ended at {done} bytes, not {size}")
                done += got
            return view
        finally:
            os.close(fd)

    def read_whole(self, pointer: BlobPointer, part10_bytes: int, what: str) -> bytes:
        """The Part-10 bytes of a blob file of up to WHOLE_READ_BYTES_MAX (a slice), as
        C-GET and C-MOVE send them: the file read into this thread's reused buffer, checked
        by the CRC-32 its pointer records in place of zstd's XXH64 of the content (every
        stored byte, before any is used: node/codec.py's decompress_crc_checked, as WADO-RS's
        reads of a blob file), decompressed, their length checked against `part10_bytes`.
        CorruptBlob when the file is missing, of another size, or fails a check."""
        buffer: memoryview | None = getattr(self._read_buffers, "buffer", None)
        if buffer is None or len(buffer) < pointer.size_bytes:
            buffer = self._read_buffers.buffer = memoryview(bytearray(max(pointer.size_bytes, 1024 * 1024)))
        blob = self.read_into(pointer, buffer, what)
        if blob is None:  # Only a cached_only read gives None: not asked here.
            raise CorruptBlob(f"blob file of {what} was not read")
        part10 = decompress_crc_checked(blob, pointer.crc32, what)
        if len(part10) != part10_bytes:
            raise CorruptBlob(f"blob of {what} holds {len(part10)} bytes, not {part10_bytes}")
        return part10

    def stream(self, pointer: BlobPointer, part10_bytes: int, what: str) -> "Part10Stream":
        try:
            source = open(self.path(pointer), "rb")
        except FileNotFoundError:
            raise CorruptBlob(f"blob file of {what} is missing") from None
        return Part10Stream(source, part10_bytes, what, pointer)

    def head(self, pointer: BlobPointer, size: int, what: str) -> bytes:
        """The first `size` Part-10 bytes (not checksum-verified: the checksum covers all)."""
        with self.stream(pointer, size, what) as stream:
            return stream.read_head(size)

    # ------------------------------------------------------------------ recovery
    def remove_temps_of(self, pid: int) -> int:
        """Remove the temp files process `pid` (a DICOM worker that died) left; their count.
        One the node was naming meanwhile fails that store (never acknowledged: the
        association died with the worker)."""
        removed = 0
        for path in self.directory.glob(f"{TEMP_PREFIX}{pid}_*{SUFFIX}"):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def files(self, *, empty: bool = True) -> Iterator[str]:
        """Names of every file under the directory (temporary ones included); with
        `empty=False` only those holding bytes (the pool's ready files left out)."""
        for path in self.directory.rglob("*"):
            if path.is_file() and (empty or path.stat().st_size > 0):
                yield path.relative_to(self.directory).as_posix()


class TempWriter:
    """Writes a temp file in the blobs directory, CRC-32 as it goes; `finish` fsyncs it.
    Leaving the `with` block without `finish` removes the file."""

    def __init__(self, directory: Path) -> None:
        descriptor, name = _mkstemp(directory)
        self.path = Path(name)
        self._file: BinaryIO = open(descriptor, "wb", buffering=CHUNK_BYTES)
        self._crc = RunningCrc()
        self._finished = False

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._crc.update(data)

    def finish(self) -> TempBlob:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._finished = True
        return TempBlob(self.path, self._crc.size, self._crc.value, self._crc.marks)

    def __enter__(self) -> "TempWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self._file.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


class CheckedReader:
    """A blob file read forward from its start (a decompressor's source: its `read` alone),
    every byte read checked against its pointer: at each CRC-32 mark as the reads pass it
    (`BlobPointer.crc32_marks`), and the whole file's CRC-32 and size when they reach its
    end. `finish` reads on to the next mark (or, for a pointer without marks, to the end):
    then every byte read so far has been checked. CorruptBlob on a mismatch.

    With `hide_checksum` the decompressor sees the zstd frame without its content checksum
    (the header's flag cleared, its last 4 bytes withheld but still read into the CRC-32),
    so that zstd does not hash again the bytes the CRC-32 checks (codec.decompress_crc_checked
    does the same for a whole read)."""

    def __init__(self, source: BinaryIO, size_bytes: int, crc32: int, marks: tuple[int, ...] | None, what: str,
                 *, hide_checksum: bool = False) -> None:
        self._source = source
        self._size = size_bytes
        self._crc32 = crc32
        self._marks = marks if marks_fit(marks, size_bytes) else None
        self._what = what
        self._crc = 0
        self.position = 0  # Bytes read from the file.
        self.checked = 0    # Bytes read and checked (at a mark, or the whole file).
        held = os.fstat(source.fileno()).st_size
        if held != size_bytes:
            raise CorruptBlob(f"blob file of {what} holds {held} bytes, not {size_bytes}")
        # Only a zstd frame that has its checksum (as every stored one): anything else is
        # handed out as it is, for the decompressor to refuse.
        head = os.pread(source.fileno(), 5, 0) if hide_checksum else b""
        self._hide = len(head) == 5 and head[:4] == ZSTD_MAGIC and bool(head[4] & ZSTD_CHECKSUM_FLAG) \
            and size_bytes >= 9

    def _take(self, data: bytes) -> None:
        view = memoryview(data)
        marks = self._marks
        while view:
            room = len(view)
            mark = self.position // MARK_BYTES  # marks[mark] is the CRC-32 at (mark + 1) x MARK_BYTES.
            if marks is not None and mark < len(marks):
                room = min(room, (mark + 1) * MARK_BYTES - self.position)
            self._crc = crc32_of(view[:room], self._crc)
            self.position += room
            view = view[room:]
            if marks is not None and mark < len(marks) and self.position == (mark + 1) * MARK_BYTES:
                if self._crc != marks[mark]:
                    raise CorruptBlob(f"blob file of {self._what} failed its CRC-32 check before byte "
                                      f"{self.position}")
                self.checked = self.position
        if self.position >= self._size:
            if self.position != self._size or self._crc != self._crc32:
                raise CorruptBlob(f"blob file of {self._what} failed its size or CRC-32 check")
            self.checked = self.position

    def read(self, size: int = -1) -> bytes:
        limit = self._size - self.position
        if self._hide and limit >= 4:
            limit -= 4  # The checksum: read below, never handed out.
        if size < 0 or size > limit:
            size = limit
        data = self._source.read(size) if size > 0 else b""
        if size > 0 and len(data) < size:
            self._take(data)
            raise CorruptBlob(f"blob file of {self._what} ended at {self.position} bytes, not {self._size}")
        start = self.position
        self._take(data)
        if self._hide and self.position == self._size - 4 and size > 0:
            tail = self._source.read(4)
            if len(tail) != 4:
                raise CorruptBlob(f"blob file of {self._what} ended at {self.position + len(tail)} bytes")
            self._take(tail)
        if self._hide and start <= 4 < start + len(data):
            edited = bytearray(data)
            edited[4 - start] &= ~ZSTD_CHECKSUM_FLAG & 0xFF
            data = bytes(edited)
        return data

    def finish(self) -> None:
        """Read on to the next mark (the end without marks), so that every byte read so far
        is checked; CorruptBlob when a check fails."""
        while self.checked < self.position:
            if self._marks is not None and self.position // MARK_BYTES < len(self._marks):
                step = (self.position // MARK_BYTES + 1) * MARK_BYTES - self.position
            else:
                step = min(CHUNK_BYTES, self._size - self.position)
            data = self._source.read(step)
            if len(data) < step:
                raise CorruptBlob(f"blob file of {self._what} ended at {self.position + len(data)} bytes, "
                                  f"not {self._size}")
            self._take(data)

    def close(self) -> None:
        self._source.close()


class Part10Stream:
    """The Part-10 bytes of a blob file, decompressed in order as they are asked for.

    `payload(offset)` is the data set (from `offset` on) as node/pdata.py's Payload: its
    length, and slices asked for in order; each slice is decompressed when asked. With the
    file's pointer (`BlobFiles.stream`) the compressed bytes are checked as they are read
    (CheckedReader: at each CRC-32 mark, and the whole file's CRC-32 before the last slice
    is handed out), zstd's content checksum not computed; without it, zstd's checksum is
    checked when the last slice is read. CorruptBlob on a mismatch."""

    def __init__(self, source: BinaryIO, part10_bytes: int, what: str, pointer: BlobPointer | None = None) -> None:
        self._source = source
        checked: BinaryIO = source
        if pointer is not None:
            try:
                # Read through its read() alone (zstandard's documented duck typing).
                checked = cast(BinaryIO, CheckedReader(source, pointer.size_bytes, pointer.crc32,
                                                       pointer.crc32_marks, what, hide_checksum=True))
            except BaseException:  # A file of another size (CorruptBlob): not left open.
                source.close()
                raise
        self._reader = zstandard.ZstdDecompressor().stream_reader(checked, read_size=CHUNK_BYTES)
        self._size = part10_bytes
        self._what = what
        self._position = 0

    def __len__(self) -> int:
        return self._size

    def _read(self, count: int) -> bytes:
        parts: list[bytes] = []
        remaining = count
        try:
            while remaining > 0:
                chunk = self._reader.read(remaining)
                if not chunk:
                    raise CorruptBlob(f"blob of {self._what} ended {remaining} bytes early")
                parts.append(chunk)
                remaining -= len(chunk)
            self._position += count
            if self._position == self._size and self._reader.read(1):  # Reads to the end: the last check.
                raise CorruptBlob(f"blob of {self._what} holds more than {self._size} bytes")
        except zstandard.ZstdError as error:
            raise CorruptBlob(f"blob of {self._what} failed its checksum: {error}") from error
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_head(self, size: int) -> bytes:
        try:
            head = bytearray()
            while len(head) < size:
                chunk = self._reader.read(size - len(head))
                if not chunk:
                    break
                head += chunk
            return bytes(head)
        except zstandard.ZstdError as error:
            raise CorruptBlob(f"blob of {self._what} is not a readable zstd frame: {error}") from error

    def read_chunk(self, size: int = CHUNK_BYTES) -> bytes:
        """The next up to `size` bytes; b"" at the end (checksum checked on the last one)."""
        count = min(size, self._size - self._position)
        return self._read(count) if count > 0 else b""

    def read_all(self) -> bytes:
        """Everything left (memory: for the few paths that need the instance whole)."""
        return self._read(self._size - self._position)

    def skip_to(self, offset: int) -> None:
        if offset < self._position:
            raise ValueError("a Part-10 stream only reads forward")
        while self._position < offset:
            self._read(min(CHUNK_BYTES, offset - self._position))

    def payload(self, offset: int) -> "StreamPayload":
        return StreamPayload(self, offset)

    def close(self) -> None:
        self._reader.close()  # type: ignore[no-untyped-call]  # zstandard has no annotation here.
        self._source.close()

    def __enter__(self) -> "Part10Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamPayload:
    """Slices of a Part10Stream from `offset` on, asked for in order (node/pdata.Payload)."""

    def __init__(self, stream: Part10Stream, offset: int) -> None:
        self._stream = stream
        self._offset = offset
        self._next = 0

    def __len__(self) -> int:
        return len(self._stream) - self._offset

    def __getitem__(self, index: slice) -> bytes:
        start, stop, _step = index.indices(len(self))
        if start != self._next:
            raise ValueError(f"stream slices must be asked for in order: {start} after {self._next}")
        if self._next == 0:
            self._stream.skip_to(self._offset)
        self._next = stop
        return self._stream._read(stop - start)

    def close(self) -> None:
        self._stream.close()


def _write_all(descriptor: int, data: memoryview) -> None:
    while data:
        data = data[os.write(descriptor, data):]


def _ensure_directory(directory: Path) -> None:
    """A blobs subdirectory, its own entry durable (the parent fsync'ed when it is new)."""
    if not directory.is_dir():
        directory.mkdir(exist_ok=True)
        _fsync_directory(directory.parent)


def _final_name(content_hash: str) -> str:
    return f"{content_hash[:2]}/{content_hash}-{secrets.token_hex(4)}{SUFFIX}"


def _mkstemp(directory: Path) -> tuple[int, str]:
    # `.tmp-<pid>_<random>.zst`: a dead DICOM worker's temp files are known by its PID.
    return tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}_", suffix=SUFFIX, dir=directory)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
