"""WADO-RS /frames and Pixel Data /bulk of a 230 MB multi-frame instance from a real node
process (node/frame_stream.py): streamed from its blob file frame by frame, the node's
peak RSS growing by less than PEAK_MARGIN_BYTES (measured from /proc: VmHWM after
clear_refs 5, against VmRSS before), where the whole read held the instance (and pydicom
a second copy of its pixel data): 230 MB and more."""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacsnode.node.dicomweb_media import MultipartReader, multipart_boundary

from . import clients

FRAMES = 440
ROWS = COLUMNS = 512
FRAME_BYTES = ROWS * COLUMNS * 2
# What serving the frames of a big instance may add to the node's peak RSS: the header,
# a decompressed chunk (1 MiB), zstd's window and input (1 MiB), body pieces in flight
# (a few of up to 1 MiB), uvicorn's and the socket's buffers. Read whole, the instance
# alone is 230 MB.
PEAK_MARGIN_BYTES = 32 << 20

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_growth(pid: int, action: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run `action`; the growth of the node's peak RSS over its RSS before (None: the
    kernel does not let this process reset the peak)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0).
    except OSError:
        return action(), None
    before_kib = _status_kib(pid, "VmRSS")
    result = action()
    return result, (_status_kib(pid, "VmHWM") - before_kib) * 1024


def _write_instance(path: Path) -> tuple[Dataset, int]:
    """A 440-frame 512 x 512 16-bit instance (12 bits of noise and a ramp: zstd gains a
    little, as on real data); (its dataset without pixels, the pixel value's offset)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture.
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BIGFRAMES"
    ds.PatientName = "Frames^Big"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = ROWS, COLUMNS, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = FRAMES
    rng = np.random.default_rng(1301)
    ramp = (np.arange(ROWS * COLUMNS, dtype=np.uint32) % 4096).astype(np.uint16)
    pixels = np.empty((FRAMES, ROWS * COLUMNS), dtype=np.uint16)
    for index in range(FRAMES):
        pixels[index] = (ramp + rng.integers(0, 64, ROWS * COLUMNS, dtype=np.uint16) + index) % 4096
    ds.PixelData = pixels.tobytes()
    del pixels
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    del ds.PixelData
    size = path.stat().st_size
    return ds, size - FRAMES * FRAME_BYTES  # Pixel Data is the last element.


def _stream_parts(url: str, out: Path, accept: str | None = None) -> tuple[int, list[bytes]]:
    """GET streamed to a file (the client holds no copy while it reads), then its parts."""
    headers = {"Accept": accept} if accept else {}
    with httpx.stream("GET", url, headers=headers, timeout=300) as reply, open(out, "wb") as sink:
        for chunk in reply.iter_bytes():
            sink.write(chunk)
        status, content_type = reply.status_code, reply.headers.get("content-type", "")
    if status != 200:
        return status, []
    _type, boundary = multipart_boundary(content_type)
    reader = MultipartReader(boundary, part_bytes_max=FRAMES * FRAME_BYTES + 1)
    parts = reader.feed(out.read_bytes())
    reader.close()
    return status, [part.body for part in parts]


def test_frames_and_bulk_of_a_230_mb_instance_stream_in_bounded_memory(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "big.dcm"
    ds, pixel_offset = _write_instance(path)
    node = node_factory.start()
    result, acked = clients.storescu(node.dicom_port, [str(path)])
    assert len(acked) == 1, result.stdout + result.stderr
    assert "blob_file=yes" in node.log_text()
    pid = node.process.pid
    base = (f"http://127.0.0.1:{node.http_port}/dicom-web/studies/{ds.StudyInstanceUID}"
            f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    with open(path, "rb") as source, mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as stored:
        def frame(number: int) -> bytes:
            start = pixel_offset + (number - 1) * FRAME_BYTES
            return stored[start:start + FRAME_BYTES]

        asked = [FRAMES, 1, 220, 221]
        (status, parts), frames_growth = _peak_growth(
            pid, lambda: _stream_parts(f"{base}/frames/{','.join(map(str, asked))}", tmp_path / "frames.body"))
        assert status == 200 and parts == [frame(n) for n in asked]
        del parts

        (status, parts), bulk_growth = _peak_growth(
            pid, lambda: _stream_parts(f"{base}/bulk/7FE00010", tmp_path / "bulk.body", "application/octet-stream"))
        assert status == 200 and len(parts) == 1
        assert hashlib.sha256(parts[0]).digest() == hashlib.sha256(stored[pixel_offset:]).digest()
        del parts

        # Every frame, one request each, four at a time would cost 4 x 230 MB held whole.
        (status, parts), all_growth = _peak_growth(
            pid, lambda: _stream_parts(f"{base}/frames/{','.join(map(str, range(1, FRAMES + 1)))}",
                                       tmp_path / "all.body"))
        assert status == 200 and len(parts) == FRAMES and parts[-1] == frame(FRAMES)
        del parts
    for what, growth in (("frames", frames_growth), ("bulk", bulk_growth), ("all frames", all_growth)):
        print(f"node peak RSS growth, {what}: {growth} bytes")  # With -s: the figures bench/README.md quotes.
        if growth is not None:
            assert growth < PEAK_MARGIN_BYTES, (what, growth)
    assert "Traceback" not in node.log_text()


def _write_jpeg_instance(path: Path, frames: int) -> Dataset:
    """A multi-frame JPEG baseline instance (Pillow: YCbCr 4:2:0 frames of 512 x 512 noise at
    quality 90, ~235 KB each), labelled YBR_FULL_422."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.4"  # Multi-frame True Color Secondary Capture.
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BIGJPEG"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = ROWS, COLUMNS, 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(1302)
    coded = []
    for _ in range(frames):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (ROWS, COLUMNS, 3), dtype=np.uint8), mode="RGB").save(
            out, format="JPEG", quality=90)
        coded.append(out.getvalue())
    ds.PixelData = encapsulate(coded, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_decoded_frames_of_a_big_jpeg_instance_stream_in_bounded_memory(node_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Frames of a 113 MB 480-frame JPEG baseline instance asked uncompressed: decoded one at a time
    from the file (node/frame_stream.py `encoded_frames`), the same bytes as a decode of the
    whole instance, the node's peak RSS within the same margin."""
    from pydicom import dcmread

    from pacsnode.node.dicomweb_render import decoded_frames

    path = tmp_path / "jpeg.dcm"
    ds = _write_jpeg_instance(path, 480)
    assert path.stat().st_size > 100_000_000
    node = node_factory.start()
    result, acked = clients.storescu(node.dicom_port, [str(path)], extra=["-xy"])  # Proposes JPEG baseline.
    assert len(acked) == 1, result.stdout + result.stderr
    base = (f"http://127.0.0.1:{node.http_port}/dicom-web/studies/{ds.StudyInstanceUID}"
            f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    asked = [480, 1, 240]
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'
    (status, parts), growth = _peak_growth(
        node.process.pid, lambda: _stream_parts(f"{base}/frames/{','.join(map(str, asked))}",
                                                tmp_path / "decoded.body", accept))
    assert status == 200 and [len(part) for part in parts] == [ROWS * COLUMNS * 2] * 3
    assert parts == list(decoded_frames(path.read_bytes(), asked))
    assert dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "YBR_FULL_422"
    print(f"node peak RSS growth, decoded frames: {growth} bytes")
    if growth is not None:
        assert growth < PEAK_MARGIN_BYTES, growth
    assert "Traceback" not in node.log_text()
