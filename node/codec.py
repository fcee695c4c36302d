"""zstd framing of stored instances: compressed once at ingest, verified on every read."""

from __future__ import annotations

import importlib
import threading
import time
import zlib
from typing import Callable

import zstandard

from pacsnode.replication.model import CorruptBlob, Instance, InstanceRecord, StoredInstance
from pacsnode.replication.model import INSTANCE_KEYWORDS
from pacsnode.replication.hlc import Version


def _load_isal_crc32() -> Callable[[bytes | memoryview, int], int] | None:
    """ISA-L's CRC-32 (zlib's, with SIMD), or None in a venv installed before isal was a
    dependency: zstd's own check then, as before. Imported by name, so that the type check
    (tests/unit/test_types.py) passes with or without isal installed."""
    try:
        module = importlib.import_module("isal.isal_zlib")
    except ImportError:
        return None
    crc32: Callable[[bytes | memoryview, int], int] = module.crc32
    return crc32


_isal_crc32 = _load_isal_crc32()


def crc32_of(data: bytes | memoryview, value: int = 0) -> int:
    """zlib's CRC-32 of `data`, continued from `value` (a running CRC over pieces):
    ISA-L's when isal is installed (0.5 against 8.6 ms per 42 MB, bench/README.md), else
    zlib's. Both compute the same value."""
    if _isal_crc32 is not None:
        return _isal_crc32(data, value)
    return zlib.crc32(data, value)

# zstd's fast levels (negative: no entropy coding of literals, repeats still found).
# Decompresses at 2.8-5.8 GB/s against 0.6-1.1 GB/s at level 1 on 16-bit images (what every
# retrieve, WADO-RS and C-GET/C-MOVE, pays per instance) and compresses faster (what every
# C-STORE pays), for less saved on disk. -3 rather than -1 (stop 34, bench/README.md "zstd
# level -3 by default"): per CT 512 x 512 instance compression 0.85 -> 0.34 ms and
# decompression 0.24 -> 0.07 ms on a CT-like phantom (0.47 -> 0.13 ms compression on
# noise-like pixels), for 0.503 instead of 0.498 of the bytes stored there; over pydicom's
# uncompressed test images of 30 KB or more 0.407 instead of 0.386 (CT_small 0.885 against
# 0.846; level 1: 0.307); a 20 000-study ingest 1.4 % more disk.
# A blob that saves nothing is a frame of raw blocks: still checksummed and verified.
# The default of NodeConfig.zstd_level (node/config.py), and of the functions here.
ZSTD_LEVEL = -3
# The levels zstd takes (its ZSTD_minCLevel() is -131072; 0 is its default level, 3).
ZSTD_LEVEL_MIN = -(1 << 17)
ZSTD_LEVEL_MAX = zstandard.MAX_COMPRESSION_LEVEL


_THREAD = threading.local()


