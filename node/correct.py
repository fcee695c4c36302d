"""Apply a study's correction to the bytes retrieval sends: header only, never pixel data.

A corrected study's instances are stored as received; C-GET, C-MOVE and WADO-RS send
each with the correction applied (replication/correction.py). The rewrite walks the
dataset's top-level element headers up to the last correctable tag (StudyID, 0020,0010):
every element a correction names is re-encoded (or inserted where its tag belongs), the
other bytes are copied as they are, and everything after that tag (pixel data included)
is the stored bytes unchanged. The result is the same transfer syntax. A deflated
dataset is inflated, rewritten with pydicom and deflated again (it cannot be split).

Text is encoded in the instance's Specific Character Set; a non-ASCII value in an
instance with the default repertoire switches it to ISO_IR 192 (UTF-8, a superset of the
ASCII the rest of its text is in). A value the instance's character set cannot hold is
written with '?' for those characters (logged, without the value).
"""

from __future__ import annotations

import json
import logging
import struct
from io import BytesIO

from pydicom import dcmread
from pydicom.charset import convert_encodings, encode_string
from pydicom.valuerep import PersonName

from pacsnode.node.ingest import top_level_elements
from pacsnode.replication.correction import CORRECTABLE, LAST_CORRECTABLE_TAG, Correction

log = logging.getLogger(__name__)

_IMPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_CHARSET_TAG = 0x00080005
_UTF8 = "ISO_IR 192"


def corrected(part10: bytes, offset: int, transfer_syntax_uid: str, correction: Correction | None) -> tuple[bytes, int]:
    """(Part-10 bytes, dataset offset) with the correction's values in the header. Without
    a correction (or with an empty one): the bytes given, unchanged (no copy)."""
    if correction is None or not correction.fields:
        return part10, offset
    values = correction.values()
    syntax = transfer_syntax_uid.strip("\x00 ")
    if syntax == _DEFLATED:
        return _rewrite_whole(part10, values)
    little = syntax != _EXPLICIT_BIG_ENDIAN
    implicit = syntax == _IMPLICIT_LITTLE_ENDIAN
    order = "<" if little else ">"
    elements = list(top_level_elements(part10, offset, little_endian=little, implicit_vr=implicit,
                                       last_tag=LAST_CORRECTABLE_TAG))
    split = elements[-1][3] if elements else offset
    charsets = ["ISO_IR 6"]
    for start, tag, vr, end in elements:
        if tag == _CHARSET_TAG:
            value_start = start + 8
            raw = part10[value_start:end].decode("ascii", "replace").strip("\x00 ")
            charsets = [c.strip() for c in raw.split("\\")] if raw else ["ISO_IR 6"]
    new: dict[int, str] = {CORRECTABLE[k][0]: v for k, v in values.items()}
    if not all(v.isascii() for v in values.values()) and charsets[0] in ("", "ISO_IR 6") and len(charsets) == 1:
        charsets = [_UTF8]
        new[_CHARSET_TAG] = _UTF8
    encodings = convert_encodings(charsets)
    out = bytearray(part10[:offset])
    pending = sorted(new)
    for start, tag, _vr, end in elements:
        while pending and pending[0] < tag:
            out += _element(pending[0], new[pending.pop(0)], encodings, order, implicit)
        if pending and pending[0] == tag:
            out += _element(tag, new[pending.pop(0)], encodings, order, implicit)
        else:
            out += part10[start:end]
    for tag in pending:
        out += _element(tag, new[tag], encodings, order, implicit)
    out += part10[split:]
    return bytes(out), offset


def _vr_of(tag: int) -> str:
    if tag == _CHARSET_TAG:
        return "CS"
    return next(vr for t, vr in CORRECTABLE.values() if t == tag)


def _element(tag: int, value: str, encodings: list[str], order: str, implicit: bool) -> bytes:
    vr = _vr_of(tag)
    if vr == "PN":
        data = PersonName(value).encode(encodings)
    elif value.isascii():
        data = value.encode("ascii")
    else:
        try:
            data = encode_string(value, encodings)
        except (UnicodeError, LookupError):
            log.warning("correct.encode.lossy tag=%08X charset_count=%d", tag, len(encodings))
            data = value.encode(encodings[0], "replace") if encodings else value.encode("ascii", "replace")
    if len(data) % 2:
        data += b" "
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack(order + "HHL", group, element, len(data)) + data
    return struct.pack(order + "HH2sH", group, element, vr.encode("ascii"), len(data)) + data


def _rewrite_whole(part10: bytes, values: dict[str, str]) -> tuple[bytes, int]:
    dataset = dcmread(BytesIO(part10))
    if not all(v.isascii() for v in values.values()) and str(dataset.get("SpecificCharacterSet", "") or "") in (
            "", "ISO_IR 6"):
        dataset.SpecificCharacterSet = _UTF8
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    # Preamble (128) + "DICM" + (0002,0000) UL element (12 bytes, its value the rest of the meta).
    meta_length = struct.unpack_from("<L", data, 140)[0]
    return data, 144 + meta_length


def overlay_json(part: bytes, correction_json: str) -> bytes:
    """One instance's DICOM JSON (/metadata) with the study's correction put over it."""
    correction = Correction.loads(correction_json)
    if not correction.fields:
        return part
    attributes = json.loads(part)
    for keyword, value in correction.values().items():
        tag, vr = CORRECTABLE[keyword]
        if not value:
            attributes[f"{tag:08X}"] = {"vr": vr}
        elif vr == "PN":
            groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), value.split("=")))
            attributes[f"{tag:08X}"] = {"vr": vr, "Value": [{k: v for k, v in groups.items() if v}]}
        else:
            attributes[f"{tag:08X}"] = {"vr": vr, "Value": [value]}
    return json.dumps(dict(sorted(attributes.items())), separators=(",", ":")).encode("utf-8")
