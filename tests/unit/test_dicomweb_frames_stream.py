"""WADO-RS /frames and Pixel Data /bulk of a big instance streamed from its blob file
(node/frame_stream.py): the same frames as the whole read (node/dicomweb_render.py `frames`,
pydicom's generate_frames) for native and encapsulated layouts (Basic and Extended Offset
Tables, one fragment a frame, several fragments a frame found by their EOI marker), in
any order asked; every stored byte checked by the file's CRC-32 before the last piece
goes out; and, through the node's HTTP server, no whole read of the instance."""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest
import zstandard
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.uid import generate_uid

from pacsnode.node import frame_stream
from pacsnode.node.blob_files import MARK_BYTES, RunningCrc
from pacsnode.node.dicomweb_media import MultipartReader, multipart_boundary
from pacsnode.node.dicomweb_render import decoded_frames, render
from pacsnode.node.dicomweb_render import frames as whole_read_frames
from pacsnode.node.frame_stream import BlobFile, FrameLayoutError, NoFrame, NotStreamed
from pacsnode.node.http_server import HttpServer
from pacsnode.node.http_views import StoreHeaders, StoreReads
from pacsnode.node.metrics import Metrics
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive, InstanceLocation
from pacsnode.replication.model import CorruptBlob

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
MPEG2 = "1.2.840.10008.1.2.4.100"


def _dataset(frames: int, rows: int = 16, columns: int = 8, samples: int = 1, bits: int = 16,
             photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "FS1"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    return ds


def _part10(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=syntax == IMPLICIT, little_endian=True)
    return out.getvalue()


def _blob(data: bytes, path: Path) -> BlobFile:
    compressed = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    path.write_bytes(compressed)
    return BlobFile(open=lambda: open(path, "rb"), size_bytes=len(compressed), crc32=zlib.crc32(compressed),
                    part10_bytes=len(data), what="test")


def _streamed(blob: BlobFile, numbers: list[int] | None) -> list[bytes]:
    """The frames frame_body sends, split at its part heads."""
    found, first = frame_stream.layout(blob)
    body = b"".join(frame_stream.frame_body(blob, found, first, frame_stream.check_numbers(found, numbers),
                                            lambda first_part: b"|HEAD|", b"|END|"))
    assert body.startswith(b"|HEAD|") and body.endswith(b"|END|")
    return body[len(b"|HEAD|"):-len(b"|END|")].split(b"|HEAD|")


def _fragments(count: int, size: int, rng: np.random.Generator) -> list[bytes]:
    """Stand-ins for JPEG code streams (SOI ... EOI): never decoded here."""
    return [b"\xff\xd8" + rng.integers(0, 255, size, dtype=np.uint8).tobytes().replace(b"\xff\xd9", b"\xff\x00")
            + b"\xff\xd9" for _ in range(count)]


def _jpegs(count: int, rng: np.random.Generator) -> list[bytes]:
    """Real JPEG baseline frames (Pillow: YCbCr 4:2:0), 256 x 256, of noise (~150 KB each)."""
    from PIL import Image

    frames = []
    for _ in range(count):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), mode="RGB").save(
            out, format="JPEG", quality=95)
        frames.append(out.getvalue())
    return frames


