"""C-FIND response identifiers built from index rows as raw, already-encoded elements.

A C-FIND answer is one identifier per matching row, and pynetdicom encodes each one with
pydicom's `write_dataset`. Built the usual way (`Dataset.add_new` per attribute), each
element is converted and then written by its VR's writer: ~0.9 ms of a node's CPU per
row (py-spy, a name-prefix query of ~200 studies), most of a query's cost. A row whose
values are all ASCII text needs none of that: each value is encoded here once, as
`RawDataElement`s (the same bytes pydicom would write: values joined by backslashes,
padded to even length with a space, a UI with NUL), in a Dataset whose original encoding
is set to the association's (`Dataset.set_original_encoding`, which pydicom documents for
this: raw elements are then written as they are, not decoded).

Anything else -- a non-ASCII value (its Specific Character Set decides the bytes), a
binary number, a sequence, a keyword pydicom does not know -- makes `ascii_response`
return None, and the caller builds that row the general way.

`ascii_identifier` goes one step further: the same identifier as little-endian bytes,
which the node's associations send as the Pending response's data set themselves
(node/dicom.py, node/acceptor.py send_find_row), without pydicom's writer at all.
`AsciiIdentifiers` does that for every row of one C-FIND (what the rows share worked out
once), and also takes a row with non-ASCII text whose response character set
(`response_charset`) is ISO_IR 100 or ISO_IR 192: one code table, no escape sequences, so
each value is its plain encoding.
"""

from __future__ import annotations

import re
import struct
from functools import lru_cache
from typing import Any, Iterable

from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

# Value representations whose value is text (PS3.5 6.2), written as its characters.
TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
# Integer strings pydicom writes back unchanged (it rewrites " 0", "+1", "007" from the
# number); any other IS, and every DS, goes the general way.
_CANONICAL_IS = re.compile(r"^(0|-?[1-9][0-9]{0,8})$")