def compress(part10: bytes | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """zstd frame with its content checksum (zstandard releases the GIL while it works),
    by this thread's compressor for the level: making one cost three times compressing a
    one-instance study's 1.7 KB (18 against 6 us); each `compress` call is a frame of its own."""
    compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(_THREAD, "compressors", None)
    if compressors is None:
        compressors = _THREAD.compressors = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return compressor.compress(part10)


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor. Making one costs more than decompressing a small
    instance (500 x 9 KB blobs: 10.7 ms with a new one each, 2.1 ms with one reused, thread
    CPU at load 5.4); each `decompress` call starts its frame afresh, after an error too."""
    decompressor: zstandard.ZstdDecompressor | None = getattr(_THREAD, "decompressor", None)
    if decompressor is None:
        decompressor = _THREAD.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def decompress(blob: bytes | memoryview, what: str = "instance") -> bytes:
    """The Part-10 bytes of a blob; CorruptBlob when the frame or its checksum is bad."""
    try:
        return _decompressor().decompress(blob)
    except zstandard.ZstdError as error:
        raise CorruptBlob(f"blob of {what} failed its checksum: {error}") from error


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Frame_Header_Descriptor (the byte after the magic) bit 2, RFC 8878 3.1.1.1.1: the frame
# ends with a 4-byte content checksum (the low 32 bits of XXH64 of the content).
ZSTD_CHECKSUM_FLAG = 0x04


def decompress_crc_checked(blob: memoryview, crc32: int, what: str = "instance") -> bytes:
    """The Part-10 bytes of a blob (one zstd frame, as `compress` writes it) read into a
    writable buffer of the caller's, checked by the CRC-32 of all its bytes that the store
    recorded (node/blob_files.py's BlobPointer) instead of by zstd's content checksum:
    every stored byte is still checked before any is used, for a sixth of the CPU (42 MB:
    ISA-L's CRC-32 ~0.5 ms, zstd's XXH64 ~3.3 ms; zlib's CRC-32 would be ~8.6 ms). Then
    the frame's checksum flag is cleared in `blob` and its 4 checksum bytes left out, so
    that zstd does not check again bytes the CRC-32 covered. CorruptBlob when the CRC-32
    differs or the frame is not readable. Without isal installed, zstd's checksum checks
    the content (`decompress`), as before isal was a dependency."""
    if _isal_crc32 is None:
        return decompress(blob, what)
    if _isal_crc32(blob, 0) != crc32:
        raise CorruptBlob(f"blob of {what} failed its CRC-32 check")
    if len(blob) < 6 or blob[:4] != ZSTD_MAGIC:
        raise CorruptBlob(f"blob of {what} is not a zstd frame")
    frame = blob
    if blob[4] & ZSTD_CHECKSUM_FLAG:
        blob[4] &= ~ZSTD_CHECKSUM_FLAG & 0xFF
        frame = blob[:-4]
    try:
        return _decompressor().decompress(frame)
    except zstandard.ZstdError as error:
        raise CorruptBlob(f"blob of {what} is not a readable zstd frame: {error}") from error


def decompress_head(blob: bytes, size: int, what: str = "instance") -> bytes:
    """The first `size` bytes a blob decompresses to (all of them when fewer), decompressing
    only as far as that: not checked against the frame's checksum, which covers the whole.
    `blob` stays open (a memory map of a blob file included: closefd=False)."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(blob, closefd=False) as reader:
            head = bytearray()
            while len(head) < size:
                chunk = reader.read(size - len(head))
                if not chunk:
                    break
                head += chunk
            return bytes(head)
    except zstandard.ZstdError as error:
        raise CorruptBlob(f"blob of {what} is not a readable zstd frame: {error}") from error


def payload_crc32(blob: bytes) -> int:
    """The CRC-32 a peer store carries for its compressed payload (ISA-L's and zlib's both
    release the GIL)."""
    return crc32_of(blob)


def check_payload(blob: bytes, total_size_bytes: int, crc32: int | None, what: str = "instance") -> None:
    """CorruptBlob unless `blob` is one zstd frame of `total_size_bytes` (when its header
    says) with its content checksum, whose bytes match `crc32`; with `crc32` None, unless
    it decompresses (checking zstd's checksum) to `total_size_bytes`."""
    try:
        frame = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as error:
        raise CorruptBlob(f"blob of {what} is not a zstd frame: {error}") from error
    if not frame.has_checksum:
        raise CorruptBlob(f"blob of {what} has no content checksum")
    if frame.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, total_size_bytes):
        raise CorruptBlob(f"blob of {what} holds {frame.content_size} bytes, not {total_size_bytes}")
    if crc32 is not None:
        if crc32_of(blob) != crc32:
            raise CorruptBlob(f"blob of {what} failed its CRC-32")
        return
    if len(decompress(blob, what)) != total_size_bytes:
        raise CorruptBlob(f"blob of {what} does not decompress to {total_size_bytes} bytes")


def to_stored(instance: Instance, *, now_ms: int | None = None, level: int = ZSTD_LEVEL,
              version: Version | None = None) -> StoredInstance:
    """The instance as replicas keep it, stamped with `version` (the coordinator's hybrid
    clock), or else with the wall clock (`now_ms`, default now) and no logical part."""
    if version is None:
        version = Version(int(time.time() * 1000) if now_ms is None else now_ms, 0, "")
    record = InstanceRecord(
        study_instance_uid=instance.study_instance_uid,
        series_instance_uid=instance.series_instance_uid,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        content_hash=instance.content_hash,
        size_bytes=instance.size_bytes,
        dataset_offset=instance.dataset_offset,
        stored_at_ms=version.ms,
        attributes={k: instance.attributes[k] for k in INSTANCE_KEYWORDS if k in instance.attributes},
        version_logical=version.logical,
        version_node=version.node,
    )
    blob = instance.blob or compress(instance.part10, level)
    return StoredInstance(record=record, attributes=dict(instance.attributes), blob=blob,
                          blob_file=instance.blob_file)


# Our Implementation Class UID (2.25 form from a fixed UUID) and version, written into the
# file meta of every stored instance.
IMPLEMENTATION_CLASS_UID = "2.25.226151372045151187049930236536312470373"
IMPLEMENTATION_VERSION_NAME = "PACSNODE_010"


def _element(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of the file meta group (values padded to even)."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    tag = group_element.to_bytes(4, "big")
    header = tag[1::-1] + tag[3:1:-1] + vr  # group LE, element LE
    if vr == b"OB":
        return header + b"\x00\x00" + len(value).to_bytes(4, "little") + value
    return header + len(value).to_bytes(2, "little") + value


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                  source_ae_title: str = "") -> bytes:
    """Preamble, 'DICM' and the file meta group (PS3.10 7.1) for a received dataset.

    Written directly (about 10x faster than pydicom's writer, which pynetdicom's
    encoded_dataset() uses); tests/unit/test_codec.py checks pydicom reads it back.
    """
    elements = [
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", sop_class_uid.encode("ascii")),
        _element(0x00020003, b"UI", sop_instance_uid.encode("ascii")),
        _element(0x00020010, b"UI", transfer_syntax_uid.encode("ascii")),
        _element(0x00020012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _element(0x00020013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    ]
    source = source_ae_title.strip().encode("ascii", errors="replace")
    if source:
        elements.append(_element(0x00020016, b"AE", source))
    body = b"".join(elements)
    group_length = _element(0x00020000, b"UL", len(body).to_bytes(4, "little"))
    return b"\x00" * 128 + b"DICM" + group_length + body