def _split_items(frames: list[bytes]) -> bytes:
    """Encapsulated Pixel Data, an empty Basic Offset Table, each frame two fragments (the
    first without EOI): only the EOI marker says where a frame ends."""
    items = b""
    for frame in frames:
        for fragment in (frame[:len(frame) // 2], frame[len(frame) // 2:]):
            items += b"\xfe\xff\x00\xe0" + len(fragment).to_bytes(4, "little") + fragment
    return b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


LISTS = [[1], [5], [2, 4], [5, 1, 3, 3], None]


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("samples", [1, 3])
def test_native_frames_are_the_whole_reads(tmp_path: Path, syntax: str, samples: int) -> None:
    rng = np.random.default_rng(samples)
    bits = 16 if samples == 1 else 8
    ds = _dataset(5, samples=samples, bits=bits, photometric="MONOCHROME2" if samples == 1 else "RGB")
    ds.PixelData = rng.integers(0, 255, 5 * 16 * 8 * samples * bits // 8, dtype=np.uint8).tobytes()
    data = _part10(ds, syntax)
    blob = _blob(data, tmp_path / "b.zst")
    for numbers in LISTS:
        assert _streamed(blob, numbers) == whole_read_frames(data, numbers), numbers


@pytest.mark.parametrize("kind", ["one-a-frame", "basic-offset-table", "eoi", "extended-offset-table", "rle"])
def test_encapsulated_frames_are_the_whole_reads(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(7)
    coded = _fragments(5, 3000, rng)
    ds = _dataset(5, bits=8, samples=3, photometric="YBR_FULL_422")
    syntax = JPEG_BASELINE
    if kind == "one-a-frame":
        ds.PixelData = encapsulate(coded, has_bot=False)
    elif kind == "basic-offset-table":
        ds.PixelData = encapsulate(coded, fragments_per_frame=3, has_bot=True)
    elif kind == "eoi":
        ds.PixelData = _split_items(coded)
    elif kind == "extended-offset-table":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(coded)
    else:
        syntax = RLE  # Fragments without EOI: one fragment a frame.
        ds.PixelData = encapsulate([frame[2:-2] for frame in coded], has_bot=False)
    ds["PixelData"].VR = "OB"
    data = _part10(ds, syntax)
    blob = _blob(data, tmp_path / "b.zst")
    for numbers in LISTS:
        assert _streamed(blob, numbers) == whole_read_frames(data, numbers), (kind, numbers)


def test_what_is_not_streamed_and_frames_that_do_not_exist(tmp_path: Path) -> None:
    ds = _dataset(3)
    ds.PixelData = bytes(3 * 16 * 8 * 2)
    blob = _blob(_part10(ds, EXPLICIT), tmp_path / "native.zst")
    found, first = frame_stream.layout(blob)
    first.close()
    with pytest.raises(NoFrame):
        frame_stream.check_numbers(found, [4])
    video = _dataset(3, bits=8)
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(100)], has_bot=False)
    with pytest.raises(NotStreamed):  # An MPEG stream is not cut into frames here.
        frame_stream.layout(_blob(_part10(video, MPEG2), tmp_path / "video.zst"))
    no_pixels = _dataset(1)
    with pytest.raises(NoFrame):
        frame_stream.layout(_blob(_part10(no_pixels, EXPLICIT), tmp_path / "none.zst"))


def test_fewer_fragments_than_frames_breaks_the_body_off(tmp_path: Path) -> None:
    ds = _dataset(4, bits=8)
    ds.PixelData = encapsulate(_fragments(3, 100, np.random.default_rng(3)), has_bot=False)  # Says 4 frames.
    ds["PixelData"].VR = "OB"
    blob = _blob(_part10(ds, JPEG_2000), tmp_path / "short.zst")
    found, first = frame_stream.layout(blob)
    with pytest.raises(FrameLayoutError):
        b"".join(frame_stream.frame_body(blob, found, first, [4], lambda first_part: b"", b"END"))


@pytest.mark.parametrize("where", ["in-the-frame", "after-the-frame"])
def test_a_damaged_file_raises_before_the_last_piece_goes_out(tmp_path: Path, where: str) -> None:
    """A byte flipped in the compressed file, in the frames asked or after them (bytes the
    decompressor never reads for frame 1): CorruptBlob, and the closing never sent."""
    rng = np.random.default_rng(11)
    ds = _dataset(20, rows=256, columns=256)
    ds.PixelData = rng.integers(0, 4096, 20 * 256 * 256, dtype=np.uint16).tobytes()
    data = _part10(ds, EXPLICIT)
    path = tmp_path / "b.zst"
    blob = _blob(data, path)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 40 if where == "in-the-frame" else len(damaged) - 100] ^= 0x01
    path.write_bytes(bytes(damaged))
    found, first = frame_stream.layout(blob)
    sent = []
    with pytest.raises(CorruptBlob):
        for piece in frame_stream.frame_body(blob, found, first, [1], lambda first_part: b"HEAD", b"END"):
            sent.append(piece)
    assert b"END" not in sent
    whole = b"".join(sent)
    assert len(whole) < len(b"HEAD") + found.frame_bytes  # The frame's last piece was held back.


class _ReadCountingArchive(Archive):
    """The single-node Archive, counting its whole reads."""

    def __init__(self, store: RocksStore) -> None:
        super().__init__(store)
        self.reads: list[str] = []

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        self.reads.append(location.sop_instance_uid)
        return super().read(location)


def _parts(reply: httpx.Response) -> list[bytes]:
    _type, boundary = multipart_boundary(reply.headers["content-type"])
    reader = MultipartReader(boundary, part_bytes_max=100_000_000)
    parts = reader.feed(reply.content)
    reader.close()
    return [part.body for part in parts]


def test_a_big_instance_is_streamed_by_the_node_without_a_whole_read(
        tmp_path: Path, make_instance: Callable[[bytes], Any]) -> None:
    """Through the node's HTTP server and StoreReads: dicomweb-client's frames and bulk data
    of a 40-frame native instance (5 MB) and of a JPEG 2000 one are the stored frames, those
    of a JPEG baseline one asked uncompressed are the whole read's decoded frames, and the
    archive's whole read is never asked (it is for a small instance)."""
    rng = np.random.default_rng(21)
    native = _dataset(40, rows=256, columns=256)
    native.PixelData = rng.integers(0, 4096, 40 * 256 * 256, dtype=np.uint16).tobytes()
    native_data = _part10(native, EXPLICIT)
    coded = _dataset(30, rows=256, columns=256, bits=8)
    coded.StudyInstanceUID, coded.SeriesInstanceUID = native.StudyInstanceUID, native.SeriesInstanceUID
    coded.PixelData = encapsulate(_fragments(30, 100_000, rng), has_bot=True)
    coded["PixelData"].VR = "OB"
    coded_data = _part10(coded, JPEG_2000)
    colour = _dataset(36, rows=256, columns=256, samples=3, bits=8, photometric="YBR_FULL_422")
    colour.StudyInstanceUID, colour.SeriesInstanceUID = native.StudyInstanceUID, native.SeriesInstanceUID
    colour.PixelData = encapsulate(_jpegs(36, rng), has_bot=False)
    colour["PixelData"].VR = "OB"
    colour_data = _part10(colour, JPEG_BASELINE)
    small = _dataset(2)
    small.StudyInstanceUID, small.SeriesInstanceUID = native.StudyInstanceUID, native.SeriesInstanceUID
    small.PixelData = bytes(2 * 16 * 8 * 2)
    small_data = _part10(small, EXPLICIT)
    assert len(native_data) > frame_stream.STREAM_PART10_BYTES_MIN and len(coded_data) > frame_stream.STREAM_PART10_BYTES_MIN
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1024)
    archive = _ReadCountingArchive(store)
    assert len(colour_data) > frame_stream.STREAM_PART10_BYTES_MIN
    for data in (native_data, coded_data, colour_data, small_data):
        archive.store(make_instance(data))
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=100_000_000, qido_result_max=4,
                        owns=lambda study: True, local_reads=StoreReads(store, 1024),
                        local_headers=StoreHeaders(store))  # /metadata from the header alone, as the node's.
    server.start()
    try:
        client = DICOMwebClient(f"http://127.0.0.1:{server.port}/dicom-web")
        uids = (str(native.StudyInstanceUID), str(native.SeriesInstanceUID))
        got = client.retrieve_instance_frames(*uids, str(native.SOPInstanceUID), [40, 1, 7])
        assert got == whole_read_frames(native_data, [40, 1, 7])
        metadata = client.retrieve_instance_metadata(*uids, str(native.SOPInstanceUID))
        assert client.retrieve_bulkdata(metadata["7FE00010"]["BulkDataURI"]) == [bytes(native.PixelData)]
        got = client.retrieve_instance_frames(*uids, str(coded.SOPInstanceUID), [3, 2],
                                              media_types=(("image/jp2", JPEG_2000),))
        assert got == whole_read_frames(coded_data, [3, 2])
        metadata = client.retrieve_instance_metadata(*uids, str(coded.SOPInstanceUID))
        assert client.retrieve_bulkdata(metadata["7FE00010"]["BulkDataURI"]) == whole_read_frames(coded_data, None)
        base = f"http://127.0.0.1:{server.port}/dicom-web/studies/{uids[0]}/series/{uids[1]}/instances/"
        assert httpx.get(base + f"{native.SOPInstanceUID}/frames/41").status_code == 404
        backwards = ",".join(str(n) for n in range(40, 0, -1))  # 40 passes over the file.
        refused = httpx.get(base + f"{native.SOPInstanceUID}/frames/{backwards}")
        assert refused.status_code == 400 and "increasing order" in refused.text
        sixteen = ",".join(str(n) for n in range(16, 0, -1))  # PASSES_MAX passes: still answered.
        assert _parts(httpx.get(base + f"{native.SOPInstanceUID}/frames/{sixteen}")) == \
            whole_read_frames(native_data, list(range(16, 0, -1)))
        # Asked uncompressed: decoded a frame at a time from the stream, as the whole read decodes.
        octet = (("application/octet-stream", EXPLICIT),)
        got = client.retrieve_instance_frames(*uids, str(colour.SOPInstanceUID), [3, 1], media_types=octet)
        assert got == list(decoded_frames(colour_data, [3, 1])) and len(got[0]) == 256 * 256 * 2
        metadata = client.retrieve_instance_metadata(*uids, str(colour.SOPInstanceUID))
        assert client.retrieve_bulkdata(metadata["7FE00010"]["BulkDataURI"], media_types=("application/octet-stream",)) \
            == [b"".join(decoded_frames(colour_data, None))]
        assert archive.reads == []  # No big instance was read whole.
        assert client.retrieve_instance_frames(*uids, str(small.SOPInstanceUID), [2]) == \
            whole_read_frames(small_data, [2])
        assert archive.reads == [str(small.SOPInstanceUID)]  # A small one is.

        # A file damaged near its end: frame 1 is read and checked up to the CRC-32 mark
        # after it, never reaching the damage, and answered whole; frame 40's body, which
        # reads the damaged bytes, breaks off (no closing delimiter), the client fails.
        found = store.compressed_copy(uids[0], str(native.SOPInstanceUID))
        assert found is not None and not isinstance(found[0], bytes)
        assert found[0].crc32_marks is not None and len(found[0].crc32_marks) >= 3
        path = store.blob_files.path(found[0])
        damaged = bytearray(path.read_bytes())
        damaged[-50] ^= 0x01
        path.write_bytes(bytes(damaged))
        assert _parts(httpx.get(base + f"{native.SOPInstanceUID}/frames/1")) == whole_read_frames(native_data, [1])
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("GET", base + f"{native.SOPInstanceUID}/frames/40") as cut:
                assert cut.status_code == 200
                for _chunk in cut.iter_raw():
                    pass
    finally:
        server.stop()
        store.close()
    assert dcmread(io.BytesIO(native_data)).NumberOfFrames == 40


