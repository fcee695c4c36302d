"""The owner's side of the peer protocol's Data.FetchFrames: the asked frames of an
instance held here, so that a node answering WADO-RS /frames for a study it does not hold
moves the frames' bytes between nodes, not the instance's (bench/README.md, stop 34).

An instance kept as a big blob file is cut by node/frame_stream.py, as this node's own
/frames cuts it: read forward from the file, only as far as the last frame asked, every
byte checked by the file's CRC-32 marks before the piece made from it goes out. Any other
copy (a RocksDB value, a hint, a layout frame_stream does not read) is decompressed whole
here (checked by zstd's checksum) and cut as the single-node path cuts a whole read
(dicomweb_render.frames). Either way only the frames go on the wire.

Everything here blocks (disk reads, decompression): node/peer_server.py runs it on threads.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pacsnode.node import frame_stream
from pacsnode.node.blob_files import CHUNK_BYTES, BlobPointer
from pacsnode.node.codec import decompress
from pacsnode.node.dicomweb_render import RenderError, frames
from pacsnode.node.frame_stream import BlobFile, NoFrame, NotStreamed, TooManyPasses
from pacsnode.replication.model import CorruptBlob, StoreError


class FramesOutcome(enum.Enum):
    """The answer's outcome (FramesOutcome on the wire)."""

    SENDING = "sending"
    NOT_HELD = "not-held"
    NO_FRAME = "no-frame"
    LIST_REFUSED = "list-refused"
    UNREADABLE = "unreadable"


@dataclass
class FramesAnswer:
    """What a FetchFrames gets: the outcome, and with SENDING the frames as `events` (each
    frame's number as it starts, then its bytes in chunks; blocking: read on a thread).
    `close` releases the file a streamed answer holds open."""

    outcome: FramesOutcome
    message: str = ""
    transfer_syntax_uid: str = ""
    content_hash: str = ""
    events: Iterator[int | bytes] = field(default_factory=lambda: iter(()))
    streamed: bool = False  # Cut from a blob file as read (else from a whole decompressed copy).

    def close(self) -> None:
        close = getattr(self.events, "close", None)
        if close is not None:
            close()


def open_frames(store: Any, study_instance_uid: str, sop_instance_uid: str, numbers: list[int], *,
                include_hints: bool = False) -> FramesAnswer:
    """The answer to a FetchFrames for the frames `numbers` (1-based, in the order asked)
    of one instance in `store` (node/store.py's RocksStore)."""
    found = store.compressed_copy(study_instance_uid, sop_instance_uid)
    if found is not None:
        kept, record = found
        part10_bytes = record.size_bytes + record.dataset_offset
        if isinstance(kept, BlobPointer) and part10_bytes > frame_stream.STREAM_PART10_BYTES_MIN:
            answer = _streamed(store, kept, part10_bytes, sop_instance_uid, numbers)
            if answer is not None:
                answer.transfer_syntax_uid = record.transfer_syntax_uid
                answer.content_hash = record.content_hash
                return answer
        try:
            part10 = store.read_part10(study_instance_uid, sop_instance_uid)  # Checked; a corrupt copy is logged.
        except KeyError:
            return FramesAnswer(FramesOutcome.NOT_HELD, "instance not held here")
        except (CorruptBlob, StoreError):
            return FramesAnswer(FramesOutcome.UNREADABLE, "this copy failed its check")
        return _cut(part10, numbers, record.transfer_syntax_uid, record.content_hash)
    if include_hints:
        for owner in store.hint_owners():
            stored = store.read_hint(owner, study_instance_uid, sop_instance_uid)
            if stored is not None:
                try:
                    part10 = decompress(stored.blob, sop_instance_uid)
                except CorruptBlob:
                    return FramesAnswer(FramesOutcome.UNREADABLE, "this copy failed its check")
                return _cut(part10, numbers, stored.record.transfer_syntax_uid, stored.record.content_hash)
    return FramesAnswer(FramesOutcome.NOT_HELD, "instance not held here")


def _streamed(store: Any, pointer: BlobPointer, part10_bytes: int, what: str,
              numbers: list[int]) -> FramesAnswer | None:
    """The frames cut from the blob file as it is read; None: not streamed (the whole read then)."""
    def open_file() -> BinaryIO:
        try:
            return open(store.blob_files.path(pointer), "rb")
        except FileNotFoundError:
            raise CorruptBlob(f"blob file of {what} is missing") from None

    blob = BlobFile(open=open_file, size_bytes=pointer.size_bytes, crc32=pointer.crc32, part10_bytes=part10_bytes,
                    what=what, crc32_marks=pointer.crc32_marks)
    try:
        layout, first = frame_stream.layout(blob)
    except NotStreamed:
        return None
    except NoFrame as error:
        return FramesAnswer(FramesOutcome.NO_FRAME, str(error))
    except CorruptBlob:
        return None  # The whole read checks it again and logs it (store.blob.corrupt).
    try:
        asked = frame_stream.check_numbers(layout, numbers)
    except NoFrame as error:
        first.close()
        return FramesAnswer(FramesOutcome.NO_FRAME, str(error))
    except TooManyPasses as error:
        first.close()
        return FramesAnswer(FramesOutcome.LIST_REFUSED, str(error))
    return FramesAnswer(FramesOutcome.SENDING, events=frame_stream.frame_events(blob, layout, first, asked),
                        streamed=True)


def _cut(part10: bytes, numbers: list[int], syntax: str, content_hash: str) -> FramesAnswer:
    """The frames of a whole decompressed copy, as the single-node path cuts them."""
    try:
        cut = frames(part10, numbers)
    except RenderError as error:
        return FramesAnswer(FramesOutcome.NO_FRAME, str(error))
    events: list[int | bytes] = []
    for number, data in zip(numbers, cut):
        events.append(number)
        events.extend(data[offset:offset + CHUNK_BYTES]
                      for offset in range(0, len(data), CHUNK_BYTES))
    return FramesAnswer(FramesOutcome.SENDING, transfer_syntax_uid=syntax, content_hash=content_hash,
                        events=iter(events))
