"""The owner's side of Data.FetchFrames below the gRPC server: frame_stream.frame_events
gives the frames a whole read gives (native and encapsulated layouts, any order asked),
holds the last chunk of a pass until that pass's check, and peer_server.FrameMessages
cuts them into messages that name each frame and carry its size and CRC-32."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.encaps import encapsulate, encapsulate_extended

from pacsnode.node import frame_stream
from pacsnode.node.dicomweb_render import frames as whole_read_frames
from pacsnode.node.frame_stream import BlobFile
from pacsnode.node.peer_frames import FramesAnswer, FramesOutcome
from pacsnode.node.peer_server import FrameMessages
from pacsnode.proto import CHUNK_BYTES_MAX
from pacsnode.replication.model import CorruptBlob

from .test_dicomweb_frames_stream import EXPLICIT, JPEG_BASELINE, LISTS, _blob, _dataset, _fragments, _part10, \
    _split_items


def _events(blob: BlobFile, numbers: list[int] | None) -> list[int | bytes]:
    found, first = frame_stream.layout(blob)
    return list(frame_stream.frame_events(blob, found, first, frame_stream.check_numbers(found, numbers)))


def _frames_of(events: list[int | bytes]) -> tuple[list[int], list[bytes]]:
    numbers: list[int] = []
    frames: list[bytes] = []
    for event in events:
        if isinstance(event, int):
            numbers.append(event)
            frames.append(b"")
        else:
            assert len(event) <= CHUNK_BYTES_MAX
            frames[-1] += event
    return numbers, frames


def test_native_frame_events_are_the_whole_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ds = _dataset(5, rows=512, columns=512)  # 512 KiB frames: several chunks each.
    ds.PixelData = rng.integers(0, 4096, 5 * 512 * 512, dtype=np.uint16).tobytes()
    data = _part10(ds, EXPLICIT)
    blob = _blob(data, tmp_path / "b.zst")
    for numbers in LISTS:
        asked, frames = _frames_of(_events(blob, numbers))
        assert asked == (numbers or [1, 2, 3, 4, 5])
        assert frames == whole_read_frames(data, numbers), numbers


@pytest.mark.parametrize("kind", ["one-a-frame", "basic-offset-table", "eoi", "extended-offset-table"])
def test_encapsulated_frame_events_are_the_whole_reads(tmp_path: Path, kind: str) -> None:
    coded = _fragments(5, 3000, np.random.default_rng(7))
    ds = _dataset(5, bits=8, samples=3, photometric="YBR_FULL_422")
    if kind == "one-a-frame":
        ds.PixelData = encapsulate(coded, has_bot=False)
    elif kind == "basic-offset-table":
        ds.PixelData = encapsulate(coded, fragments_per_frame=3, has_bot=True)
    elif kind == "eoi":
        ds.PixelData = _split_items(coded)
    else:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(coded)
    ds["PixelData"].VR = "OB"
    data = _part10(ds, JPEG_BASELINE)
    blob = _blob(data, tmp_path / "b.zst")
    for numbers in LISTS:
        assert _frames_of(_events(blob, numbers))[1] == whole_read_frames(data, numbers), (kind, numbers)


def test_a_damaged_file_raises_before_the_last_chunk_of_the_pass(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    ds = _dataset(20, rows=256, columns=256)
    ds.PixelData = rng.integers(0, 4096, 20 * 256 * 256, dtype=np.uint16).tobytes()
    data = _part10(ds, EXPLICIT)
    path = tmp_path / "b.zst"
    blob = _blob(data, path)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) - 100] ^= 0x01  # After frame 1: only the pass's check finds it.
    path.write_bytes(bytes(damaged))
    found, first = frame_stream.layout(blob)
    out: list[int | bytes] = []
    with pytest.raises(CorruptBlob):
        for event in frame_stream.frame_events(blob, found, first, [1]):
            out.append(event)
    assert out[0] == 1
    assert sum(len(e) for e in out[1:] if isinstance(e, bytes)) < found.frame_bytes  # The last chunk held back.


def test_frame_messages_name_each_frame_and_carry_its_size_and_crc() -> None:
    big = bytes(range(256)) * 9000  # 2.2 MiB: three messages.
    events: list[int | bytes] = [3, big[:1 << 20], big[1 << 20:2 << 20], big[2 << 20:], 1, b"tiny", 3, b""]
    messages = FrameMessages(FramesAnswer(FramesOutcome.SENDING, events=iter(events)))
    out = []
    while True:
        batch = messages.batch()
        if not batch:
            break
        out.extend(batch)
    assert all(len(m.data) <= CHUNK_BYTES_MAX for m in out)
    assert [m.frame_number for m in out if m.frame_number] == [3, 1, 3]
    ends = [m for m in out if m.frame_end]
    assert [(m.frame_size_bytes, m.frame_crc32) for m in ends] == [
        (len(big), zlib.crc32(big)), (4, zlib.crc32(b"tiny")), (0, 0)]
    assert out[-1].last and sum(m.last for m in out) == 1
    assert b"".join(m.data for m in out) == big + b"tiny"
