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
the blob's place, a small pointer (`BlobPointer`: the file's name, size and CRC-32) and a
`f <file name>` key saying the file is referenced. So after a crash:

- a record always has its file (the file was durable before the batch was written);
- a file without its `f` key (the batch never committed, or a delete committed and the
  unlink did not happen) is an orphan: `RocksStore` removes those, and every temporary
  file, when it opens (`orphans`).

Reading: `read` gives the whole blob, CRC-checked (peers, conflicts); `Part10Stream` gives
the Part-10 bytes in order, decompressed a chunk at a time, so retrieval sends a 200 MB
instance without holding it (zstd's frame checksum is verified when the stream reaches
its end; a mismatch raises CorruptBlob before the last fragment goes out).
"""

from __future__ import annotations

import collections
import json
import logging
import mmap
import os
import secrets
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from pacsnode.node.codec import decompress_crc_checked
from pacsnode.replication.model import CorruptBlob

_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # Linux 4.14 and later.

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
WORKER_POOL_PREFIX = "w"  # + "<pid>_": the pool files of a DICOM worker (write_pooled).
POOL_BATCH = 64  # Empty blob files made at a time (one directory fsync each batch).
SUFFIX = ".zst"
CHUNK_BYTES = 1 << 20  # Written and read this much at a time.
# A RocksDB blob value that starts with this is a pointer, not a zstd frame (a zstd frame
# starts with the magic 28 B5 2F FD).
POINTER_MAGIC = b"\x00pacsnode-blob-file\x00"


@dataclass(frozen=True)
class BlobPointer:
    """What RocksDB holds in place of a blob kept as a file."""

    name: str       # Relative to the blobs directory: "<aa>/<content hash>-<unique>.zst".
    size_bytes: int  # Compressed bytes in the file.
    crc32: int      # Of the file's bytes.

    def encode(self) -> bytes:
        return POINTER_MAGIC + json.dumps({"name": self.name, "size_bytes": self.size_bytes,
                                           "crc32": self.crc32}, separators=(",", ":")).encode()

    @staticmethod
    def decode(value: bytes) -> "BlobPointer | None":
        """The pointer in a blob value; None when the value is the blob itself."""
        if not value.startswith(POINTER_MAGIC):
            return None
        fields = json.loads(bytes(value[len(POINTER_MAGIC):]))
        return BlobPointer(name=str(fields["name"]), size_bytes=int(fields["size_bytes"]), crc32=int(fields["crc32"]))


def stored_size(value: bytes) -> int:
    """Compressed bytes of a blob value (the file's size for a pointer)."""
    pointer = BlobPointer.decode(value)
    return len(value) if pointer is None else pointer.size_bytes


@dataclass
class WorkerBlob:
    """A blob a DICOM worker wrote into an empty file of its own pool (`BlobFiles.write_pooled`):
    under its final name, its directory entry durable since the pool made it, its bytes
    fsync'ed. The node's store records it as it is (no rename, no directory fsync) and sets
    `kept` when a batch recorded it (or another record already points at it); the channel
    removes a file that was not kept."""

    pointer: BlobPointer
    kept: bool = False


@dataclass(frozen=True)
class TempBlob:
    """A blob written and fsync'ed to a temporary file, not yet named."""

    path: Path
    size_bytes: int
    crc32: int


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
        return BlobPointer(name=name, size_bytes=len(blob), crc32=crc)

    def write_pooled(self, blob: bytes) -> BlobPointer | None:
        """A blob in memory written into an empty file of the pool and fsync'ed (one device
        flush: the pool made the name durable); None when the pool has no file ready (the
        caller writes a temp file instead). A DICOM worker's STORE names the file (WorkerBlob)."""
        name = self.pool.take() if self.pool is not None else None
        if name is None:
            return None
        return BlobPointer(name=name, size_bytes=len(blob), crc32=self._write_file(name, blob, create=False))

    def _write_file(self, name: str, blob: bytes, *, create: bool) -> int:
        """Write `blob` into the file `name` (a new one with `create`, else an empty one that
        exists) and fsync it; its CRC-32. The file is removed when this fails."""
        descriptor = os.open(self.directory / name, os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        crc = 0
        try:
            try:
                view = memoryview(blob)
                for start in range(0, len(view), CHUNK_BYTES):
                    piece = view[start:start + CHUNK_BYTES]
                    _write_all(descriptor, piece)
                    crc = zlib.crc32(piece, crc)
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
        return BlobPointer(name=name, size_bytes=temp.size_bytes, crc32=temp.crc32)

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
        if len(data) != pointer.size_bytes or zlib.crc32(data) != pointer.crc32:
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
        return Part10Stream(source, part10_bytes, what)

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
        self._size = 0
        self._crc = 0
        self._finished = False

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._size += len(data)
        self._crc = zlib.crc32(data, self._crc)

    def finish(self) -> TempBlob:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._finished = True
        return TempBlob(self.path, self._size, self._crc)

    def __enter__(self) -> "TempWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self._file.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


class Part10Stream:
    """The Part-10 bytes of a blob file, decompressed in order as they are asked for.

    `payload(offset)` is the data set (from `offset` on) as node/pdata.py's Payload: its
    length, and slices asked for in order; each slice is decompressed when asked. The
    frame's checksum is checked when the last slice is read (CorruptBlob)."""

    def __init__(self, source: BinaryIO, part10_bytes: int, what: str) -> None:
        self._source = source
        self._reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK_BYTES)
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
            if self._position == self._size and self._reader.read(1):  # Also checks the checksum.
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
