"""The file meta we write for received datasets, and the zstd framing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from pacsnode.node import codec
from pacsnode.node.codec import IMPLEMENTATION_CLASS_UID, compress, decompress, part10_prefix
from pacsnode.replication.model import CorruptBlob


@pytest.mark.parametrize("source", ["", "STORESCU", "ODD"])
@pytest.mark.parametrize("uid", ["1.2.3", "1.2.34", "2.25.1234567890123456789"])
def test_part10_prefix_reads_back_with_pydicom(source: str, uid: str) -> None:
    dataset = Dataset()
    dataset.PatientID = "P1"
    dataset.SOPInstanceUID = uid
    body = encode(dataset, False, True)
    assert body is not None
    prefix = part10_prefix("1.2.840.10008.5.1.4.1.1.2", uid, "1.2.840.10008.1.2.1", source)
    read = dcmread(io.BytesIO(prefix + body))
    meta = read.file_meta
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert meta.MediaStorageSOPInstanceUID == uid
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.get("SourceApplicationEntityTitle", "").strip() == source
    assert meta.FileMetaInformationGroupLength == len(prefix) - 132 - 12
    assert read.PatientID == "P1"
    assert prefix[:128] == b"\x00" * 128 and prefix[128:132] == b"DICM"


def test_compress_round_trip_and_corruption_is_detected() -> None:
    data = b"DICM" + bytes(range(256)) * 400
    blob = compress(data)
    assert decompress(blob) == data
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(CorruptBlob):
        decompress(bytes(damaged))
    with pytest.raises(CorruptBlob):
        decompress(blob[: len(blob) // 2])  # Cut short.
    assert decompress(blob) == data  # The thread's decompressor, reused after the errors.


@pytest.mark.parametrize("with_isal", [True, False])
def test_crc32_of_is_zlibs_crc32_in_pieces_with_or_without_isal(with_isal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import random
    import zlib

    if not with_isal:
        monkeypatch.setattr(codec, "_isal_crc32", None)
    elif codec._isal_crc32 is None:
        pytest.skip("isal is not installed in this venv")
    data = random.Random(7).randbytes(300_001)
    running = 0
    for start in range(0, len(data), 65_536):
        running = codec.crc32_of(memoryview(data)[start:start + 65_536], running)
    assert running == codec.crc32_of(data) == zlib.crc32(data)
    assert codec.payload_crc32(data) == zlib.crc32(data)


def test_decompress_head_leaves_a_mapped_blob_open(tmp_path: Path) -> None:
    """A DIMSE worker's blob reaches the node as a memory map of its file; reading its head
    (the /metadata entry) must not close it before the copies are sent from it."""
    import mmap

    part10 = bytes(range(256)) * 1024
    path = tmp_path / "blob.zst"
    path.write_bytes(compress(part10))
    with open(path, "rb") as source:
        mapped = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        assert codec.decompress_head(mapped, 1000) == part10[:1000]  # type: ignore[arg-type]
        assert not mapped.closed
        assert decompress(mapped[:]) == part10
    finally:
        mapped.close()
