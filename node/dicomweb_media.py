"""DICOMweb media types, as pure logic: Accept headers (PS3.18 8.7), multipart/related
bodies written and read incrementally (RFC 2387, PS3.18 8.6.1.2), and the Part-10 file
meta group of a STOW-RS part.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Callable

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = UNCOMPRESSED | {DEFLATED}  # Pixel data not compressed: another encoding of the dataset decodes nothing.
# What compressed pixel data is decoded to, when a client asks for it by name.
DECODED_SYNTAXES = frozenset({EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2"})


class MediaError(ValueError):
    """A malformed body or header (HTTP 400 with this text)."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header."""

    media_type: str  # Lower case, e.g. "multipart/related", "application/dicom+json", "*/*".
    parameters: dict[str, str] = field(default_factory=dict)  # Names lower case, values unquoted.
    quality: float = 1.0

    @property
    def part_type(self) -> str:
        """The type of the parts of a multipart/related range ("" when not given)."""
        return self.parameters.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str | None:
        return self.parameters.get("transfer-syntax")


def _split_quoted(text: str, separator: str) -> list[str]:
    """Split on `separator` outside double quotes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, best quality first (no header: `*/*`)."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = []
    for index, item in enumerate(_split_quoted(header, ",")):
        pieces = _split_quoted(item, ";")
        media_type = pieces[0].strip().lower()
        if not media_type:
            continue
        parameters: dict[str, str] = {}
        quality = 1.0
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            name, value = name.strip().lower(), value.strip().strip('"')
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
            elif name:
                parameters[name] = value
        ranges.append((-quality, index, MediaRange(media_type, parameters, quality)))
    return [entry for _q, _i, entry in sorted(ranges) if entry.quality > 0]


def accepts_json(ranges: list[MediaRange]) -> bool:
    """QIDO and /metadata answer application/dicom+json (or application/json)."""
    return any(r.media_type in (DICOM_JSON, "application/json", "application/*", "*/*") for r in ranges)


def dicom_syntaxes(ranges: list[MediaRange]) -> list[str] | None:
    """For a study/series/instance retrieve: the transfer syntaxes the client accepts in
    multipart/related; type="application/dicom" ("*" for any); None when it accepts no
    DICOM representation at all (HTTP 406).

    A range without a transfer-syntax parameter accepts the stored syntax (pacsnode never
    transcodes unasked; PS3.18 would have the server convert to Explicit VR Little Endian).
    """
    syntaxes: list[str] = []
    for entry in ranges:
        if entry.media_type in ("*/*", "multipart/*"):
            syntaxes.append("*")
        elif entry.media_type == "multipart/related" and entry.part_type in ("", DICOM, "application/*", "*/*"):
            syntaxes.append(entry.transfer_syntax or "*")
        elif entry.media_type == DICOM:  # Single part, accepted for one instance by many servers.
            syntaxes.append(entry.transfer_syntax or "*")
    return syntaxes or None


def choose_syntax(stored_syntax: str, accepted: list[str],
                  can_decode: Callable[[str], bool] = lambda _syntax: False) -> str | None:
    """The syntax to send an instance in, or None when it cannot be produced:

    - its own when accepted (the stored bytes, unchanged; `*` and the default path);
    - for native pixel data (uncompressed or deflated), the first accepted uncompressed
      syntax: the dataset is re-encoded, the pixel values are not decoded;
    - for compressed pixel data, only when the client names Explicit or Implicit VR Little
      Endian and `can_decode(stored_syntax)` (a pydicom pixel handler is installed for it):
      the pixel data is decoded to native.
    """
    if "*" in accepted or stored_syntax in accepted:
        return stored_syntax
    if stored_syntax in NATIVE:
        return next((syntax for syntax in accepted if syntax in UNCOMPRESSED), None)
    if can_decode(stored_syntax):
        return next((syntax for syntax in accepted if syntax in DECODED_SYNTAXES), None)
    return None


def new_boundary() -> str:
    return "pacsnode-" + os.urandom(12).hex()


def multipart_content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    text = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return text + (f"; transfer-syntax={transfer_syntax}" if transfer_syntax else "")


def part_header(boundary: str, content_type: str, *, first: bool, location: str = "") -> bytes:
    """The delimiter and headers in front of one part (the CRLF before a delimiter belongs to it)."""
    lines = [("" if first else "\r\n") + f"--{boundary}", f"Content-Type: {content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def closing_delimiter(boundary: str, *, empty: bool = False) -> bytes:
    return (("" if empty else "\r\n") + f"--{boundary}--\r\n").encode("ascii")


def multipart_boundary(content_type: str) -> tuple[str, str]:
    """(type parameter, boundary) of a multipart/related Content-Type; MediaError otherwise."""
    ranges = parse_accept(content_type)
    if not ranges or ranges[0].media_type != "multipart/related":
        raise MediaError("the body must be multipart/related")
    boundary = ranges[0].parameters.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise MediaError("multipart/related without a boundary")
    return ranges[0].part_type, boundary


@dataclass
class Part:
    headers: dict[str, str]  # Names lower case.
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


class BodyCutShort(MediaError):
    """The body ended before its closing delimiter; `oversized` is the part it ended in
    when that part was already over the size limit (its bytes read so far)."""

    def __init__(self, message: str, oversized: "OversizedPart | None") -> None:
        super().__init__(message)
        self.oversized = oversized


REFUSED_HEAD_BYTES = 65_536  # What an oversized part keeps of its start: the file meta group names it.


@dataclass
class OversizedPart:
    """A part over `part_bytes_max`: its bytes were read and dropped as they came (the
    body goes on streaming, and the parts after it are read), only its start is kept."""
    headers: dict[str, str]  # Names lower case.
    head: bytes  # The first REFUSED_HEAD_BYTES (at most) of its body.
    size_bytes: int  # Its whole body's length.


class MultipartReader:
    """Reads a multipart body fed in chunks of any size; `feed` returns the parts it
    completed. Only the part being read is held in memory, and at most `part_bytes_max`
    of it: a larger part is read on to its end without keeping its bytes, and comes out
    as an OversizedPart."""

    def __init__(self, boundary: str, *, part_bytes_max: int) -> None:
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buffer = bytearray(b"\r\n")  # So that a delimiter on the first line matches too.
        self._state = "preamble"  # preamble -> headers -> body -> ... -> done
        self._scan_from = 0
        self._headers: dict[str, str] = {}
        self._part_bytes_max = part_bytes_max
        self._refused_head = b""  # In state "skip": the oversized part's start,
        self._refused_bytes = 0  # and how many of its bytes were dropped.

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def buffered_bytes(self) -> int:
        """The body's bytes this reader holds now (of the part being read, or what a
        delimiter may start in; a part over the limit: its first bytes only)."""
        return len(self._buffer) + len(self._refused_head)

    def feed(self, chunk: bytes) -> list[Part | OversizedPart]:
        if self._state == "done":
            return []  # The epilogue after the closing delimiter is ignored.
        self._buffer += chunk
        parts: list[Part | OversizedPart] = []
        while True:
            if self._state in ("preamble", "body", "skip"):
                index = self._buffer.find(self._delimiter, self._scan_from)
                if index < 0:
                    self._scan_from = max(0, len(self._buffer) - len(self._delimiter) + 1)
                    if self._state == "body" and len(self._buffer) > self._part_bytes_max + len(self._delimiter):
                        self._state = "skip"
                        self._refused_head = bytes(self._buffer[:REFUSED_HEAD_BYTES])
                    if self._state == "skip":
                        self._drop_scanned()
                    elif self._state == "preamble" and len(self._buffer) > len(self._delimiter) + 1:
                        # A preamble is ignored (RFC 2046 5.1.1): not kept, however long.
                        del self._buffer[:len(self._buffer) - len(self._delimiter) - 1]
                        self._scan_from = 0
                    return parts
                after = index + len(self._delimiter)
                if len(self._buffer) < after + 2:
                    self._scan_from = index
                    return parts  # Need the two bytes after the delimiter.
                follower = bytes(self._buffer[after:after + 2])
                if follower != b"--" and follower != b"\r\n" and follower[:1] not in (b" ", b"\t"):
                    self._scan_from = index + 1  # The boundary text inside a body, not a delimiter.
                    continue
                if self._state == "body" and index <= self._part_bytes_max:
                    parts.append(Part(self._headers, bytes(self._buffer[:index])))
                elif self._state in ("body", "skip"):
                    head = self._refused_head if self._state == "skip" else bytes(self._buffer[:REFUSED_HEAD_BYTES])
                    parts.append(OversizedPart(self._headers, head, self._refused_bytes + index))
                    self._refused_head, self._refused_bytes = b"", 0
                self._headers = {}
                if self._buffer[after:after + 2] == b"--":
                    self._state = "done"
                    self._buffer.clear()
                    return parts
                del self._buffer[:after]
                self._scan_from = 0
                self._state = "headers"
            if self._state == "headers":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > 16_384:
                        raise MediaError("part headers are too long")
                    return parts
                lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
                # The first line is the rest of the delimiter line (transport padding).
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        self._headers[name.strip().lower()] = value.strip()
                del self._buffer[:end + 4]  # An empty body ends right here, at its delimiter.
                self._scan_from = 0
                self._state = "body"
                continue
            return parts

    def _drop_scanned(self) -> None:
        """State "skip": drop what was searched, keeping the bytes a delimiter may start in."""
        keep = len(self._delimiter) + 1
        if len(self._buffer) > keep:
            dropped = len(self._buffer) - keep
            del self._buffer[:dropped]
            self._refused_bytes += dropped
            self._scan_from = 0

    def close(self) -> None:
        """BodyCutShort unless the closing delimiter was read."""
        if self._state == "skip":
            raise BodyCutShort("the multipart body ended before its closing delimiter, inside a part over the "
                               "size limit", OversizedPart(self._headers, self._refused_head,
                                                           self._refused_bytes + len(self._buffer)))
        if self._state != "done":
            raise BodyCutShort("the multipart body ended before its closing delimiter", None)


# ------------------------------------------------------------------ Part-10 meta

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


@dataclass(frozen=True)
class FileMeta:
    dataset_offset: int
    transfer_syntax_uid: str
    media_storage_sop_class_uid: str
    media_storage_sop_instance_uid: str


def read_file_meta(part10: bytes) -> FileMeta:
    """The file meta group of a Part-10 file (PS3.10 7.1): where the dataset starts and the
    UIDs it names. Reads element by element (a missing or wrong group length is common)."""
    if len(part10) < 132 or part10[128:132] != b"DICM":
        raise MediaError("not a DICOM Part-10 file (no 'DICM' after the 128-byte preamble)")
    position = 132
    values: dict[int, bytes] = {}
    while position + 8 <= len(part10):
        group, element = struct.unpack_from("<HH", part10, position)
        if group != 0x0002:
            break
        vr = part10[position + 4:position + 6]
        if vr in _LONG_VRS:
            if position + 12 > len(part10):
                raise MediaError("file meta cut short")
            (length,) = struct.unpack_from("<L", part10, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", part10, position + 6)
            start = position + 8
        if length == _UNDEFINED or start + length > len(part10):
            raise MediaError("file meta element cut short")
        values[element] = part10[start:start + length]
        position = start + length

    def uid(element: int) -> str:
        return values.get(element, b"").decode("ascii", errors="replace").strip("\x00 ")

    syntax = uid(0x0010)
    if not syntax:
        raise MediaError("file meta without TransferSyntaxUID")
    return FileMeta(position, syntax, uid(0x0002), uid(0x0003))
