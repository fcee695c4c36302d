"""WADO-RS frames and Pixel Data bulk data of a big instance, streamed from its blob file.

An instance kept as a blob file (node/blob_files.py: its Part-10 bytes as one zstd frame,
the file's size and CRC-32 in the pointer RocksDB holds) is read forward, decompressed a
chunk at a time, and only as far as the last frame asked. Its header is read first (the
lean reader, node/header_reader.py; pydicom for the headers that reader leaves to it);
where each frame lies comes from it:

- native pixel data: offset arithmetic (Rows x Columns x Samples per Pixel x Bits
  Allocated / 8 a frame; two samples a pixel for a native YBR_FULL_422 / YBR_PARTIAL_422);
- encapsulated pixel data: the Extended Offset Table (7FE0,0001) when there is one, else
  the Basic Offset Table, else a walk of the item tags: one frame for a single-frame
  instance, one fragment a frame for RLE and Deflated Image Frame Compression, and for the
  JPEG family a frame ending at the fragment that ends with an EOI / EOC marker (FFD9 in
  its last 10 bytes), as pydicom's generate_frames does.

Frames go out in the order asked. The file is read forward only: a list that goes back
("3,1", or "2,2") is read in runs, each a new pass over the file from its start, at most
PASSES_MAX a request (a longer list is refused: 400).

Memory: the header (up to HEADER_BYTES_MAX), one decompressed chunk (CHUNK_BYTES), the
body pieces in flight (PIECE_BYTES each) and zstd's window; never a whole frame, let alone
the instance. Small frames go out joined with their part headers in pieces of about
PIECE_BYTES. Frames to decode (`encoded_frames`, for dicomweb_render.decoded_from_frames)
come whole, two at most in memory.

Checks: every compressed byte the decompressor reads is checked before the piece made
from it is released (blob_files.CheckedReader), by the CRC-32 marks its pointer records
(`BlobPointer.crc32_marks`: the running CRC-32 of the file at every MARK_BYTES, 1 MiB),
and by the whole file's CRC-32 and size when a pass reaches its end; zstd's XXH64 of the
content is not computed (the frame handed to the decompressor without its checksum, as
BlobFiles.read_whole's). A pass that stops before the end (frame 1 of 440) reads on to
the next mark only: what it sends is checked, not the rest of the file (230 MB: 23-51 ms
of reads and CRC-32 before). A pointer without marks (written before they were) makes a
pass read the rest of the file, without decompressing it, into the CRC-32 and compare it
with the whole file's. The last piece of each pass is held back until that check passes:
a mismatch raises CorruptBlob before it goes out, so the caller breaks the body off (no
closing delimiter) and a client never takes a corrupt answer for a complete one. The
frames before it may have gone out, as with a streamed C-GET (docs/design.md).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO, cast

import zstandard

from pacsnode.node import header_reader
from pacsnode.node.blob_files import CHUNK_BYTES, CheckedReader
from pacsnode.node.dicomweb_media import MediaError, read_file_meta
from pacsnode.replication.model import CorruptBlob

# Instances of more Part-10 bytes than this are streamed; smaller ones are read whole
# (one read, one CRC-32, one decompress: faster for a slice).
STREAM_PART10_BYTES_MIN = 2 * 1024**2
HEADER_BYTES_MAX = 64 * 1024**2  # A bigger header (enhanced multi-frame): the whole read.
_HEAD_FIRST_BYTES = 256 * 1024
PIECE_BYTES = 256 * 1024
# Forward passes one request may take (a frame list that goes back N - 1 times): each
# decompresses up to its last frame and reads the rest of the file for the check, so a
# list such as 440,439,...,1 would cost 440 reads of the file.
PASSES_MAX = 16

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
DEFLATED_IMAGE_FRAME = "1.2.840.10008.1.2.8.1"
# Encapsulated syntaxes whose frames are cut here: one fragment a frame, or the JPEG family
# (JPEG, JPEG-LS, JPEG 2000, HTJ2K: each frame's code stream ends with FFD9). Video and
# others are not (a frame of an MPEG stream is not a fragment): the whole read answers them.
_ONE_FRAGMENT_PER_FRAME = frozenset({RLE_LOSSLESS, DEFLATED_IMAGE_FRAME})
_JPEG_FAMILY = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
_NATIVE = frozenset({EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN})

_PIXEL_DATA = 0x7FE00010
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"
_UNDEFINED = 0xFFFFFFFF
_EOI = b"\xff\xd9"
_NEEDED = {0x00280002: "SamplesPerPixel", 0x00280004: "PhotometricInterpretation", 0x00280008: "NumberOfFrames",
           0x00280010: "Rows", 0x00280011: "Columns", 0x00280100: "BitsAllocated",
           0x7FE00001: "ExtendedOffsetTable"}


class NotStreamed(Exception):
    """This instance's pixel data is not streamed here (its syntax, a 1-bit or float
    layout, a header too long or one this module cannot place): the whole read answers."""


class NoFrame(Exception):
    """The instance has no Pixel Data, or not a frame asked (before any byte is sent)."""


class TooManyPasses(Exception):
    """The frame list goes back over the file more than PASSES_MAX - 1 times (400)."""


class FrameLayoutError(Exception):
    """The pixel data does not hold what its header says (found while streaming: the
    caller breaks the body off)."""


@dataclass(frozen=True)
class BlobFile:
    """A blob file to stream: how to open it, and what its pointer says of it."""

    open: Callable[[], BinaryIO]
    size_bytes: int
    crc32: int
    part10_bytes: int
    what: str  # For messages: the SOP Instance UID.
    crc32_marks: tuple[int, ...] | None = None  # The pointer's (None: a record without them).


@dataclass(frozen=True)
class PixelLayout:
    """Where an instance's frames lie in its Part-10 bytes."""

    syntax: str
    frames: int
    value_offset: int          # The Pixel Data value's first byte (encapsulated: its first item's tag).
    value_length: int | None   # Native: the value's length; encapsulated: None.
    frame_bytes: int           # Native: one frame's bytes.
    offsets: tuple[int, ...] | None  # Encapsulated, from the Extended Offset Table: each frame's offset.
    photometric: str
    header: bytes = b""        # The Part-10 bytes before the Pixel Data element (a decoder reads them).

    @property
    def encapsulated(self) -> bool:
        return self.value_length is None


