"""WADO-RS /metadata of one instance, built once when the instance is stored.

`header_json` turns a Part-10 header into DICOM JSON (PS3.18 F) without reading, let
alone decoding, the pixel data: pydicom reads the header up to the pixel data element,
and the element there is described from its own header bytes. Binary values (the pixel
data, and any other OB/OW/... value of BULK_BYTES_MIN or more) become BulkDataURIs. The
stored JSON names them relative to the DICOMweb root (`studies/.../bulk/7FE00010`);
`with_root` makes them absolute for the client that asked, by rewriting the one place
a BulkDataURI can appear: the key `"BulkDataURI":"` (a value's own quotes are always
escaped in JSON, so the text cannot come from patient data).

`ingest_header_json` builds the entry when an instance is stored (node/store.py keeps it
in the instance's own write batch), from the first HEADER_READ_BYTES its blob decompresses
to, by the lean reader alone; what that cannot read is built when first asked.

`bulk_value` finds the value a BulkDataURI names, for the /bulk route.
"""

from __future__ import annotations

import json
import struct
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pacsnode.node import header_reader
from pacsnode.node.codec import decompress_head
from pacsnode.node.dicomweb_json import dataset_to_json
from pacsnode.node.dicomweb_media import MediaError, read_file_meta
from pacsnode.node.header_reader import Unsupported
from pacsnode.replication.model import CorruptBlob, InstanceRecord

BULK_BYTES_MIN = 1024
# What is decompressed first to build an instance's entry: a header almost always ends
# within it (an instance smaller than this is read whole).
HEADER_READ_BYTES = 64 * 1024
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # PixelData, FloatPixelData, DoubleFloatPixelData
AVAILABLE_TRANSFER_SYNTAX = "00083002"
_BULK_KEY = b'"BulkDataURI":"'
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"


class HeaderTruncated(Exception):
    """header_json was given the first bytes of an instance, and its header does not end
    within them: read the whole instance."""


class BulkDataError(Exception):
    """The bulk data path names no binary value of the instance."""


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def header_json(part10: bytes, transfer_syntax_uid: str, study_uid: str, series_uid: str, sop_uid: str,
                *, whole: bool = True) -> bytes:
    """The instance's /metadata entry (compact JSON, sorted by tag, BulkDataURIs relative
    to the DICOMweb root). Raises whatever pydicom raises on an unreadable header.

    `whole` False: `part10` is only the first bytes of the instance; the answer is given
    only when the header ends at a pixel data element within them (every element before
    it then lies whole in the bytes given), else HeaderTruncated."""
    base = instance_path(study_uid, series_uid, sop_uid) + "/bulk/"
    syntax = transfer_syntax_uid.strip("\x00 ")
    try:
        return _lean_header_json(part10, syntax, base, whole=whole)
    except Unsupported:
        # pydicom reads it (the same answer, slower).
        return pydicom_header_json(part10, transfer_syntax_uid, study_uid, series_uid, sop_uid, whole=whole)


def ingest_header_json(record: InstanceRecord, blob: bytes) -> bytes | None:
    """header_json of an instance being stored, from its zstd blob: only the first
    HEADER_READ_BYTES are decompressed (the blob's checksum is checked by whoever accepted
    it: the compressing node, or a peer's receiver), and only the lean reader reads them
    (a few tenths of a millisecond a CT header). None when that is not enough (a header
    pydicom must read, one longer than that, a deflated one): built when first asked."""
    try:
        head = decompress_head(blob, HEADER_READ_BYTES, record.sop_instance_uid)
    except CorruptBlob:
        return None
    base = instance_path(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid) + "/bulk/"
    try:
        return _lean_header_json(head, record.transfer_syntax_uid.strip("\x00 "), base,
                                 whole=len(head) < HEADER_READ_BYTES)
    except (Unsupported, HeaderTruncated):
        return None