@lru_cache(maxsize=4096)
def _text_tag(keyword: str) -> tuple[int, str] | None:
    """(tag, VR) of a keyword whose VR is text; None for any other keyword. The tag is a
    plain int: a row's tags are sorted in C, not by BaseTag.__lt__ in Python."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    vr = dictionary_VR(tag)
    return (int(tag), vr) if vr in TEXT_VRS else None


def response_charset(row: dict[str, Any]) -> str:
    """The Specific Character Set of a row's identifier that has a non-ASCII value: the
    stored one if it can carry every value, else UTF-8 (ISO_IR 192)."""
    stored = row.get("SpecificCharacterSet")
    candidate = stored if isinstance(stored, str) else ("\\".join(stored) if isinstance(stored, list) else "")
    if candidate:
        encodings = convert_encodings(candidate.split("\\"))
        try:
            for value in row.values():
                for item in value if isinstance(value, list) else [value]:
                    if not str(item).isascii():
                        encode_string(str(item), encodings)
            return candidate
        except (UnicodeError, LookupError, ValueError):
            pass
    return "ISO_IR 192"


# Response character sets whose text pydicom writes as the value's plain encoding (one
# code table, no escape sequences), and the text VRs whose value it encodes with it.
_PLAIN_CHARSETS = {"ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_CHARSET_VRS = frozenset("LO LT PN SH ST UC UT".split())


def _encoded(value: Any, vr: str, codec: str | None = None) -> bytes | None:
    """The value's bytes as pydicom writes them; None when it is not ASCII text (with
    `codec`: when it is not text that codec encodes, in a VR the character set applies to)."""
    if value is None:
        text = ""
    elif isinstance(value, str):
        text = value.strip() if vr == "UI" else value  # pydicom's UID strips whitespace.
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = "\\".join(v.strip() if vr == "UI" else v for v in value)
    else:
        return None
    if not text.isascii():
        if codec is None or vr not in _CHARSET_VRS:
            return None
        try:
            return _padded(text.encode(codec), vr)
        except UnicodeError:
            return None
    if vr == "DS" or (vr == "IS" and text and not all(_CANONICAL_IS.match(part) for part in text.split("\\"))):
        return None
    return _padded(text.encode("ascii"), vr)


def _padded(data: bytes, vr: str) -> bytes:
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def ascii_response(requested: Iterable[str], row: dict[str, Any], level: str, ae_title: str,
                   implicit_vr: bool, little_endian: bool) -> Dataset | None:
    """The identifier for `row` with the `requested` keywords (as DicomFrontEnd builds it:
    QueryRetrieveLevel set, SpecificCharacterSet left out, RetrieveAETitle this node's,
    InstanceAvailability ONLINE, anything unknown empty), or None (see the module). For
    the associations that cannot take `AsciiIdentifiers`' bytes (big endian, deflated):
    the same element table and values, as raw elements pydicom writes unchanged."""
    values = ascii_identifiers(tuple(requested), level, ae_title, implicit_vr).ascii_values(row)
    if values is None:
        return None
    response = Dataset()
    for tag, vr, data in values:
        response[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr, len(data), data, 0, implicit_vr, little_endian)
    response.set_original_encoding(implicit_vr, little_endian, default_encoding)
    return response


# Explicit VR little endian: these text VRs have a 4-byte length after two reserved bytes
# (PS3.5 7.1.2); the others a 2-byte length.
_LONG_LENGTH_VRS = frozenset({"UC", "UR", "UT"})
_TAG = struct.Struct("<HH")
_TAG_VR = struct.Struct("<HH2s")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")


def ascii_identifier(requested: Iterable[str], row: dict[str, Any], level: str, ae_title: str,
                     implicit_vr: bool) -> bytes | None:
    """`ascii_response`'s identifier already encoded, little endian, as pydicom writes that
    Dataset (tests/unit/test_find_rows.py compares them): the node sends it as the Pending
    C-FIND response's data set itself (node/dicom.py), without pydicom's write_dataset
    per row (~a fifth of a node's GIL time on a ~200-row answer). None when
    `ascii_response` would be None, or when a value is too long for its length field.
    One row's worth of AsciiIdentifiers (which a C-FIND makes once for all its rows)."""
    return AsciiIdentifiers(requested, level, ae_title, implicit_vr).encode_ascii(row)


@lru_cache(maxsize=256)
def ascii_identifiers(requested: tuple[str, ...], level: str, ae_title: str, implicit_vr: bool) -> "AsciiIdentifiers":
    """The AsciiIdentifiers of a C-FIND's shape, made once per shape (a requestor asks the
    same keys query after query; ~40 us a C-FIND to make, py-spy). Immutable: shared
    across associations."""
    return AsciiIdentifiers(requested, level, ae_title, implicit_vr)


class AsciiIdentifiers:
    """`ascii_identifier` for every row of one C-FIND: what does not depend on the row (the
    requested keywords' tags and VRs in tag order, each element's header before its
    length, the values this node supplies: QueryRetrieveLevel, RetrieveAETitle,
    InstanceAvailability) is worked out once here, not per row; `encode(row)` then only
    encodes the row's own values."""

    def __init__(self, requested: Iterable[str], level: str, ae_title: str, implicit_vr: bool) -> None:
        # Per tag in order: (pre-encoded element, or None for a row value), keyword, VR,
        # element header, tag, and a supplied value's encoded data (else None).
        self._usable = True
        self._elements: list[tuple[bytes | None, str, str, bytes, int, bytes | None]] = []
        self._implicit_vr = implicit_vr
        # (0008,0005) Specific Character Set (CS), before every other element (_charset_first).
        self._charset_header = _TAG.pack(0x0008, 0x0005) if implicit_vr else _TAG_VR.pack(0x0008, 0x0005, b"CS")
        keywords: dict[int, tuple[str, str]] = {}
        for keyword in requested:
            if keyword == "SpecificCharacterSet":
                continue
            spec = _text_tag(keyword)
            if spec is None:
                self._usable = False  # A keyword that is not text: every row goes the general way.
                return
            keywords[spec[0]] = (keyword, spec[1])
        level_tag, level_vr = _text_tag("QueryRetrieveLevel")  # type: ignore[misc]  # Always text (CS).
        keywords[level_tag] = ("QueryRetrieveLevel", level_vr)
        self._charset_first = min(keywords) > 0x00080005  # Else such a row goes the general way.
        supplied = {"QueryRetrieveLevel": level, "RetrieveAETitle": ae_title, "InstanceAvailability": "ONLINE"}
        for tag in sorted(keywords):
            keyword, vr = keywords[tag]
            group, element = tag >> 16, tag & 0xFFFF
            if implicit_vr:
                header = _TAG.pack(group, element)
            else:
                header = _TAG_VR.pack(group, element, vr.encode("ascii"))
            if keyword in supplied:
                data = _encoded(supplied[keyword], vr)
                encoded = None if data is None else self._element(header, vr, data)
                if encoded is None:
                    self._usable = False
                    return
                self._elements.append((encoded, keyword, vr, header, tag, data))
            else:
                self._elements.append((None, keyword, vr, header, tag, None))

    def _element(self, header: bytes, vr: str, data: bytes) -> bytes | None:
        if self._implicit_vr:
            return header + _UL.pack(len(data)) + data
        if vr in _LONG_LENGTH_VRS:
            return header + b"\x00\x00" + _UL.pack(len(data)) + data
        if len(data) > 0xFFFF:
            return None
        return header + _US.pack(len(data)) + data

    def encode(self, row: dict[str, Any]) -> bytes | None:
        """The identifier for `row` (as ascii_identifier; for a row with a non-ASCII value
        whose response character set is ISO_IR 100 or ISO_IR 192, as the general way
        writes it: that Specific Character Set first, the values in it), or None: build
        it the general way."""
        encoded = self.encode_ascii(row)
        if encoded is not None or not self._usable:
            return encoded
        charset = response_charset(row)
        codec = _PLAIN_CHARSETS.get(charset)
        if codec is None:
            return None
        encoded = self._encode(row, codec)
        if encoded is None:
            return None
        if not self._charset_first:
            return None
        data = _encoded(charset, "CS")
        element = None if data is None else self._element(self._charset_header, "CS", data)
        return None if element is None else element + encoded

    def encode_ascii(self, row: dict[str, Any]) -> bytes | None:
        """ascii_identifier's identifier for `row`: None when a value is not ASCII text."""
        return self._encode(row, None) if self._usable else None

    def ascii_values(self, row: dict[str, Any]) -> list[tuple[int, str, bytes]] | None:
        """(tag, VR, encoded value) of each element of `row`'s identifier in tag order (what
        `encode_ascii` writes, without the headers); None when it would be None."""
        if not self._usable:
            return None
        values: list[tuple[int, str, bytes]] = []
        for _encoded_element, keyword, vr, _header, tag, supplied in self._elements:
            data = supplied if supplied is not None else _encoded(row.get(keyword), vr)
            if data is None:
                return None
            values.append((tag, vr, data))
        return values

    def _encode(self, row: dict[str, Any], codec: str | None) -> bytes | None:
        parts: list[bytes] = []
        for encoded, keyword, vr, header, _tag, _supplied in self._elements:
            if encoded is None:
                data = _encoded(row.get(keyword), vr, codec)
                if data is None:
                    return None
                encoded = self._element(header, vr, data)
                if encoded is None:
                    return None
            parts.append(encoded)
        return b"".join(parts)