class _Forward:
    """The Part-10 bytes of a blob file, decompressed forward from the start."""

    def __init__(self, blob: BlobFile) -> None:
        self._blob = blob
        source = blob.open()
        try:
            self._source = CheckedReader(source, blob.size_bytes, blob.crc32, blob.crc32_marks, blob.what,
                                         hide_checksum=True)
        except BaseException:
            source.close()
            raise
        # The source is read through its read() alone (zstandard's documented duck typing).
        self._reader = zstandard.ZstdDecompressor().stream_reader(cast(BinaryIO, self._source), read_size=CHUNK_BYTES)
        self.position = 0
        self._buffer = b""  # Read ahead (the head); from _buffer_at on not yet consumed.
        self._buffer_at = 0

    def _raw(self, size: int) -> bytes:
        try:
            return self._reader.read(size)
        except zstandard.ZstdError as error:
            raise CorruptBlob(f"blob of {self._blob.what} is not a readable zstd frame: {error}") from error

    def head(self, size: int) -> bytes:
        """Up to the first `size` bytes, kept to be read again (only at the start)."""
        if self.position:
            raise ValueError("the head is read at the start only")
        if len(self._buffer) < size:
            parts = [self._buffer]
            held = len(self._buffer)
            while held < size:
                chunk = self._raw(min(CHUNK_BYTES, size - held))
                if not chunk:
                    break
                parts.append(chunk)
                held += len(chunk)
            self._buffer = b"".join(parts)
        return self._buffer[:size]

    def chunk(self, limit: int) -> bytes:
        """The next up to `limit` bytes (at most CHUNK_BYTES); CorruptBlob at an early end."""
        limit = min(limit, CHUNK_BYTES)
        if self._buffer_at < len(self._buffer):
            data = self._buffer[self._buffer_at:self._buffer_at + limit]
            self._buffer_at += len(data)
            if self._buffer_at == len(self._buffer):
                self._buffer, self._buffer_at = b"", 0
        else:
            data = self._raw(limit)
            if not data:
                raise CorruptBlob(f"blob of {self._blob.what} ended at {self.position} bytes")
        self.position += len(data)
        return data

    def read(self, size: int) -> bytes:
        parts = []
        while size > 0:
            data = self.chunk(size)
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    def skip_to(self, offset: int) -> None:
        if offset < self.position:
            raise ValueError("a blob file is read forward only")
        while self.position < offset:
            self.chunk(offset - self.position)

    def check(self) -> None:
        """Every compressed byte read so far checked (CheckedReader.finish: on to the next
        CRC-32 mark, or to the end of a file whose pointer has none)."""
        self._source.finish()

    def close(self) -> None:
        try:
            self._reader.close()  # type: ignore[no-untyped-call]  # zstandard has no annotation here.
        finally:
            self._source.close()


