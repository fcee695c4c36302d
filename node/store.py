"""RocksStore: the local storage engine (RocksDB through rocksdict).

One synced WriteBatch per instance holds everything about it: the zstd-compressed
Part-10 bytes (with zstd's frame checksum), its instance record, the updated series and
study records and the study's query-index keys. After `put_instance` returns, all of it
is on disk; after a crash, either all of it is there or none of it.

Key layout (every data key starts with the study's 8-byte ring token, so a token range
is one contiguous scan, stream or DeleteRange):

    b <token8> <study uid> 0x00 <sop uid>     -> zstd(Part-10 bytes)
    m <token8> <study uid> 0x00 <sop uid>     -> InstanceRecord (JSON)
    e <token8> <study uid> 0x00 <series uid>  -> SeriesRecord (JSON)
    s <token8> <study uid>                    -> StudyRecord (JSON)
    c <token8> <study uid> 0x00 <sop uid> 0x00 <content hash> -> conflicting copy (zstd)
    x <keyword> 0x00 <value> 0x00 <token8> <study uid> -> b"" (sorted study-level index)
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
from typing import Any, Iterator

import zstandard
from rocksdict import Options, ReadOptions, Rdict, WriteBatch, WriteOptions

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
    StoreOutcome,
    StudyRecord,
)
from pacsnode.ring.tokens import study_token, token_bytes

log = logging.getLogger(__name__)

SEP = b"\x00"
PREFIX_BLOB = b"b"
PREFIX_META = b"m"
PREFIX_SERIES = b"e"
PREFIX_STUDY = b"s"
PREFIX_CONFLICT = b"c"
PREFIX_INDEX = b"x"
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


def _dump(record: Any) -> bytes:
    return json.dumps(dataclasses.asdict(record), separators=(",", ":"), ensure_ascii=False).encode()


def _prefix_upper_bound(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\xff" * (len(prefix) + 1)
    return stripped[:-1] + bytes([stripped[-1] + 1])


class RocksStore:
    """The node's durable store. Thread-safe; every write is one synced WriteBatch."""

    def __init__(
        self,
        path: Path,
        *,
        disk_free_bytes_min: int = 256 * 1024**2,
        instance_size_bytes_max: int = 4 * 1024**3,
        zstd_level: int = 1,
    ) -> None:
        self._path = Path(path)
        self._path.mkdir(parents=True, exist_ok=True)
        self._disk_free_bytes_min = disk_free_bytes_min
        self._instance_size_bytes_max = instance_size_bytes_max
        self._zstd_level = zstd_level
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        # Large values go to blob files: compaction then moves keys, not images.
        options.set_enable_blob_files(True)
        options.set_min_blob_size(8192)
        options.set_keep_log_file_num(5)
        self._db = Rdict(str(self._path / "rocksdb"), options)
        self._sync = WriteOptions()
        self._sync.sync = True
        self._write_lock = threading.Lock()
        self._closed = False
        self._counters = self._load_counters()
        self._free_checked_at = 0.0
        self._free_bytes = 0

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        with self._write_lock:
            if not self._closed:
                self._closed = True
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
        )

    def _load_counters(self) -> dict[str, int]:
        raw = self._db.get(KEY_COUNTERS)
        base = {"instances": 0, "bytes_received": 0, "bytes_stored": 0, "studies": 0, "conflicts": 0}
        if raw:
            base.update(json.loads(raw))
        return base

    # ----------------------------------------------------------------- writes
    def check_capacity(self, size_bytes: int) -> None:
        """Raise StoreFull when this instance is over the limit or the disk is nearly full."""
        if size_bytes > self._instance_size_bytes_max:
            raise StoreFull(
                f"instance of {size_bytes} bytes is over instance_size_bytes_max="
                f"{self._instance_size_bytes_max}"
            )
        now = time.monotonic()
        if now - self._free_checked_at > 0.5:
            self._free_bytes = shutil.disk_usage(self._path).free
            self._free_checked_at = now
        if self._free_bytes - size_bytes < self._disk_free_bytes_min:
            raise StoreFull(
                f"free disk {self._free_bytes} bytes minus this instance is below "
                f"disk_free_bytes_min={self._disk_free_bytes_min}"
            )

    def put_instance(self, instance: Instance, *, now_ms: int | None = None) -> str:
        """Durably store one instance; returns a StoreOutcome value.

        Identical bytes under a known SOP Instance UID: DUPLICATE, nothing written.
        Different bytes: CONFLICT, the first copy stays, the new one is kept aside.
        Raises StoreFull (nothing written) when the disk is (nearly) full, unless the same
        bytes are already stored (a retry: DUPLICATE needs no space).
        """
        prefix = study_prefix(instance.study_instance_uid)
        sop = instance.sop_instance_uid.encode("ascii")
        meta_key = PREFIX_META + prefix + SEP + sop
        try:
            self.check_capacity(len(instance.part10))
        except StoreFull:
            self._ensure_open()
            existing = self._db.get(meta_key)
            if existing is not None and json.loads(existing)["content_hash"] == instance.content_hash:
                return StoreOutcome.DUPLICATE
            raise
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        # Compress outside the lock: zstandard releases the GIL, so parallel
        # associations compress in parallel.
        blob = zstandard.ZstdCompressor(level=self._zstd_level, write_checksum=True).compress(
            instance.part10
        )
        with self._write_lock:
            self._ensure_open()
            existing = self._db.get(meta_key)
            if existing is not None:
                record = json.loads(existing)
                if record["content_hash"] == instance.content_hash:
                    return StoreOutcome.DUPLICATE
                return self._put_conflict(instance, prefix, sop, blob)
            batch = WriteBatch(raw_mode=True)
            record = InstanceRecord(
                study_instance_uid=instance.study_instance_uid,
                series_instance_uid=instance.series_instance_uid,
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
                transfer_syntax_uid=instance.transfer_syntax_uid,
                content_hash=instance.content_hash,
                size_bytes=instance.size_bytes,
                dataset_offset=instance.dataset_offset,
                stored_at_ms=now_ms,
                attributes=_pick(instance.attributes, "instance"),
            )
            batch.put(PREFIX_BLOB + prefix + SEP + sop, blob)
            batch.put(meta_key, _dump(record))
            new_study = self._update_series_and_study(batch, instance, prefix, now_ms)
            counters = dict(self._counters)
            counters["instances"] += 1
            counters["bytes_received"] += instance.size_bytes
            counters["bytes_stored"] += len(blob)
            counters["studies"] += 1 if new_study else 0
            batch.put(KEY_COUNTERS, json.dumps(counters).encode())
            self._write(batch)
            self._counters = counters
        return StoreOutcome.STORED

    def _update_series_and_study(
        self, batch: WriteBatch, instance: Instance, prefix: bytes, now_ms: int
    ) -> bool:
        """Add the instance to its series and study records; True if the study is new."""
        series_key = PREFIX_SERIES + prefix + SEP + instance.series_instance_uid.encode("ascii")
        raw_series = self._db.get(series_key)
        new_series = raw_series is None
        if new_series:
            series = SeriesRecord(
                study_instance_uid=instance.study_instance_uid,
                series_instance_uid=instance.series_instance_uid,
                attributes=_pick(instance.attributes, "series"),
                first_sop_instance_uid=instance.sop_instance_uid,
            )
        else:
            series = SeriesRecord(**json.loads(raw_series))
        series.instance_count += 1
        batch.put(series_key, _dump(series))

        study_key = PREFIX_STUDY + prefix
        raw_study = self._db.get(study_key)
        new_study = raw_study is None
        if new_study:
            study = StudyRecord(
                study_instance_uid=instance.study_instance_uid,
                attributes=_pick(instance.attributes, "study"),
                first_sop_instance_uid=instance.sop_instance_uid,
            )
            for keyword in INDEXED_STUDY_KEYWORDS:
                for value in _values(study.attributes.get(keyword)):
                    batch.put(_index_key(keyword, value, prefix), b"")
        else:
            study = StudyRecord(**json.loads(raw_study))
        study.instance_count += 1
        study.series_count += 1 if new_series else 0
        study.size_bytes += instance.size_bytes
        study.updated_at_ms = now_ms
        modality = instance.attributes.get("Modality")
        if isinstance(modality, str) and modality and modality not in study.modalities:
            study.modalities.append(modality)
        if instance.sop_class_uid not in study.sop_classes:
            study.sop_classes.append(instance.sop_class_uid)
        batch.put(study_key, _dump(study))
        return new_study

    def _put_conflict(self, instance: Instance, prefix: bytes, sop: bytes, blob: bytes) -> str:
        key = PREFIX_CONFLICT + prefix + SEP + sop + SEP + instance.content_hash.encode()
        if self._db.get(key) is None:
            batch = WriteBatch(raw_mode=True)
            batch.put(key, blob)
            counters = dict(self._counters)
            counters["conflicts"] += 1
            batch.put(KEY_COUNTERS, json.dumps(counters).encode())
            self._write(batch)
            self._counters = counters
        return StoreOutcome.CONFLICT

    def _write(self, batch: WriteBatch) -> None:
        try:
            self._db.write(batch, self._sync)
        except Exception as error:  # rocksdict raises plain Exception subclasses
            text = str(error)
            if "No space" in text or "ENOSPC" in text or "space" in text.lower():
                raise StoreFull(f"disk full: {text}") from error
            raise StoreError(f"write failed: {text}") from error

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    # ----------------------------------------------------------------- reads
    def instance_record(self, study_instance_uid: str, sop_instance_uid: str) -> InstanceRecord | None:
        raw = self._db.get(PREFIX_META + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode())
        return InstanceRecord(**json.loads(raw)) if raw is not None else None

    def read_part10(self, study_instance_uid: str, sop_instance_uid: str) -> bytes:
        """The stored Part-10 bytes, checksum-verified; raises CorruptBlob or KeyError."""
        key = PREFIX_BLOB + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode()
        blob = self._db.get(key)
        if blob is None:
            raise KeyError(sop_instance_uid)
        try:
            return zstandard.ZstdDecompressor().decompress(blob)
        except zstandard.ZstdError as error:
            log.error(
                "store.blob.corrupt study_instance_uid=%s sop_instance_uid=%s error=%s",
                study_instance_uid,
                sop_instance_uid,
                error,
            )
            raise CorruptBlob(f"blob of {sop_instance_uid} failed its checksum: {error}") from error

    def study(self, study_instance_uid: str) -> StudyRecord | None:
        raw = self._db.get(PREFIX_STUDY + study_prefix(study_instance_uid))
        return StudyRecord(**json.loads(raw)) if raw is not None else None

    def studies(self) -> Iterator[StudyRecord]:
        for _key, value in self._scan(PREFIX_STUDY):
            yield StudyRecord(**json.loads(value))

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
            yield SeriesRecord(**json.loads(value))

    def all_series(self) -> Iterator[SeriesRecord]:
        for _key, value in self._scan(PREFIX_SERIES):
            yield SeriesRecord(**json.loads(value))

    def instances(self, study_instance_uid: str) -> Iterator[InstanceRecord]:
        for _key, value in self._scan(PREFIX_META + study_prefix(study_instance_uid) + SEP):
            yield InstanceRecord(**json.loads(value))

    def all_instances(self) -> Iterator[InstanceRecord]:
        for _key, value in self._scan(PREFIX_META):
            yield InstanceRecord(**json.loads(value))

    def conflicts(self, study_instance_uid: str, sop_instance_uid: str) -> list[bytes]:
        """The Part-10 bytes of copies that lost the first-writer-wins rule."""
        prefix = PREFIX_CONFLICT + study_prefix(study_instance_uid) + SEP + sop_instance_uid.encode() + SEP
        decompressor = zstandard.ZstdDecompressor()
        return [decompressor.decompress(value) for _key, value in self._scan(prefix)]

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
