"""WADO-RS retrieve with `Content-Encoding: zstd`, as pure pieces: the Accept-Encoding
test, the frames the node makes itself, and what a stored frame must declare to go out as
it is kept.

The node keeps each instance as one zstd frame (node/codec.py). A zstd stream may be
several frames one after another, decoded as the concatenation of their contents
(RFC 8878 section 3), so a multipart body can go out as a sequence of frames: each part's
header (and the closing delimiter) a small frame made here at level 1, and each stored
instance's own frame as stored, never decompressed on the node (node/dicomweb.py,
`DicomWeb._zstd_parts`). RFC 9659 (zstd as an HTTP content coding) bounds the window a
frame may declare to 8 MB; a stored frame that declares more is not sent as stored.
"""

from __future__ import annotations

import threading

import zstandard

ZSTD = "zstd"
# RFC 9659 section 3: a zstd Content-Encoding window must not exceed 8 MB (2^23 bytes,
# what the zstd level 19 frames declare; levels -1 and 1 declare 512 KiB at most).
ZSTD_WINDOW_BYTES_MAX = 8 * 1024**2
# The level of the frames made here (part headers, and the few instances that cannot go
# as stored): windows of 512 KiB at most, whatever the input's size.
ENCODE_LEVEL = 1
# zstd's frame header is at most 18 bytes (RFC 8878 3.1.1): enough to read its window.
FRAME_HEADER_BYTES_MAX = 18


def _quality(text: str) -> float | None:
    """An RFC 9110 qvalue ("0", "0.5", "1.000"), or None when it is not one."""
    text = text.strip()
    if not text or len(text) > 5 or text[0] not in "01" or (len(text) > 1 and text[1] != "."):
        return None
    if not all(char.isdigit() for char in text[2:]):
        return None
    value = float(text)
    return value if value <= 1.0 else None


def accepts_zstd(header: str | None) -> bool:
    """Whether an Accept-Encoding header (RFC 9110 12.5.3) accepts zstd: named with a
    quality above 0, or not named and `*` accepted. `zstd;q=0` refuses it, whatever `*`
    says; an entry with a malformed quality counts as not accepted; no header: not asked
    (the answer is not encoded)."""
    if not header:
        return False
    named: float | None = None
    anything: float | None = None
    for item in header.split(","):
        coding, *parameters = item.split(";")
        coding = coding.strip().lower()
        quality: float | None = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                quality = _quality(value)
        if quality is None:
            quality = 0.0
        if coding == ZSTD:
            named = quality if named is None else min(named, quality)
        elif coding == "*":
            anything = quality if anything is None else min(anything, quality)
    if named is not None:
        return named > 0
    return anything is not None and anything > 0


class WindowTooLarge(Exception):
    """A stored frame declares a window over ZSTD_WINDOW_BYTES_MAX (RFC 9659)."""


def check_frame_header(frame: bytes | memoryview, content_bytes: int) -> None:
    """That a stored frame may go out as it is: a zstd frame (CorruptBlob-worthy errors
    are the caller's: zstandard.ZstdError) with its content checksum, of `content_bytes`
    when its header says, whose window is at most ZSTD_WINDOW_BYTES_MAX (else
    WindowTooLarge). Reads its header only. ValueError when the header says otherwise."""
    parameters = zstandard.get_frame_parameters(bytes(frame[:FRAME_HEADER_BYTES_MAX]))
    if not parameters.has_checksum:
        raise ValueError("the stored frame has no content checksum")
    if parameters.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, content_bytes):
        raise ValueError(f"the stored frame holds {parameters.content_size} bytes, not {content_bytes}")
    if parameters.window_size > ZSTD_WINDOW_BYTES_MAX:
        raise WindowTooLarge(f"window of {parameters.window_size} bytes")


_THREAD = threading.local()


def encode(data: bytes | memoryview) -> bytes:
    """`data` as one zstd frame at ENCODE_LEVEL (its content size declared, no checksum:
    the node made these bytes now), with this thread's compressor."""
    compressor: zstandard.ZstdCompressor | None = getattr(_THREAD, "compressor", None)
    if compressor is None:
        compressor = _THREAD.compressor = zstandard.ZstdCompressor(level=ENCODE_LEVEL, write_content_size=True)
    return compressor.compress(data)