def layout(blob: BlobFile) -> tuple[PixelLayout, _Forward]:
    """The instance's pixel layout, from its header, and the stream it was read from (at
    its start, the head kept: the first pass reads on from there). NotStreamed, NoFrame,
    CorruptBlob (a file that is missing or not zstd)."""
    forward = _Forward(blob)
    try:
        size = _HEAD_FIRST_BYTES
        while True:
            head = forward.head(size)
            try:
                found = _layout_of(head, whole=len(head) < size)
            except header_reader.Truncated:
                found = None
            if found is not None:
                return found, forward
            if len(head) < size or size >= HEADER_BYTES_MAX:
                raise NotStreamed("the header does not end within the bytes read")
            size *= 4
    except BaseException:
        forward.close()
        raise


def _layout_of(head: bytes, *, whole: bool) -> PixelLayout | None:
    """The layout from the first bytes of an instance; None: the header goes on past them."""
    try:
        meta = read_file_meta(head)
    except MediaError:
        if whole:
            raise NotStreamed("no file meta") from None
        return None
    syntax = meta.transfer_syntax_uid
    if syntax not in _NATIVE and syntax not in _ONE_FRAGMENT_PER_FRAME and syntax not in _JPEG_FAMILY:
        raise NotStreamed(f"transfer syntax {syntax[:64]}")
    try:
        elements, stopped, at_pixels = header_reader.walk(head, meta.dataset_offset, syntax)
        values = {tag: bytes(head[start:end]) for tag, _vr, start, end, _items in elements if tag in _NEEDED}
    except header_reader.Unsupported:
        found = _pydicom_header(head, meta.dataset_offset)
        if found is None:
            if whole:
                raise NotStreamed("a header pydicom does not read to its pixel data") from None
            return None
        values, stopped, at_pixels = found
    if not at_pixels:
        if whole:
            raise NoFrame("the instance has no pixel data")
        return None
    implicit = syntax == IMPLICIT_VR_LITTLE_ENDIAN
    if stopped + (8 if implicit else 12) > len(head):
        return None
    tag = struct.unpack_from("<HH", head, stopped)
    if (tag[0] << 16 | tag[1]) != _PIXEL_DATA:
        raise NotStreamed("float pixel data")
    if implicit:
        (length,) = struct.unpack_from("<L", head, stopped + 4)
        value_offset = stopped + 8
    else:
        (length,) = struct.unpack_from("<L", head, stopped + 8)
        value_offset = stopped + 12
    photometric = _text(values.get(0x00280004)) or "MONOCHROME2"
    frames = max(1, _int_text(values.get(0x00280008), 1))
    rows = _us(values.get(0x00280010))
    columns = _us(values.get(0x00280011))
    samples = _us(values.get(0x00280002)) or 1
    bits = _us(values.get(0x00280100))
    if syntax in _NATIVE:
        if length == _UNDEFINED:
            raise NotStreamed("native pixel data of undefined length")
        if bits == 0 or bits % 8:
            raise NotStreamed("frames of 1-bit (or unaligned) pixel data")
        if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422") and samples == 3:
            frame_bytes = rows * columns * 2 * bits // 8
        else:
            frame_bytes = rows * columns * samples * bits // 8
        if frame_bytes <= 0:
            raise NotStreamed("no frame size")
        return PixelLayout(syntax, frames, value_offset, length, frame_bytes, None, photometric, head[:stopped])
    if length != _UNDEFINED:
        raise NotStreamed("encapsulated pixel data of defined length")
    offsets = None
    table = values.get(0x7FE00001)
    if table:
        count = len(table) // 8
        offsets = struct.unpack(f"<{count}Q", table[:count * 8])
        if count != frames or list(offsets) != sorted(offsets):
            raise NotStreamed("an Extended Offset Table that does not fit the frames")
    return PixelLayout(syntax, frames, value_offset, None, 0, offsets, photometric, head[:stopped])


