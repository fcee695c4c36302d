"""Turn received DICOM bytes into an `Instance`, reading only the header tags we index.

The dataset is never decoded in full: node/header_reader.py reads the indexed tags
straight from the bytes (pydicom with `stop_before_pixels` and `specific_tags` for the
headers it leaves to pydicom), and the bytes are kept exactly as received.
"""

from __future__ import annotations

import base64
import re
import struct
from io import BytesIO
from typing import Any, Iterable, Iterator

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from pacsnode.node import codec, header_reader
from pacsnode.replication.model import ALL_INDEXED_KEYWORDS, Attributes, Instance, content_hash

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
def _tags(keywords: Iterable[str]) -> list[int]:
    """The tags of the keywords pydicom knows (an unknown keyword has none)."""
    return [tag for tag in map(tag_for_keyword, keywords) if tag is not None]


_INDEX_TAGS = _tags([*ALL_INDEXED_KEYWORDS, "SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"])
_INDEX_TAG_SET = frozenset(_INDEX_TAGS)


class InvalidInstance(Exception):
    """The dataset cannot be archived; `status` is the C-STORE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


_DEFLATED_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
_IMPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _DatasetWalker:
    """Walks element headers (never values) to prove a dataset is whole: every header and
    defined-length value lies inside the bytes, and every undefined length is closed.

    The header read (`stop_before_pixels`, `specific_tags`) skips values by seeking, so
    on its own it accepts a dataset cut short anywhere after the tags it wants.
    """

    def __init__(self, data: bytes, little_endian: bool) -> None:
        self._data = data
        self._end = len(data)
        order = "<" if little_endian else ">"
        self._tag_length = struct.Struct(order + "HHL")  # Implicit VR elements and all items.
        self._explicit = struct.Struct(order + "HH2sH")
        self._length = struct.Struct(order + "L")

    def elements(self, position: int, *, implicit_vr: bool, in_item: bool) -> int:
        while position < self._end:
            if position + 8 > self._end:
                raise ValueError(f"element header cut short at {position}")
            group, element, length = self._tag_length.unpack_from(self._data, position)
            if group == 0xFFFE:
                if in_item and (group << 16 | element) == _ITEM_END:
                    return position + 8
                raise ValueError(f"unexpected item tag at {position}")
            vr = b""
            if implicit_vr:
                position += 8
            else:
                _group, _element, vr, short_length = self._explicit.unpack_from(self._data, position)
                if vr in _LONG_LENGTH_VRS:
                    if position + 12 > self._end:
                        raise ValueError(f"element header cut short at {position}")
                    length = self._length.unpack_from(self._data, position + 8)[0]
                    position += 12
                elif b"AA" <= vr <= b"ZZ":
                    length = short_length
                    position += 8
                else:  # Some writers switch to implicit VR (pydicom reads these too).
                    position += 8
            if length == _UNDEFINED_LENGTH:
                # UN of undefined length is a sequence in Implicit VR (PS3.5 6.2.2).
                position = self.items(position, implicit_vr=implicit_vr or vr == b"UN")
            else:
                position += length
                if position > self._end:
                    raise ValueError(f"value of ({group:04X},{element:04X}) cut short")
        if in_item:
            raise ValueError("item without its delimiter")
        return position

    def items(self, position: int, *, implicit_vr: bool) -> int:
        while True:
            if position + 8 > self._end:
                raise ValueError("sequence without its delimiter")
            group, element, length = self._tag_length.unpack_from(self._data, position)
            tag = group << 16 | element
            position += 8
            if tag == _SEQUENCE_END:
                return position
            if tag != _ITEM:
                raise ValueError(f"expected an item at {position - 8}")
            if length == _UNDEFINED_LENGTH:
                # Like pydicom, trust the first element's bytes over the transfer syntax:
                # some writers switch VR encoding inside sequences.
                vr = bytes(self._data[position + 4 : position + 6])
                position = self.elements(position, implicit_vr=vr not in _KNOWN_VRS, in_item=True)
            else:
                position += length
                if position > self._end:
                    raise ValueError("item cut short")


def top_level_elements(data: bytes, position: int, *, little_endian: bool, implicit_vr: bool,
                       last_tag: int) -> Iterator[tuple[int, int, bytes, int]]:
    """(start, tag, VR (b"" in Implicit VR), end) of each top-level element from `position`,
    while its tag is at most `last_tag`: headers are read, values skipped (sequences walked
    item by item), never decoded. Raises ValueError on a header or value cut short."""
    walker = _DatasetWalker(data, little_endian)
    order = "<" if little_endian else ">"
    tag_length = struct.Struct(order + "HHL")
    explicit = struct.Struct(order + "HH2sH")
    long_length = struct.Struct(order + "L")
    end = len(data)
    while position + 8 <= end:
        start = position
        group, element, length = tag_length.unpack_from(data, position)
        tag = group << 16 | element
        if tag > last_tag:
            return
        vr = b""
        if implicit_vr:
            position += 8
        else:
            _group, _element, vr, short_length = explicit.unpack_from(data, position)
            if vr in _LONG_LENGTH_VRS:
                if position + 12 > end:
                    raise ValueError(f"element header cut short at {position}")
                length = long_length.unpack_from(data, position + 8)[0]
                position += 12
            else:
                length = short_length
                position += 8
        if length == _UNDEFINED_LENGTH:
            position = walker.items(position, implicit_vr=implicit_vr or vr == b"UN")
        else:
            position += length
            if position > end:
                raise ValueError(f"value of ({group:04X},{element:04X}) cut short")
        yield start, tag, vr, position


def check_complete(part10: bytes, dataset_offset: int, transfer_syntax_uid: str, *, start: int | None = None) -> None:
    """Raise InvalidInstance(0xC000) when the dataset is truncated or its structure is broken.
    `start`: the top-level elements from the offset to there are known to be whole (the
    header read walked them, node/header_reader.py index_attributes_walked); only the rest
    is walked."""
    if transfer_syntax_uid == _DEFLATED_LITTLE_ENDIAN:
        return  # Compressed as a whole; the header read inflates (and checks) it.
    if not 0 <= dataset_offset <= len(part10):
        raise InvalidInstance(STATUS_CANNOT_UNDERSTAND, "dataset offset outside the received bytes")
    walker = _DatasetWalker(part10, little_endian=transfer_syntax_uid != _EXPLICIT_BIG_ENDIAN)
    try:
        walker.elements(dataset_offset if start is None else start,
                        implicit_vr=transfer_syntax_uid == _IMPLICIT_LITTLE_ENDIAN, in_item=False)
    except (ValueError, struct.error, RecursionError) as error:
        raise InvalidInstance(STATUS_CANNOT_UNDERSTAND, f"truncated or malformed dataset: {error}") from None


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))


def element_text(value: Any) -> str | list[str]:
    """A decoded element value as the index keeps it: a string, or a list of strings."""
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace").rstrip("\x00 ")
    return "" if value is None else str(value)


def read_attributes(stream: bytes, keywords: Iterable[str] | None = None) -> tuple[Dataset, Attributes]:
    """Read the header of a Part-10 byte string; return the dataset and indexed attributes.

    Raises InvalidInstance(0xC000) when the bytes are not a readable DICOM dataset.
    """
    tags = _INDEX_TAGS if keywords is None else _tags(keywords)
    try:
        dataset = dcmread(BytesIO(stream), stop_before_pixels=True, specific_tags=tags)
        attributes: Attributes = {}
        for element in dataset:
            keyword = element.keyword
            if not keyword or element.VR == "SQ":
                continue
            text = element_text(element.value)
            if text != "" and text != []:
                attributes[keyword] = text
    except InvalidInstance:
        raise
    except Exception as error:  # pydicom raises many types on malformed input
        raise InvalidInstance(STATUS_CANNOT_UNDERSTAND, f"unreadable dataset: {type(error).__name__}") from None
    return dataset, attributes


def read_file_attributes(path: Any) -> tuple[Dataset, Attributes]:
    """read_attributes for a Part-10 file on disk: only the header is read (pydicom stops
    before the pixel data); the instance is never loaded whole."""
    try:
        with open(path, "rb") as source:
            dataset = dcmread(source, stop_before_pixels=True, specific_tags=_INDEX_TAGS)
            attributes: Attributes = {}
            for element in dataset:
                keyword = element.keyword
                if not keyword or element.VR == "SQ":
                    continue
                text = element_text(element.value)
                if text != "" and text != []:
                    attributes[keyword] = text
    except OSError:
        raise
    except Exception as error:  # pydicom raises many types on malformed input
        raise InvalidInstance(STATUS_CANNOT_UNDERSTAND, f"unreadable dataset: {type(error).__name__}") from None
    return dataset, attributes


def instance_from_spooled(
    part10: Any,
    path: Any,
    dataset_offset: int,
    transfer_syntax_uid: str,
    *,
    content_hash_value: str,
    blob: bytes,
    affected_sop_class_uid: str | None = None,
    affected_sop_instance_uid: str | None = None,
) -> Instance:
    """instance_from_part10 for a data set spooled to a Part-10 file (node/spool.py):
    `part10` is a read-only mmap of the file (its structure is walked header by header,
    the values are never touched), `content_hash_value` and `blob` were computed from the
    file in chunks. Raises InvalidInstance."""
    attributes = _walked_index_attributes(part10, dataset_offset, transfer_syntax_uid)
    if attributes is None:
        _dataset, attributes = read_file_attributes(path)
    return _instance(part10, dataset_offset, transfer_syntax_uid, attributes, content_hash_value, blob,
                     affected_sop_class_uid, affected_sop_instance_uid)


def _walked_index_attributes(part10: Any, dataset_offset: int, transfer_syntax_uid: str) -> Attributes | None:
    """check_complete and the index attributes by node/header_reader.py in one walk of the
    header: the structure check goes on from where the header read stopped (pixel data,
    or the last index tag), instead of walking the same elements again (with the read,
    a fifth of a node's GIL time per one-instance study: bench/README.md, "stop 33, helper
    P"). None when the header reader leaves the header to pydicom (the whole dataset
    then checked from its start). Raises InvalidInstance."""
    try:
        attributes, walked_to = header_reader.index_attributes_walked(part10, dataset_offset, transfer_syntax_uid,
                                                                       _INDEX_TAG_SET)
    except (header_reader.Unsupported, header_reader.Truncated):
        check_complete(part10, dataset_offset, transfer_syntax_uid.strip("\x00 "))
        return None
    check_complete(part10, dataset_offset, transfer_syntax_uid.strip("\x00 "), start=walked_to)
    return attributes


def instance_from_part10(
    part10: bytes,
    dataset_offset: int,
    transfer_syntax_uid: str,
    *,
    affected_sop_class_uid: str | None = None,
    affected_sop_instance_uid: str | None = None,
    compress_level: int | None = None,
) -> Instance:
    """Validate and describe one received instance. Raises InvalidInstance. With
    `compress_level`, its blob is compressed here (node/codec.py), once it is valid;
    without, the Instance's blob is empty."""
    attributes = _walked_index_attributes(part10, dataset_offset, transfer_syntax_uid)
    if attributes is None:
        _dataset, attributes = read_attributes(part10)
    blob = b"" if compress_level is None else codec.compress(part10, compress_level)
    return _instance(part10, dataset_offset, transfer_syntax_uid, attributes, None, blob,
                     affected_sop_class_uid, affected_sop_instance_uid)


