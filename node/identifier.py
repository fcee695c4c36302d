"""A C-FIND/C-GET/C-MOVE request's Identifier read from its bytes, without a pydicom Dataset.

pynetdicom's `event.identifier` decodes the request's Identifier into a pydicom Dataset
(`read_dataset`), and every element read from it is converted by the Dataset's machinery
(`Dataset.__getitem__`: a DataElement made from the RawDataElement and stored back). Read
twice per C-FIND (the audit trail's keys, node/dicom_guard.py, then the query,
node/dicom.py find_request), that was ~10 % of a node's CPU on an exact-key C-FIND at
100 000 studies (py-spy, bench/README.md stop 32). An identifier of plain elements is
read here instead, once per request: each element's value is still pydicom's own
(`pydicom.values.convert_value`, the converter `Dataset.__getitem__` ends in), so the
values, their types and their `str()` are the same; only the Dataset is left out.

Anything this does not read the way pydicom would for certain -- a Specific Character
Set, a sequence or an undefined length, a value that is not text (or is an IS or DS), a tag pydicom's dictionary does not hold
(private, repeater, unknown), an ambiguous VR, an explicit VR other than the dictionary's,
a big-endian or deflated syntax, bytes that do not add up -- gives None, and the caller
reads `event.identifier` as before (which answers an undecodable identifier as before).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, cast

from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.datadict import dictionary_has_tag, dictionary_keyword, dictionary_VR
from pydicom.tag import BaseTag
from pydicom.values import convert_value

_IMPLICIT = struct.Struct("<HHL")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<L")
# Explicit VR little endian: these VRs have two reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
                              b"UV"})
_SPECIFIC_CHARACTER_SET = 0x00080005
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Text VRs (PS3.5 6.2) but IS and DS: the value pydicom's converter gives (a str, a UID, a
# PersonName, or a MultiValue of them) is the DataElement's value as it is. An element of
# another VR is read here only when empty (its value then is pydicom's empty value).
_TEXT_VRS = frozenset("AE AS CS DA DT LO LT PN SH ST TM UC UI UR UT".split())
_ATTRIBUTE = "_pacsnode_identifier"
_NOT_READ = object()


@dataclass(frozen=True, slots=True)
class IdentifierElement:
    """What the node reads of a pydicom DataElement: `tag` (an int), `keyword`, `VR`, `value`."""

    tag: int
    keyword: str
    VR: str
    value: Any


@lru_cache(maxsize=4096)
def _known(tag: int) -> tuple[str, str] | None:
    """(keyword, VR) of a tag pydicom's dictionary holds with one VR; None otherwise."""
    if not dictionary_has_tag(tag):
        return None
    vr = dictionary_VR(tag)
    if len(vr) != 2 or vr == "SQ":
        return None
    return dictionary_keyword(tag), vr


class Identifier:
    """The elements of an identifier, in tag order, with a Dataset's `get(keyword)` and
    iteration (what node/dicom.py find_request and node/dicom_guard.py read)."""

    def __init__(self, elements: list[IdentifierElement]) -> None:
        self._elements = elements
        self._by_keyword = {element.keyword: element for element in elements}

    def __iter__(self) -> Iterator[IdentifierElement]:
        return iter(self._elements)

    def get(self, keyword: str, default: Any = None) -> Any:
        element = self._by_keyword.get(keyword)
        return default if element is None else element.value


def read(data: bytes, implicit_vr: bool) -> Identifier | None:
    """The identifier in `data` (little endian), or None (see the module)."""
    elements: list[IdentifierElement] = []
    offset, total, previous = 0, len(data), -1
    while offset < total:
        if implicit_vr:
            if offset + 8 > total:
                return None
            group, number, length = _IMPLICIT.unpack_from(data, offset)
            offset += 8
            explicit = None
        else:
            if offset + 8 > total:
                return None
            group, number, explicit, length = _EXPLICIT_SHORT.unpack_from(data, offset)
            offset += 8
            if explicit in _LONG_LENGTH_VRS:
                if offset + 4 > total:
                    return None
                length = _LONG_LENGTH.unpack_from(data, offset)[0]
                offset += 4
        tag = group << 16 | number
        if tag <= previous or tag == _SPECIFIC_CHARACTER_SET or length == _UNDEFINED_LENGTH \
                or offset + length > total:
            return None
        previous = tag
        known = _known(tag)
        if known is None:
            return None
        keyword, vr = known
        if (explicit is not None and explicit != vr.encode("ascii")) or (length and vr not in _TEXT_VRS):
            return None
        if not length:  # A return key: what convert_value gives for an empty value.
            elements.append(IdentifierElement(tag, keyword, vr, empty_value_for_VR(vr)))
            continue
        value_bytes = data[offset:offset + length]
        offset += length
        raw = RawDataElement(BaseTag(tag), vr, length, value_bytes, 0, implicit_vr, True)
        try:
            value = convert_value(vr, raw, None)
        except Exception:  # Let pydicom's Dataset read it (and fail) the usual way.
            return None
        elements.append(IdentifierElement(tag, keyword, vr, value))
    return Identifier(elements)


def of_request(event: Any) -> Identifier | None:
    """The request's identifier read here, once per event (kept on it), or None: read
    `event.identifier`. Never raises."""
    cached = getattr(event, _ATTRIBUTE, _NOT_READ)
    if cached is not _NOT_READ:
        return cast("Identifier | None", cached)
    found: Identifier | None = None
    try:
        syntax = event.context.transfer_syntax
        identifier = event.request.Identifier
        if syntax.is_little_endian and not syntax.is_deflated and identifier is not None:
            found = read(identifier.getvalue(), bool(syntax.is_implicit_VR))
    except Exception:  # Anything unexpected: pydicom's way.
        found = None
    try:
        setattr(event, _ATTRIBUTE, found)
    except AttributeError:
        pass
    return found
