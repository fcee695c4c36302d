"""RocksStore: the local storage engine (RocksDB through rocksdict).

One synced WriteBatch per instance holds everything about it: the zstd-compressed
Part-10 bytes (with zstd's frame checksum), its instance record, the updated series and
study records and the study's query-index keys. After `put_instance` returns, all of it
is on disk; after a crash, either all of it is there or none of it. A big blob (spooled,
or `blob_file_bytes_min` compressed bytes or more) is a file under `blobs/` instead,
durable under its final name before the batch that points at it (node/blob_files.py);
unreferenced files are removed when the store opens.

Key layout (every data key starts with the study's 8-byte ring token, so a token range
is one contiguous scan, stream or DeleteRange):

    b <token8> <study uid> 0x00 <sop uid>     -> zstd(Part-10 bytes), or for a blob of
                                              blob_file_bytes_min or more a BlobPointer to a file
                                              under <store>/blobs (node/blob_files.py)
    f <blob file name>                        -> b"": the file is referenced (a file without
                                              this key is an orphan, removed at open)
    m <token8> <study uid> 0x00 <sop uid>     -> InstanceRecord (JSON)
    e <token8> <study uid> 0x00 <series uid>  -> SeriesRecord (JSON)
    s <token8> <study uid>                    -> StudyRecord (JSON)
    c <token8> <study uid> 0x00 <sop uid> 0x00 <content hash> -> conflicting copy (zstd or BlobPointer)
    x <keyword> 0x00 <value> 0x00 <token8> <study uid> -> b"" (sorted study-level index)
    d <segment 2 bytes>                       -> digest (XOR 16 bytes, count 8) of the instances
                                              in that ring segment (replication/digest.py)
    h <owner id> 0x00 <token8> <study uid> 0x00 <sop uid> -> hint: header length (4 bytes),
                                              header JSON (record, attributes), zstd blob
    t <token8> <study uid> 0x00 <sop uid>     -> Tombstone (JSON): the instance was deleted at
                                              that version; in the segment digest as
                                              (sop uid, version mark)
    k <owner id> 0x00 <token8> <study uid> 0x00 <sop uid> -> tombstone held as a hint for an owner
    j <token8> <study uid> 0x00 <sop uid>     -> content hash 0x00 WADO-RS /metadata JSON of that
                                              content (node/dicomweb_metadata.py): written in the
                                              instance's own batch when stored (`header_of`), else
                                              without a sync when first asked; derived data, rebuilt
                                              from the blob when absent or of other content
    r <token8> <study uid>                    -> Correction (canonical JSON, replication/correction.py):
                                              the study's overlay; in the segment digest as
                                              ("", "^" + that JSON)
    q <owner id> 0x00 <token8> <study uid>    -> Correction held as a hint for an owner (a stand-in's
                                              copy; not in the digests, replayed to the owner)
    _ <name>                                  -> node-local bookkeeping (counters)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, cast

import orjson
from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, ReadOptions, Rdict, WriteBatch, WriteOptions

from pacsnode.replication.model import (
    INSTANCE_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    CorruptBlob,
    Instance,
    InstanceRecord,
    SeriesRecord,
    StoreError,
    StoreFull,
    StoredInstance,
    StoreOutcome,
    StudyRecord,
    Tombstone,
)
from pacsnode.replication.archive import InstanceLocation
from pacsnode.replication.correction import CORRECTION_SOP, Correction, apply, correction_of_entry, is_correction_entry
from pacsnode.replication.hlc import is_mark
from pacsnode.node import write_trace
from pacsnode.node.blob_files import BlobFiles, BlobPointer, Part10Stream, TempBlob, TEMP_PREFIX, WorkerBlob, stored_size
from pacsnode.node.blob_files import WHOLE_READ_BYTES_MAX as WHOLE_READ_BYTES_MAX  # Re-exported: its old home.
from pacsnode.node.codec import ZSTD_LEVEL, decompress, decompress_head, to_stored
from pacsnode.replication.digest import SEGMENT_COUNT, Digest, entry_hash, segment_bounds, segment_of
from pacsnode.ring.tokens import study_token, token_bytes

log = logging.getLogger(__name__)

SEP = b"\x00"
PREFIX_BLOB = b"b"
PREFIX_META = b"m"
PREFIX_SERIES = b"e"
PREFIX_STUDY = b"s"
PREFIX_CONFLICT = b"c"
PREFIX_INDEX = b"x"
PREFIX_HINT = b"h"
PREFIX_DIGEST = b"d"
PREFIX_TOMBSTONE = b"t"
PREFIX_TOMBSTONE_HINT = b"k"
PREFIX_HEADER = b"j"
PREFIX_CORRECTION = b"r"
PREFIX_CORRECTION_HINT = b"q"
PREFIX_BLOB_FILE = b"f"
KEY_COUNTERS = b"_counters"

# Study-level keys with a sorted secondary index: exact, prefix-wildcard, range and list
# matches on these avoid a scan over every study.
INDEXED_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "PatientBirthDate",
)


@dataclass(frozen=True)
class StoreStats:
    instances: int
    bytes_received: int
    bytes_stored: int
    studies: int
    conflicts: int
    hints: int = 0
    hint_bytes: int = 0
    tombstones: int = 0


def study_prefix(study_instance_uid: str) -> bytes:
    """token8 + study uid: the part every key of one study shares after its type byte."""
    return token_bytes(study_token(study_instance_uid)) + study_instance_uid.encode("ascii")


def index_value(keyword: str, value: str) -> str:
    """How a value is kept in the secondary index: PN case-folded (matching is case-insensitive),
    dates without the dots of the old "YYYY.MM.DD" form (matching reads both forms)."""
    if keyword == "PatientName":
        return value.upper()
    if keyword in ("StudyDate", "PatientBirthDate"):
        return value.replace(".", "")
    return value


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _dump(record: Any) -> bytes:
    """A record as JSON. The records' fields are plain values (str, int, lists and dicts of
    them), so a shallow dict gives the JSON dataclasses.asdict would, without its deep copy
    (~80 us per record, three per stored instance; ~10 us this way). orjson writes the same
    compact UTF-8 JSON as json.dumps(separators=(",", ":"), ensure_ascii=False) for such
    values, several times faster (tests/unit/test_store.py compares the two)."""
    names = _FIELD_NAMES.get(type(record))
    if names is None:
        names = _FIELD_NAMES[type(record)] = tuple(f.name for f in dataclasses.fields(record))
    return orjson.dumps({name: getattr(record, name) for name in names})


def _prefix_upper_bound(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\xff" * (len(prefix) + 1)
    return stripped[:-1] + bytes([stripped[-1] + 1])


def store_directory(data_dir: Path) -> Path:
    """Where a node keeps its store (RocksDB and the blobs directory) under its data dir."""
    return Path(data_dir) / "store"


def blobs_directory(store_path: Path) -> Path:
    """The blobs directory of the store at `store_path` (node/blob_files.py); DICOM worker
    processes write their temp blob files there for the node's store to name."""
    return Path(store_path) / "blobs"



# Block compression: zstd with a dictionary trained on each SST file's own data
# (RocksDB's default is Snappy without one). The records, index keys and small blobs of
# one study look much like those of the next (a small instance's zstd frame at level -1
# still holds the DICOM header's literals), and a dictionary lets each 4 KiB block share
# what it repeats of the others. 10 000 one-instance studies (bench/README.md, "Disk: zstd
# with a trained dictionary"): 24.5 MB of SST files with Snappy, 18.7 with zstd, 14.7 with
# the trained dictionary; a point read 5 -> ~11 us. The cost: RocksDB buffers an output
# file's data (at most its target size, 64 MiB) to train the dictionary before writing it,
# and trains it (ZDICT) on up to DICT_TRAIN_BYTES of samples, on its background threads.
# Existing files keep their compression until compaction rewrites them.
DICT_BYTES = 16 * 1024
DICT_TRAIN_BYTES = 100 * DICT_BYTES
_ZSTD_DEFAULT_WINDOW_BITS = -14
_ZSTD_LEVEL = 3
_ZSTD_DEFAULT_STRATEGY = 0


def _compress_blocks(options: Options) -> None:
    options.set_compression_type(DBCompressionType.zstd())
    options.set_compression_options(_ZSTD_DEFAULT_WINDOW_BITS, _ZSTD_LEVEL, _ZSTD_DEFAULT_STRATEGY, DICT_BYTES)
    options.set_zstd_max_train_bytes(DICT_TRAIN_BYTES)


