"""A lean reader of DICOM headers, straight from the bytes, for the common encodings.

pydicom reads a header into a Dataset and converts each value through its element
machinery (tens of microseconds an element). Two hot paths only need plain values: the
index attributes read at ingest (C-STORE, STOW-RS) and an instance's /metadata JSON.
This module walks the element headers itself and converts values the way pydicom 3.0
does, for what it knows:

- Explicit and Implicit VR Little Endian (big endian and deflated: not here);
- Specific Character Set absent, ISO_IR 6, ISO_IR 100 or ISO_IR 192, with no escape
  sequences, and no item carrying its own character set;
- every VR but UN and the dictionary's ambiguous ones ("US or SS", "OB or OW");
- tags in ascending order, private tags only in Explicit VR;
- values pydicom converts without a second guess: an IS that is an integer, a DS that
  is a finite decimal number, a PN with a component, binary numbers of whole values.

Anything else raises Unsupported and the caller reads the header with pydicom, so the
answer is always pydicom's: tests/unit/test_header_reader.py compares the two on every
test file of pydicom and of this project.
"""

from __future__ import annotations

import base64
import re
import struct
from typing import Any, Callable

from pydicom.datadict import dictionary_VR, keyword_for_tag

Items = list[list["Element"]]
Element = tuple[int, str, int, int, "Items | None"]  # tag, VR, value start, value end, sequence items

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Where pydicom's stop_before_pixels stops.
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
SPECIFIC_CHARACTER_SET = 0x00080005
BULK_INLINE_BYTES_MAX = (1024 // 4) * 3  # pydicom: base64 longer than the 1024 threshold becomes bulk data.

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_DEPTH_MAX = 16
_TAG_LENGTH = struct.Struct("<HHL")
_SHORT_LENGTH = struct.Struct("<H")
_LONG_LENGTH = struct.Struct("<L")
_VRS = {name.encode(): name for name in (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV").split()}
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_CHARSET_CODECS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_DEFAULT_CODEC = "latin_1"  # pydicom's default_encoding, "iso8859".
_IS = re.compile(r"\s*[+-]?[0-9]+\s*\Z")
_DS = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*\Z")
_dictionary_vrs: dict[int, str] = {}


class Unsupported(Exception):
    """The header uses something this reader leaves to pydicom."""


class Truncated(Exception):
    """The bytes end inside the header (given only the first bytes of an instance)."""


def _dictionary_vr(tag: int) -> str:
    vr = _dictionary_vrs.get(tag)
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise Unsupported(f"({tag:08X}) is not in the dictionary") from None
        if " or " in vr:
            raise Unsupported(f"({tag:08X}) has an ambiguous VR")
        _dictionary_vrs[tag] = vr
    return vr


class _Walker:
    def __init__(self, data: Any, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit

    def elements(self, position: int, end: int, *, depth: int, delimited: bool, top: bool,
                 stop_after: int) -> tuple[list[Element], int, bool]:
        """The elements from `position` to `end` (or to an item delimiter when `delimited`):
        (elements, position after them, stopped at pixel data). At the top level the walk
        stops at pixel data, or before the first tag past `stop_after`."""
        data = self.data
        implicit = self.implicit
        found: list[Element] = []
        previous = -1
        while True:
            if position >= end:
                if delimited:
                    raise Truncated("item without its delimiter")
                return found, position, False
            if position + 8 > end:
                raise Truncated("element header cut short")
            group, number, length = _TAG_LENGTH.unpack_from(data, position)
            tag = group << 16 | number
            if group == 0xFFFE:
                if delimited and tag == _ITEM_END:
                    return found, position + 8, False
                raise Unsupported("an item tag among elements")
            if tag <= previous:
                raise Unsupported("tags out of order")
            previous = tag
            if top:
                if tag in PIXEL_TAGS:
                    return found, position, True
                if tag > stop_after:
                    return found, position, False
            if group <= 0x0002:
                raise Unsupported("a command or file meta element in the dataset")
            code = bytes(data[position + 4:position + 6])
            if implicit:
                if group & 1:
                    raise Unsupported("a private tag in Implicit VR")
                if code in _VRS:
                    raise Unsupported("Implicit VR that looks explicit")  # pydicom would switch.
                vr = _dictionary_vr(tag)
                position += 8
            else:
                name = _VRS.get(code)
                if name is None:
                    raise Unsupported("an element without a known VR")
                vr = name
                if vr in _LONG_VRS:
                    if position + 12 > end:
                        raise Truncated("element header cut short")
                    length = _LONG_LENGTH.unpack_from(data, position + 8)[0]
                    position += 12
                else:
                    length = _SHORT_LENGTH.unpack_from(data, position + 6)[0]
                    position += 8
            if vr == "UN":
                raise Unsupported("a UN element")
            if length == _UNDEFINED:
                if vr != "SQ":
                    raise Unsupported("an undefined length outside a sequence")
                if depth >= _DEPTH_MAX:
                    raise Unsupported("sequences nested too deep")
                start = position
                items, position = self.items(position, end, depth=depth + 1, delimited=True)
                found.append((tag, vr, start, position, items))
                continue
            value_end = position + length
            if value_end > end:
                raise Truncated("value cut short")
            if vr == "SQ":
                if depth >= _DEPTH_MAX:
                    raise Unsupported("sequences nested too deep")
                items, _after = self.items(position, value_end, depth=depth + 1, delimited=False)
                found.append((tag, vr, position, value_end, items))
            else:
                found.append((tag, vr, position, value_end, None))
            position = value_end

    def items(self, position: int, end: int, *, depth: int, delimited: bool) -> tuple[Items, int]:
        items: Items = []
        while True:
            if position >= end and not delimited:
                return items, position
            if position + 8 > end:
                raise Truncated("sequence cut short")
            group, number, length = _TAG_LENGTH.unpack_from(self.data, position)
            tag = group << 16 | number
            position += 8
            if tag == _SEQUENCE_END and delimited:
                return items, position
            if tag != _ITEM:
                raise Unsupported("a sequence holding something other than items")
            if length == _UNDEFINED:
                elements, position, _ = self.elements(position, end, depth=depth, delimited=True, top=False,
                                                      stop_after=_UNDEFINED)
            else:
                if position + length > end:
                    raise Truncated("item cut short")
                elements, _after, _ = self.elements(position, position + length, depth=depth, delimited=False,
                                                    top=False, stop_after=_UNDEFINED)
                position += length
            if any(element[0] == SPECIFIC_CHARACTER_SET for element in elements):
                raise Unsupported("an item with its own character set")
            items.append(elements)


def walk(data: Any, offset: int, transfer_syntax_uid: str, *, stop_after: int = _UNDEFINED,
         end: int | None = None) -> tuple[list[Element], int, bool]:
    """The top-level elements of the dataset at `offset`, up to pixel data or the first tag
    past `stop_after`: (elements, where the walk stopped, stopped at pixel data).
    Raises Unsupported, or Truncated when the bytes end inside an element."""
    syntax = transfer_syntax_uid.strip("\x00 ")
    if syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        raise Unsupported(f"transfer syntax {syntax[:64]}")
    walker = _Walker(data, implicit=syntax == IMPLICIT_VR_LITTLE_ENDIAN)
    return walker.elements(offset, len(data) if end is None else end, depth=0, delimited=False, top=True,
                           stop_after=stop_after)


def text_codec(data: Any, elements: list[Element]) -> str:
    """The Python codec of the dataset's text values (its Specific Character Set)."""
    for tag, _vr, start, value_end, _items in elements:
        if tag == SPECIFIC_CHARACTER_SET:
            values = bytes(data[start:value_end]).decode(_DEFAULT_CODEC).rstrip(" \x00").split("\\")
            codec = _CHARSET_CODECS.get(values[0].strip()) if len(values) == 1 else None
            if codec is None:
                raise Unsupported("a character set this reader leaves to pydicom")
            return codec
        if tag > SPECIFIC_CHARACTER_SET:
            break
    return _DEFAULT_CODEC


def _decode(raw: bytes, codec: str) -> str:
    if b"\x1b" in raw:
        raise Unsupported("an escape sequence in a text value")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        raise Unsupported("a text value its character set cannot decode") from None


def _person_name(text: str) -> tuple[str, ...]:
    components = text.split("=")
    while components and not components[-1]:
        components.pop()
    return tuple(components)


def values(vr: str, raw: bytes, codec: str) -> list[Any]:
    """An element's values as pydicom 3.0 decodes them, as plain Python values (text as
    str, IS as int, DS as float, PN as its components, AT as an int); [] when empty."""
    if not raw:
        return []
    if vr in ("CS", "DA", "TM", "DT", "AS"):
        items = raw.decode(_DEFAULT_CODEC).rstrip(" \x00").split("\\")
        return items if len(items) > 1 or items[0] else []
    if vr in ("SH", "LO", "UC"):
        items = [item.rstrip("\x00 ") for item in _decode(raw, codec).split("\\")]
        return items if len(items) > 1 or items[0] else []
    if vr == "UI":
        items = raw.decode(_DEFAULT_CODEC).rstrip("\x00 ").split("\\")
        return items if len(items) > 1 or items[0] else []
    if vr in ("ST", "LT", "UT"):
        text = _decode(raw, codec).rstrip("\x00 ")
        return [text] if text else []
    if vr == "UR":
        text = raw.decode(_DEFAULT_CODEC).rstrip()
        return [text] if text else []
    if vr == "AE":
        items = [item.strip() for item in raw.decode(_DEFAULT_CODEC).split("\\")]
        return items if len(items) > 1 or items[0] else []
    if vr == "PN":
        stripped = raw.rstrip(b"\x00 ")
        if not stripped:
            return []
        names = [_person_name(item) for item in _decode(stripped, codec).split("\\")]
        if not all(names):
            raise Unsupported("a PN value without a component")
        return names
    if vr == "IS":
        items = raw.decode(_DEFAULT_CODEC).rstrip(" \x00").split("\\")
        if len(items) == 1 and not items[0].strip():
            return []
        if not all(_IS.match(item) for item in items):
            raise Unsupported("an IS value that is not an integer")
        integers = [int(item) for item in items]
        if any(abs(value) >= 2**53 for value in integers):
            raise Unsupported("an IS value pydicom keeps as a float")  # IS becomes ISfloat past float's precision.
        return integers
    if vr == "DS":
        items = raw.decode(_DEFAULT_CODEC).strip().rstrip(" \x00").split("\\")
        if len(items) == 1 and not items[0].strip():
            return []
        if not all(_DS.match(item) for item in items):
            raise Unsupported("a DS value that is not a decimal number")
        numbers = [float(item) for item in items]
        if any(number in (float("inf"), float("-inf")) for number in numbers):
            raise Unsupported("a DS value out of range")
        return numbers
    number_format = _NUMBER_FORMATS.get(vr)
    if number_format is not None:
        size = struct.calcsize("<" + number_format)
        if len(raw) % size:
            raise Unsupported("binary numbers of a length that is not whole values")
        return list(struct.unpack(f"<{len(raw) // size}{number_format}", raw))
    if vr == "AT":
        if len(raw) % 4:
            raise Unsupported("an AT value of a length that is not whole tags")
        pairs = struct.unpack(f"<{len(raw) // 2}H", raw)
        return [pairs[index] << 16 | pairs[index + 1] for index in range(0, len(pairs), 2)]
    raise Unsupported(f"no value conversion for VR {vr}")


# ------------------------------------------------------------------ the index attributes


_keywords: dict[int, str] = {}


def index_attributes(data: Any, offset: int, transfer_syntax_uid: str,
                     tags: frozenset[int]) -> dict[str, str | list[str]]:
    """The attributes the index keeps (keyword -> text, or a list of texts for several
    values; empty ones left out), exactly as node/ingest.py's pydicom read gives them:
    each value as pydicom's str() of it. Reads up to the last tag asked for.
    Raises Unsupported or Truncated."""
    return index_attributes_walked(data, offset, transfer_syntax_uid, tags)[0]


def index_attributes_walked(data: Any, offset: int, transfer_syntax_uid: str,
                            tags: frozenset[int]) -> tuple[dict[str, str | list[str]], int]:
    """index_attributes, and where its walk stopped: the top-level elements from `offset`
    to there are whole (every header and value inside the bytes, every sequence and item
    closed), so a check of the whole dataset's structure (node/ingest.py check_complete)
    goes on from there. Raises Unsupported or Truncated."""
    if len(data) < 132 or data[128:132] != b"DICM" or offset < 132:
        raise Unsupported("not a Part-10 file")  # pydicom decides what such bytes are.
    elements, position, _pixels = walk(data, offset, transfer_syntax_uid, stop_after=max(tags))
    if not elements:
        raise Unsupported("no elements")
    codec = text_codec(data, elements)
    attributes: dict[str, str | list[str]] = {}
    for tag, vr, start, value_end, _items in elements:
        if tag not in tags or vr == "SQ":
            continue
        keyword = _keywords.get(tag)
        if keyword is None:
            keyword = _keywords[tag] = keyword_for_tag(tag)
        raw = bytes(data[start:value_end])
        if vr in _BINARY_VRS or vr == "AT":
            raise Unsupported(f"an index attribute with VR {vr}")
        if vr == "IS" or vr == "DS":
            texts = _number_texts(vr, raw)
        elif vr == "PN":
            texts = ["=".join(name) for name in values(vr, raw, codec)] if raw.rstrip(b"\x00 ") else []
        elif vr in _NUMBER_FORMATS:
            texts = [str(value) for value in values(vr, raw, codec)]
        else:
            texts = values(vr, raw, codec)
        if len(texts) > 1:
            attributes[keyword] = texts
        elif texts and texts[0] != "":
            attributes[keyword] = texts[0]
    return attributes, position


def _number_texts(vr: str, raw: bytes) -> list[str]:
    """IS/DS as pydicom's str() gives them: each value's original text, stripped."""
    text = raw.decode(_DEFAULT_CODEC)
    items = (text.strip() if vr == "DS" else text).rstrip(" \x00").split("\\")
    pattern = _IS if vr == "IS" else _DS
    if len(items) == 1 and not items[0].strip():
        return []
    if not all(pattern.match(item) for item in items):
        raise Unsupported(f"an {vr} value pydicom would read another way")
    if vr == "IS" and any(abs(int(item)) >= 2**53 for item in items):
        raise Unsupported("an IS value pydicom keeps as a float")
    return [item.strip() for item in items]


# ------------------------------------------------------------------ DICOM JSON (PS3.18 F), as pydicom writes it


def json_attributes(data: Any, elements: list[Element], bulk_uri: Callable[[str], str]) -> dict[str, Any]:
    """The elements in the DICOM JSON model exactly as pydicom's Dataset.to_json_dict gives
    them (bulk data threshold 1024, binary values longer than BULK_INLINE_BYTES_MAX as
    {"vr", "BulkDataURI": bulk_uri(path)}, path "TAG" or "SEQ/index/TAG"), in tag order."""
    return _json_dataset(data, elements, text_codec(data, elements), bulk_uri, "")


# The JSON entry of each short element value seen lately, by (tag, VR, character set,
# raw bytes): the instances of a series repeat most of their header (patient, study,
# series, equipment), so a series' first /metadata converts each such value once. A pure
# function's results: shared between the answers, never changed after they are made.
_MEMO_VALUE_BYTES_MAX = 256
_MEMO_ENTRIES_MAX = 8192
_json_entries: dict[tuple[int, str, str, bytes], dict[str, Any]] = {}


def _json_dataset(data: Any, elements: list[Element], codec: str, bulk_uri: Callable[[str], str],
                  prefix: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for tag, vr, start, value_end, items in elements:
        key = f"{tag:08X}"
        if items is not None:
            result[key] = {"vr": "SQ", "Value": [_json_dataset(data, item, codec, bulk_uri, f"{prefix}{key}/{index}/")
                                                 for index, item in enumerate(items)]}
            continue
        if vr in _BINARY_VRS:
            length = value_end - start
            if length == 0:
                result[key] = {"vr": vr}
            elif length > BULK_INLINE_BYTES_MAX:
                result[key] = {"vr": vr, "BulkDataURI": bulk_uri(prefix + key)}
            else:
                result[key] = {"vr": vr, "InlineBinary": base64.b64encode(bytes(data[start:value_end])).decode("ascii")}
            continue
        raw = bytes(data[start:value_end])
        memo_key = (tag, vr, codec, raw) if value_end - start <= _MEMO_VALUE_BYTES_MAX else None
        if memo_key is not None:
            entry = _json_entries.get(memo_key)
            if entry is not None:
                result[key] = entry
                continue
        converted = values(vr, raw, codec)
        if not converted:
            result[key] = {"vr": vr}
        elif vr == "PN":
            result[key] = {"vr": vr, "Value": [_pn_json(name) for name in converted]}
        elif vr == "AT":
            result[key] = {"vr": vr, "Value": [f"{value:08X}" for value in converted]}
        elif vr == "FL" or vr == "FD":
            result[key] = {"vr": vr, "Value": [float(value) for value in converted]}
        else:
            result[key] = {"vr": vr, "Value": converted}
        if memo_key is not None:
            if len(_json_entries) >= _MEMO_ENTRIES_MAX:
                _json_entries.clear()
            _json_entries[memo_key] = result[key]
    return result


def _pn_json(components: tuple[str, ...]) -> dict[str, str]:
    name = {"Alphabetic": components[0]}
    if len(components) > 1:
        name["Ideographic"] = components[1]
    if len(components) > 2:
        name["Phonetic"] = components[2]
    return name