def _pydicom_header(head: bytes, offset: int) -> tuple[dict[int, bytes], int, bool] | None:
    """What the lean reader gives, by pydicom (raw values of the tags needed)."""
    from pydicom import dcmread

    stream = BytesIO(head)
    try:
        dataset = dcmread(stream, stop_before_pixels=True)
    except Exception:  # pydicom raises many types, on a header cut off by the end of the bytes too
        return None
    stopped = stream.tell()
    if stopped + 8 > len(head):
        return None
    group, element = struct.unpack_from("<HH", head, stopped)
    if (group << 16 | element) not in header_reader.PIXEL_TAGS:
        return None
    values: dict[int, bytes] = {}
    for tag in _NEEDED:
        if tag in dataset:
            value = dataset[tag].value
            if isinstance(value, bytes):
                values[tag] = value
            elif isinstance(value, int) and tag != 0x00280008:
                values[tag] = struct.pack("<H", value)
            else:
                values[tag] = str(value).encode("ascii", errors="replace")
    return values, stopped, True


def _us(raw: bytes | None) -> int:
    return struct.unpack_from("<H", raw)[0] if raw and len(raw) >= 2 else 0


def _text(raw: bytes | None) -> str:
    return raw.decode("latin-1").strip(" \x00") if raw else ""


def _int_text(raw: bytes | None, default: int) -> int:
    try:
        return int(_text(raw)) if raw else default
    except ValueError:
        return default


def check_numbers(found: PixelLayout, numbers: list[int] | None) -> list[int]:
    """The frame numbers to send (None: every frame); NoFrame when one is beyond NumberOfFrames
    or (native) beyond the value's length."""
    if numbers is None:
        numbers = list(range(1, found.frames + 1))
    if numbers and max(numbers) > found.frames:
        raise NoFrame(f"the instance has {found.frames} frames")
    if found.value_length is not None and max(numbers, default=0) * found.frame_bytes > found.value_length:
        raise NoFrame("the pixel data is shorter than its frames")
    passes = len(_runs(numbers))
    if passes > PASSES_MAX:
        raise TooManyPasses(f"the frame list goes back {passes - 1} times; this instance is read forward, at most "
                            f"{PASSES_MAX} times a request: ask for its frames in increasing order, or in "
                            "several requests")
    return numbers


