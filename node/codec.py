"""zstd framing of stored instances: compressed once at ingest, verified on every read."""

from __future__ import annotations

import time

import zstandard

from pacsnode.replication.model import CorruptBlob, Instance, InstanceRecord, StoredInstance
from pacsnode.replication.model import INSTANCE_KEYWORDS

ZSTD_LEVEL = 1  # Fast; CT noise compresses about as well at 1 as at 3.


def compress(part10: bytes, level: int = ZSTD_LEVEL) -> bytes:
    """zstd frame with its content checksum (zstandard releases the GIL while it works)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(part10)


def decompress(blob: bytes, what: str = "instance") -> bytes:
    """The Part-10 bytes of a blob; CorruptBlob when the frame or its checksum is bad."""
    try:
        return zstandard.ZstdDecompressor().decompress(blob)
    except zstandard.ZstdError as error:
        raise CorruptBlob(f"blob of {what} failed its checksum: {error}") from error


def to_stored(instance: Instance, *, now_ms: int | None = None, level: int = ZSTD_LEVEL) -> StoredInstance:
    record = InstanceRecord(
        study_instance_uid=instance.study_instance_uid,
        series_instance_uid=instance.series_instance_uid,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        content_hash=instance.content_hash,
        size_bytes=instance.size_bytes,
        dataset_offset=instance.dataset_offset,
        stored_at_ms=int(time.time() * 1000) if now_ms is None else now_ms,
        attributes={k: instance.attributes[k] for k in INSTANCE_KEYWORDS if k in instance.attributes},
    )
    return StoredInstance(record=record, attributes=dict(instance.attributes), blob=compress(instance.part10, level))