def _instance(part10: Any, dataset_offset: int, transfer_syntax_uid: str, attributes: Attributes,
              hash_value: str | None, blob: bytes, affected_sop_class_uid: str | None,
              affected_sop_instance_uid: str | None) -> Instance:
    study_uid = attributes.get("StudyInstanceUID")
    series_uid = attributes.get("SeriesInstanceUID")
    sop_uid = attributes.get("SOPInstanceUID")
    sop_class = attributes.get("SOPClassUID") or affected_sop_class_uid
    for name, value in (
        ("SOPInstanceUID", sop_uid),
        ("SOPClassUID", sop_class),
        ("StudyInstanceUID", study_uid),
        ("SeriesInstanceUID", series_uid),
    ):
        if value is None or value == "":
            raise InvalidInstance(STATUS_DATASET_MISMATCH, f"missing {name}")
        if not is_valid_uid(value):
            raise InvalidInstance(STATUS_DATASET_MISMATCH, f"invalid {name}")
    if affected_sop_instance_uid and affected_sop_instance_uid != sop_uid:
        raise InvalidInstance(
            STATUS_DATASET_MISMATCH, "SOPInstanceUID differs from the request's Affected SOP Instance UID"
        )
    if affected_sop_class_uid and sop_class != affected_sop_class_uid:
        raise InvalidInstance(STATUS_DATASET_MISMATCH, "SOPClassUID differs from the request's Affected SOP Class UID")
    return Instance(
        study_instance_uid=str(study_uid),
        series_instance_uid=str(series_uid),
        sop_instance_uid=str(sop_uid),
        sop_class_uid=str(sop_class),
        transfer_syntax_uid=str(UID(transfer_syntax_uid)),
        part10=part10,
        dataset_offset=dataset_offset,
        attributes=attributes,
        content_hash=hash_value if hash_value is not None else content_hash(transfer_syntax_uid,
                                                                             part10[dataset_offset:]),
        blob=blob,
    )