# Point reads (a study, series or instance record, a blob, a key that is not there): a
# whole-key Bloom filter in every SST file, BLOOM_BITS_PER_KEY bits a key (~1 % false
# positives). Keys are stored at random ring tokens, so the level-0 files a big ingest
# flushes (64 MiB memtables, up to 3 before the first compaction) each span the whole key
# space: without a filter a read looks in every one of them, an index search and a 4 KiB
# block decompressed (zstd with a dictionary) for each, before the level it is in. With
# one, a file without the key costs a filter probe. 100 000 one-instance studies fresh from
# ingest (3 level-0 files; bench/README.md "stop 32, helper L"): ~38 -> ~13 us of CPU a
# record read. The filters take ~10 bits of ~80-byte keys, under 1.5 % of the SST bytes.
# A filter is written with an SST file (a flush or compaction): files written before this
# option keep none until compaction rewrites them, which RocksDB does as level 0 fills;
# a reader without a filter policy ignores them. Prefix scans (the query index) use none.
BLOOM_BITS_PER_KEY = 10
# The block cache (uncompressed data blocks; index and filter blocks are held by the open
# table readers, outside it): RocksDB's default size, named so that it is the same at
# every open. Before the default column family's options were passed at open, a store
# got 32 MiB when created and 8 MiB at every later open (RocksDB's fallback).
BLOCK_CACHE_BYTES = 32 * 1024**2


def _table_options(options: Options) -> Cache:
    """Set the block-based table options; returns the block cache, which must outlive the
    database."""
    cache = Cache(BLOCK_CACHE_BYTES)
    table = BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)  # False: a full filter per file, not per block
    options.set_block_based_table_factory(table)
    return cache


