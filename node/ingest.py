"""Turn received DICOM bytes into an `Instance`, reading only the header tags we index.

The dataset is never decoded in full: pydicom reads the header with
`stop_before_pixels` and `specific_tags`, and the bytes are kept exactly as received.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any, Iterable

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from pacsnode.replication.model import ALL_INDEXED_KEYWORDS, Attributes, Instance, content_hash

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_INDEX_TAGS = [tag_for_keyword(k) for k in ALL_INDEXED_KEYWORDS] + [
    tag_for_keyword("SeriesInstanceUID"),
    tag_for_keyword("StudyInstanceUID"),
    tag_for_keyword("SOPInstanceUID"),
    tag_for_keyword("SOPClassUID"),
]


class InvalidInstance(Exception):
    """The dataset cannot be archived; `status` is the C-STORE status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


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
    tags = _INDEX_TAGS if keywords is None else [tag_for_keyword(k) for k in keywords if tag_for_keyword(k)]
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


def instance_from_part10(
    part10: bytes,
    dataset_offset: int,
    transfer_syntax_uid: str,
    *,
    affected_sop_class_uid: str | None = None,
    affected_sop_instance_uid: str | None = None,
) -> Instance:
    """Validate and describe one received instance. Raises InvalidInstance."""
    _dataset, attributes = read_attributes(part10)
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
        content_hash=content_hash(transfer_syntax_uid, part10[dataset_offset:]),
    )


def header_attributes(part10: bytes, keywords: tuple[str, ...]) -> Attributes:
    """Attributes the index does not keep, read from a stored instance's header."""
    try:
        _dataset, attributes = read_attributes(part10, keywords)
    except InvalidInstance:
        return {}
    return {k: v for k, v in attributes.items() if k in keywords}