# A sequence travels in a result row (plain strings, JSON across peers) as this prefix and
# the base64 of the element encoded in Explicit VR Little Endian; the front end decodes it.
SEQUENCE_PREFIX = "\x00sq:"


def header_attributes(part10: bytes, keywords: tuple[str, ...]) -> Attributes:
    """Attributes the index does not keep, read from a stored instance's header
    (sequences as SEQUENCE_PREFIX strings)."""
    try:
        dataset, attributes = read_attributes(part10, keywords)
    except InvalidInstance:
        return {}
    result = {k: v for k, v in attributes.items() if k in keywords}
    for element in dataset:
        if element.VR == "SQ" and element.keyword in keywords and element.value:
            encoded = encode_sequence(dataset, element)
            if encoded is not None:
                result[element.keyword] = encoded
    return result


def encode_sequence(dataset: Dataset, element: Any) -> str | None:
    """One sequence element as a SEQUENCE_PREFIX string (None if pydicom cannot write it)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    single = Dataset()
    if "SpecificCharacterSet" in dataset:
        single.SpecificCharacterSet = dataset.SpecificCharacterSet
    single.add(element)
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    try:
        write_dataset(buffer, single)
    except Exception:
        return None
    return SEQUENCE_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_sequence(text: str) -> Any | None:
    """The sequence DataElement of a SEQUENCE_PREFIX string, or None."""
    if not text.startswith(SEQUENCE_PREFIX):
        return None
    from pydicom.filereader import read_dataset

    try:
        dataset = read_dataset(BytesIO(base64.b64decode(text[len(SEQUENCE_PREFIX):])), False, True)
        return next((e for e in dataset if e.VR == "SQ"), None)
    except Exception:
        return None
