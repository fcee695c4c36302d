"""node/identifier.py: a request's Identifier read from its bytes gives what pydicom's
Dataset gives to the C-FIND handler (find_request) and to the audit trail (the guard's
keys), or None (then pydicom's Dataset is read, as before)."""

from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode

from pacsnode.node import identifier
from pacsnode.node.dicom import find_request
from pacsnode.node.dicom_guard import _identifier_keys

STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
              "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries")


def _study(**match: Any) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for keyword in STUDY_KEYS:
        setattr(query, keyword, "")
    for keyword, value in match.items():
        setattr(query, keyword, value)
    return query


READ_HERE = [
    _study(PatientID="1389803428"),
    _study(StudyInstanceUID="2.25.305506128775905039548993452937606589192"),
    _study(StudyInstanceUID="1.2.3"),  # Odd length: padded with a NUL.
    _study(StudyInstanceUID="1.2.3\\1.2.44"),  # A list of UIDs.
    _study(AccessionNumber="A360325567584"),
    _study(PatientName="MORRIS^MICH*"),
    _study(PatientName="O?BRIEN"),
    _study(StudyDate="20180101-20181231"),
    _study(StudyDate="20180504", StudyTime="1200-1300"),
    _study(ModalitiesInStudy="CT\\MR"),
    _study(PatientID="ABC "),  # Padded by the requestor.
    _study(PatientID=" LEAD"),
    _study(StudyDescription="*"),
]

PYDICOM_WAY = [
    _study(PatientName="MÜLLER^HANS", SpecificCharacterSet="ISO_IR 100"),  # A character set.
    _study(NumberOfStudyRelatedInstances="5"),  # IS with a value.
]


def _with_sequence() -> Dataset:
    query = _study(PatientID="X")
    item = Dataset()
    item.CodeValue = "1"
    query.ProcedureCodeSequence = [item]
    return query


def _with_private() -> Dataset:
    query = _study(PatientID="X")
    query.add_new(0x00091010, "LO", "private")
    return query


PYDICOM_WAY += [_with_sequence(), _with_private()]


def _event(query: Dataset, syntax: Any) -> SimpleNamespace:
    data = encode(query, syntax.is_implicit_VR, syntax.is_little_endian)
    assert data is not None
    return SimpleNamespace(
        context=SimpleNamespace(transfer_syntax=syntax),
        request=SimpleNamespace(Identifier=BytesIO(data)),
        identifier=decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian),
    )


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
@pytest.mark.parametrize("query", READ_HERE, ids=range(len(READ_HERE)))
def test_an_identifier_read_here_gives_what_pydicom_s_dataset_gives(query: Dataset, syntax: Any) -> None:
    event = _event(query, syntax)
    fast = identifier.of_request(event)
    assert fast is not None
    assert find_request(fast, "STUDY") == find_request(event.identifier, "STUDY")
    assert [(int(e.tag), e.keyword, e.VR, str(e.value)) for e in fast] == \
        [(int(e.tag), e.keyword, e.VR, str(e.value)) for e in event.identifier]
    # The audit trail's keys (node/dicom_guard.py) read it too, with the same result.
    slow = SimpleNamespace(identifier=event.identifier, context=None, request=None)
    assert _identifier_keys(event) == _identifier_keys(slow)
    assert _identifier_keys(slow)  # Not an empty comparison.


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
@pytest.mark.parametrize("query", PYDICOM_WAY, ids=range(len(PYDICOM_WAY)))
def test_what_is_not_read_for_certain_here_is_left_to_pydicom(query: Dataset, syntax: Any) -> None:
    assert identifier.of_request(_event(query, syntax)) is None


def test_bytes_that_do_not_add_up_are_left_to_pydicom() -> None:
    data = encode(_study(PatientID="1389803428"), True, True)
    assert data is not None
    assert identifier.read(data, True) is not None
    assert identifier.read(data[:-3], True) is None  # A value cut short.
    assert identifier.read(data + b"\x10\x00", True) is None  # A header cut short.
