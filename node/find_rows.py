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
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterable

from pydicom.charset import default_encoding
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
def _text_tag(keyword: str) -> tuple[BaseTag, str] | None:
    """(tag, VR) of a keyword whose VR is text; None for any other keyword."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    vr = dictionary_VR(tag)
    return (BaseTag(tag), vr) if vr in TEXT_VRS else None


def _encoded(value: Any, vr: str) -> bytes | None:
    """The value's bytes as pydicom writes them; None when it is not ASCII text."""
    if value is None:
        text = ""
    elif isinstance(value, str):
        text = value.strip() if vr == "UI" else value  # pydicom's UID strips whitespace.
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = "\\".join(v.strip() if vr == "UI" else v for v in value)
    else:
        return None
    if not text.isascii():
        return None
    if vr == "DS" or (vr == "IS" and text and not all(_CANONICAL_IS.match(part) for part in text.split("\\"))):
        return None
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


def ascii_response(requested: Iterable[str], row: dict[str, Any], level: str, ae_title: str,
                   implicit_vr: bool, little_endian: bool) -> Dataset | None:
    """The identifier for `row` with the `requested` keywords (as DicomFrontEnd builds it:
    QueryRetrieveLevel set, SpecificCharacterSet left out, RetrieveAETitle this node's,
    InstanceAvailability ONLINE, anything unknown empty), or None (see the module)."""
    elements: dict[BaseTag, RawDataElement] = {}
    for keyword in requested:
        if keyword == "SpecificCharacterSet":
            continue
        spec = _text_tag(keyword)
        if spec is None:
            return None
        tag, vr = spec
        if keyword == "QueryRetrieveLevel":
            value: Any = level
        elif keyword == "RetrieveAETitle":
            value = ae_title
        elif keyword == "InstanceAvailability":
            value = "ONLINE"
        else:
            value = row.get(keyword)
        data = _encoded(value, vr)
        if data is None:
            return None
        elements[tag] = RawDataElement(tag, vr, len(data), data, 0, implicit_vr, little_endian)
    tag, vr = _text_tag("QueryRetrieveLevel")  # type: ignore[misc]  # Always text (CS).
    data = _encoded(level, vr)
    if data is None:
        return None
    elements[tag] = RawDataElement(tag, vr, len(data), data, 0, implicit_vr, little_endian)
    response = Dataset()
    for tag in sorted(elements):
        response[tag] = elements[tag]
    response.set_original_encoding(implicit_vr, little_endian, default_encoding)
    return response