class RocksStore:
    """The node's durable store. Thread-safe; every write is one synced WriteBatch."""

    def __init__(
        self,
        path: Path,
        *,
        disk_free_bytes_min: int = 256 * 1024**2,
        instance_size_bytes_max: int = 4 * 1024**3,
        zstd_level: int = ZSTD_LEVEL,
        blob_file_bytes_min: int = 64 * 1024,  # config.py's blob_file_bytes_min default
        header_of: Callable[[InstanceRecord, bytes], bytes | None] | None = None,
        whole_read_bytes_max: int = WHOLE_READ_BYTES_MAX,
    ) -> None:
        """`header_of(record, blob)`: the WADO-RS /metadata JSON of an instance being
        stored (node/dicomweb_metadata.py's ingest_header_json), kept in the instance's own
        write batch; None from it, or no `header_of`, leaves it to be built when first asked.
        `whole_read_bytes_max`: open_part10 reads a blob file of up to this many Part-10
        bytes whole, and streams a bigger one."""
        self._path = Path(path)
        self._path.mkdir(parents=True, exist_ok=True)
        self._disk_free_bytes_min = disk_free_bytes_min
        self._instance_size_bytes_max = instance_size_bytes_max
        self._zstd_level = zstd_level
        self._blob_file_bytes_min = blob_file_bytes_min
        self._whole_read_bytes_max = whole_read_bytes_max
        self._header_of = header_of
        self.blob_files = BlobFiles(blobs_directory(self._path))
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        # Large values go to blob files: compaction then moves keys, not images.
        options.set_enable_blob_files(True)
        options.set_min_blob_size(8192)
        # Deleted instances' blobs are reclaimed when compaction rewrites their blob files.
        options.set_enable_blob_gc(True)
        options.set_keep_log_file_num(5)
        _compress_blocks(options)
        self._block_cache = _table_options(options)
        # The default column family's options named too: without them rocksdict opens an
        # existing database with the column family options of its OPTIONS file, not these,
        # and that file cannot carry a filter policy (it reads back as none), so a store
        # would lose its filters, and any later change here, at its first restart.
        self._db = Rdict(str(self._path / "rocksdb"), options, column_families={"default": options})
        # A commit is written without sync, then the WAL is synced by flush_wal(True): the
        # same durability (nothing is acknowledged before the sync returns), but rocksdict's
        # write() holds the GIL for its whole duration, fsync included, while flush_wal()
        # releases it, so the other associations' threads run during the fsync
        # (bench/store_gil.py).
        self._unsynced = WriteOptions()
        self._unsynced.sync = False
        self._blob_read_options = ReadOptions()
        self._blob_read_options.set_verify_checksums(False)  # See open_part10.
        self._commit = threading.Condition()
        self._queue: list[_Pending] = []
        self._leader_active = False
        self._group_commits = 0
        self._commits_batched = 0
        self._closed = False
        self._counters = self._load_counters()
        self._free_checked_at = 0.0
        self._free_bytes = 0
        self.missing_blob_files = 0  # Records whose blob file is gone, counted at open (_remove_orphan_blob_files).
        self._remove_orphan_blob_files()
        self.blob_files.start_pool()  # Empty files ready for in-memory blobs (node/blob_files.py BlobPool).

    def _remove_orphan_blob_files(self) -> None:
        """Remove the blob files no record points at (a crash between a blob file's rename
        and its batch, or between a delete's batch and its unlink) and temp files; count the
        records whose file is gone (`missing_blob_files`: never made by this code now, but a
        store written before 3453a8f by an entry node with DICOM workers in a cluster may hold
        some, and a disk may lose files), reported at ERROR, without patient data."""
        removed = 0
        present: set[bytes] = set()
        for name in list(self.blob_files.files()):
            if name.rpartition("/")[2].startswith(TEMP_PREFIX) or \
                    self._db.get(PREFIX_BLOB_FILE + name.encode()) is None:
                self.blob_files.remove(name)
                removed += 1
            else:
                present.add(name.encode())
        if removed:
            log.info("store.blob_files.orphans_removed files=%d", removed)
        skip = len(PREFIX_BLOB_FILE)
        self.missing_blob_files = sum(1 for key, _value in self._scan(PREFIX_BLOB_FILE) if key[skip:] not in present)
        if self.missing_blob_files:
            log.error("store.blob_files.missing files=%d: records here point at blob files that are gone; those "
                      "instances cannot be read from this node (other owners' copies can)", self.missing_blob_files)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        with self._commit:
            while self._leader_active:
                self._commit.wait()
            if not self._closed:
                self._closed = True
                self.blob_files.close()
                try:
                    self._db.close()
                except Exception as error:  # e.g. a flush that hits a full disk
                    # Everything acknowledged is in the synced WAL; RocksDB replays it at the
                    # next open. Say so and carry on shutting down.
                    log.error("store.close.failed error=%s (acknowledged data is in the WAL)", error)

    @property
    def path(self) -> Path:
        return self._path

    def statistics(self) -> StoreStats:
        counters = self._counters
        return StoreStats(
            instances=counters["instances"],
            bytes_received=counters["bytes_received"],
            bytes_stored=counters["bytes_stored"],
            studies=counters["studies"],
            conflicts=counters["conflicts"],
            hints=counters["hints"],
            hint_bytes=counters["hint_bytes"],
            tombstones=counters["tombstones"],
        )

    def is_empty(self) -> bool:
        return self._counters["instances"] == 0

    def commit_statistics(self) -> tuple[int, int]:
        """(synced WriteBatches written since start, writes they carried); the second is
        larger than the first when group commit batched parallel writes."""
        return self._group_commits, self._commits_batched

    def _load_counters(self) -> dict[str, int]:
        raw = self._db.get(KEY_COUNTERS)
        base = dict.fromkeys(("instances", "bytes_received", "bytes_stored", "studies", "conflicts", "hints",
                              "hint_bytes", "tombstones"), 0)
        if raw:
            base.update(orjson.loads(raw))
        return base

    # ----------------------------------------------------------------- writes
    def check_capacity(self, size_bytes: int, disk_bytes: int | None = None) -> None:
        """Raise StoreFull when an instance of `size_bytes` is over the limit, or writing
        `disk_bytes` (default: size_bytes) would take the disk below its free minimum."""
        if size_bytes > self._instance_size_bytes_max:
            raise StoreFull(
                f"instance of {size_bytes} bytes is over instance_size_bytes_max="
                f"{self._instance_size_bytes_max}"
            )
        now = time.monotonic()
        if now - self._free_checked_at > 0.5:
            self._free_bytes = shutil.disk_usage(self._path).free
            self._free_checked_at = now
        needed = size_bytes if disk_bytes is None else disk_bytes
        if self._free_bytes - needed < self._disk_free_bytes_min:
            raise StoreFull(
                f"free disk {self._free_bytes} bytes minus this instance is below "
                f"disk_free_bytes_min={self._disk_free_bytes_min}"
            )

    def put_instance(self, instance: Instance, *, now_ms: int | None = None) -> str:
        """Compress and durably store one instance as received (see put_stored)."""
        if self._holds_same(instance.study_instance_uid, instance.sop_instance_uid, instance.content_hash):
            return StoreOutcome.DUPLICATE  # A retry needs no space and no compression.
        self.check_capacity(len(instance.part10))
        return self.put_stored(to_stored(instance, now_ms=now_ms, level=self._zstd_level))

    def put_stored(self, stored: StoredInstance, *, hint_for: str = "") -> str:
        """Durably store one instance; returns a StoreOutcome value.

        Identical bytes under a known SOP Instance UID: DUPLICATE, nothing written.
        Different bytes: CONFLICT, the first copy stays, the new one is kept aside.
        With `hint_for`, the instance is kept as a hint for that owner (a full copy, synced
        like primary data) instead of as a replica of our own.
        Raises StoreFull (nothing written) when the disk is (nearly) full, unless the same
        bytes are already stored (a retry: DUPLICATE needs no space).
        """
        write_trace.mark("put.start", stored.sop_instance_uid)
        if not hint_for and self._holds_same(stored.study_instance_uid, stored.sop_instance_uid,
                                             stored.content_hash):
            return StoreOutcome.DUPLICATE
        self.check_capacity(stored.record.size_bytes, len(stored.blob) + 4096)
        if hint_for:
            return self._submit(lambda view, batch: self._build_hint(view, batch, stored, hint_for))
        # Built before the batch is queued (not in the group commit's leader, which writes for all).
        header = stored.metadata_json
        if header is None and self._header_of is not None and stored.blob_file is None:
            header = self._header_of(stored.record, stored.blob)
        if len(stored.blob) < self._blob_file_bytes_min and stored.blob_file is None:
            outcome = self._submit(lambda view, batch: self._build_instance(view, batch, stored, stored.blob, header))
            write_trace.mark("put.end", stored.sop_instance_uid)
            return outcome
        return self._put_with_blob_file(stored, header)

    def _put_with_blob_file(self, stored: StoredInstance, header: bytes | None) -> str:
        """put_stored for a big blob: the file is durable under its final name before the
        batch that points at it; removed again when the batch did not keep it."""
        temp = stored.blob_file if isinstance(stored.blob_file, TempBlob) and stored.blob_file.path.exists() \
            else None
        # A worker's pool file is recorded as it is by the one write that claims it; any other
        # (the channel gave it up, or an earlier write claimed it) writes its own file below.
        worker = stored.blob_file if isinstance(stored.blob_file, WorkerBlob) and stored.blob_file.claim() else None
        if worker is not None and self._db.get(PREFIX_BLOB_FILE + worker.pointer.name.encode()) is not None:
            worker.kept = True  # Another record's file (a worker naming it twice): never removed.
            raise StoreError("a worker's blob file is already referenced")
        try:
            if worker is not None:  # Written and fsync'ed by a DICOM worker under its final name.
                pointer = worker.pointer
            elif temp is None:  # In memory (a C-STORE below the spool threshold, a peer's copy).
                pointer = self.blob_files.write_named(stored.blob, stored.content_hash)
            else:  # The front end's spooled temp file: renamed, not copied.
                try:
                    pointer = self.blob_files.commit(temp, stored.content_hash)
                except BaseException:
                    self.blob_files.remove(temp.path.name)
                    raise
        except OSError as error:  # ENOSPC writing or syncing the file: a full disk is 0xA700.
            raise self._write_failure(error) from error
        write_trace.mark("put.file", stored.sop_instance_uid)
        kept = False
        try:
            outcome = self._submit(lambda view, batch: self._build_instance(view, batch, stored, pointer.encode(),
                                                                            header))
            write_trace.mark("put.end", stored.sop_instance_uid)
            kept = self._db.get(PREFIX_BLOB_FILE + pointer.name.encode()) is not None
            if worker is not None:
                worker.kept = kept
            return outcome
        finally:
            if not kept:
                self.blob_files.remove(pointer.name)

    def delete_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> None:
        """Forget a hint once its owner acknowledged a durable copy."""
        self._submit(lambda view, batch: self._build_hint_delete(view, batch, owner, study_instance_uid,
                                                                 sop_instance_uid))

    def _holds_same(self, study_uid: str, sop_uid: str, content_hash: str) -> bool:
        self._ensure_open()
        existing = self._db.get(PREFIX_META + study_prefix(study_uid) + SEP + sop_uid.encode("ascii"))
        return existing is not None and orjson.loads(existing)["content_hash"] == content_hash

    # Group commit: callers queue a build step; one of them (the leader) builds every
    # queued step into one WriteBatch, in order, over a view that sees the earlier steps'
    # writes, and writes it with one sync (flush_wal, GIL released: see __init__), so
    # parallel associations share one fsync instead of each waiting for its own in turn.
    def _submit(self, build: Callable[["_View", WriteBatch], str]) -> str:
        pending = _Pending(build)
        with self._commit:
            self._queue.append(pending)
            while not pending.done and self._leader_active:
                self._commit.wait()
            if pending.done:
                return pending.result()
            self._leader_active = True
            group, self._queue = self._queue, []
        try:
            self._commit_group(group)
        finally:
            with self._commit:
                self._leader_active = False
                self._commit.notify_all()
        return pending.result()

    def _commit_group(self, group: list["_Pending"]) -> None:
        if self._closed:
            for pending in group:
                pending.fail(StoreError("store is closed"))
            return
        view = _View(self._db)
        batch = WriteBatch(raw_mode=True)
        counters = dict(self._counters)
        view.counters = counters
        built: list[_Pending] = []
        for pending in group:
            try:
                pending.outcome = pending.build(view, batch)
                built.append(pending)
            except StoreError as error:
                pending.fail(error)
        if not batch.is_empty():
            batch.put(KEY_COUNTERS, orjson.dumps(counters))
            try:
                self._write(batch)
            except StoreError as error:
                for pending in built:
                    pending.fail(error)
                return
            self._counters = counters
            self._group_commits += 1
            self._commits_batched += len(built)
            for name in view.removed_files:  # A crash before this leaves orphans, removed at open.
                self.blob_files.remove(name)
        for pending in built:
            pending.succeed()

    def _put_blob(self, view: "_View", batch: WriteBatch, key: bytes, value: bytes) -> None:
        """Put a blob value (the blob, or a pointer to its file, whose `f` key goes with it)."""
        view.put(batch, key, value)
        pointer = BlobPointer.decode(value)
        if pointer is not None:
            view.put(batch, PREFIX_BLOB_FILE + pointer.name.encode(), b"")

    def _delete_blob(self, view: "_View", batch: WriteBatch, key: bytes) -> int:
        """Delete a blob value; its file (if any) is unlinked once the batch is written.
        Returns its compressed size (0 when there was none)."""
        value = view.get(key)
        if value is None:
            return 0
        view.delete(batch, key)
        pointer = BlobPointer.decode(value)
        if pointer is not None:
            view.delete(batch, PREFIX_BLOB_FILE + pointer.name.encode())
            view.removed_files.append(pointer.name)
        return stored_size(value)

    def _build_instance(self, view: "_View", batch: WriteBatch, stored: StoredInstance, blob_value: bytes,
                        header: bytes | None = None) -> str:
        record = stored.record
        prefix = study_prefix(record.study_instance_uid)
        sop = record.sop_instance_uid.encode("ascii")
        meta_key = PREFIX_META + prefix + SEP + sop
        existing = view.get(meta_key)
        if existing is not None:
            current = orjson.loads(existing)
            if current["content_hash"] == record.content_hash:
                return StoreOutcome.DUPLICATE
            return self._resolve_conflict(view, batch, stored, blob_value, current, prefix, sop)
        tombstone_key = PREFIX_TOMBSTONE + prefix + SEP + sop
        raw_tombstone = view.get(tombstone_key)
        if raw_tombstone is not None:
            tombstone = Tombstone.from_json(orjson.loads(raw_tombstone))
            if tombstone.version >= record.version:
                return StoreOutcome.DELETED  # Deleted after this write: the delete wins.
            # Stored after the delete: a new instance under the same UID; the tombstone goes.
            self._drop_tombstone(view, batch, tombstone, prefix, sop)
        self._put_blob(view, batch, PREFIX_BLOB + prefix + SEP + sop, blob_value)
        view.put(batch, meta_key, _dump(record))
        if header is not None:
            view.put(batch, PREFIX_HEADER + prefix + SEP + sop, record.content_hash.encode("ascii") + SEP + header)
        segment_key = _digest_key(segment_of(study_token(record.study_instance_uid)))
        digest = Digest.from_bytes(view.get(segment_key)).add(entry_hash(record.sop_instance_uid, record.content_hash))
        view.put(batch, segment_key, digest.to_bytes())
        new_study = self._update_series_and_study(view, batch, stored, prefix)
        view.counters["instances"] += 1
        view.counters["bytes_received"] += record.size_bytes
        view.counters["bytes_stored"] += len(stored.blob)
        view.counters["studies"] += 1 if new_study else 0
        return StoreOutcome.STORED

    def _resolve_conflict(self, view: "_View", batch: WriteBatch, stored: StoredInstance, blob_value: bytes,
                          current: dict[str, Any], prefix: bytes, sop: bytes) -> str:
        """Same SOP Instance UID, other bytes: one deterministic rule on every replica.

        The first writer wins, by the version (ingest time at the coordinator, content
        hash): whichever order copies reach a replica in, every replica ends with the same
        copy as the instance and the other kept as a conflict record.
        """
        record = stored.record
        incoming = (record.version, record.content_hash)
        kept_record = InstanceRecord(**current)
        kept = (kept_record.version, kept_record.content_hash)
        if incoming < kept:
            # The incoming copy was written first: it becomes the instance, ours the conflict.
            blob_key = PREFIX_BLOB + prefix + SEP + sop
            old_blob = view.get(blob_key) or b""
            loser_key = PREFIX_CONFLICT + prefix + SEP + sop + SEP + kept[1].encode()
            if view.get(loser_key) is None:
                view.put(batch, loser_key, old_blob)  # A pointer moves with its `f` key kept.
                view.counters["conflicts"] += 1
            else:
                old_pointer = BlobPointer.decode(old_blob)
                if old_pointer is not None:  # Held twice: the conflict copy stays, this file goes.
                    view.delete(batch, PREFIX_BLOB_FILE + old_pointer.name.encode())
                    view.removed_files.append(old_pointer.name)
            winner_key = PREFIX_CONFLICT + prefix + SEP + sop + SEP + record.content_hash.encode()
            if view.get(winner_key) is not None:
                self._delete_blob(view, batch, winner_key)
                view.counters["conflicts"] -= 1
            self._put_blob(view, batch, blob_key, blob_value)
            view.put(batch, PREFIX_META + prefix + SEP + sop, _dump(record))
            segment_key = _digest_key(segment_of(study_token(record.study_instance_uid)))
            digest = Digest.from_bytes(view.get(segment_key))
            digest = digest.remove(entry_hash(record.sop_instance_uid, kept[1]))
            digest = digest.add(entry_hash(record.sop_instance_uid, record.content_hash))
            view.put(batch, segment_key, digest.to_bytes())
            view.counters["bytes_stored"] += len(stored.blob) - stored_size(old_blob)
            view.counters["bytes_received"] += record.size_bytes - int(current["size_bytes"])
            return StoreOutcome.CONFLICT
        key = PREFIX_CONFLICT + prefix + SEP + sop + SEP + record.content_hash.encode()
        if view.get(key) is None:
            self._put_blob(view, batch, key, blob_value)
            view.counters["conflicts"] += 1
        return StoreOutcome.CONFLICT

    def _build_hint(self, view: "_View", batch: WriteBatch, stored: StoredInstance, owner: str) -> str:
        key = _hint_key(owner, stored.study_instance_uid, stored.sop_instance_uid)
        existing = view.get(key)
        if existing is not None:
            header, _blob = _split_hint(existing)
            if header["record"]["content_hash"] == stored.content_hash:
                return StoreOutcome.DUPLICATE
        header_bytes = json.dumps({"record": dataclasses.asdict(stored.record), "attributes": stored.attributes},
                                  separators=(",", ":"), ensure_ascii=False).encode()
        view.put(batch, key, len(header_bytes).to_bytes(4, "big") + header_bytes + stored.blob)
        if existing is None:
            view.counters["hints"] += 1
            view.counters["hint_bytes"] += len(stored.blob)
        return StoreOutcome.STORED

    def _build_hint_delete(self, view: "_View", batch: WriteBatch, owner: str, study_uid: str, sop_uid: str) -> str:
        key = _hint_key(owner, study_uid, sop_uid)
        existing = view.get(key)
        if existing is None:
            return StoreOutcome.DUPLICATE
        _header, blob = _split_hint(existing)
        view.delete(batch, key)
        view.counters["hints"] -= 1
        view.counters["hint_bytes"] -= len(blob)
        return StoreOutcome.STORED

    def _update_series_and_study(self, view: "_View", batch: WriteBatch, stored: StoredInstance,
                                 prefix: bytes) -> bool:
        """Add the instance to its series and study records; True if the study is new."""
        record = stored.record
        series_key = PREFIX_SERIES + prefix + SEP + record.series_instance_uid.encode("ascii")
        raw_series = view.get(series_key)
        new_series = raw_series is None
        if new_series:
            series = SeriesRecord(
                study_instance_uid=record.study_instance_uid,
                series_instance_uid=record.series_instance_uid,
                attributes=_pick(stored.attributes, "series"),
                first_sop_instance_uid=record.sop_instance_uid,
            )
        else:
            assert raw_series is not None
            series = SeriesRecord(**orjson.loads(raw_series))
        series.instance_count += 1
        view.put(batch, series_key, _dump(series))

        study_key = PREFIX_STUDY + prefix
        raw_study = view.get(study_key)
        new_study = raw_study is None
        if new_study:
            study = StudyRecord(
                study_instance_uid=record.study_instance_uid,
                attributes=_pick(stored.attributes, "study"),
                first_sop_instance_uid=record.sop_instance_uid,
            )
            raw_correction = view.get(PREFIX_CORRECTION + prefix)
            if raw_correction is not None:  # Corrected before this instance came: it applies too.
                correction = Correction.loads(raw_correction)
                study.attributes = apply(study.attributes, correction)
                study.correction = correction.dumps()
            for keyword in INDEXED_STUDY_KEYWORDS:
                for value in _values(study.attributes.get(keyword)):
                    view.put(batch, _index_key(keyword, value, prefix), b"")
        else:
            assert raw_study is not None
            study = StudyRecord(**orjson.loads(raw_study))
        study.instance_count += 1
        study.series_count += 1 if new_series else 0
        study.size_bytes += record.size_bytes
        study.updated_at_ms = record.stored_at_ms
        modality = stored.attributes.get("Modality")
        if isinstance(modality, str) and modality and modality not in study.modalities:
            study.modalities.append(modality)
        if record.sop_class_uid not in study.sop_classes:
            study.sop_classes.append(record.sop_class_uid)
        view.put(batch, study_key, _dump(study))
        return new_study

    def _write(self, batch: WriteBatch) -> None:
        try:
            self._db.write(batch, self._unsynced)
            self._db.flush_wal(True)
        except Exception as error:  # rocksdict raises plain Exception subclasses, no errno
            raise self._write_failure(error) from error

    def _write_failure(self, error: Exception) -> StoreError:
        """What a failed write (RocksDB's or a blob file's) means. Decided by the disk, not by
        the error's text: a failed write on a disk that has less free space than the reserve
        is a full disk (0xA700, retry later)."""
        try:
            free = shutil.disk_usage(self._path).free
        except OSError:
            free = -1
        self._free_bytes = free if free >= 0 else self._free_bytes
        if 0 <= free < max(self._disk_free_bytes_min, 64 * 1024**2):
            return StoreFull(f"disk full: {free} bytes free")
        return StoreError(f"write failed: {type(error).__name__}")

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    # ----------------------------------------------------------------- ranges (anti-entropy, rebalance)
    def segment_digests(self, intervals: list[tuple[int, int]]) -> dict[int, Digest]:
        """Digest per ring segment of the instances whose token is in the inclusive
        intervals: stored digests for whole segments, a scan for the cut ones."""
        result: dict[int, Digest] = {}
        for low, high in intervals:
            first, last = segment_of(low), segment_of(high)
            for segment in (first, last) if first != last else (first,):
                seg_low, seg_high = segment_bounds(segment)
                if low <= seg_low and seg_high <= high:
                    continue
                digest = Digest()
                for _study, sop, content_hash in self.entries(max(low, seg_low), min(high, seg_high)):
                    digest = digest.add(entry_hash(sop, content_hash))
                result[segment] = result.get(segment, Digest()).combine(digest)
            full_low = first if low <= segment_bounds(first)[0] else first + 1
            full_high = last if segment_bounds(last)[1] <= high else last - 1
            if full_low > full_high:
                continue
            start = _digest_key(full_low)
            stop = _digest_key(full_high + 1) if full_high + 1 < SEGMENT_COUNT else PREFIX_DIGEST + b"\xff\xff\xff"
            for key, value in self._scan_range(start, stop):
                segment = int.from_bytes(key[1:3], "big")
                digest = Digest.from_bytes(value)
                if digest.count:
                    result[segment] = result.get(segment, Digest()).combine(digest)
        return {segment: digest for segment, digest in result.items() if digest.count or digest.xor}

    def entries(self, low: int, high: int) -> Iterator[tuple[str, str, str]]:
        """(study uid, sop uid, content hash) of every instance with low <= token <= high,
        then (study uid, sop uid, version mark) of every tombstone there (hlc.is_mark)."""
        start = PREFIX_META + token_bytes(low)
        stop = PREFIX_META + token_bytes(high + 1) if high + 1 < (1 << 64) else PREFIX_META + b"\xff" * 9
        for _key, value in self._scan_range(start, stop):
            record = orjson.loads(value)
            yield record["study_instance_uid"], record["sop_instance_uid"], record["content_hash"]
        for tombstone in self.tombstones(low, high):
            yield tombstone.study_instance_uid, tombstone.sop_instance_uid, tombstone.version.mark()
        for correction in self.corrections(low, high):
            yield correction.study_instance_uid, CORRECTION_SOP, correction.entry_content()

    def studies_in(self, low: int, high: int) -> list[str]:
        """Study UIDs with low <= token <= high."""
        start = PREFIX_STUDY + token_bytes(low)
        stop = PREFIX_STUDY + token_bytes(high + 1) if high + 1 < (1 << 64) else PREFIX_STUDY + b"\xff" * 9
        return [key[9:].decode("ascii") for key, _value in self._scan_range(start, stop)]

    def delete_study(self, study_instance_uid: str) -> int:
        """Remove a whole study this node no longer owns (after the drop rule allowed it).
        Returns the instances removed. One synced WriteBatch."""
        count = self._submit(lambda view, batch: self._build_study_delete(view, batch, study_instance_uid))
        return int(count)

    def _build_study_delete(self, view: "_View", batch: WriteBatch, study_uid: str) -> str:
        prefix = study_prefix(study_uid)
        raw_study = view.get(PREFIX_STUDY + prefix)
        if raw_study is None:
            return "0"
        study = StudyRecord(**orjson.loads(raw_study))
        for keyword in INDEXED_STUDY_KEYWORDS:
            for value in _values(study.attributes.get(keyword)):
                view.delete(batch, _index_key(keyword, value, prefix))
        segment_key = _digest_key(segment_of(study_token(study_uid)))
        digest = Digest.from_bytes(view.get(segment_key))
        removed = 0
        for key, meta in list(self._scan(PREFIX_META + prefix + SEP)):
            record = orjson.loads(meta)
            digest = digest.remove(entry_hash(record["sop_instance_uid"], record["content_hash"]))
            view.counters["bytes_stored"] -= self._delete_blob(view, batch, PREFIX_BLOB + key[1:])
            view.counters["bytes_received"] -= int(record["size_bytes"])
            view.counters["instances"] -= 1
            view.delete(batch, key)
            removed += 1
        for key, _value in list(self._scan(PREFIX_CONFLICT + prefix + SEP)):
            self._delete_blob(view, batch, key)
        for prefix_byte in (PREFIX_SERIES, PREFIX_HEADER):
            for key, _value in list(self._scan(prefix_byte + prefix + SEP)):
                view.delete(batch, key)
        view.delete(batch, PREFIX_STUDY + prefix)
        raw_correction = view.get(PREFIX_CORRECTION + prefix)
        if raw_correction is not None:
            digest = digest.remove(entry_hash(CORRECTION_SOP, Correction.loads(raw_correction).entry_content()))
            view.delete(batch, PREFIX_CORRECTION + prefix)
        view.put(batch, segment_key, digest.to_bytes())
        view.counters["studies"] -= 1
        return str(removed)

    def delete_instances(self, entries: Sequence[tuple[str, str, str]]) -> int:
        """Remove exactly these instances, each (study uid, sop uid, content hash), and each
        only if it is still held here with that content: the drop rule verified that every
        owner holds them. An instance that arrived since the check, or whose content
        changed, is not in `entries` or does not match, and stays. One synced WriteBatch;
        the segment digests, the series and study records (a series or study left with no
        instance loses its record and index keys) and the counters change with it.
        Returns the instances removed."""
        if not entries:
            return 0
        chosen = list(entries)
        return int(self._submit(lambda view, batch: self._build_instances_delete(view, batch, chosen)))

    def _build_instances_delete(self, view: "_View", batch: WriteBatch,
                                entries: list[tuple[str, str, str]]) -> str:
        removed = 0
        for study_uid, sop_uid, content_hash in entries:
            prefix = study_prefix(study_uid)
            sop = sop_uid.encode("ascii")
            if is_correction_entry(content_hash):  # A correction of a study this node no longer owns.
                raw_correction = view.get(PREFIX_CORRECTION + prefix)
                if raw_correction is not None and Correction.loads(raw_correction).entry_content() == content_hash:
                    self._drop_correction(view, batch, prefix, content_hash)
                continue
            if is_mark(content_hash):  # A tombstone of a range this node no longer owns.
                raw_tombstone = view.get(PREFIX_TOMBSTONE + prefix + SEP + sop)
                if raw_tombstone is not None:
                    tombstone = Tombstone.from_json(orjson.loads(raw_tombstone))
                    if tombstone.version.mark() == content_hash:
                        self._drop_tombstone(view, batch, tombstone, prefix, sop)
                continue
            meta_key = PREFIX_META + prefix + SEP + sop
            raw = view.get(meta_key)
            if raw is None:
                continue
            record = orjson.loads(raw)
            if record["content_hash"] != content_hash:
                continue  # Another copy won meanwhile: not what the owners were checked for.
            self._remove_instance(view, batch, record, prefix, sop)
            removed += 1
        return str(removed)

    def _remove_instance(self, view: "_View", batch: WriteBatch, record: dict[str, Any], prefix: bytes,
                         sop: bytes) -> None:
        """Delete one held instance (blob, record, conflicts) and update its segment
        digest, series and study records (a series or study left with no instance loses
        its record and index keys) and the counters."""
        study_uid = str(record["study_instance_uid"])
        sop_uid = str(record["sop_instance_uid"])
        segment_key = _digest_key(segment_of(study_token(study_uid)))
        digest = Digest.from_bytes(view.get(segment_key)).remove(entry_hash(sop_uid, str(record["content_hash"])))
        view.put(batch, segment_key, digest.to_bytes())
        view.counters["bytes_stored"] -= self._delete_blob(view, batch, PREFIX_BLOB + prefix + SEP + sop)
        view.counters["bytes_received"] -= int(record["size_bytes"])
        view.counters["instances"] -= 1
        view.delete(batch, PREFIX_META + prefix + SEP + sop)
        view.delete(batch, PREFIX_HEADER + prefix + SEP + sop)
        for key, _value in list(self._scan(PREFIX_CONFLICT + prefix + SEP + sop + SEP)):
            if view.get(key) is not None:
                self._delete_blob(view, batch, key)
                view.counters["conflicts"] -= 1
        series_count_change = 0
        series_key = PREFIX_SERIES + prefix + SEP + str(record["series_instance_uid"]).encode("ascii")
        raw_series = view.get(series_key)
        if raw_series is not None:
            series = SeriesRecord(**orjson.loads(raw_series))
            series.instance_count -= 1
            if series.instance_count <= 0:
                view.delete(batch, series_key)
                series_count_change = 1
            else:
                view.put(batch, series_key, _dump(series))
        study_key = PREFIX_STUDY + prefix
        raw_study = view.get(study_key)
        if raw_study is not None:
            study = StudyRecord(**orjson.loads(raw_study))
            study.instance_count -= 1
            study.series_count -= series_count_change
            study.size_bytes -= int(record["size_bytes"])
            if study.instance_count <= 0:
                for keyword in INDEXED_STUDY_KEYWORDS:
                    for value in _values(study.attributes.get(keyword)):
                        view.delete(batch, _index_key(keyword, value, prefix))
                view.delete(batch, study_key)
                view.counters["studies"] -= 1
            else:
                view.put(batch, study_key, _dump(study))

    # ----------------------------------------------------------------- tombstones
    def put_tombstones(self, tombstones: Sequence[Tombstone], *, hint_for: str = "") -> int:
        """Durably apply deletes; returns how many held instances they removed.

        Per tombstone: an instance of that SOP Instance UID with an older version is
        removed (with its conflict copies) and the tombstone kept in its place, in the
        segment digest, so anti-entropy carries it; an instance with a newer version was
        stored after the delete and stays (the tombstone is not kept). An equal or newer
        tombstone already held: nothing to do. With `hint_for`, the tombstones are kept as
        hints for that owner instead. One synced WriteBatch."""
        if not tombstones:
            return 0
        chosen = list(tombstones)
        if hint_for:
            return int(self._submit(lambda view, batch: self._build_tombstone_hints(view, batch, chosen, hint_for)))
        return int(self._submit(lambda view, batch: self._build_tombstones(view, batch, chosen)))

    def _build_tombstones(self, view: "_View", batch: WriteBatch, tombstones: list[Tombstone]) -> str:
        removed = 0
        for tombstone in tombstones:
            prefix = study_prefix(tombstone.study_instance_uid)
            sop = tombstone.sop_instance_uid.encode("ascii")
            tombstone_key = PREFIX_TOMBSTONE + prefix + SEP + sop
            raw_existing = view.get(tombstone_key)
            existing = Tombstone.from_json(orjson.loads(raw_existing)) if raw_existing is not None else None
            if existing is not None and existing.version >= tombstone.version:
                continue
            raw = view.get(PREFIX_META + prefix + SEP + sop)
            if raw is not None:
                record = orjson.loads(raw)
                if InstanceRecord(**record).version > tombstone.version:
                    continue  # Stored after this delete: a new instance, it stays.
                self._remove_instance(view, batch, record, prefix, sop)
                removed += 1
            if existing is not None:
                self._drop_tombstone(view, batch, existing, prefix, sop)
            view.put(batch, tombstone_key, json.dumps(tombstone.to_json(), separators=(",", ":")).encode())
            segment_key = _digest_key(segment_of(study_token(tombstone.study_instance_uid)))
            digest = Digest.from_bytes(view.get(segment_key)).add(
                entry_hash(tombstone.sop_instance_uid, tombstone.version.mark()))
            view.put(batch, segment_key, digest.to_bytes())
            view.counters["tombstones"] += 1
        # A key is needed in the batch even when nothing changed, so the counters key is written.
        return str(removed)

    def _drop_tombstone(self, view: "_View", batch: WriteBatch, tombstone: Tombstone, prefix: bytes,
                        sop: bytes) -> None:
        view.delete(batch, PREFIX_TOMBSTONE + prefix + SEP + sop)
        segment_key = _digest_key(segment_of(study_token(tombstone.study_instance_uid)))
        digest = Digest.from_bytes(view.get(segment_key)).remove(
            entry_hash(tombstone.sop_instance_uid, tombstone.version.mark()))
        view.put(batch, segment_key, digest.to_bytes())
        view.counters["tombstones"] -= 1

    def _build_tombstone_hints(self, view: "_View", batch: WriteBatch, tombstones: list[Tombstone],
                               owner: str) -> str:
        for tombstone in tombstones:
            key = _tombstone_hint_key(owner, tombstone.study_instance_uid, tombstone.sop_instance_uid)
            raw = view.get(key)
            if raw is not None and Tombstone.from_json(orjson.loads(raw)).version >= tombstone.version:
                continue
            view.put(batch, key, json.dumps(tombstone.to_json(), separators=(",", ":")).encode())
        return "0"

    # ----------------------------------------------------------------- corrections
    def put_correction(self, correction: Correction, *, hint_for: str = "") -> bool:
        """Merge a study's correction into the one held (keyword by keyword, newer version
        wins; replication/correction.py) and apply it to the study record and its index
        keys, in one synced batch. True if anything changed (False: already held). With
        `hint_for`, merged into the hint held for that owner instead (a stand-in's copy:
        not in the digests, not applied to the study, replayed to the owner)."""
        if hint_for:
            return self._submit(lambda view, batch: self._build_correction_hint(view, batch, correction,
                                                                                 hint_for)) == "1"
        return self._submit(lambda view, batch: self._build_correction(view, batch, correction)) == "1"

    def _build_correction_hint(self, view: "_View", batch: WriteBatch, correction: Correction, owner: str) -> str:
        key = _correction_hint_key(owner, correction.study_instance_uid)
        raw = view.get(key)
        held = Correction.loads(raw) if raw is not None else None
        merged = held.merge(correction) if held is not None else correction
        if held is not None and merged.fields == dict(held.fields):
            return "0"
        view.put(batch, key, merged.dumps().encode())
        return "1"

    def correction_hint_owners(self) -> list[str]:
        owners: list[str] = []
        for key, _value in self._scan(PREFIX_CORRECTION_HINT):
            owner = key[1:key.index(SEP)].decode()
            if not owners or owners[-1] != owner:
                owners.append(owner)
        return owners

    def correction_hints(self, owner: str) -> Iterator[Correction]:
        for _key, value in self._scan(PREFIX_CORRECTION_HINT + owner.encode() + SEP):
            yield Correction.loads(value)

    def delete_correction_hints(self, owner: str, corrections: Sequence[Correction]) -> None:
        """Forget correction hints once their owner made them durable (each only if no
        newer change was merged into it meanwhile)."""
        chosen = list(corrections)

        def build(view: "_View", batch: WriteBatch) -> str:
            for correction in chosen:
                key = _correction_hint_key(owner, correction.study_instance_uid)
                raw = view.get(key)
                if raw is not None and Correction.loads(raw).fields == dict(correction.fields):
                    view.delete(batch, key)
            return "0"

        self._submit(build)

    def _build_correction(self, view: "_View", batch: WriteBatch, correction: Correction) -> str:
        prefix = study_prefix(correction.study_instance_uid)
        key = PREFIX_CORRECTION + prefix
        raw = view.get(key)
        held = Correction.loads(raw) if raw is not None else None
        merged = held.merge(correction) if held is not None else correction
        if held is not None and merged.fields == dict(held.fields):
            return "0"
        segment_key = _digest_key(segment_of(study_token(correction.study_instance_uid)))
        digest = Digest.from_bytes(view.get(segment_key))
        if held is not None:
            digest = digest.remove(entry_hash(CORRECTION_SOP, held.entry_content()))
        digest = digest.add(entry_hash(CORRECTION_SOP, merged.entry_content()))
        view.put(batch, segment_key, digest.to_bytes())
        view.put(batch, key, merged.dumps().encode())
        study_key = PREFIX_STUDY + prefix
        raw_study = view.get(study_key)
        if raw_study is not None:
            study = StudyRecord(**orjson.loads(raw_study))
            corrected = apply(study.attributes, merged)
            for keyword in INDEXED_STUDY_KEYWORDS:
                before, after = _values(study.attributes.get(keyword)), _values(corrected.get(keyword))
                if before != after:
                    for value in before:
                        view.delete(batch, _index_key(keyword, value, prefix))
                    for value in after:
                        view.put(batch, _index_key(keyword, value, prefix), b"")
            study.attributes = corrected
            study.correction = merged.dumps()
            view.put(batch, study_key, _dump(study))
        return "1"

    def _drop_correction(self, view: "_View", batch: WriteBatch, prefix: bytes, content: str) -> None:
        """Forget a study's correction (the study left this node's ranges)."""
        view.delete(batch, PREFIX_CORRECTION + prefix)
        study_uid = correction_of_entry(content).study_instance_uid
        segment_key = _digest_key(segment_of(study_token(study_uid)))
        view.put(batch, segment_key, Digest.from_bytes(view.get(segment_key)).remove(
            entry_hash(CORRECTION_SOP, content)).to_bytes())

    def correction(self, study_instance_uid: str) -> Correction | None:
        raw = self._db.get(PREFIX_CORRECTION + study_prefix(study_instance_uid))
        return Correction.loads(raw) if raw is not None else None

    def corrections(self, low: int = 0, high: int = (1 << 64) - 1) -> Iterator[Correction]:
        """Every study correction held with low <= token <= high."""
        start = PREFIX_CORRECTION + token_bytes(low)
        stop = PREFIX_CORRECTION + token_bytes(high + 1) if high + 1 < (1 << 64) else PREFIX_CORRECTION + b"\xff" * 9
        for _key, value in self._scan_range(start, stop):
            yield Correction.loads(value)

    def tombstone(self, study_instance_uid: str, sop_instance_uid: str) -> Tombstone | None:
        raw = self._db.get(PREFIX_TOMBSTONE + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode())
        return Tombstone.from_json(orjson.loads(raw)) if raw is not None else None

    def tombstones(self, low: int = 0, high: int = (1 << 64) - 1) -> Iterator[Tombstone]:
        """Every tombstone held with low <= token <= high."""
        start = PREFIX_TOMBSTONE + token_bytes(low)
        stop = PREFIX_TOMBSTONE + token_bytes(high + 1) if high + 1 < (1 << 64) else PREFIX_TOMBSTONE + b"\xff" * 9
        for _key, value in self._scan_range(start, stop):
            yield Tombstone.from_json(orjson.loads(value))

    def tombstone_hint_owners(self) -> list[str]:
        owners: list[str] = []
        for key, _value in self._scan(PREFIX_TOMBSTONE_HINT):
            owner = key[1:key.index(SEP)].decode()
            if not owners or owners[-1] != owner:
                owners.append(owner)
        return owners

    def tombstone_hints(self, owner: str) -> Iterator[Tombstone]:
        for _key, value in self._scan(PREFIX_TOMBSTONE_HINT + owner.encode() + SEP):
            yield Tombstone.from_json(orjson.loads(value))

    def delete_tombstone_hints(self, owner: str, tombstones: Sequence[Tombstone]) -> None:
        """Forget tombstone hints once their owner acknowledged them (each only if unchanged)."""
        chosen = list(tombstones)

        def build(view: "_View", batch: WriteBatch) -> str:
            for tombstone in chosen:
                key = _tombstone_hint_key(owner, tombstone.study_instance_uid, tombstone.sop_instance_uid)
                raw = view.get(key)
                if raw is not None and Tombstone.from_json(orjson.loads(raw)).version == tombstone.version:
                    view.delete(batch, key)
            return "0"

        self._submit(build)

    def purge_tombstones(self, tombstones: Sequence[Tombstone]) -> int:
        """Forget these tombstones (each only if still held at that version), then compact
        their key ranges so the deleted instances' bytes leave the disk. Returns how many."""
        chosen = list(tombstones)
        if not chosen:
            return 0

        def build(view: "_View", batch: WriteBatch) -> str:
            purged = 0
            for tombstone in chosen:
                prefix = study_prefix(tombstone.study_instance_uid)
                sop = tombstone.sop_instance_uid.encode("ascii")
                raw = view.get(PREFIX_TOMBSTONE + prefix + SEP + sop)
                if raw is not None and Tombstone.from_json(orjson.loads(raw)).version == tombstone.version:
                    self._drop_tombstone(view, batch, tombstone, prefix, sop)
                    purged += 1
            return str(purged)

        purged = int(self._submit(build))
        self.compact_studies({t.study_instance_uid for t in chosen})
        return purged

    def compact_studies(self, study_uids: set[str] | list[str]) -> None:
        """Compact every key of these studies (blobs, records, tombstones): deleted data
        leaves the disk now rather than whenever RocksDB would get to it."""
        self._ensure_open()
        for study_uid in study_uids:
            prefix = study_prefix(study_uid)
            for type_byte in (PREFIX_BLOB, PREFIX_META, PREFIX_CONFLICT, PREFIX_TOMBSTONE, PREFIX_HEADER):
                start = type_byte + prefix
                self._db.compact_range(start, _prefix_upper_bound(start))

    # ----------------------------------------------------------------- hints
    def hint_owners(self) -> dict[str, tuple[int, int]]:
        """Pending hints per intended owner: (instances, compressed bytes)."""
        owners: dict[str, tuple[int, int]] = {}
        for key, value in self._scan(PREFIX_HINT):
            owner = key[1:key.index(SEP)].decode()
            count, size = owners.get(owner, (0, 0))
            owners[owner] = (count + 1, size + len(value))
        return owners

    def hint_summary(self) -> dict[str, tuple[int, int, int]]:
        """Pending instance hints per intended owner: (instances, compressed bytes, the
        oldest one's write time in epoch ms). Reads each hint's header, not its blob's bytes
        beyond the length: for `pacsnode status`, not the hot path."""
        owners: dict[str, tuple[int, int, int]] = {}
        if self._counters["hints"] <= 0:
            return owners
        for key, value in self._scan(PREFIX_HINT):
            owner = key[1:key.index(SEP)].decode()
            header, blob = _split_hint(value)
            written_ms = int(header["record"].get("stored_at_ms") or 0)
            count, size, oldest = owners.get(owner, (0, 0, 0))
            owners[owner] = (count + 1, size + len(blob), min(oldest, written_ms) if oldest else written_ms)
        return owners

    def hint_records(self) -> Iterator[tuple[InstanceRecord, dict[str, Any]]]:
        """(record, indexed attributes) of every hint held, for queries (no blob decoded)."""
        if self._counters["hints"] <= 0:
            return
        for _key, value in self._scan(PREFIX_HINT):
            header, _blob = _split_hint(value)
            record = InstanceRecord(**header["record"])
            if not self.deleted(record):
                yield record, header["attributes"]

    def deleted(self, record: InstanceRecord) -> bool:
        """Whether a tombstone held here (as owner) deletes this copy (hints are checked with it)."""
        tombstone = self.tombstone(record.study_instance_uid, record.sop_instance_uid)
        return tombstone is not None and tombstone.version >= record.version

    def hints(self, owner: str) -> Iterator[StoredInstance]:
        """The hints held for `owner`, oldest token range first."""
        for _key, value in self._scan(PREFIX_HINT + owner.encode() + SEP):
            header, blob = _split_hint(value)
            yield StoredInstance(record=InstanceRecord(**header["record"]), attributes=header["attributes"],
                                 blob=blob)

    # ----------------------------------------------------------------- reads
    def _get_blob(self, key: bytes) -> bytes | None:
        """One blob by key, asked as a one-key batch: rocksdict's batch get releases the GIL
        while RocksDB reads the value from its blob file; its single-key get holds the GIL
        throughout (py-spy --gil on a C-GET: 19% of GIL samples in that get)."""
        values = self._db.get([key])  # rocksdict's stubs type get() as one value or None.
        blob: bytes | None = cast(list[bytes | None], values)[0]
        return blob

    def instance_record(self, study_instance_uid: str, sop_instance_uid: str) -> InstanceRecord | None:
        raw = self._db.get(PREFIX_META + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode())
        return InstanceRecord(**orjson.loads(raw)) if raw is not None else None

    def compressed_copy(self, study_instance_uid: str,
                        sop_instance_uid: str) -> tuple[bytes | BlobPointer, InstanceRecord] | None:
        """An instance as kept, not decompressed or verified: its zstd blob, or the pointer
        to its blob file, with its record; None when it is not here. For a reader in another
        process (a DICOM worker) that decompresses and checks it itself."""
        record = self.instance_record(study_instance_uid, sop_instance_uid)
        if record is None:
            return None
        value = self._get_blob(PREFIX_BLOB + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode())
        if value is None:
            return None
        pointer = BlobPointer.decode(value)
        return (value if pointer is None else pointer), record

    def read_part10(self, study_instance_uid: str, sop_instance_uid: str) -> bytes:
        """The stored Part-10 bytes, checksum-verified; raises CorruptBlob or KeyError."""
        key = PREFIX_BLOB + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode()
        blob = self._get_blob(key)
        if blob is None:
            raise KeyError(sop_instance_uid)
        try:
            return decompress(self._blob_bytes(blob, sop_instance_uid), sop_instance_uid)
        except CorruptBlob as error:
            log.error(
                "store.blob.corrupt study_instance_uid=%s sop_instance_uid=%s error=%s",
                study_instance_uid,
                sop_instance_uid,
                error,
            )
            raise

    def _blob_bytes(self, value: bytes, what: str) -> bytes:
        """A blob value's compressed bytes (read from its file, CRC-checked, for a pointer)."""
        pointer = BlobPointer.decode(value)
        return value if pointer is None else self.blob_files.read(pointer, what)

    def open_part10(self, study_instance_uid: str, sop_instance_uid: str,
                    part10_bytes: int | None = None) -> bytes | Part10Stream:
        """The stored Part-10 bytes as retrieval sends them: a blob file of more than
        whole_read_bytes_max is a Part10Stream (decompressed as it is read, zstd's checksum
        checked at its end; the caller closes it), a smaller one is read whole and checked
        by its pointer's CRC-32, a RocksDB value decompressed and zstd-checksum-verified
        here. Raises KeyError, or CorruptBlob (logged)."""
        key = PREFIX_BLOB + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode()
        # RocksDB's CRC-32C of a value read back from its blob file is computed in software
        # by rocksdict's build (42 of 80 CT reads' 49 ms of CPU): not asked for, as every
        # blob value is a zstd frame whose own checksum decompress checks, or a pointer to a
        # file read with its size checked and decompressed the same way.
        value = self._db.get(key, read_opt=self._blob_read_options)
        if value is None:
            raise KeyError(sop_instance_uid)
        try:
            try:
                pointer = BlobPointer.decode(value)
            except (ValueError, KeyError, TypeError) as error:
                raise CorruptBlob(f"blob pointer of {sop_instance_uid} is unreadable") from error
            if pointer is None:
                return decompress(value, sop_instance_uid)
            if part10_bytes is None:
                record = self.instance_record(study_instance_uid, sop_instance_uid)
                if record is None:
                    raise KeyError(sop_instance_uid)
                part10_bytes = record.size_bytes + record.dataset_offset
            if part10_bytes <= self._whole_read_bytes_max and pointer.size_bytes <= self._whole_read_bytes_max:
                # A CT or MR slice: one read into this thread's reused buffer and one
                # decompression with its reused decompressor, cheaper than a stream (WADO-RS
                # 80 CT: 51 -> 44 ms of CPU), checked by the CRC-32 its pointer records (every
                # stored byte, before any is sent) in place of zstd's XXH64 of the content.
                return self.blob_files.read_whole(pointer, part10_bytes, sop_instance_uid)
            return self.blob_files.stream(pointer, part10_bytes, sop_instance_uid)
        except CorruptBlob as error:
            log.error("store.blob.corrupt study_instance_uid=%s sop_instance_uid=%s error=%s",
                      study_instance_uid, sop_instance_uid, error)
            raise

    def read_part10_head(self, study_instance_uid: str, sop_instance_uid: str, size: int) -> bytes:
        """The first `size` bytes of the stored Part-10 bytes (all when fewer), decompressing
        only those: for reading a header (/metadata). Not checksum-verified (the checksum
        covers the whole instance); raises KeyError, or CorruptBlob when the frame is unreadable."""
        key = PREFIX_BLOB + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode()
        blob = self._get_blob(key)
        if blob is None:
            raise KeyError(sop_instance_uid)
        pointer = BlobPointer.decode(blob)
        if pointer is not None:
            return self.blob_files.head(pointer, size, sop_instance_uid)
        return decompress_head(blob, size, sop_instance_uid)

    def instance_header(self, study_instance_uid: str, sop_instance_uid: str, content_hash: str) -> bytes | None:
        """The /metadata JSON kept for this content of the instance (None: not built yet,
        or built for other content that has since lost a conflict)."""
        raw = self._db.get(PREFIX_HEADER + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode())
        if raw is None:
            return None
        kept_hash, _sep, header = bytes(raw).partition(SEP)
        return header if kept_hash == content_hash.encode("ascii") else None

    def put_header(self, study_instance_uid: str, sop_instance_uid: str, content_hash: str, header: bytes) -> None:
        """Keep the /metadata JSON built from this content (not synced: derived data). A
        write racing a delete of the instance can leave an orphan of a few KB; it is read
        only with an instance record of the same content hash."""
        self._ensure_open()
        key = PREFIX_HEADER + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode()
        self._db.put(key, content_hash.encode("ascii") + SEP + header)

    def read_stored(self, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None:
        """Record, attributes and compressed blob, to ship to a peer (checksum not verified here:
        the receiver verifies before acknowledging)."""
        prefix = study_prefix(study_instance_uid)
        sop = sop_instance_uid.encode()
        raw = self._db.get(PREFIX_META + prefix + SEP + sop)
        blob = self._get_blob(PREFIX_BLOB + prefix + SEP + sop)
        if raw is None or blob is None:
            return None
        pointer = BlobPointer.decode(blob)
        if pointer is not None:
            try:  # File-backed pages, not heap; the receiver checks the bytes.
                blob = self.blob_files.map(pointer, sop_instance_uid)
            except CorruptBlob as error:
                log.error("store.blob.corrupt study_instance_uid=%s sop_instance_uid=%s error=%s",
                          study_instance_uid, sop_instance_uid, error)
                return None
        record = InstanceRecord(**orjson.loads(raw))
        attributes: dict[str, Any] = {}
        study = self.study(study_instance_uid)
        if study is not None:
            attributes.update(study.attributes)
        series_raw = self._db.get(PREFIX_SERIES + prefix + SEP + record.series_instance_uid.encode("ascii"))
        if series_raw is not None:  # One point lookup, not a scan of every series of the study.
            attributes.update(SeriesRecord(**orjson.loads(series_raw)).attributes)
        attributes.update(record.attributes)
        return StoredInstance(record=record, attributes=attributes, blob=blob)

    def study(self, study_instance_uid: str) -> StudyRecord | None:
        raw = self._db.get(PREFIX_STUDY + study_prefix(study_instance_uid))
        return StudyRecord(**orjson.loads(raw)) if raw is not None else None

    def studies(self) -> Iterator[StudyRecord]:
        for _key, value in self._scan(PREFIX_STUDY):
            yield StudyRecord(**orjson.loads(value))

    def studies_by_index(self, keyword: str, low: str, high: str | None) -> Iterator[str]:
        """Study UIDs whose indexed `keyword` value v has low <= v <= high (high None: prefix match on low)."""
        base = PREFIX_INDEX + keyword.encode() + SEP
        if high is None:
            start = base + index_value(keyword, low).encode("utf-8")
            stop = _prefix_upper_bound(start)
        else:
            start = base + index_value(keyword, low).encode("utf-8") + SEP
            stop = _prefix_upper_bound(base + index_value(keyword, high).encode("utf-8") + SEP)
        for key, _value in self._scan_range(start, stop):
            rest = key[len(base) :]  # value 0x00 token8 study-uid; values never hold 0x00
            yield rest[rest.index(SEP) + 1 + 8 :].decode("ascii")

    def series(self, study_instance_uid: str) -> Iterator[SeriesRecord]:
        for _key, value in self._scan(PREFIX_SERIES + study_prefix(study_instance_uid) + SEP):
            yield SeriesRecord(**orjson.loads(value))

    def all_series(self) -> Iterator[SeriesRecord]:
        for _key, value in self._scan(PREFIX_SERIES):
            yield SeriesRecord(**orjson.loads(value))

    def instances(self, study_instance_uid: str) -> Iterator[InstanceRecord]:
        for _key, value in self._scan(PREFIX_META + study_prefix(study_instance_uid) + SEP):
            yield InstanceRecord(**orjson.loads(value))

    def study_locations(self, study_instance_uid: str, instances_max: int) -> list[InstanceLocation] | None:
        """Each instance of the study held here as a C-GET/C-MOVE sends it (series, SOP class
        and instance UIDs, stored transfer syntax, Part-10 length, the study's correction),
        read from the index records without building a query row per instance
        (Coordinator.locate_here; the C-FIND path, LocalQuery, builds and matches one).
        None when the study is not held here or has more than `instances_max` instances."""
        prefix = study_prefix(study_instance_uid)
        raw_study = self._db.get(PREFIX_STUDY + prefix)
        if raw_study is None:
            return None
        correction = str(orjson.loads(raw_study).get("correction", "") or "")
        locations: list[InstanceLocation] = []
        for _key, value in self._scan(PREFIX_META + prefix + SEP):
            if len(locations) >= instances_max:
                return None
            record = orjson.loads(value)
            locations.append(InstanceLocation(
                study_instance_uid, record["series_instance_uid"], record["sop_instance_uid"],
                record["sop_class_uid"], record["transfer_syntax_uid"],
                # A corrected study's headers are rewritten on the way out: the length is not known first.
                0 if correction else record["size_bytes"] + record["dataset_offset"], correction))
        return locations

    def all_instances(self) -> Iterator[InstanceRecord]:
        for _key, value in self._scan(PREFIX_META):
            yield InstanceRecord(**orjson.loads(value))

    def conflicts(self, study_instance_uid: str, sop_instance_uid: str) -> list[bytes]:
        """The Part-10 bytes of copies that lost the first-writer-wins rule."""
        prefix = PREFIX_CONFLICT + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode() + SEP
        return [decompress(self._blob_bytes(value, sop_instance_uid), sop_instance_uid)
                for _key, value in self._scan(prefix)]

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self._scan_range(prefix, _prefix_upper_bound(prefix))

    def _scan_range(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._ensure_open()
        read_options = ReadOptions()
        read_options.set_iterate_upper_bound(stop)
        iterator = self._db.iter(read_options)
        iterator.seek(start)
        while iterator.valid():
            yield iterator.key(), iterator.value()
            iterator.next()


def _index_key(keyword: str, value: str, prefix: bytes) -> bytes:
    return (
        PREFIX_INDEX
        + keyword.encode()
        + SEP
        + index_value(keyword, value).encode("utf-8")
        + SEP
        + prefix
    )


def _values(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [v for v in value if v]
    return [value] if value else []


def _pick(attributes: dict[str, Any], level: str) -> dict[str, Any]:
    """The attributes a record at `level` keeps (study records carry patient attributes too)."""
    keywords = {
        "study": PATIENT_KEYWORDS + STUDY_KEYWORDS + ("SpecificCharacterSet",),
        "series": SERIES_KEYWORDS,
        "instance": INSTANCE_KEYWORDS,
    }[level]
    return {k: attributes[k] for k in keywords if k in attributes}


def _hint_key(owner: str, study_uid: str, sop_uid: str) -> bytes:
    return PREFIX_HINT + owner.encode() + SEP + study_prefix(study_uid) + SEP + sop_uid.encode("ascii")


def _tombstone_hint_key(owner: str, study_uid: str, sop_uid: str) -> bytes:
    return PREFIX_TOMBSTONE_HINT + owner.encode() + SEP + study_prefix(study_uid) + SEP + sop_uid.encode("ascii")


def _correction_hint_key(owner: str, study_uid: str) -> bytes:
    return PREFIX_CORRECTION_HINT + owner.encode() + SEP + study_prefix(study_uid)


def _digest_key(segment: int) -> bytes:
    return PREFIX_DIGEST + segment.to_bytes(2, "big")


def _split_hint(value: bytes) -> tuple[dict[str, Any], bytes]:
    length = int.from_bytes(value[:4], "big")
    return orjson.loads(value[4 : 4 + length]), value[4 + length :]


class _Pending:
    """One queued write of a group commit."""

    def __init__(self, build: Callable[["_View", WriteBatch], str]) -> None:
        self.build = build
        self.done = False
        self.outcome = ""
        self.error: BaseException | None = None

    def succeed(self) -> None:
        self.done = True

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done = True

    def result(self) -> str:
        if self.error is not None:
            raise self.error
        return self.outcome


class _View:
    """The database as the group being built sees it: earlier steps' writes included."""

    def __init__(self, db: Rdict) -> None:
        self._db = db
        self._written: dict[bytes, bytes | None] = {}
        self.counters: dict[str, int] = {}
        self.removed_files: list[str] = []  # Blob files to unlink once the batch is written.

    def get(self, key: bytes) -> bytes | None:
        if key in self._written:
            return self._written[key]
        value: bytes | None = self._db.get(key)
        return value

    def put(self, batch: WriteBatch, key: bytes, value: bytes) -> None:
        batch.put(key, value)
        self._written[key] = value

    def delete(self, batch: WriteBatch, key: bytes) -> None:
        batch.delete(key)
        self._written[key] = None