class _CountingFile(io.FileIO):
    """A file that counts the bytes read from it (into `read_bytes`, a one-item list)."""

    def __init__(self, path: Path, counter: list[int]) -> None:
        super().__init__(path, "r")
        self._counter = counter

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self._counter[0] += len(data or b"")
        return data or b""


def _marked_blob(data: bytes, path: Path, counter: list[int], *, marks: bool) -> BlobFile:
    """The blob as the store now records it (the CRC-32 marks in its pointer), or as a
    pointer written before the marks (`marks=False`)."""
    compressed = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    path.write_bytes(compressed)
    crc = RunningCrc()
    crc.update(compressed)
    return BlobFile(open=lambda: _CountingFile(path, counter), size_bytes=len(compressed), crc32=crc.value,
                    part10_bytes=len(data), what="test", crc32_marks=crc.marks if marks else None)


def test_a_frame_is_checked_up_to_the_next_mark_not_to_the_end_of_the_file(tmp_path: Path) -> None:
    """A pointer with CRC-32 marks: frame 1 of a 40-frame noise instance (5 MB, ~5 MB
    compressed) reads the file up to the mark after the bytes it decompressed (2 MiB at
    most), not all of it; a pointer without them (an older record) reads it all. Both send
    the whole read's frame. A byte flipped after that mark is not read for frame 1 (the
    frame goes out whole), and is found by a read of the last frame (CorruptBlob, the
    closing never sent)."""
    rng = np.random.default_rng(5)
    ds = _dataset(40, rows=256, columns=256)
    ds.PixelData = rng.integers(0, 65535, 40 * 256 * 256, dtype=np.uint16).tobytes()
    data = _part10(ds, EXPLICIT)
    read: list[int] = [0]
    marked = _marked_blob(data, tmp_path / "m.zst", read, marks=True)
    assert marked.crc32_marks is not None and len(marked.crc32_marks) == (marked.size_bytes - 1) // MARK_BYTES >= 4
    assert _streamed(marked, [1]) == whole_read_frames(data, [1])
    assert 0 < read[0] <= 2 * MARK_BYTES
    read[0] = 0
    old = _marked_blob(data, tmp_path / "o.zst", read, marks=False)
    assert _streamed(old, [1]) == whole_read_frames(data, [1])
    assert read[0] == old.size_bytes
    assert _streamed(marked, [2, 40]) == whole_read_frames(data, [2, 40])  # To the end: the whole CRC-32.

    damaged = bytearray((tmp_path / "m.zst").read_bytes())
    damaged[len(damaged) - 100] ^= 0x01
    (tmp_path / "m.zst").write_bytes(bytes(damaged))
    assert _streamed(marked, [1]) == whole_read_frames(data, [1])
    found, first = frame_stream.layout(marked)
    sent = []
    with pytest.raises(CorruptBlob):
        for piece in frame_stream.frame_body(marked, found, first, [40], lambda first_part: b"HEAD", b"END"):
            sent.append(piece)
    assert b"END" not in sent and len(b"".join(sent)) < len(b"HEAD") + found.frame_bytes