def pydicom_header_json(part10: bytes, transfer_syntax_uid: str, study_uid: str, series_uid: str, sop_uid: str,
                        *, whole: bool = True) -> bytes:
    """header_json through pydicom's Dataset.to_json_dict: for every header, and the
    reference the lean reader's answer is tested against."""
    base = instance_path(study_uid, series_uid, sop_uid) + "/bulk/"
    syntax = transfer_syntax_uid.strip("\x00 ")
    stream = BytesIO(part10)
    deflated = syntax == _DEFLATED
    if deflated and not whole:
        raise HeaderTruncated("a deflated dataset is read whole")
    # A deflated dataset is inflated as a whole into another buffer: read all of it there
    # (the pixel data is then read as bytes and left out of the JSON, never decoded).
    try:
        dataset = dcmread(stream, stop_before_pixels=not deflated)
    except Exception:  # pydicom raises many types, on a header cut off by the end of the bytes too
        if whole:
            raise
        raise HeaderTruncated("the header could not be read from the bytes given") from None
    # Given only the first bytes: a value cut off by their end is read short without a word,
    # but then the read ends at the end of the bytes. A pixel data element found where it
    # stopped shows that every element before it lay whole within them.
    pixel = None if deflated else _element_at(part10, stream.tell(), syntax)
    if not whole and pixel is None:
        raise HeaderTruncated("the header does not end at pixel data within the bytes given")
    paths = _bulk_paths(dataset)

    def uri(element: Any) -> str:
        path = paths.get(id(element))
        return base + path if path is not None else ""

    attributes = dataset_to_json(dataset, uri, BULK_BYTES_MIN)
    if pixel is not None:
        tag, vr = pixel
        attributes[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": base + f"{tag:08X}"}
    # Available Transfer Syntax UID (PS3.18 10.4.1.2): the syntax the instance is stored in.
    attributes.setdefault(AVAILABLE_TRANSFER_SYNTAX, {"vr": "UI", "Value": [syntax]})
    return json.dumps(dict(sorted(attributes.items())), separators=(",", ":")).encode("utf-8")


def _lean_header_json(part10: bytes, syntax: str, base: str, *, whole: bool) -> bytes:
    """header_json by node/header_reader.py: the same bytes as pydicom's conversion, for
    the headers that reader knows; Unsupported for the others."""
    try:
        meta = read_file_meta(part10)
    except MediaError:
        raise Unsupported("no file meta this reader can read") from None
    if meta.transfer_syntax_uid != syntax:
        raise Unsupported("the file meta names another transfer syntax")
    try:
        elements, stopped, at_pixels = header_reader.walk(part10, meta.dataset_offset, syntax)
    except header_reader.Truncated:
        if whole:
            raise Unsupported("a header pydicom reads its own way (cut short)") from None
        raise HeaderTruncated("the header does not end within the bytes given") from None
    if not whole and not at_pixels:
        raise HeaderTruncated("the header does not end at pixel data within the bytes given")
    if not at_pixels and stopped != len(part10):
        raise Unsupported("bytes after the last element")
    attributes = header_reader.json_attributes(part10, elements, lambda path: base + path)
    pixel = _element_at(part10, stopped, syntax) if at_pixels else None
    if pixel is not None:
        tag, vr = pixel
        attributes[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": base + f"{tag:08X}"}
    attributes.setdefault(AVAILABLE_TRANSFER_SYNTAX, {"vr": "UI", "Value": [syntax]})
    return json.dumps(dict(sorted(attributes.items())), separators=(",", ":")).encode("utf-8")


def with_root(stored: bytes, root: str) -> bytes:
    """A stored header_json with its BulkDataURIs under `root` (the DICOMweb root URL)."""
    if _BULK_KEY not in stored:
        return stored
    escaped = json.dumps(root.rstrip("/") + "/")[1:-1].encode("utf-8")
    return stored.replace(_BULK_KEY, _BULK_KEY + escaped)


def bulk_value(dataset: Dataset, path: str) -> DataElement:
    """The element a bulk path names: "7FE00010", or "00880200/0/7FE00010" inside a sequence item."""
    steps = path.strip("/").split("/")
    current: Dataset = dataset
    try:
        while len(steps) > 1:
            sequence = current[Tag(int(steps[0], 16))]
            current = sequence.value[int(steps[1])]
            steps = steps[2:]
        if len(steps) != 1:
            raise BulkDataError(f"bad bulk data path {path[:80]}")
        element = current[Tag(int(steps[0], 16))]
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        raise BulkDataError(f"no bulk data at {path[:80]}") from None
    if not isinstance(element.value, (bytes, bytearray)):
        raise BulkDataError(f"no binary value at {path[:80]}")
    return element


def _bulk_paths(dataset: Dataset, prefix: str = "") -> dict[int, str]:
    """id(element) -> its bulk path, for every element of the dataset and its items."""
    paths: dict[int, str] = {}
    for element in dataset:
        key = f"{prefix}{element.tag:08X}"
        paths[id(element)] = key
        if element.VR == "SQ" and element.value:
            for index, item in enumerate(element.value):
                paths.update(_bulk_paths(item, f"{key}/{index}/"))
    return paths


def _element_at(part10: bytes, position: int, syntax: str) -> tuple[int, str] | None:
    """(tag, VR) of the pixel data element whose header starts at `position` (where the
    header read stopped), or None when the dataset ends there."""
    if position + 8 > len(part10):
        return None
    order = ">" if syntax == _BIG_ENDIAN else "<"
    group, element = struct.unpack_from(order + "HH", part10, position)
    tag = group << 16 | element
    if tag not in PIXEL_TAGS:
        return None
    vr = part10[position + 4:position + 6].decode("latin-1")
    if syntax == _IMPLICIT or not vr.isalpha() or not vr.isupper():
        vr = {0x7FE00008: "OF", 0x7FE00009: "OD"}.get(tag, "OW")
    return tag, vr
