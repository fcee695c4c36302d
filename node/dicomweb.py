"""DICOMweb (PS3.18) endpoints: QIDO-RS, WADO-RS and STOW-RS over the Archive API.

The same Archive the DIMSE front end calls serves every request, so any node answers for
the whole cluster, and a URL that names a study becomes a query with that
StudyInstanceUID, which the coordinator sends to that study's owners only. Archive calls
block; they run on Starlette's thread pool, never on the HTTP loop. One exception, with no
wait in it: a WADO-RS retrieve of a study this node owns reads its own blob files that are
in the page cache on the HTTP loop (`DicomWeb._read_all`: a memory copy and a decompress
per instance, no disk).

Complete or flagged (DESIGN): a search or retrieve that could not ask part of the archive
answers 206 Partial Content with what it found, or 503 when it found nothing, each with
`Warning: 299 pacsnode "incomplete: ..."`; 200 means the answer is whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import concurrent.futures
import enum
import functools
import json
import logging
import threading
from collections import OrderedDict
from io import BytesIO
from typing import Any, AsyncGenerator, AsyncIterator, BinaryIO, Callable, Iterator, Protocol

from pydicom import dcmread
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pacsnode.node.blob_files import CHUNK_BYTES, Part10Stream
from pacsnode.node.dicomweb_json import row_to_json
from pacsnode.node.dicomweb_media import (
    BodyCutShort,
    DICOM,
    DICOM_JSON,
    EXPLICIT_VR_LITTLE_ENDIAN,
    MediaError,
    MediaRange,
    OCTET_STREAM,
    MultipartReader,
    OversizedPart,
    Part,
    accepts_json,
    choose_syntax,
    closing_delimiter,
    dicom_syntaxes,
    multipart_boundary,
    multipart_content_type,
    new_boundary,
    parse_accept,
    part_header,
    read_file_meta,
)
from pacsnode.node.dicomweb_zstd import ZSTD, accepts_zstd, encode
from pacsnode.node.dicomweb_stow_budget import (FEED_BYTES_MAX, BudgetWaitTimeout, StowBudget, StowBudgetStats,
                                                StowHold)
from pacsnode.node.dicomweb_metadata import BulkDataError, HeaderTruncated, bulk_value, header_json, with_root
from pacsnode.node.dicomweb_render import (
    DECODE_AS_RGB,
    FrameDecodeError,
    FrameForm,
    NoSuchFrame,
    RenderError,
    decodable,
    decoded_frames,
    decoded_from_frames,
    frame_media_type,
    frame_numbers,
    frames,
    render,
    render_frame,
    viewport_size,
)
from pacsnode.node import frame_stream
from pacsnode.node.frame_stream import BlobFile, FrameLayoutError, NoFrame, NotStreamed, PixelLayout, TooManyPasses
from pacsnode.node.dicomweb_query import QidoError, QidoRequest, parse_qido, sort_key
from pacsnode.node.audit import MAJOR_FAILURE, MINOR_FAILURE, SUCCESS
from pacsnode.node.http_guard import Caller, HttpAudit, caller_of
from pacsnode.node.correct import overlay_json
from pacsnode.node.ingest import InvalidInstance, instance_from_part10
from pacsnode.replication.archive import IncompleteAnswer, InstanceLocation, ReadError, RetrievePlan, Shortfall, WriteStatus
from pacsnode.replication.delete_coordinator import DeleteScope, DeleteStatus
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import Attributes, CorruptBlob
from pacsnode.replication.transport import FrameListRefused, FrameNotFound, PeerError

log = logging.getLogger(__name__)

STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_STORE_FAILED = 0xA701
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

STOW_PARTS_IN_FLIGHT = 8  # Parts of one STOW-RS request stored at once (their bytes are in memory).
STOW_RETRY_AFTER_S = 5  # Retry-After of a 503 when the node's STOW-RS memory stayed full.
# WADO-RS reads: instances per hand-off from the reader threads to the HTTP loop, and how
# many such groups are read ahead (up to READ_GROUPS_AHEAD x READ_GROUP_BYTES in memory,
# plus one instance over the mark per group). A group is read in order on one thread:
# 32 small instances (a 500 x 9 KB study: 16 groups instead of 125 hand-offs) where a
# 525 KB CT makes groups of 4.
READ_GROUP_BYTES = 2 * 1024**2
READ_GROUP_INSTANCES = 32
# Instances smaller than SMALL_PART_BYTES go out with their part headers in one write of
# up to COALESCE_BYTES: a write through Starlette, uvicorn and the socket costs more than
# copying a few small parts into one.
SMALL_PART_BYTES = 64 * 1024
COALESCE_BYTES = 256 * 1024
READ_GROUPS_AHEAD = 8  # As 8 single reads were before grouping: reads from peers still overlap 8 at a time.
# Groups read ahead when this node owns every study of the retrieve: its own copies are
# read here (RocksDB get, zstd), CPU rather than a wait on a peer, and more reads at once
# only contend with the HTTP loop for the cores and the GIL. Two: one group read while the
# one before it is sent. 80 CT 512 x 512 (42 MB), server CPU per study 44-45 ms with 8
# ahead, 37.5-38 with 2 (bench/README.md, DICOMweb).
OWN_READ_GROUPS_AHEAD = 2
# Instances whose blob files `local_reads.kept` looks up at a time, on a reader thread (the
# next batch looked up while this one is read and sent).
LOOKUP_BATCH = 64
# An encoded (Content-Encoding: zstd) retrieve sends the stored frames as stored only when
# those sampled hold at most this share of their Part-10 bytes (DicomWeb._zstd_saves):
# the phantom CT 0.50, noise 1.00 (raw blocks).
ZSTD_STORED_RATIO_MAX = 0.9
ZSTD_SAMPLES = 3


def warning_header(text: str) -> str:
    """An RFC 7234 Warning with code 299 as PS3.18 8.4.3 uses it."""
    return '299 pacsnode "' + text.replace('"', "'") + '"'


def _incomplete(shortfall: Shortfall) -> dict[str, str]:
    return {"Warning": warning_header(shortfall.describe())}


class LocalHeaders(Protocol):
    """The /metadata JSON of instances this node holds, kept beside its index
    (node/http_views.py's StoreHeaders): built from the header the first time it is asked
    for, then read back. None: not held here (the archive's read is used)."""

    def header(self, location: InstanceLocation) -> bytes | None: ...


class LocalReads(Protocol):
    """An instance this node holds, read for WADO-RS without the archive's round
    (node/http_views.py's StoreReads: a blob file read into the calling thread's reused
    buffer, checked by its CRC-32, and decompressed whole). None: not here, a blob file too
    big to read whole, or failing a check (then the archive's read is used, as for any
    other instance). A copy that fails
    a check is not logged here: the archive's read of it logs it (store.blob.corrupt),
    once, and reads another owner's copy."""

    def part10(self, location: InstanceLocation) -> tuple[bytes, int] | None:
        """The Part-10 bytes and the dataset's offset in them, or None."""

    def kept(self, location: InstanceLocation) -> Any | None:
        """What `read_cached` reads for `location` (a blob file of up to a few MB), or None
        (not here, or not so kept). Looks it up: called on a reader thread."""

    def read_cached(self, kept: Any) -> bytes | None:
        """The Part-10 bytes of what `kept` found, checked, when all of it is in the page
        cache; None when it is not; CorruptBlob (not logged) when it fails a check. Never
        waits on the disk and costs about a memory copy of the bytes: the HTTP loop calls it."""

    def blob_file(self, location: InstanceLocation) -> Any | None:
        """The blob file an instance is kept in here, of any size (its pointer as
        `.pointer`, its Part-10 length as `.part10_bytes`), or None: not here, or not kept
        as a file. A lookup: called on a reader thread."""

    def open_blob(self, kept: Any) -> BinaryIO:
        """The file `blob_file` found, open for reading (unchecked: the reader checks it);
        CorruptBlob when it is missing."""

    def stored_bytes(self, location: InstanceLocation) -> int | None:
        """The bytes of the instance's stored zstd frame (the compressed size: a blob file's
        size from its pointer, a RocksDB value's length), unchecked; None: not here. A
        lookup: called on a reader thread."""

    def stored_frame(self, location: InstanceLocation) -> "bytes | memoryview | FrameChunks | None":
        """The instance's zstd frame as stored, checked as its read checks it today (a blob
        file by its pointer's CRC-32, a RocksDB value by zstd's checksum), or for a big blob
        file the chunks of it (FrameChunks, closed by the caller); None: not here, or its
        window is over RFC 9659's bound; CorruptBlob (not logged) when a check fails. A
        lookup and a read: called on a reader thread."""


class FrameChunks(Protocol):
    """A stored frame too big to read whole, handed out a chunk at a time (blocking)."""

    def next_chunk(self) -> bytes:
        """The next chunk; b"" after the last; CorruptBlob instead of the last one when the
        file fails its check."""

    def close(self) -> None: ...


class MetadataCache:
    """Serialized /metadata of recently asked instances (instances never change: first
    writer wins), bounded in bytes."""

    def __init__(self, bytes_max: int) -> None:
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._bytes_max = bytes_max
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self._bytes_max:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._entries[key] = value
            self._bytes += len(value)
            while self._bytes > self._bytes_max:
                _key, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)


class TranscodeError(Exception):
    """An instance could not be converted to the transfer syntax choose_syntax picked."""


def transcode(part10: bytes, syntax: str) -> bytes:
    """The instance in another transfer syntax: native pixel data (uncompressed or deflated)
    is re-encoded without decoding its values; compressed pixel data is decoded by
    pydicom's pixel handlers (Dataset.decompress with DECODE_AS_RGB: YBR colour becomes
    RGB and the converted header says so, as pydicom documents; frames decoded on their
    own keep the stored colour space instead, dicomweb_render.decoded_frames), keeping
    the instance's UIDs. Raises TranscodeError."""
    try:
        dataset = dcmread(BytesIO(part10))
        if dataset.file_meta.TransferSyntaxUID.is_compressed:
            dataset.decompress(as_rgb=DECODE_AS_RGB, generate_instance_uid=False)
        target = UID(syntax)
        dataset.file_meta.TransferSyntaxUID = target
        output = BytesIO()
        dataset.save_as(output, implicit_vr=target.is_implicit_VR, little_endian=target.is_little_endian,
                        enforce_file_format=True)
    except Exception as error:  # pydicom and its pixel handlers raise many types
        raise TranscodeError(f"cannot convert to {syntax}: {type(error).__name__}") from error
    return output.getvalue()


_DELETE_HTTP_STATUS = {
    DeleteStatus.DELETED: 204,
    DeleteStatus.NOT_FOUND: 404,
    DeleteStatus.INCOMPLETE: 202,
    DeleteStatus.QUORUM_FAILED: 503,
    DeleteStatus.NOT_JOINED: 503,
}


class StowOutcome(enum.Enum):
    """How a STOW-RS request ended, as docs/conformance-statement.md 9.4 lists them."""
    STORED = "every part stored"
    SOME_STORED = "some parts stored; others refused, or the body malformed after them"
    NONE_STORED = "no part stored, none over the size limit, the body well formed"
    TOO_LARGE = "no part stored, a part over the size limit"
    MALFORMED = "no part stored, none over the size limit, the body malformed"
    EMPTY = "a well-formed body with no parts"
    BUSY = "no part stored, the rest of the body not read: the node's STOW-RS memory stayed full"


STOW_HTTP_STATUS = {
    StowOutcome.STORED: 200,
    StowOutcome.SOME_STORED: 202,
    StowOutcome.NONE_STORED: 409,
    StowOutcome.TOO_LARGE: 413,
    StowOutcome.MALFORMED: 400,
    StowOutcome.EMPTY: 400,
    StowOutcome.BUSY: 503,
}


def stow_outcome(*, stored: int, failed: int, oversized: int, malformed: bool, busy: bool = False) -> StowOutcome:
    """The outcome of a STOW-RS request from how many parts were stored and refused (of
    these, how many for their size), whether the body was malformed, and whether the rest
    of it was left unread because the node's STOW-RS memory budget stayed full (`busy`)."""
    if stored:
        return StowOutcome.SOME_STORED if failed or malformed or busy else StowOutcome.STORED
    if busy:
        return StowOutcome.BUSY
    if oversized:
        return StowOutcome.TOO_LARGE
    if malformed:
        return StowOutcome.MALFORMED
    return StowOutcome.NONE_STORED if failed else StowOutcome.EMPTY


class DicomWeb:
    """The /dicom-web routes of one node."""

    def __init__(self, archive: Any, *, instance_size_bytes_max: int, qido_result_max: int,
                 metadata_cache_bytes: int = 64 * 1024**2, read_parallelism: int = 8,
                 audit: HttpAudit | None = None, local_headers: LocalHeaders | None = None,
                 deletes_need_admin: bool = False, owns: Callable[[str], bool] | None = None,
                 local_reads: LocalReads | None = None, stow_bytes_max: int = 2 * 1024**3,
                 stow_wait_s: float = 30.0) -> None:
        """`owns(study_instance_uid)`: whether this node is one of the study's owners (its
        reads then take its own copies: OWN_READ_GROUPS_AHEAD); None: reads may wait on peers.
        `local_reads`: those own copies read straight from the store (with `owns` only).
        `stow_bytes_max`: the STOW-RS bytes all requests hold in memory together (a request
        waits for its share at most `stow_wait_s`): node/dicomweb_stow_budget.py."""
        self._archive = archive
        self._owns = owns
        self._local_reads = local_reads if owns is not None else None
        self._local_headers = local_headers
        self._deletes_need_admin = deletes_need_admin  # A TLS cluster: DELETE takes an admin certificate.
        self._audit = audit  # QIDO, WADO and STOW requests in the audit trail (node/http_guard.py).
        self._instance_size_bytes_max = instance_size_bytes_max
        self._stow_budget = StowBudget(stow_bytes_max, instance_size_bytes_max, wait_s=stow_wait_s)
        self._qido_result_max = qido_result_max
        self._metadata = MetadataCache(metadata_cache_bytes)
        self._readers = concurrent.futures.ThreadPoolExecutor(max_workers=read_parallelism,
                                                              thread_name_prefix="pacsnode-wado")

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

    def stow_statistics(self) -> StowBudgetStats:
        """The STOW-RS memory budget's figures (/metrics: node/http_server.py StowCollector)."""
        return self._stow_budget.statistics()

    def routes(self) -> list[Route]:
        def qido(resource: str) -> Callable[[Request], Any]:
            async def endpoint(request: Request) -> Response:
                return await self.search(request, resource)
            return endpoint

        return [
            Route("/studies", qido("studies"), methods=["GET"]),
            Route("/studies", self.stow, methods=["POST"]),
            Route("/series", qido("series"), methods=["GET"]),
            Route("/instances", qido("instances"), methods=["GET"]),
            Route("/studies/{study}", self.retrieve, methods=["GET"]),
            Route("/studies/{study}", self.delete, methods=["DELETE"]),
            Route("/studies/{study}/series/{series}", self.delete, methods=["DELETE"]),
            Route("/studies/{study}/series/{series}/instances/{instance}", self.delete, methods=["DELETE"]),
            Route("/studies/{study}", self.stow, methods=["POST"]),
            Route("/studies/{study}/metadata", self.metadata, methods=["GET"]),
            Route("/studies/{study}/series", qido("series"), methods=["GET"]),
            Route("/studies/{study}/instances", qido("instances"), methods=["GET"]),
            Route("/studies/{study}/series/{series}", self.retrieve, methods=["GET"]),
            Route("/studies/{study}/series/{series}/metadata", self.metadata, methods=["GET"]),
            Route("/studies/{study}/series/{series}/instances", qido("instances"), methods=["GET"]),
            Route("/studies/{study}/series/{series}/instances/{instance}", self.retrieve, methods=["GET"]),
            Route("/studies/{study}/series/{series}/instances/{instance}/metadata", self.metadata, methods=["GET"]),
            Route("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}", self.frames,
                  methods=["GET"]),
            Route("/studies/{study}/series/{series}/instances/{instance}/rendered", self.rendered, methods=["GET"]),
            Route("/studies/{study}/series/{series}/instances/{instance}/bulk/{path:path}", self.bulk,
                  methods=["GET"]),
            Route("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered", self.rendered,
                  methods=["GET"]),
            Route("/studies/{study}/rendered", self.rendered, methods=["GET"]),
            Route("/studies/{study}/series/{series}/rendered", self.rendered, methods=["GET"]),
            Route("/studies/{study}/thumbnail", self.thumbnail, methods=["GET"]),
            Route("/studies/{study}/series/{series}/thumbnail", self.thumbnail, methods=["GET"]),
            Route("/studies/{study}/series/{series}/instances/{instance}/thumbnail", self.thumbnail, methods=["GET"]),
        ]

    # ------------------------------------------------------------------ QIDO-RS
    async def search(self, request: Request, resource: str) -> Response:
        if not accepts_json(parse_accept(request.headers.get("accept"))):
            return PlainTextResponse("QIDO-RS answers application/dicom+json only", status_code=406)
        try:
            qido = parse_qido(resource, request.query_params.multi_items(),
                              study_instance_uid=request.path_params.get("study"),
                              series_instance_uid=request.path_params.get("series"))
        except QidoError as error:
            return PlainTextResponse(str(error), status_code=400)
        rows, shortfall = await run_in_threadpool(self._collect, qido.query)
        if self._audit is not None:
            self._audit.searched(caller_of(request), qido.query, matches=len(rows), complete=not shortfall)
        rows.sort(key=sort_key(qido.query.level))
        limit = self._qido_result_max if qido.limit is None else min(qido.limit, self._qido_result_max)
        page = rows[qido.offset:qido.offset + limit]
        root = _root(request)
        body = [row_to_json(row, qido.keywords, _retrieve_extra(root, qido.query.level, row)) for row in page]
        headers: dict[str, str] = {}
        warnings = []
        remaining = len(rows) - qido.offset - len(page)
        if remaining > 0:
            warnings.append(warning_header(f"There are {remaining} additional results that can be requested"))
        status = 200
        if shortfall:
            warnings.append(warning_header(shortfall.describe()))
            status = 206 if page else 503
            log.warning("dicomweb.search.incomplete level=%s matches=%d unreachable_studies=%d unreachable_ranges=%d",
                        qido.query.level, len(rows), shortfall.studies, shortfall.ranges)
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        log.info("dicomweb.search.done level=%s matches=%d returned=%d", qido.query.level, len(rows), len(page))
        return JSONResponse(body, status_code=status, headers=headers, media_type=DICOM_JSON)

    def _collect(self, query: Query) -> tuple[list[Attributes], Shortfall]:
        rows: list[Attributes] = []
        shortfall = Shortfall()
        found = self._archive.find(query)
        try:
            for row in found:
                rows.append(row)
        except IncompleteAnswer as error:
            shortfall = error.shortfall
        finally:
            close = getattr(found, "close", None)
            if close is not None:
                close()
        return rows, shortfall

    # ------------------------------------------------------------------ WADO-RS
    def _locate(self, request: Request) -> tuple[Query, RetrievePlan]:
        conditions = [Condition("StudyInstanceUID", "UI", request.path_params["study"])]
        level = "STUDY"
        if "series" in request.path_params:
            conditions.append(Condition("SeriesInstanceUID", "UI", request.path_params["series"]))
            level = "SERIES"
        if "instance" in request.path_params:
            conditions.append(Condition("SOPInstanceUID", "UI", request.path_params["instance"]))
            level = "IMAGE"
        query = Query(level=level, conditions=tuple(conditions))
        return query, self._archive.locate(query)

    async def retrieve(self, request: Request) -> Response:
        accepted = dicom_syntaxes(parse_accept(request.headers.get("accept")))
        if accepted is None:
            return PlainTextResponse('this resource is available as multipart/related; type="application/dicom"',
                                     status_code=406)
        query, plan = await run_in_threadpool(self._locate, request)
        if not plan.locations:
            if plan.shortfall:
                return PlainTextResponse(plan.shortfall.describe(), status_code=503, headers=_incomplete(plan.shortfall))
            return PlainTextResponse("no such instances", status_code=404)
        chosen = [(location, choose_syntax(location.transfer_syntax_uid, accepted, decodable))
                  for location in plan.locations]
        sendable = [(location, syntax) for location, syntax in chosen if syntax is not None]
        if not sendable:
            return PlainTextResponse("no stored instance is available in an accepted transfer syntax "
                                     f"(stored: {', '.join(sorted({l.transfer_syntax_uid for l in plan.locations}))})",
                                     status_code=406)
        warnings = []
        if len(sendable) < len(chosen):
            warnings.append(warning_header(f"{len(chosen) - len(sendable)} instances are not available "
                                           "in an accepted transfer syntax"))
        if plan.shortfall:
            warnings.append(warning_header(plan.shortfall.describe()))
        status = 206 if warnings else 200
        boundary = new_boundary()
        root = _root(request)
        log.info("dicomweb.retrieve.start level=%s instances=%d unreachable=%d", query.level, len(sendable),
                 plan.unreachable)
        headers = {"Warning": ", ".join(warnings)} if warnings else {}
        heads = [part_header(boundary, f"{DICOM}; transfer-syntax={syntax}", first=index == 0,
                             location=_instance_url(root, location))
                 for index, (location, syntax) in enumerate(sendable)]
        audited = (caller_of(request), plan.locations, status) if self._audit is not None else None
        # The answer depends on Accept-Encoding (zstd or not), whichever is sent.
        headers["Vary"] = "Accept-Encoding"
        if self._zstd_sendable(request, sendable) and \
                await asyncio.wrap_future(self._readers.submit(self._zstd_saves, sendable)):
            headers["Content-Encoding"] = ZSTD  # Chunked: the frames' lengths are known only as they are read.
            return StreamingResponse(self._zstd_parts(sendable, boundary, heads, audited), status_code=status,
                                     headers=headers, media_type=multipart_content_type(DICOM, boundary))
        length = _body_length(sendable, heads, closing_delimiter(boundary))
        if length is not None:
            # The stored bytes go out as they are, and the index knows their length: say it
            # first, so that the server writes each part straight to the socket (a chunked
            # body costs a copy of every byte).
            headers["Content-Length"] = str(length)
        return StreamingResponse(self._parts(sendable, boundary, heads, audited, exact=length is not None),
                                 status_code=status, headers=headers,
                                 media_type=multipart_content_type(DICOM, boundary))

    def _zstd_sendable(self, request: Request, sendable: list[tuple[InstanceLocation, str]]) -> bool:
        """Whether the retrieve goes out with Content-Encoding: zstd, each stored frame as
        stored: the client accepts zstd, this node owns every study (its copies are at hand,
        `local_reads`), and every instance goes out as stored, uncorrected. Otherwise (a
        corrected study, a transcode, a study read from peers) the answer is not encoded: those
        bytes would have to be compressed here, CPU on the node for bytes on the wire, where
        the as-stored frames cost the node less than today's answer."""
        return (self._local_reads is not None and accepts_zstd(request.headers.get("accept-encoding"))
                and self._owns_all(sendable)
                and all(syntax == location.transfer_syntax_uid and not location.correction
                        for location, syntax in sendable))

    def _zstd_saves(self, sendable: list[tuple[InstanceLocation, str]]) -> bool:
        """Whether the stored frames are worth sending as stored: sampled on up to
        ZSTD_SAMPLES instances (the first, the last, one between; a study's instances are
        alike), their stored frames hold at most ZSTD_STORED_RATIO_MAX of their Part-10
        bytes. Frames that did not compress (noise: raw blocks) save nothing on the wire and
        cost the node more CPU sent as stored (each read on a reader thread, where the plain
        answer reads the page cache on the HTTP loop: 36.5 against 27.2 ms a 42 MB study),
        so such a study goes out plain. On a reader thread."""
        reads = self._local_reads
        assert reads is not None  # _zstd_sendable said so.
        picks = sorted({0, len(sendable) // 2, len(sendable) - 1})[:ZSTD_SAMPLES]
        stored = part10 = 0
        for index in picks:
            location = sendable[index][0]
            size = reads.stored_bytes(location)
            if size is None or location.part10_bytes <= 0:
                continue
            stored += size
            part10 += location.part10_bytes
        return part10 == 0 or stored <= ZSTD_STORED_RATIO_MAX * part10

    def _zstd_group(self, group: list[tuple[InstanceLocation, bytes]]) -> "_ZstdGroup":
        """One group of an encoded retrieve (each instance with its part header), on a
        reader thread: each part header a frame made here, each instance its stored frame
        (`local_reads.stored_frame`), small parts joined into writes of about COALESCE_BYTES.
        An instance whose stored frame cannot go as stored (a window over the bound, not
        here) or fails its check (CorruptBlob: the archive's read then logs it and reads
        another owner's copy, as today) is read as today and compressed anew at level 1."""
        reads = self._local_reads
        assert reads is not None  # _zstd_sendable said so.
        pieces: list[tuple[bytes | memoryview | FrameChunks, int]] = []
        joined: list[bytes | memoryview] = []
        joined_bytes = 0
        joined_parts = 0

        def flush() -> None:
            nonlocal joined, joined_bytes, joined_parts
            if joined:
                pieces.append((b"".join(joined), joined_parts))
                joined, joined_bytes, joined_parts = [], 0, 0

        for location, head in group:
            try:
                head_frame = encode(head)
                try:
                    stored = reads.stored_frame(location)
                    corrupt = False
                except CorruptBlob:
                    stored, corrupt = None, True
                body: bytes | memoryview | FrameChunks
                if stored is None:
                    opened, _offset = self._open(location, own=not corrupt)
                    body = _EncodedStream(opened) if isinstance(opened, Part10Stream) else encode(opened)
                else:
                    body = stored
                if isinstance(body, (bytes, memoryview)) and len(body) < SMALL_PART_BYTES:
                    joined += (head_frame, body)
                    joined_bytes += len(head_frame) + len(body)
                    joined_parts += 1
                    if joined_bytes >= COALESCE_BYTES:
                        flush()
                    continue
                joined.append(head_frame)
                flush()
                pieces.append((body, 1))
            except (ReadError, CorruptBlob) as error:
                flush()
                return pieces, error
        flush()
        return pieces, None

    async def _zstd_parts(self, sendable: list[tuple[InstanceLocation, str]], boundary: str, heads: list[bytes],
                          audited: tuple[Caller, list[InstanceLocation], int] | None = None) -> AsyncIterator[bytes]:
        """The multipart body as a sequence of zstd frames (Content-Encoding: zstd, RFC 8878
        section 3: decoded, the frames' contents one after another): the bytes `_parts`
        would send, each stored instance's frame as stored (never decompressed here). Read in
        groups on the reader threads, OWN_READ_GROUPS_AHEAD ahead; a big blob file a chunk at
        a time, the next while the one before it is sent. A failed check breaks the body
        off (no closing frame, no last chunk of the chunked body), as `_parts` does."""
        groups: list[list[tuple[InstanceLocation, bytes]]] = []
        start = 0
        for group in _read_groups(sendable):
            groups.append([(location, heads[start + offset]) for offset, (location, _syntax) in enumerate(group)])
            start += len(group)
        futures: list[concurrent.futures.Future[_ZstdGroup]] = []
        pending: list[tuple[bytes | memoryview | FrameChunks, int]] = []
        current: FrameChunks | None = None
        ahead: concurrent.futures.Future[bytes] | None = None
        writes = _Unaligned()
        sent = 0
        finished = False
        index = 0
        try:
            while index < len(groups) or futures:
                while index < len(groups) and len(futures) < OWN_READ_GROUPS_AHEAD:
                    futures.append(self._readers.submit(self._zstd_group, groups[index]))
                    index += 1
                read, error = await asyncio.wrap_future(futures.pop(0))
                pending = list(read)
                while pending:
                    piece, parts = pending.pop(0)
                    if isinstance(piece, (bytes, memoryview)):
                        for write in writes.put(piece):
                            yield write  # type: ignore[misc]  # Starlette sends memoryviews as they are.
                        sent += parts
                        continue
                    current = piece
                    ahead = self._readers.submit(piece.next_chunk)
                    chunk = await asyncio.wrap_future(ahead)
                    while chunk:
                        ahead = self._readers.submit(piece.next_chunk)
                        for write in writes.put(chunk):
                            yield write  # type: ignore[misc]
                        chunk = await asyncio.wrap_future(ahead)
                    ahead = None
                    current = None
                    piece.close()
                    sent += parts
                if error is not None:
                    raise error  # After the group's instances read before it.
            finished = True
        except (ReadError, CorruptBlob) as error:
            # The instances before the unreadable one go out whole (and their last byte held
            # back); then the body is broken off: no closing frame.
            yield writes.end(b"")
            log.error("dicomweb.retrieve.unreadable sent=%d reason=%s encoding=zstd", sent, error)
            raise
        finally:
            if current is not None:
                _close_chunks_when_read(current, ahead)
            for piece, _parts in pending:
                if not isinstance(piece, (bytes, memoryview)):
                    piece.close()
            for future in futures:
                if not future.cancel():
                    future.add_done_callback(_close_zstd_group)
            if audited is not None and not finished and self._audit is not None:
                self._audit.retrieved(audited[0], audited[1], sent=sent, outcome=MAJOR_FAILURE, what="retrieve")
        if audited is not None and self._audit is not None:
            self._audit.retrieved(audited[0], audited[1], sent=sent, what="retrieve",
                                  outcome=SUCCESS if audited[2] == 200 else MINOR_FAILURE)
        yield writes.end(encode(closing_delimiter(boundary, empty=sent == 0)))

    def _open(self, location: InstanceLocation, own: bool = False) -> tuple[bytes | Part10Stream, int]:
        """`read`, or an own copy kept as a blob file as a Part10Stream (node/blob_files.py)
        when the archive offers `open_streamed`. With `own` (this node owns every study of
        the retrieve) an uncorrected instance kept here as a blob file comes from
        `local_reads`, as the archive's own-copy read would take it, with one lookup less
        and no copy of the file into memory."""
        if own and self._local_reads is not None and not location.correction:
            found = self._local_reads.part10(location)
            if found is not None:
                return found
        open_streamed = getattr(self._archive, "open_streamed", None)
        if open_streamed is not None:
            opened: tuple[bytes | Part10Stream, int] = open_streamed(location)
            return opened
        read: tuple[bytes, int] = self._archive.read(location)
        return read

    async def _read_all(self, sendable: list[tuple[InstanceLocation, str]]) -> AsyncGenerator[_Opened, None]:
        """Each instance's bytes (or stream), in order. When this node owns every study of
        the retrieve and its blob files are in the page cache, they are read and
        decompressed on the HTTP loop itself, one at a time just before they are sent
        (`local_reads.read_cached`; only the lookups are on a reader thread, LOOKUP_BATCH
        at a time): the bytes are still in this core's cache when the socket copies them,
        and no reader thread hands them over. 80 CT (42 MB): server CPU per study 35-36 ->
        29-31 ms (bench/README.md, DICOMweb). Everything else (instances owned elsewhere,
        RocksDB values, corrected or transcoded instances, big blob files) is read ahead
        on the reader threads (`_read_ahead`), a run of such instances at a time; and so is
        the rest of the retrieve from the first file not in the page cache (a cold study
        is read there, with its reads overlapping)."""
        own = self._owns_all(sendable)
        reads = self._local_reads
        if not own or reads is None:
            async for opened in self._read_ahead(sendable, own):
                yield opened
            return

        def lookup(batch: list[tuple[InstanceLocation, str]]) -> list[Any]:
            return [reads.kept(location) if syntax == location.transfer_syntax_uid and not location.correction
                    else None for location, syntax in batch]

        batches = [sendable[start:start + LOOKUP_BATCH] for start in range(0, len(sendable), LOOKUP_BATCH)]
        looking: concurrent.futures.Future[list[Any]] | None = self._readers.submit(lookup, batches[0])
        files: list[Any] = []  # What the lookups found so far, by position in `sendable`.

        async def looked_up(position: int) -> bool:
            """Whether `files` reaches `position` (waiting for the next batch's lookups)."""
            nonlocal looking
            if position < len(files):
                return True
            if looking is None:
                return False
            found: list[Any] = await asyncio.wrap_future(looking)
            files.extend(found)
            following = len(files) // LOOKUP_BATCH  # Every batch but the last is whole.
            looking = (self._readers.submit(lookup, batches[following])
                       if len(files) < len(sendable) else None)
            return True

        position = 0
        failed = ""  # The SOP Instance UID of the copy read_cached found corrupt, if any.
        try:
            while await looked_up(position):
                if files[position] is None:  # A run of instances not kept as files: read ahead on threads.
                    end = position + 1
                    while await looked_up(end) and files[end] is None:
                        end += 1
                    async for opened in self._read_ahead(sendable[position:end], own):
                        yield opened
                    position = end
                    continue
                try:
                    body = reads.read_cached(files[position])
                except CorruptBlob:
                    # This copy failed a check: it goes to the archive's read (which logs it
                    # once and reads another copy), not to `local_reads` again; the rest as below.
                    failed = files[position].location.sop_instance_uid
                    break
                if body is None:
                    break  # Not in the page cache: this and the rest read ahead on threads.
                position += 1
                yield _Opened(body)
        finally:
            if looking is not None:
                looking.cancel()
        if position < len(sendable):
            async for opened in self._read_ahead(sendable[position:], own, failed):
                yield opened

    async def _read_ahead(self, sendable: list[tuple[InstanceLocation, str]],
                          own: bool, failed: str = "") -> AsyncGenerator[_Opened, None]:
        """Reads ahead on the reader threads (a cluster read waits on a peer, a local one
        decompresses; a blob file is opened and its first chunk decompressed when it goes
        out as stored); the HTTP loop only awaits them. Instances are read in groups of up
        to READ_GROUP_BYTES (at most READ_GROUP_INSTANCES), READ_GROUPS_AHEAD groups at a
        time: one hand-off between the threads and the loop per group, not per instance.
        `failed`: an instance whose own copy read_cached found corrupt, read through the
        archive only."""
        groups = _read_groups(sendable)
        groups_ahead = OWN_READ_GROUPS_AHEAD if own else READ_GROUPS_AHEAD
        futures: list[concurrent.futures.Future[_Group]] = []
        pending: list[_Opened] = []  # Of the group being yielded.
        index = 0
        try:
            while index < len(groups) or futures:
                while index < len(groups) and len(futures) < groups_ahead:
                    futures.append(self._readers.submit(self._open_group, groups[index], own, failed))
                    index += 1
                read, error = await asyncio.wrap_future(futures.pop(0))
                pending = list(read)
                while pending:
                    yield pending.pop(0)
                if error is not None:
                    raise error  # After the group's instances read before it, as if read one by one.
        finally:
            for opened in pending:  # The body stopped inside a group.
                opened.close()
            for future in futures:
                if not future.cancel():
                    future.add_done_callback(_close_streams)

    def _owns_all(self, sendable: list[tuple[InstanceLocation, str]]) -> bool:
        """Whether this node owns every study the retrieve reads from: its reads are then
        OWN_READ_GROUPS_AHEAD groups ahead (else READ_GROUPS_AHEAD), and `local_reads`'."""
        owns = self._owns
        return owns is not None and all(owns(study) for study in {location.study_instance_uid
                                                                 for location, _syntax in sendable})

    def _open_group(self, group: list[tuple[InstanceLocation, str]], own: bool = False, failed: str = "") -> _Group:
        read: list[_Opened] = []
        for location, syntax in group:
            try:
                body, _offset = self._open(location, own and location.sop_instance_uid != failed)
                opened = _Opened(body)
                if isinstance(body, Part10Stream) and syntax == location.transfer_syntax_uid:
                    try:
                        first = _next_chunk(body)
                    except CorruptBlob:
                        body.close()
                        raise
                    if len(first) == len(body):
                        # All of it in one chunk, its checksum checked by that read: closed
                        # here, and sent as bytes, with no stream left for the HTTP loop.
                        body.close()
                        opened = _Opened(first)
                    else:
                        opened.first = first
                read.append(opened)
            except (ReadError, CorruptBlob) as error:
                return read, error
        return read, None

    async def _parts(self, sendable: list[tuple[InstanceLocation, str]], boundary: str, heads: list[bytes],
                     audited: tuple[Caller, list[InstanceLocation], int] | None = None, *,
                     exact: bool = False) -> AsyncIterator[bytes]:
        """The multipart body: each part's header, then its bytes (the stored ones unless a
        transcode was asked); instances under SMALL_PART_BYTES are joined with their part
        headers into writes of about COALESCE_BYTES, bigger ones never copied. With `exact`
        (Content-Length stated), each instance must be as long as the index said."""
        sent = 0
        finished = False
        small = _SmallParts()  # Not yet written.
        reads = self._read_all(sendable)
        try:
            index = 0
            async for opened in reads:
                location, syntax = sendable[index]
                body = opened.body
                if isinstance(body, Part10Stream) and syntax == location.transfer_syntax_uid:
                    ahead: concurrent.futures.Future[bytes] | None = None
                    try:
                        if exact and len(body) != location.part10_bytes:
                            raise ReadError(f"instance {location.sop_instance_uid} changed length since the "
                                            "retrieve began")
                        if small.parts:
                            sent += small.parts
                            yield small.take()
                        yield heads[index]
                        # Decompressed a chunk at a time on the reader threads (the first one with
                        # its group), each next one while the one before it is sent: one read in
                        # flight, two chunks in memory at most.
                        # The read of the last chunk checks the checksum: no read after it.
                        chunk = opened.first
                        if chunk is None:
                            ahead = self._readers.submit(_next_chunk, body)
                            chunk = await asyncio.wrap_future(ahead)
                        left = len(body) - len(chunk)
                        while chunk:
                            ahead = self._readers.submit(_next_chunk, body) if left > 0 else None
                            yield chunk
                            chunk = await asyncio.wrap_future(ahead) if ahead is not None else b""
                            left -= len(chunk)
                    finally:
                        _close_when_read(body, ahead)
                    index += 1
                    sent += 1
                    continue
                if isinstance(body, Part10Stream):
                    with body:
                        part10 = await run_in_threadpool(body.read_all)  # A transcode decodes it whole.
                else:
                    part10 = body
                if syntax != location.transfer_syntax_uid:
                    part10 = await run_in_threadpool(transcode, part10, syntax)
                if exact and len(part10) != location.part10_bytes:
                    # Another copy won a conflict since the plan was made: the stated length
                    # is wrong, and a body of another length must not look complete.
                    raise ReadError(f"instance {location.sop_instance_uid} changed length since the retrieve began")
                if len(part10) < SMALL_PART_BYTES:
                    index += 1
                    if small.add(heads[index - 1], part10):
                        sent += small.parts
                        yield small.take()
                    continue
                if small.parts:
                    sent += small.parts
                    yield small.take()
                yield heads[index]
                yield part10
                index += 1
                sent += 1
            if small.parts:
                sent += small.parts
                yield small.take()
            finished = True
        except (ReadError, TranscodeError, CorruptBlob) as error:
            if small.parts:  # The instances before the unreadable one go out whole.
                sent += small.parts
                yield small.take()
            # The status line has gone: break the body off (no closing delimiter), so that
            # the client sees a failed transfer, never a complete-looking short one.
            log.error("dicomweb.retrieve.unreadable sent=%d reason=%s", sent, error)
            raise
        finally:
            await reads.aclose()
            if audited is not None and not finished and self._audit is not None:
                self._audit.retrieved(audited[0], audited[1], sent=sent, outcome=MAJOR_FAILURE, what="retrieve")
        if audited is not None and self._audit is not None:
            self._audit.retrieved(audited[0], audited[1], sent=sent, what="retrieve",
                                  outcome=SUCCESS if audited[2] == 200 else MINOR_FAILURE)
        yield closing_delimiter(boundary, empty=sent == 0)

    async def metadata(self, request: Request) -> Response:
        if not accepts_json(parse_accept(request.headers.get("accept"))):
            return PlainTextResponse("metadata is available as application/dicom+json", status_code=406)
        _query, plan = await run_in_threadpool(self._locate, request)
        if not plan.locations:
            if plan.shortfall:
                return PlainTextResponse(plan.shortfall.describe(), status_code=503, headers=_incomplete(plan.shortfall))
            return PlainTextResponse("no such instances", status_code=404)
        root = _root(request)
        try:
            parts = await run_in_threadpool(self._metadata_parts, plan.locations, root)
        except ReadError as error:
            log.error("dicomweb.metadata.unreadable reason=%s", error)
            return PlainTextResponse("an instance could not be read; see the node log", status_code=503)
        headers = _incomplete(plan.shortfall) if plan.shortfall else {}
        if self._audit is not None:
            self._audit.retrieved(caller_of(request), plan.locations, sent=len(parts), what="metadata",
                                  outcome=MINOR_FAILURE if plan.shortfall else SUCCESS)
        body = with_root(b"[" + b",".join(parts) + b"]", root)
        return Response(body, status_code=206 if plan.shortfall else 200, headers=headers, media_type=DICOM_JSON)

    def _metadata_parts(self, locations: list[InstanceLocation], root: str) -> list[bytes]:
        """Each instance's stored JSON (BulkDataURIs relative to the root): from memory, else
        as kept beside the index, else built from the instance's header."""
        parts: list[bytes | None] = [self._metadata.get(location.sop_instance_uid) for location in locations]
        missing = [index for index, part in enumerate(parts) if part is None]
        if missing:
            results = self._readers.map(lambda i: self._instance_metadata(locations[i]), missing)
            for index, part in zip(missing, results):
                parts[index] = part
                self._metadata.put(locations[index].sop_instance_uid, part)
        # What is kept and cached is the header as received; a corrected study's values are
        # put over it on every answer (the correction can change after the cache was filled).
        return [overlay_json(part, location.correction) if location.correction else part
                for part, location in zip(parts, locations) if part is not None]

    def _instance_metadata(self, location: InstanceLocation) -> bytes:
        """The header of one instance in DICOM JSON (pixel data never read, let alone decoded)."""
        if self._local_headers is not None:
            kept = self._local_headers.header(location)
            if kept is not None:
                return kept
        part10, _offset = self._archive.read(dataclasses.replace(location, correction=""))  # As received.
        return instance_header_json(part10, location)

    # ------------------------------------------------------------------ bulk data
    async def bulk(self, request: Request) -> Response:
        """A BulkDataURI of /metadata: the binary value as stored, one part of
        application/octet-stream. The Pixel Data (7FE00010) of a compressed instance is sent
        as /frames sends every frame (`_bulk_form`): as stored, each frame a part in the
        codec's media type, when the Accept header allows that form (the fast path: never
        decoded); when it allows only uncompressed `application/octet-stream` (PS3.18
        8.7.3.5, 8.7.4: bulk data's default, Explicit VR Little Endian), every frame decoded,
        in order, concatenated in one part, the value native Pixel Data would hold
        (`_decoded_frames`, streamed); else 406."""
        ranges = parse_accept(request.headers.get("accept"))
        if ranges and not any(entry.media_type in ("*/*", "multipart/*", "multipart/related", "application/*",
                                                   "application/octet-stream") for entry in ranges):
            return PlainTextResponse('bulk data is available as multipart/related; type="application/octet-stream"',
                                     status_code=406)
        _query, plan = await run_in_threadpool(self._locate, request)
        if not plan.locations:
            return self._not_found(plan)
        location = plan.locations[0]
        path = request.path_params["path"]
        syntax = location.transfer_syntax_uid
        # Only the instance's own Pixel Data is cut into frames; an icon's (in a sequence
        # item) is a value like any other.
        pixel_data = path.strip("/").upper() == "7FE00010"
        encapsulated = UID(syntax).is_compressed and pixel_data
        if encapsulated:
            form = _bulk_form(ranges, frame_media_type(syntax), syntax)
            if form is None:
                return PlainTextResponse(_frames_refused("the pixel data of this instance is", syntax), status_code=406)
            if form is FrameForm.DECODED:
                return await self._decoded_frames(request, location, None)
        if pixel_data:
            try:
                opened = await run_in_threadpool(self._open_stream, location)
            except NoFrame as error:
                return PlainTextResponse(str(error), status_code=404)
            if opened is not None:
                blob, found, first = opened
                boundary = new_boundary()
                closing = closing_delimiter(boundary)
                if found.encapsulated:
                    media_type = frame_media_type(syntax)
                    part_type = f"{media_type}; transfer-syntax={syntax}"
                    streamed = frame_stream.frame_body(
                        blob, found, first, frame_stream.check_numbers(found, None),
                        lambda first_part: part_header(boundary, part_type, first=first_part), closing)
                    content_type = multipart_content_type(media_type, boundary, syntax)
                else:
                    streamed = frame_stream.value_body(blob, found, first,
                                                       part_header(boundary, OCTET_STREAM, first=True), closing)
                    content_type = multipart_content_type(OCTET_STREAM, boundary)
                return self._streamed(request, location, streamed, content_type, "bulk")

        def load() -> tuple[str, list[bytes]]:
            part10, _offset = self._archive.read(location)
            if encapsulated:
                return frame_media_type(syntax), frames(part10, None)
            return "application/octet-stream", [bytes(bulk_value(dcmread(BytesIO(part10)), path).value)]

        try:
            media_type, values = await run_in_threadpool(load)
        except (BulkDataError, RenderError, ValueError) as error:
            return PlainTextResponse(str(error), status_code=404)
        except ReadError as error:
            log.error("dicomweb.bulk.unreadable reason=%s", error)
            return PlainTextResponse("the instance could not be read; see the node log", status_code=503)
        if self._audit is not None:
            self._audit.retrieved(caller_of(request), [location], sent=1, outcome=SUCCESS, what="bulk")
        boundary = new_boundary()
        # Frames as stored are labelled with the stored syntax, octet-stream ones too (video:
        # no image media type; without it a client would take them as uncompressed).
        part_type = f"{media_type}; transfer-syntax={syntax}" if encapsulated else media_type
        body = b"".join(part_header(boundary, part_type, first=index == 0) + value
                        for index, value in enumerate(values)) + closing_delimiter(boundary)
        return Response(body, media_type=multipart_content_type(media_type, boundary,
                                                                syntax if encapsulated else None))

    # ------------------------------------------------------------------ frames, rendered, thumbnail
    async def frames(self, request: Request) -> Response:
        """PS3.18 8.7.3 (instance frames): as stored when the Accept header allows it (the
        stored bytes, never decoded: the fast path); a compressed instance's frames decoded
        to native bytes when only uncompressed `application/octet-stream` is accepted
        (`_decoded_frames`); else 406."""
        try:
            numbers = frame_numbers(request.path_params["frames"])
        except RenderError as error:
            return PlainTextResponse(str(error), status_code=400)
        _query, plan = await run_in_threadpool(self._locate, request)
        if not plan.locations:
            return self._not_found(plan)
        location = plan.locations[0]
        media_type = frame_media_type(location.transfer_syntax_uid)
        form = _frame_form(parse_accept(request.headers.get("accept")), media_type, location.transfer_syntax_uid)
        if form is None:
            return PlainTextResponse(_frames_refused("frames of this instance are", location.transfer_syntax_uid), status_code=406)
        if form is FrameForm.DECODED:
            return await self._decoded_frames(request, location, numbers)
        syntax = location.transfer_syntax_uid if media_type != "application/octet-stream" or \
            UID(location.transfer_syntax_uid).is_compressed else EXPLICIT_VR_LITTLE_ENDIAN
        part_type = f"{media_type}; transfer-syntax={syntax}"
        try:
            opened = await run_in_threadpool(self._open_stream, location, numbers)
        except NoFrame as error:
            return PlainTextResponse(str(error), status_code=404)
        except TooManyPasses as error:
            return PlainTextResponse(str(error), status_code=400)
        if opened is not None:
            blob, found, first = opened
            boundary = new_boundary()
            streamed = frame_stream.frame_body(blob, found, first, numbers,
                                               lambda first_part: part_header(boundary, part_type, first=first_part),
                                               closing_delimiter(boundary))
            return self._streamed(request, location, streamed, multipart_content_type(media_type, boundary, syntax),
                                  "frames")
        open_frames = getattr(self._archive, "open_frames", None)
        if open_frames is not None:
            # A study this node does not own: the frames from an owner (Data.FetchFrames), not
            # the whole instance; None when no owner answers so (then the whole read below).
            try:
                remote = await run_in_threadpool(open_frames, location, numbers)
            except FrameNotFound as error:
                return PlainTextResponse(str(error), status_code=404)
            except FrameListRefused as error:
                return PlainTextResponse(str(error), status_code=400)
            if remote is not None:
                boundary = new_boundary()
                streamed = _remote_frame_body(remote,
                                              lambda first_part: part_header(boundary, part_type, first=first_part),
                                              closing_delimiter(boundary))
                return self._streamed(request, location, streamed,
                                      multipart_content_type(media_type, boundary, syntax), "frames")

        def load() -> list[bytes]:
            part10, _offset = self._archive.read(location)
            return frames(part10, numbers)

        try:
            encoded = await run_in_threadpool(load)
        except RenderError as error:
            return PlainTextResponse(str(error), status_code=404)
        except ReadError as error:
            log.error("dicomweb.frames.unreadable reason=%s", error)
            return PlainTextResponse("the instance could not be read; see the node log", status_code=503)
        if self._audit is not None:
            self._audit.retrieved(caller_of(request), [location], sent=1, outcome=SUCCESS, what="frames")
        boundary = new_boundary()
        body = b"".join(part_header(boundary, part_type, first=index == 0) + frame
                        for index, frame in enumerate(encoded)) + closing_delimiter(boundary)
        return Response(body, media_type=multipart_content_type(media_type, boundary, syntax))

    def _open_stream(self, location: InstanceLocation,
                     numbers: list[int] | None = None) -> tuple[BlobFile, PixelLayout, Any] | None:
        """The frames of a big instance this node keeps as a blob file, to stream
        (node/frame_stream.py: read forward from the file, frame by frame, in bounded
        memory, every byte checked by the file's CRC-32): its layout from its header and
        the stream that read it. None: the whole read answers (an instance of up to
        STREAM_PART10_BYTES_MIN, not kept here as a file, a layout not streamed, or a file
        that is missing or not zstd: the archive's read then logs it and reads another
        copy). NoFrame (404) when it has no pixel data or not a frame asked; TooManyPasses
        (400) for a list that goes back over the file too often.

        A corrected study's instance is streamed from its file as received: a correction
        changes only attributes of groups 0008-0020 (replication/correction.py CORRECTABLE),
        and node/correct.py copies every byte after the last of them unchanged, so the
        pixel data and the attributes that lay it out (group 0028, the transfer syntax) are
        those of the corrected instance; the frames (and the rendered frame) are the same
        bytes the whole read of the corrected instance gives. A deflated instance, which
        the correction rewrites whole, is not streamed (frame_stream: NotStreamed)."""
        reads = self._local_reads
        if reads is None or self._owns is None or \
                0 < location.part10_bytes <= frame_stream.STREAM_PART10_BYTES_MIN or \
                not self._owns(location.study_instance_uid):
            return None
        kept = reads.blob_file(location)
        if kept is None or kept.part10_bytes <= frame_stream.STREAM_PART10_BYTES_MIN:
            return None
        blob = BlobFile(open=lambda: reads.open_blob(kept), size_bytes=kept.pointer.size_bytes,
                        crc32=kept.pointer.crc32, part10_bytes=kept.part10_bytes, what=location.sop_instance_uid,
                        crc32_marks=kept.pointer.crc32_marks)
        try:
            found, first = frame_stream.layout(blob)
        except (NotStreamed, CorruptBlob):
            return None
        try:
            frame_stream.check_numbers(found, numbers)
        except (NoFrame, TooManyPasses):
            first.close()
            raise
        return blob, found, first

    def _streamed(self, request: Request, location: InstanceLocation, body: Iterator[bytes], content_type: str,
                  what: str) -> Response:
        """A streamed frame body (`_open_stream`) as the response."""
        caller = caller_of(request) if self._audit is not None else None
        return StreamingResponse(self._pump(location, body, caller, what), media_type=content_type)

    async def _pump(self, location: InstanceLocation, body: Iterator[bytes], caller: Caller | None,
                    what: str) -> AsyncIterator[bytes]:
        """The pieces of a streamed frame body, each next one read on a reader thread while
        the one before it is sent. A piece that fails its check (CorruptBlob) or a layout
        that does not hold (FrameLayoutError) breaks the body off: no closing delimiter."""
        ahead: concurrent.futures.Future[bytes | None] | None = None
        finished = False
        pieces = 0
        try:
            ahead = self._readers.submit(next, body, None)
            while True:
                piece = await asyncio.wrap_future(ahead)
                ahead = None
                if piece is None:
                    break
                ahead = self._readers.submit(next, body, None)
                pieces += 1
                yield piece
            finished = True
        except (CorruptBlob, FrameLayoutError, PeerError) as error:
            log.error("dicomweb.%s.unreadable sop_instance_uid=%s pieces_sent=%d reason=%s",
                      what, location.sop_instance_uid, pieces, error)
            raise
        finally:
            if ahead is not None:  # The body stopped early: close the stream once its read ends.
                ahead.add_done_callback(lambda _future: _close_body(body))
            else:
                _close_body(body)
            if caller is not None and self._audit is not None:
                self._audit.retrieved(caller, [location], sent=1 if finished else 0, what=what,
                                      outcome=SUCCESS if finished else MAJOR_FAILURE)

    async def _decoded_frames(self, request: Request, location: InstanceLocation,
                              numbers: list[int] | None) -> Response:
        """The asked frames of a compressed instance decoded (dicomweb_render.decoded_frames:
        the layout of native Pixel Data, little endian, the stored Bits Allocated, samples
        interleaved; in the colour space /metadata gives: YBR_FULL and YBR_FULL_422 JPEG as
        stored, YBR_ICT and YBR_RCT JPEG 2000 as RGB, which is what their decoding gives),
        each a part of `application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1`, in
        the asked order; `numbers` None (the /bulk of Pixel Data): every frame, first to
        last, concatenated in one part (padded to an even length, PS3.5 7.1.1: the value a
        native Pixel Data element holds). Decoded on worker threads, one frame at a time,
        the next while the one before it is sent: the stored instance (its bytes, then
        pydicom's parse of them) and two decoded frames in memory, however many frames are
        asked (the body streams; no cap on the frame list). The first frame is decoded
        before the status line: a 406 when it fails; a later frame that fails breaks the
        body off (no closing delimiter)."""
        what = "frames" if numbers is not None else "bulk"

        def start() -> tuple[Iterator[bytes], bytes]:
            opened = self._open_stream(location, numbers)
            if opened is not None:  # A big instance kept here: its frames come from the file one at a time.
                blob, found, stream = opened
                asked = frame_stream.check_numbers(found, numbers)
                decoded = decoded_from_frames(found.header, location.transfer_syntax_uid,
                                              frame_stream.encoded_frames(blob, found, stream, asked), asked)
            else:
                part10, _offset = self._archive.read(location)
                decoded = decoded_frames(part10, numbers)
            return decoded, next(decoded)

        try:
            decoded, first = await run_in_threadpool(start)
        except (RenderError, NoFrame) as error:
            return PlainTextResponse(str(error), status_code=404)
        except TooManyPasses as error:
            return PlainTextResponse(str(error), status_code=400)
        except (CorruptBlob, FrameLayoutError) as error:
            # The first frame's pass failed its check (a single pass: nothing sent yet).
            log.error("dicomweb.%s.unreadable sop_instance_uid=%s reason=%s", what, location.sop_instance_uid, error)
            return PlainTextResponse("the instance could not be read; see the node log", status_code=503)
        except FrameDecodeError as error:
            log.warning("dicomweb.%s.undecodable sop_instance_uid=%s reason=%s", what, location.sop_instance_uid, error)
            return PlainTextResponse(f"the {'frames' if numbers is not None else 'pixel data'} of this instance "
                                     f"(transfer syntax {location.transfer_syntax_uid}) "
                                     f"could not be decoded: {error}", status_code=406)
        except ReadError as error:
            log.error("dicomweb.%s.unreadable reason=%s", what, error)
            return PlainTextResponse("the instance could not be read; see the node log", status_code=503)
        boundary = new_boundary()
        caller = caller_of(request) if self._audit is not None else None
        return StreamingResponse(self._decoded_parts(location, decoded, first, boundary, caller, joined=numbers is None),
                                 media_type=multipart_content_type(OCTET_STREAM, boundary, EXPLICIT_VR_LITTLE_ENDIAN))

    async def _decoded_parts(self, location: InstanceLocation, decoded: Iterator[bytes], first: bytes,
                             boundary: str, caller: Caller | None, *, joined: bool) -> AsyncIterator[bytes]:
        """Each decoded frame a part, or (`joined`) all of them one part."""
        part_type = f"{OCTET_STREAM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"
        what = "bulk" if joined else "frames"
        frame: bytes | None = first
        ahead: asyncio.Future[bytes | None] | None = None
        index = 0
        length = 0
        finished = False
        try:
            while frame is not None:
                # The next frame decodes on a worker thread while this one is sent (one
                # decode at a time: the iterator is never advanced from two threads at once).
                ahead = asyncio.ensure_future(run_in_threadpool(next, decoded, None))
                if index == 0 or not joined:
                    yield part_header(boundary, part_type, first=index == 0)
                yield frame
                index += 1
                length += len(frame)
                frame = await ahead
                ahead = None
            if joined and length % 2:
                yield b"\x00"
            finished = True
        except FrameDecodeError as error:
            log.error("dicomweb.%s.undecodable sop_instance_uid=%s sent=%d reason=%s",
                      what, location.sop_instance_uid, index, error)
            raise
        except (CorruptBlob, FrameLayoutError) as error:  # A streamed big instance's file.
            log.error("dicomweb.%s.unreadable sop_instance_uid=%s sent=%d reason=%s",
                      what, location.sop_instance_uid, index, error)
            raise
        finally:
            if ahead is not None:  # The body stopped early: the decode finishes, unread.
                ahead.cancel()
            else:
                _close_body(decoded)  # A streamed instance's file, now rather than when collected.
            if caller is not None and self._audit is not None:
                self._audit.retrieved(caller, [location], sent=1 if finished else 0, what=what,
                                      outcome=SUCCESS if finished else MAJOR_FAILURE)
        yield closing_delimiter(boundary)

    async def rendered(self, request: Request) -> Response:
        return await self._render(request, default_viewport=None)

    async def thumbnail(self, request: Request) -> Response:
        return await self._render(request, default_viewport=(128, 128))

    async def _render(self, request: Request, *, default_viewport: tuple[int, int] | None) -> Response:
        media_type = _rendered_type(parse_accept(request.headers.get("accept")))
        if media_type is None:
            return PlainTextResponse("rendered images are available as image/jpeg or image/png", status_code=406)
        try:
            viewport = viewport_size(request.query_params.get("viewport"), default_viewport)
            frame = frame_numbers(request.path_params.get("frames", "1"))[0]
            quality = int(request.query_params.get("quality", "90"))
        except (RenderError, ValueError) as error:
            return PlainTextResponse(str(error), status_code=400)
        _query, plan = await run_in_threadpool(self._locate, request)
        if not plan.locations:
            return self._not_found(plan)
        # A series or study (rendered or thumbnail) shows a representative frame: the first
        # frame of its middle instance (series by UID, then instances by UID).
        ordered = sorted(plan.locations, key=lambda l: (l.series_instance_uid, l.sop_instance_uid))
        location = ordered[len(ordered) // 2] if "instance" not in request.path_params else ordered[0]

        def load() -> bytes:
            # A big instance kept here as a blob file: read only as far as its frame
            # (node/frame_stream.py), never whole.
            opened = self._open_stream(location, [frame])
            if opened is not None:
                blob, found, first = opened
                try:
                    (frame_bytes,) = list(frame_stream.encoded_frames(blob, found, first, [frame]))
                except (CorruptBlob, FrameLayoutError):
                    pass  # The whole read below: the archive's logs a corrupt copy and reads another.
                else:
                    return render_frame(found.header, frame_bytes, media_type=media_type, viewport=viewport,
                                        quality=max(1, min(quality, 100)))
            part10, _offset = self._archive.read(location)
            return render(part10, frame=frame, media_type=media_type, viewport=viewport,
                          quality=max(1, min(quality, 100)))

        try:
            image = await run_in_threadpool(load)
        except NoFrame as error:
            return PlainTextResponse(str(error), status_code=404)
        except RenderError as error:
            log.warning("dicomweb.render.failed sop_instance_uid=%s reason=%s", location.sop_instance_uid, error)
            return PlainTextResponse(str(error), status_code=404 if isinstance(error, NoSuchFrame) else 406)
        except ReadError as error:
            log.error("dicomweb.render.unreadable reason=%s", error)
            return PlainTextResponse("the instance could not be read; see the node log", status_code=503)
        if self._audit is not None:
            self._audit.retrieved(caller_of(request), [location], sent=1, outcome=SUCCESS,
                                  what="rendered" if default_viewport is None else "thumbnail")
        return Response(image, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @staticmethod
    def _not_found(plan: RetrievePlan) -> Response:
        if plan.shortfall:
            return PlainTextResponse(plan.shortfall.describe(), status_code=503, headers=_incomplete(plan.shortfall))
        return PlainTextResponse("no such instances", status_code=404)

    # ------------------------------------------------------------------ STOW-RS
    async def delete(self, request: Request) -> Response:
        """DELETE of a study, series or instance (as dcm4chee's and Orthanc's DICOMweb do; not
        in PS3.18): 204 once W owners hold the tombstones, 404 when nothing is there, 503 when
        the delete did not become durable, 202 when it did but some owners could not be asked
        (run it again). On a TLS cluster only an admin certificate may delete."""
        caller = caller_of(request)
        if self._deletes_need_admin and not (caller.identity is not None and caller.identity.is_admin):
            return PlainTextResponse("only an admin certificate may delete", status_code=403)
        params = request.path_params
        scope = DeleteScope(str(params["study"]), str(params.get("series", "")), str(params.get("instance", "")))
        if any(len(uid) > 64 for uid in (scope.study_instance_uid, scope.series_instance_uid,
                                         scope.sop_instance_uid)):
            return PlainTextResponse("a UID has at most 64 characters", status_code=400)
        delete = getattr(self._archive, "delete", None)
        if delete is None:  # An archive without a delete path (a test's single-node Archive).
            return PlainTextResponse("this archive cannot delete", status_code=501)
        result = await run_in_threadpool(delete, scope)
        if self._audit is not None:
            self._audit.deleted(caller, scope, result)
        status = _DELETE_HTTP_STATUS[result.status]
        if status == 204:
            return Response(status_code=204)
        return PlainTextResponse(result.message or result.status.value, status_code=status)

    async def stow(self, request: Request) -> Response:
        try:
            part_type, boundary = multipart_boundary(request.headers.get("content-type", ""))
        except MediaError as error:
            return PlainTextResponse(str(error), status_code=415)
        if part_type not in ("", DICOM):
            return PlainTextResponse('only multipart/related; type="application/dicom" is accepted', status_code=415)
        study = request.path_params.get("study")
        caller = caller_of(request)
        reader = MultipartReader(boundary, part_bytes_max=self._stow_budget.part_bytes_max)
        # Every byte the reader holds and every part until its write ends is taken from the
        # node's STOW budget first (stow_bytes_max, node/dicomweb_stow_budget.py): a request
        # that cannot take more waits and reads no more of its body.
        hold = self._stow_budget.request()
        # Up to STOW_PARTS_IN_FLIGHT parts are validated and stored at once while the body
        # still streams in: the store's group commit then syncs them in one write instead of
        # one fsync per instance, in turn. The answer lists them in the body's order.
        tasks: list[asyncio.Future[dict[str, Any]]] = []
        unhanded: list[Part] = []  # Parts the reader gave whose store has not begun.
        malformed = ""
        busy: BudgetWaitTimeout | None = None
        try:
            async for chunk in request.stream():
                for start in range(0, len(chunk), FEED_BYTES_MAX):
                    piece = chunk[start:start + FEED_BYTES_MAX]
                    await hold.take(len(piece))
                    given = reader.feed(piece)
                    unhanded = [part for part in given if isinstance(part, Part)]
                    hold.settle(reader.buffered_bytes, [len(part.body) for part in unhanded])
                    for part in given:
                        if isinstance(part, OversizedPart):  # Its bytes are gone: listed as refused.
                            tasks.append(self._refuse_oversized(part))
                            continue
                        running = [task for task in tasks if not task.done()]
                        if len(running) >= STOW_PARTS_IN_FLIGHT:
                            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                        task = asyncio.ensure_future(run_in_threadpool(self._store_part, part, study, caller))
                        unhanded.remove(part)
                        task.add_done_callback(functools.partial(_part_stored, hold, len(part.body)))
                        tasks.append(task)
            reader.close()
        except MediaError as error:
            malformed = str(error)
            if isinstance(error, BodyCutShort) and error.oversized is not None:
                tasks.append(self._refuse_oversized(error.oversized))
        except BudgetWaitTimeout as error:
            busy = error
            stats = self._stow_budget.statistics()
            log.warning("dicomweb.store.budget_timeout waited_s=%.1f wanted_bytes=%d used_bytes=%d limit_bytes=%d "
                        "receiving_requests=%d", error.waited_s, error.wanted_bytes, stats.used_bytes,
                        stats.limit_bytes, stats.receiving_requests)
        finally:
            hold.end_receiving()
            for part in unhanded:  # The request stopped before their store began.
                hold.stored(len(part.body))
            # Every part handed to the store finishes (a write cannot be called back), even
            # when the client went away mid-body.
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        results: list[dict[str, Any]] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.error("dicomweb.store.failed error=%r", outcome)
                outcome = {"status": STATUS_PROCESSING_FAILURE, "reason": "internal error; see the node log",
                           "sop_class": "", "sop_instance": "", "study": "", "series": ""}
            results.append(outcome)
        root = _root(request)
        stored = [r for r in results if r["status"] is None]
        failed = [r for r in results if r["status"] is not None]
        body: dict[str, Any] = {}
        studies = {r["study"] for r in stored if r["study"]}
        if study or len(studies) == 1:
            body["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{study or next(iter(studies))}"]}
        if stored:
            body["00081199"] = {"vr": "SQ", "Value": [{
                "00081150": {"vr": "UI", "Value": [r["sop_class"]]},
                "00081155": {"vr": "UI", "Value": [r["sop_instance"]]},
                "00081190": {"vr": "UR", "Value": [f"{root}/studies/{r['study']}/series/{r['series']}"
                                                    f"/instances/{r['sop_instance']}"]},
            } for r in stored]}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": [{
                "00081150": {"vr": "UI", **({"Value": [r["sop_class"]]} if r["sop_class"] else {})},
                "00081155": {"vr": "UI", **({"Value": [r["sop_instance"]]} if r["sop_instance"] else {})},
                "00081197": {"vr": "US", "Value": [r["status"]]},
            } for r in failed]}
        oversized = [r for r in failed if r.get("oversized")]
        ending = stow_outcome(stored=len(stored), failed=len(failed), oversized=len(oversized),
                              malformed=bool(malformed), busy=busy is not None)
        headers: dict[str, str] = {}
        if busy is not None:
            text = (f"the rest of the body was not read: the node's STOW-RS memory (stow_bytes_max, "
                    f"{self._stow_budget.limit_bytes} bytes) stayed full for {busy.waited_s:.0f} s")
            if ending == StowOutcome.BUSY:
                log.info("dicomweb.store.done stored=0 failed=%d busy=1", len(failed))
                return PlainTextResponse(f"nothing was stored: {text}; try again later\n", status_code=503,
                                         headers={"Retry-After": str(STOW_RETRY_AFTER_S),
                                                  "Warning": warning_header(text)})
            headers["Warning"] = warning_header(text)
        if malformed:
            headers["Warning"] = warning_header(f"malformed body: {malformed}")
            log.warning("dicomweb.store.malformed stored=%d reason=%s", len(stored), malformed)
        elif ending == StowOutcome.EMPTY:
            return PlainTextResponse("the body holds no instances", status_code=400)
        if failed:
            reasons = sorted({r["reason"] for r in failed})
            headers["Warning"] = ", ".join(filter(None, [headers.get("Warning", ""),
                                                         *(warning_header(reason) for reason in reasons[:5])]))
        log.info("dicomweb.store.done stored=%d failed=%d oversized=%d", len(stored), len(failed), len(oversized))
        if ending == StowOutcome.TOO_LARGE:
            largest = max(r["size_bytes"] for r in oversized)
            others = len(failed) - len(oversized)
            text = (f"nothing was stored: {len(oversized)} part(s) over the size limit of "
                    f"{self._stow_budget.part_bytes_max} bytes ({self._limit_name()}; the largest "
                    f"{largest} bytes)" + (f", {others} part(s) refused for other reasons (Warning)" if others else "")
                    + (f"; the body was malformed: {malformed}" if malformed else "") + "\n")
            return PlainTextResponse(text, status_code=STOW_HTTP_STATUS[ending], headers=headers)
        return JSONResponse(body, status_code=STOW_HTTP_STATUS[ending], headers=headers, media_type=DICOM_JSON)

    def _limit_name(self) -> str:
        """Which setting makes the STOW-RS part limit (docs/conformance-statement.md 9.4)."""
        if self._stow_budget.part_bytes_max < self._instance_size_bytes_max:
            return "half of stow_bytes_max less 1 MiB, below instance_size_bytes_max"
        return "instance_size_bytes_max"

    def _refuse_oversized(self, part: OversizedPart) -> asyncio.Future[dict[str, Any]]:
        """The failed-part entry (a done future, in the order of the others) of a part over
        the STOW-RS part limit (instance_size_bytes_max, or less: StowBudget.part_bytes_max), named by the file meta group at its start when that can be
        read (its bytes were not kept)."""
        result: dict[str, Any] = {"status": STATUS_OUT_OF_RESOURCES, "reason": "instance is over the size limit",
                                  "sop_class": "", "sop_instance": "", "study": "", "series": "",
                                  "oversized": True, "size_bytes": part.size_bytes}
        try:
            meta = read_file_meta(part.head)
        except MediaError:
            pass  # Not a Part-10 start (or a meta group longer than the head): listed without UIDs.
        else:
            result.update(sop_class=meta.media_storage_sop_class_uid, sop_instance=meta.media_storage_sop_instance_uid)
        log.warning("dicomweb.store.too_large size_bytes=%d limit_bytes=%d sop_instance_uid=%s",
                    part.size_bytes, self._stow_budget.part_bytes_max, result["sop_instance"])
        refused: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        refused.set_result(result)
        return refused

    def _store_part(self, part: Part, study: str | None, caller: Caller | None = None) -> dict[str, Any]:
        """One STOW-RS part through the same validation and W-durable write as a C-STORE."""
        result: dict[str, Any] = {"status": None, "reason": "", "sop_class": "", "sop_instance": "", "study": "",
                                  "series": ""}

        def fail(status: int, reason: str) -> dict[str, Any]:
            log.warning("dicomweb.store.rejected reason=%s status=0x%04X sop_instance_uid=%s",
                        reason, status, result["sop_instance"])
            result.update(status=status, reason=reason)
            return result

        media_type = part.content_type.split(";")[0].strip().lower()
        if media_type not in ("", DICOM):
            return fail(STATUS_CANNOT_UNDERSTAND, f"unsupported part type {media_type[:40]}")
        try:
            meta = read_file_meta(part.body)
        except MediaError as error:
            return fail(STATUS_CANNOT_UNDERSTAND, str(error))
        result.update(sop_class=meta.media_storage_sop_class_uid, sop_instance=meta.media_storage_sop_instance_uid)
        try:
            instance = instance_from_part10(
                part.body, meta.dataset_offset, meta.transfer_syntax_uid,
                affected_sop_class_uid=meta.media_storage_sop_class_uid or None,
                affected_sop_instance_uid=meta.media_storage_sop_instance_uid or None,
            )
        except InvalidInstance as error:
            return fail(error.status, error.reason)
        result.update(sop_class=instance.sop_class_uid, sop_instance=instance.sop_instance_uid,
                      study=instance.study_instance_uid, series=instance.series_instance_uid)
        if study is not None and instance.study_instance_uid != study:
            return fail(STATUS_DATASET_MISMATCH, "StudyInstanceUID differs from the study in the URL")
        try:
            written = self._archive.store(instance)
        except Exception as error:  # A bug or an unexpected failure: this instance fails, the others go on.
            log.error("dicomweb.store.failed sop_instance_uid=%s error=%r", instance.sop_instance_uid, error)
            if self._audit is not None and caller is not None:
                self._audit.stored(caller, instance, None)
            return fail(STATUS_PROCESSING_FAILURE, "internal error; see the node log")
        if self._audit is not None and caller is not None:
            self._audit.stored(caller, instance, written)
        if written.status == WriteStatus.SUCCESS:
            return result
        if written.status == WriteStatus.OUT_OF_RESOURCES:
            return fail(STATUS_OUT_OF_RESOURCES, written.message or "out of resources")
        return fail(STATUS_STORE_FAILED, written.message or "store failed")


def _part_stored(hold: StowHold, size: int, _task: "asyncio.Future[dict[str, Any]]") -> None:
    """A STOW-RS part's write ended (whatever its outcome): its bytes leave the budget."""
    hold.stored(size)


def instance_header_json(part10: bytes, location: InstanceLocation, *, whole: bool = True) -> bytes:
    """header_json, or the instance's UIDs alone when pydicom cannot read its header (the
    instance was accepted at ingest, so this is a reader's limit, not bad data). With
    `whole` False (the first bytes only), HeaderTruncated when they do not hold the header."""
    try:
        return header_json(part10, location.transfer_syntax_uid, location.study_instance_uid,
                           location.series_instance_uid, location.sop_instance_uid, whole=whole)
    except HeaderTruncated:
        raise
    except Exception as error:  # pydicom raises many types on odd headers
        log.error("dicomweb.metadata.unreadable sop_instance_uid=%s error=%s", location.sop_instance_uid,
                  type(error).__name__)
        attributes = {"00080016": {"vr": "UI", "Value": [location.sop_class_uid]},
                      "00080018": {"vr": "UI", "Value": [location.sop_instance_uid]},
                      "0020000D": {"vr": "UI", "Value": [location.study_instance_uid]},
                      "0020000E": {"vr": "UI", "Value": [location.series_instance_uid]},
                      "00083002": {"vr": "UI", "Value": [location.transfer_syntax_uid]}}
        return json.dumps(attributes, separators=(",", ":")).encode("utf-8")


def _read_groups(sendable: list[tuple[InstanceLocation, str]]) -> list[list[tuple[InstanceLocation, str]]]:
    """Consecutive instances (each with the syntax it goes out in) in groups of at most
    READ_GROUP_INSTANCES, each closed once its stated sizes reach READ_GROUP_BYTES."""
    groups: list[list[tuple[InstanceLocation, str]]] = []
    group: list[tuple[InstanceLocation, str]] = []
    size = 0
    for location, syntax in sendable:
        group.append((location, syntax))
        size += max(0, location.part10_bytes)
        if len(group) >= READ_GROUP_INSTANCES or size >= READ_GROUP_BYTES:
            groups.append(group)
            group, size = [], 0
    if group:
        groups.append(group)
    return groups


def _remote_frame_body(frames: Iterator[int | bytes], part_head: Callable[[bool], bytes],
                       closing: bytes) -> Iterator[bytes]:
    """The multipart body of frames read from an owner (ClusterArchive.open_frames): a part
    header at each frame's start, its bytes as they come, and `closing` only once the
    owner's answer ended complete and checked (node/grpc_transport.py fetch_frames); a
    broken answer (PeerError) breaks the body off. Closing it cancels the peer call."""
    try:
        first = True
        for piece in frames:
            if isinstance(piece, int):
                yield part_head(first)
                first = False
            else:
                yield piece
        yield closing
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()


def _close_body(body: Iterator[bytes]) -> None:
    """Close a streamed frame body (its file), from whichever thread ends with it."""
    close = getattr(body, "close", None)
    if close is not None:
        try:
            close()
        except ValueError:  # "generator already executing": its read is still on a thread.
            pass


def _next_chunk(stream: Part10Stream) -> bytes:
    return stream.read_chunk(CHUNK_BYTES)


class _SmallParts:
    """Parts under SMALL_PART_BYTES (each its header and its bytes) kept to go out in one
    write of about COALESCE_BYTES."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._bytes = 0
        self.parts = 0

    def add(self, head: bytes, part10: bytes) -> bool:
        """Keep one part; True when the write is full."""
        self._pieces += (head, part10)
        self._bytes += len(head) + len(part10)
        self.parts += 1
        return self._bytes >= COALESCE_BYTES

    def take(self) -> bytes:
        joined = b"".join(self._pieces)
        self._pieces, self._bytes, self.parts = [], 0, 0
        return joined


@dataclasses.dataclass
class _Opened:
    """One instance as its group read it: its bytes, or its blob file as a Part10Stream
    with, when it goes out as stored, its first chunk already decompressed."""

    body: bytes | Part10Stream
    first: bytes | None = None

    def close(self) -> None:
        if isinstance(self.body, Part10Stream):
            self.body.close()


_Group = tuple[list[_Opened], ReadError | CorruptBlob | None]  # What one group read gives.


def _close_streams(future: "concurrent.futures.Future[_Group]") -> None:
    """A read-ahead group the body never took: close its files."""
    if future.cancelled() or future.exception() is not None:
        return
    for opened in future.result()[0]:
        opened.close()


def _close_when_read(stream: Part10Stream, ahead: "concurrent.futures.Future[bytes] | None") -> None:
    """Close a stream now, or when the chunk read in flight on a reader thread has ended
    (the body stopped while it was being read: closing under it would pull the file and
    the decompressor from under that thread)."""
    if ahead is None or ahead.done():
        stream.close()
    else:
        ahead.add_done_callback(lambda _future: stream.close())


class _Unaligned:
    """The writes of an encoded retrieve, none of which but the last ends where a zstd
    frame ends: the last byte of every piece is held back and goes out with the next one.
    httpx's zstd decoder (0.29) fails with "cannot use a decompressobj multiple times" when
    a read of the body ends exactly at a frame's end and more follows (encode/httpx
    discussion 3538; fixed in the httpx2 fork, pydantic/httpx2 PR 946); a read ends where a
    write ended more often than anywhere else. A read can still end at a frame end inside a
    write bigger than a TCP segment (rare: loopback segments are 64 KB); curl, urllib3 2.x
    and libzstd's streaming decoders carry on across frames. A small piece is kept (and joined) until
    COALESCE_BYTES; a bigger one goes out as a small copy (what was kept and its first
    byte) and a view of its middle, no copy."""

    def __init__(self) -> None:
        self._held = bytearray()

    def put(self, piece: bytes | memoryview) -> list[bytes | memoryview]:
        if len(piece) < SMALL_PART_BYTES:
            self._held += piece
            if len(self._held) < COALESCE_BYTES:
                return []
            out = bytes(self._held[:-1])
            del self._held[:-1]
            return [out]
        view = memoryview(piece)
        out_head = bytes(self._held) + bytes(view[:1])
        self._held = bytearray(view[-1:])
        return [out_head, view[1:-1]]

    def end(self, last: bytes) -> bytes:
        """What is held, then `last` (the closing frame; b"" when the body breaks off)."""
        out = bytes(self._held) + last
        self._held = bytearray()
        return out


class _EncodedStream:
    """A big instance read as today (a Part10Stream, decompressed a chunk at a time) sent in
    an encoded retrieve: each chunk compressed anew as its own level-1 frame."""

    def __init__(self, stream: Part10Stream) -> None:
        self._stream = stream

    def next_chunk(self) -> bytes:
        chunk = self._stream.read_chunk(CHUNK_BYTES)
        return encode(chunk) if chunk else b""

    def close(self) -> None:
        self._stream.close()


# What one group of an encoded retrieve gives: its pieces (each with the parts it ends).
_ZstdGroup = tuple[list[tuple["bytes | memoryview | FrameChunks", int]], ReadError | CorruptBlob | None]


def _close_zstd_group(future: "concurrent.futures.Future[_ZstdGroup]") -> None:
    """A read-ahead group of an encoded retrieve the body never took: close its files."""
    if future.cancelled() or future.exception() is not None:
        return
    for piece, _parts in future.result()[0]:
        if not isinstance(piece, (bytes, memoryview)):
            piece.close()


def _close_chunks_when_read(chunks: "FrameChunks", ahead: "concurrent.futures.Future[bytes] | None") -> None:
    """Close a chunked frame now, or once the read in flight on a reader thread has ended."""
    if ahead is None or ahead.done():
        chunks.close()
    else:
        ahead.add_done_callback(lambda _future: chunks.close())


def _body_length(sendable: list[tuple[InstanceLocation, str]], heads: list[bytes], closing: bytes) -> int | None:
    """The multipart body's length when every instance goes out as stored and its length is
    known; None otherwise (a transcode, or an index that did not say: a chunked body)."""
    if any(syntax != location.transfer_syntax_uid or location.part10_bytes <= 0 for location, syntax in sendable):
        return None
    return sum(len(head) for head in heads) + sum(location.part10_bytes for location, _syntax in sendable) + len(closing)


def _frame_form(ranges: list[Any], media_type: str, stored_syntax: str) -> FrameForm | None:
    """How /frames answers an Accept header (PS3.18 8.7.3 and 8.7.4: a frame as
    `application/octet-stream` is uncompressed, Explicit VR Little Endian unless it names
    another syntax). STORED when any accepted range allows the stored form: `*/*`,
    `multipart/*`, `type="*/*"`, `application/octet-stream; transfer-syntax=*`, or the
    form's own media type (`frame_media_type`: octet-stream for native data, with no
    syntax, the stored one or Explicit VR Little Endian; the codec's for compressed data,
    with no syntax or the stored one; octet-stream for a compressed syntax with no image
    media type, such as video, only with the stored syntax named). Else DECODED when the
    data is compressed, uncompressed octet-stream is accepted and `decodable` says a
    pydicom handler reads it; else None (406)."""
    compressed = UID(stored_syntax).is_compressed
    uncompressed_accepted = False
    for entry in ranges:
        if entry.media_type in ("*/*", "multipart/*"):
            return FrameForm.STORED
        if entry.media_type != "multipart/related":
            continue
        part = entry.part_type or OCTET_STREAM
        syntax = entry.transfer_syntax
        if part == "*/*" or (part == OCTET_STREAM and syntax == "*"):
            return FrameForm.STORED
        if part == media_type:
            allowed: set[str | None] = {"*", stored_syntax}
            if not compressed:
                allowed |= {None, EXPLICIT_VR_LITTLE_ENDIAN}
            elif media_type != OCTET_STREAM:
                allowed.add(None)
            if syntax in allowed:
                return FrameForm.STORED
        if compressed and part == OCTET_STREAM and syntax in (None, EXPLICIT_VR_LITTLE_ENDIAN):
            uncompressed_accepted = True
    if uncompressed_accepted and decodable(stored_syntax):
        return FrameForm.DECODED
    return None


def _frames_refused(subject: str, syntax: str) -> str:
    """The text of a 406 for /frames or for the /bulk of Pixel Data."""
    text = f"{subject} available as {frame_media_type(syntax)} (transfer syntax {syntax})"
    if UID(syntax).is_compressed:
        text += (', or decoded as multipart/related; type="application/octet-stream"; '
                 f"transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}" if decodable(syntax) else
                 "; no decoder installed here reads that syntax: they cannot be sent uncompressed")
    return text


def _bulk_form(ranges: list[Any], media_type: str, stored_syntax: str) -> FrameForm | None:
    """How /bulk sends a compressed instance's Pixel Data: `_frame_form`, where a
    single-part `application/octet-stream` or `application/*` range (which /bulk accepts)
    counts as `multipart/related; type="application/octet-stream"` with its transfer-syntax."""
    as_parts = [MediaRange("multipart/related", {**entry.parameters, "type": OCTET_STREAM}, entry.quality)
                if entry.media_type in (OCTET_STREAM, "application/*") else entry for entry in ranges]
    return _frame_form(as_parts, media_type, stored_syntax)


def _rendered_type(ranges: list[Any]) -> str | None:
    for entry in ranges:
        if entry.media_type in ("image/jpeg", "image/png"):
            return str(entry.media_type)
        if entry.media_type in ("*/*", "image/*"):
            return "image/jpeg"
    return None


def _root(request: Request) -> str:
    """The DICOMweb root as the client reached it (for RetrieveURL). A proxy's
    X-Forwarded-Host/-Proto win; a Host header without its port (dicomweb-client sends
    one) gets the port this connection came in on."""
    forwarded = request.headers.get("x-forwarded-host")
    if forwarded:
        scheme = request.headers.get("x-forwarded-proto", request.url.scheme)
        return f"{scheme}://{forwarded.split(',')[0].strip()}/dicom-web"
    host = request.headers.get("host", "")
    server = request.scope.get("server")
    if host and ":" not in host.rsplit("]", 1)[-1] and server and server[1] not in (80, 443):
        return f"{request.url.scheme}://{host}:{server[1]}/dicom-web"
    return str(request.base_url).rstrip("/") + "/dicom-web"


def _instance_url(root: str, location: InstanceLocation) -> str:
    return (f"{root}/studies/{location.study_instance_uid}/series/{location.series_instance_uid}"
            f"/instances/{location.sop_instance_uid}")


def _retrieve_extra(root: str, level: str, row: Attributes) -> dict[str, dict[str, Any]]:
    url = f"{root}/studies/{row.get('StudyInstanceUID', '')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{row.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{row.get('SOPInstanceUID', '')}"
    return {"RetrieveURL": {"vr": "UR", "Value": [url]}, "InstanceAvailability": {"vr": "CS", "Value": ["ONLINE"]}}