def _runs(numbers: list[int]) -> list[list[int]]:
    """The list cut where it does not strictly increase: each run is one forward pass."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number > runs[-1][-1]:
            runs[-1].append(number)
        else:
            runs.append([number])
    return runs


class _Pieces:
    """Body bytes joined into pieces of about PIECE_BYTES; the last piece is held until the
    pass's check has passed (`release`)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._bytes = 0
        self._held: bytes | None = None

    def add(self, data: bytes) -> Iterator[bytes]:
        """Pieces ready to go out (every one but the last made)."""
        self._parts.append(data)
        self._bytes += len(data)
        if self._bytes >= PIECE_BYTES:
            yield from self._rotate()

    def _rotate(self) -> Iterator[bytes]:
        piece = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._bytes = [], 0
        if self._held is not None:
            yield self._held
        self._held = piece

    def flush(self) -> Iterator[bytes]:
        """Make what is joined a piece (held): call before a check."""
        if self._parts:
            yield from self._rotate()

    def release(self) -> Iterator[bytes]:
        """The held piece (after a check has passed)."""
        if self._held is not None:
            held, self._held = self._held, None
            yield held


def frame_body(blob: BlobFile, found: PixelLayout, first: _Forward | None, numbers: list[int],
               part_head: Callable[[bool], bytes], closing: bytes) -> Iterator[bytes]:
    """The multipart body of the frames asked (`check_numbers`), each a part: the part
    headers from `part_head(first)`, then `closing` once every pass has been checked.
    Raises CorruptBlob or FrameLayoutError while streaming (the caller breaks the body off).
    `first`: the stream `layout` read the header from (the first pass reads on from it)."""
    pieces = _Pieces()
    index = 0
    for run in _runs(numbers):
        forward = first if first is not None else _Forward(blob)
        first = None
        try:
            frames = _native_frames(forward, found, run) if not found.encapsulated else \
                _encapsulated_frames(forward, found, run)
            for data in frames:
                if data is None:  # A new frame.
                    yield from pieces.add(part_head(index == 0))
                    index += 1
                else:
                    yield from pieces.add(data)
            yield from pieces.flush()
            forward.check()
        finally:
            forward.close()
        yield from pieces.release()
    yield closing
    if first is not None:
        first.close()


def frame_events(blob: BlobFile, found: PixelLayout, first: _Forward | None,
                 numbers: list[int]) -> Iterator[int | bytes]:
    """The frames asked (`check_numbers`) for the peer protocol's FetchFrames
    (node/peer_frames.py): each frame's number as it starts, then its bytes as stored in
    chunks of at most CHUNK_BYTES; the last chunk of each pass only after that pass's check
    (CorruptBlob, FrameLayoutError as `frame_body`). One chunk in memory, never a frame."""
    for run in _runs(numbers):
        forward = first if first is not None else _Forward(blob)
        first = None
        held: bytes | None = None
        index = 0
        try:
            frames = _native_frames(forward, found, run) if not found.encapsulated else \
                _encapsulated_frames(forward, found, run)
            for data in frames:
                if held is not None:
                    yield held
                    held = None
                if data is None:
                    yield run[index]
                    index += 1
                else:
                    held = data
            forward.check()
        finally:
            forward.close()
        if held is not None:
            yield held
    if first is not None:
        first.close()


def encoded_frames(blob: BlobFile, found: PixelLayout, first: _Forward | None,
                   numbers: list[int]) -> Iterator[bytes]:
    """Each frame asked (`check_numbers`) whole, in the asked order, for a decoder: two
    frames in memory at most. The last frame of each pass comes only after that pass's
    check (CorruptBlob, FrameLayoutError as `frame_body`)."""
    for run in _runs(numbers):
        forward = first if first is not None else _Forward(blob)
        first = None
        pending: bytes | None = None
        try:
            frames = _native_frames(forward, found, run) if not found.encapsulated else \
                _encapsulated_frames(forward, found, run)
            parts: list[bytes] | None = None
            for data in frames:
                if data is not None:
                    assert parts is not None  # A frame's bytes follow its start.
                    parts.append(data)
                    continue
                if parts is not None:
                    if pending is not None:
                        yield pending
                    pending = b"".join(parts)
                parts = []
            if parts is not None:
                if pending is not None:
                    yield pending
                pending = b"".join(parts)
            forward.check()
        finally:
            forward.close()
        if pending is not None:
            yield pending


