"""C-FIND identifiers built as raw elements (node/find_rows.py) encode to the same bytes as
the general path (DicomFrontEnd._response, pydicom DataElements), in both little-endian
transfer syntaxes; rows the fast path cannot take are left to the general path."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.dsutils import encode

from pacsnode.node import find_rows
from pacsnode.node.dicom import DicomFrontEnd
from pacsnode.replication.matching import Query

REQUESTED = ["QueryRetrieveLevel", "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
             "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
             "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
             "RetrieveAETitle", "InstanceAvailability"]
FRONT_END = SimpleNamespace(_config=SimpleNamespace(ae_title="PACSNODE"))


def _general(level: str, requested: list[str], row: dict[str, Any]) -> Any:
    return DicomFrontEnd._response(FRONT_END, Query(level, ()), requested, row)  # type: ignore[arg-type]


def _both(level: str, requested: list[str], row: dict[str, Any], implicit: bool) -> tuple[bytes, bytes]:
    fast = find_rows.ascii_response(requested, row, level, "PACSNODE", implicit, True)
    assert fast is not None
    general = encode(_general(level, requested, row), implicit, True)
    # The identifier the node sends itself (without pydicom's writer) is the same bytes.
    assert find_rows.ascii_identifier(requested, row, level, "PACSNODE", implicit) == general
    return encode(fast, implicit, True), general


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_a_study_row_encodes_as_the_general_path_does(implicit: bool) -> None:
    row = {"PatientName": "DOE^JOHN", "PatientID": "12345", "PatientBirthDate": "19700101", "PatientSex": "M",
           "StudyInstanceUID": "1.2.840.113619.2.55.3", "StudyDate": "20240131", "StudyTime": "101500.123",
           "AccessionNumber": "A1", "StudyID": "7", "StudyDescription": "CT CHEST", "ModalitiesInStudy": ["CT", "SR"],
           "NumberOfStudyRelatedInstances": "123"}
    fast, general = _both("STUDY", REQUESTED, row, implicit)
    assert fast == general


def test_a_big_endian_row_encodes_as_the_general_path_does() -> None:
    """Explicit VR big endian (an association that cannot take the little-endian bytes):
    ascii_response's raw elements are written as the general path writes the row."""
    row = {"PatientName": "DOE^JOHN", "PatientID": "12345", "StudyInstanceUID": "1.2.3.4",
           "ModalitiesInStudy": ["CT", "MR"], "NumberOfStudyRelatedInstances": "12"}
    fast = find_rows.ascii_response(REQUESTED, row, "STUDY", "PACSNODE", False, False)
    assert fast is not None
    assert encode(fast, False, False) == encode(_general("STUDY", REQUESTED, row), False, False)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(REQUESTED[2:15]),
                              st.one_of(st.none(), st.just(""), st.text(alphabet="ABC^ 0123456789.-", max_size=9),
                                        st.lists(st.text(alphabet="ABCDE", min_size=1, max_size=4), max_size=3))),
       implicit=st.booleans())
def test_any_ascii_row_encodes_as_the_general_path_does(values: dict[str, Any], implicit: bool) -> None:
    count = values.get("NumberOfStudyRelatedInstances")
    parts = count if isinstance(count, list) else [count] if isinstance(count, str) else []
    if any(part and str(int(part)) != part if part.lstrip("-").isdigit() else part for part in parts):
        # Not an integer as pydicom writes it (it empties or rewrites it): the general way.
        assert find_rows.ascii_response(REQUESTED, values, "STUDY", "PACSNODE", implicit, True) is None
        assert find_rows.ascii_identifier(REQUESTED, values, "STUDY", "PACSNODE", implicit) is None
        return
    fast, general = _both("STUDY", REQUESTED, values, implicit)
    assert fast == general


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_a_long_length_text_vr_encodes_as_the_general_path_does(implicit: bool) -> None:
    """UT (and UC, UR) take a 4-byte length in explicit VR (PS3.5 7.1.2)."""
    fast, general = _both("IMAGE", ["QueryRetrieveLevel", "TextValue", "SOPInstanceUID"],
                          {"TextValue": "A LONG TEXT", "SOPInstanceUID": "1.2.3"}, implicit)
    assert fast == general