def test_a_mark_that_does_not_match_stops_the_read_at_that_mark(tmp_path: Path) -> None:
    """A byte flipped in the second MiB: reading frame 1 (in the first) passes; frame 20's
    read stops with CorruptBlob at the second mark, before the frame's bytes after it are
    decompressed, even though zstd's content checksum (at the end) was never reached."""
    rng = np.random.default_rng(6)
    ds = _dataset(40, rows=256, columns=256)
    ds.PixelData = rng.integers(0, 65535, 40 * 256 * 256, dtype=np.uint16).tobytes()
    data = _part10(ds, EXPLICIT)
    read: list[int] = [0]
    marked = _marked_blob(data, tmp_path / "m.zst", read, marks=True)
    damaged = bytearray((tmp_path / "m.zst").read_bytes())
    damaged[MARK_BYTES + MARK_BYTES // 2] ^= 0x01
    (tmp_path / "m.zst").write_bytes(bytes(damaged))
    assert _streamed(marked, [1]) == whole_read_frames(data, [1])
    read[0] = 0
    with pytest.raises(CorruptBlob, match="before byte"):
        _streamed(marked, [20])
    assert read[0] <= 2 * MARK_BYTES


def test_rendered_and_thumbnail_of_a_big_instance_read_one_frame_not_the_instance(
        tmp_path: Path, make_instance: Callable[[bytes], Any]) -> None:
    """/rendered and /thumbnail of a big instance kept as a blob file: the frame is read
    from the stream (as far as that frame) and rendered with the instance's header, the
    same image as the whole read renders; the archive's whole read is never asked. A frame
    beyond the instance: 404."""
    rng = np.random.default_rng(31)
    native = _dataset(40, rows=256, columns=256)
    native.BitsStored, native.HighBit = 12, 11
    native.RescaleSlope, native.RescaleIntercept = 1, -1024
    native.WindowCenter, native.WindowWidth = 40, 400
    native.PixelData = rng.integers(0, 4096, 40 * 256 * 256, dtype=np.uint16).tobytes()
    native_data = _part10(native, EXPLICIT)
    colour = _dataset(36, rows=256, columns=256, samples=3, bits=8, photometric="YBR_FULL_422")
    colour.StudyInstanceUID, colour.SeriesInstanceUID = native.StudyInstanceUID, native.SeriesInstanceUID
    colour.PixelData = encapsulate(_jpegs(36, rng), has_bot=False)
    colour["PixelData"].VR = "OB"
    colour_data = _part10(colour, JPEG_BASELINE)
    assert min(len(native_data), len(colour_data)) > frame_stream.STREAM_PART10_BYTES_MIN
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1024)
    archive = _ReadCountingArchive(store)
    for data in (native_data, colour_data):
        archive.store(make_instance(data))
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=100_000_000, qido_result_max=4,
                        owns=lambda study: True, local_reads=StoreReads(store, 1024))
    server.start()
    try:
        base = (f"http://127.0.0.1:{server.port}/dicom-web/studies/{native.StudyInstanceUID}"
                f"/series/{native.SeriesInstanceUID}/instances/")
        for dataset, data in ((native, native_data), (colour, colour_data)):
            url = base + str(dataset.SOPInstanceUID)
            png = httpx.get(url + "/frames/7/rendered", headers={"Accept": "image/png"})
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert png.content == render(data, frame=7, media_type="image/png")
            jpeg = httpx.get(url + "/rendered", params={"quality": "80"})
            assert jpeg.content == render(data, frame=1, media_type="image/jpeg", quality=80)
            thumbnail = httpx.get(url + "/thumbnail", headers={"Accept": "image/png"})
            assert thumbnail.content == render(data, frame=1, media_type="image/png", viewport=(128, 128))
            assert httpx.get(url + "/frames/99/rendered").status_code == 404
        assert archive.reads == []
    finally:
        server.stop()
        store.close()