def value_body(blob: BlobFile, found: PixelLayout, first: _Forward | None, head: bytes,
               closing: bytes) -> Iterator[bytes]:
    """The multipart body of a native Pixel Data value (its /bulk): one part, `head` then
    the value as stored, then `closing` once the file has been checked."""
    if found.value_length is None:
        raise ValueError("an encapsulated value goes out frame by frame")
    pieces = _Pieces()
    forward = first if first is not None else _Forward(blob)
    try:
        yield from pieces.add(head)
        forward.skip_to(found.value_offset)
        left = found.value_length
        while left > 0:
            data = forward.chunk(left)
            left -= len(data)
            yield from pieces.add(data)
        yield from pieces.flush()
        forward.check()
    finally:
        forward.close()
    yield from pieces.release()
    yield closing


def _native_frames(forward: _Forward, found: PixelLayout, run: list[int]) -> Iterator[bytes | None]:
    """None at the start of each frame of `run` (increasing), then its bytes in chunks."""
    for number in run:
        forward.skip_to(found.value_offset + (number - 1) * found.frame_bytes)
        yield None
        left = found.frame_bytes
        while left > 0:
            data = forward.chunk(left)
            left -= len(data)
            yield data


def _encapsulated_frames(forward: _Forward, found: PixelLayout, run: list[int]) -> Iterator[bytes | None]:
    """The frames of `run` (increasing) cut from the items of encapsulated Pixel Data."""
    forward.skip_to(found.value_offset)
    table = _item(forward)
    if table is None:
        raise FrameLayoutError("encapsulated pixel data without its Basic Offset Table item")
    offsets = found.offsets
    basic = forward.read(table)
    if offsets is None and basic:
        count = len(basic) // 4
        offsets = struct.unpack(f"<{count}L", basic[:count * 4])
        if count != found.frames or list(offsets) != sorted(offsets):
            raise FrameLayoutError("a Basic Offset Table that does not fit the frames")
    wanted = set(run)
    last = run[-1]
    start = forward.position  # Offsets are from the first fragment's item tag.
    fragment = 0
    frame = 1  # The frame the next fragment belongs to (by EOI marker: until one ends it).
    current = 0  # The frame whose part is open.
    while True:
        relative = forward.position - start
        length = _item(forward)
        if length is None:
            break
        if offsets is not None:
            frame = bisect.bisect_right(offsets, relative)
        elif found.frames == 1:
            frame = 1
        elif found.syntax in _ONE_FRAGMENT_PER_FRAME:
            frame = fragment + 1
        if frame > found.frames:
            raise FrameLayoutError(f"more fragments than the {found.frames} frames")
        if frame > last:
            return
        fragment += 1
        ended = False
        if frame in wanted:
            if frame != current:
                yield None
                current = frame
            left = length
            tail = b""
            while left > 0:
                data = forward.chunk(left)
                left -= len(data)
                tail = (tail + data)[-10:]
                yield data
            ended = _EOI in tail
        else:
            if length > 10:
                forward.skip_to(forward.position + length - 10)
            ended = _EOI in forward.read(min(length, 10))
        if offsets is None and found.frames > 1 and found.syntax not in _ONE_FRAGMENT_PER_FRAME and ended:
            frame += 1
    if current != last:
        raise FrameLayoutError(f"the pixel data ends before frame {last}")


def _item(forward: _Forward) -> int | None:
    """The length of the next item (its header read), or None at the sequence delimiter."""
    header = forward.read(8)
    tag = header[:4]
    length = int(struct.unpack_from("<L", header, 4)[0])
    if tag == _SEQUENCE_END:
        return None
    if tag != _ITEM or length == _UNDEFINED:
        raise FrameLayoutError("an encapsulated pixel data item that is not one")
    return length