def test_rows_the_fast_path_cannot_take_go_the_general_way() -> None:
    assert find_rows.ascii_identifier(["PatientName"], {"PatientName": "MÜLLER^HANS"}, "STUDY", "AE", True) is None
    assert find_rows.ascii_identifier(["Rows"], {"Rows": "512"}, "IMAGE", "AE", False) is None
    assert find_rows.ascii_response(["PatientName"], {"PatientName": "MÜLLER^HANS"}, "STUDY", "AE", True, True) is None
    assert find_rows.ascii_response(["NoSuchKeyword"], {}, "STUDY", "AE", True, True) is None
    # A binary number (US) and a sequence are not text.
    assert find_rows.ascii_response(["Rows"], {"Rows": "512"}, "IMAGE", "AE", True, True) is None
    assert find_rows.ascii_response(["ReferencedStudySequence"], {}, "STUDY", "AE", True, True) is None


def test_find_request_gives_the_identifiers_keywords_as_pydicom_names_them() -> None:
    """find_request's one pass: the Query query_from_identifier builds, and the response's
    keys as `element.keyword` names them (private, unknown and repeater tags: none)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from pacsnode.node.dicom import find_request, query_from_identifier

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.SpecificCharacterSet = "ISO_IR 100"
    identifier.PatientName = "Dö*"
    identifier.PatientID = ""
    identifier.StudyDate = "20200101-20201231"
    identifier.ModalitiesInStudy = ["CT", "MR"]
    identifier.ReferencedStudySequence = Sequence([])
    identifier.add_new(0x60000010, "US", None)  # OverlayRows: a repeater tag.
    identifier.add_new(0x00091010, "LO", "private")  # A private element.
    identifier.add_new(0x00111000, "LO", "unknown")  # Not in the dictionary.
    query, requested = find_request(identifier, "STUDY")
    assert query == query_from_identifier(identifier, "STUDY")
    assert requested == [element.keyword for element in identifier if element.keyword]
    assert requested == ["SpecificCharacterSet", "StudyDate", "QueryRetrieveLevel", "ModalitiesInStudy",
                         "ReferencedStudySequence", "PatientName", "PatientID"]


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("row", [
    {"PatientName": "MÜLLER^JÜRGEN", "PatientID": "P1", "StudyDescription": "THORAX", "SpecificCharacterSet": "ISO_IR 100"},
    {"PatientName": "GARÇON^ANDRÉ", "StudyDescription": "CRÂNE", "SpecificCharacterSet": "ISO_IR 100", "StudyID": "1"},
    {"PatientName": "MÜLLER^HANS", "PatientID": "P2"},  # No stored set: UTF-8.
    {"PatientName": "ΑΘΗΝΑ", "SpecificCharacterSet": "ISO_IR 192", "ModalitiesInStudy": ["CT", "MR"]},
], ids=range(4))
def test_a_latin1_or_utf8_row_is_sent_as_the_general_path_writes_it(row: dict[str, Any], implicit: bool) -> None:
    """issue 10: a row with a non-ASCII value (10 % of the bench's patients) whose response
    character set is ISO_IR 100 or 192 is encoded here too (it went through pydicom's
    Dataset and writer: ~5 % of the node's CPU on PatientID C-FINDs, py-spy), the same bytes."""
    general = encode(_general("STUDY", REQUESTED, row), implicit, True)
    identifiers = find_rows.ascii_identifiers(tuple(REQUESTED), "STUDY", "PACSNODE", implicit)
    assert identifiers.encode(row) == general
    assert b"ISO_IR 1" in general


@pytest.mark.parametrize("row", [
    {"PatientName": "ﾔﾏﾀﾞ^ﾀﾛｳ", "SpecificCharacterSet": "ISO 2022 IR 13"},  # Code extensions.
    # A stored set that cannot carry a value: pydicom writes it lossily (with a warning);
    # not here.
    {"PatientName": "ŁUKASZ^NOWAK", "SpecificCharacterSet": "ISO_IR 100"},
], ids=range(2))
def test_rows_in_other_character_sets_go_the_general_way(row: dict[str, Any]) -> None:
    assert find_rows.ascii_identifiers(tuple(REQUESTED), "STUDY", "PACSNODE", True).encode(row) is None
