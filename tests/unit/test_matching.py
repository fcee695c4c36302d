"""C-FIND attribute matching (PS3.4 C.2.2.2): table-driven cases for every rule."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacsnode.replication.matching import Condition, Query, QueryError, match_all, match_value
from pacsnode.replication.model import AttributeValue

# (vr, query value, record value, expected)
Case = tuple[str, str, "AttributeValue | None", bool]

SINGLE_VALUE: list[Case] = [
    ("LO", "123", "123", True),
    ("LO", "123", "1234", False),
    ("LO", "123", "12", False),
    ("LO", "abc", "ABC", False),  # Case-sensitive outside PN.
    ("SH", "ABC ", "ABC", True),  # Padding is not significant.
    ("CS", "CT", "CT", True),
    ("CS", "ct", "CT", False),
    ("PN", "smith^john", "SMITH^JOHN", True),  # PN case-insensitive by design.
    ("PN", "SMITH^JOHN", "Smith^John", True),
    ("PN", "SMITH", "SMITH^JOHN", False),  # Single value means the whole value.
    ("PN", "müller^jürgen", "Müller^Jürgen", True),  # Latin-1 letters fold too.
    ("PN", "MÜLLER^JÜRGEN", "Müller^Jürgen", True),
    ("PN", "größer^zoë", "Größer^Zoë", True),
    ("PN", "Muller^Jurgen", "Müller^Jürgen", False),  # No accent folding.
    ("LO", "a.c", "abc", False),  # Not a regex.
]

WILDCARD: list[Case] = [
    ("LO", "12*", "12345", True),
    ("LO", "*45", "12345", True),
    ("LO", "*3*", "12345", True),
    ("LO", "12*", "0123", False),
    ("LO", "1?3", "123", True),
    ("LO", "1?3", "1233", False),
    ("LO", "1?3", "13", False),  # ? is exactly one character.
    ("LO", "a*b*c", "aXXbYYc", True),
    ("LO", "a*b*c", "aXXbYYcZ", False),
    ("LO", "*", "anything", True),
    ("LO", "a.*", "abc", False),  # Regex metacharacters are literal.
    ("LO", "(a)*", "(a)b", True),
    ("LO", "[ab]*", "a", False),
    ("SH", "abc*", "ABCD", False),  # Wildcards are case-sensitive outside PN.
    ("PN", "mül*", "Müller^Jürgen", True),
    ("PN", "MÜL*", "Müller^Jürgen", True),
    ("PN", "*jürgen", "Müller^Jürgen", True),
    ("PN", "M?LLER*", "Müller^Jürgen", True),  # ? is one decoded character (ü).
    ("PN", "smi*", "SMITH^JOHN", True),
    ("PN", "jo*", "SMITH^JOHN", False),
    ("PN", "*^jo*", "SMITH^JOHN", True),
    ("CS", "C?", "CT", True),
    ("LO", "?", "", False),
    ("LO", "A*", "", False),
]

NO_WILDCARD_VRS: list[Case] = [
    ("UI", "1.2.*", "1.2.3", False),  # UI: * is a literal, so nothing matches.
    ("UI", "1.2.?", "1.2.3", False),
    ("DA", "2024*", "20240101", False),
    ("TM", "10*", "101500", False),
]

DATE: list[Case] = [
    ("DA", "20240101", "20240101", True),
    ("DA", "20240101", "20240102", False),
    ("DA", "20240101-20240131", "20240115", True),
    ("DA", "20240101-20240131", "20240101", True),  # Bounds are inclusive.
    ("DA", "20240101-20240131", "20240131", True),
    ("DA", "20240101-20240131", "20231231", False),
    ("DA", "20240101-20240131", "20240201", False),
    ("DA", "20240101-", "20991231", True),  # Open upper end.
    ("DA", "20240101-", "20240101", True),
    ("DA", "20240101-", "20231231", False),
    ("DA", "-20240101", "19000101", True),  # Open lower end.
    ("DA", "-20240101", "20240101", True),
    ("DA", "-20240101", "20240102", False),
    # Old ACR-NEMA "YYYY.MM.DD" on either side.
    ("DA", "2024.01.01", "20240101", True),
    ("DA", "20240101", "2024.01.01", True),
    ("DA", "2024.01.01-2024.01.31", "20240115", True),
    ("DA", "20240101-20240131", "2024.01.15", True),
    ("DA", "20240101-20240131", "2024.02.15", False),
]

TIME: list[Case] = [
    ("TM", "103000", "103000", True),
    ("TM", "1030", "103000", True),  # A partial single time is padded low.
    ("TM", "103000", "103000.000", True),
    ("TM", "1030-1100", "103000", True),
    ("TM", "1030-1100", "102959", False),
    ("TM", "1030-1100", "110059", True),  # A partial upper end covers its whole minute.
    ("TM", "1030-1100", "110100", False),
    ("TM", "10-11", "115959.999", True),  # Hours only: up to 11:59:59.999999.
    ("TM", "10-11", "120000", False),
    ("TM", "10-11", "095959.999999", False),
    ("TM", "-0800", "000000", True),
    ("TM", "-0800", "075959", True),
    ("TM", "-0800", "080100", False),
    ("TM", "2200-", "235959.999999", True),
    ("TM", "2200-", "215959", False),
    ("TM", "103000.5-103000.6", "103000.55", True),  # Fractions.
    ("TM", "103000.5-103000.6", "103000.5", True),
    ("TM", "103000.5-103000.6", "103000.600000", True),
    ("TM", "103000.5-103000.6", "103000.49", False),
    ("TM", "103000.5-103000.6", "103000.7", False),
    ("TM", "103000-103000", "103000.999", True),  # Upper end without fraction: whole second.
    ("TM", "1030-1031", "10:30:30", True),  # Old "HH:MM:SS" form.
    ("TM", "10:30-10:31", "103030", True),
]

DATE_TIME: list[Case] = [
    ("DT", "20240101-20240102", "20240101120000", True),
    ("DT", "20240101-20240102", "20240102235959", True),
    ("DT", "20240101-20240102", "20240103000000", False),
    ("DT", "20240101-20240102", "20231231235959.999999", False),
    ("DT", "20240101120000-", "20240101115959", False),
    ("DT", "20240101120000-", "20240101120000.5", True),
    ("DT", "-2023", "20231231235959", True),  # Partial year: to the end of 2023.
    ("DT", "-2023", "20240101", False),
    ("DT", "202401011030-202401011031", "20240101103059", True),
    ("DT", "202401011030-202401011031", "20240101103200", False),
    ("DT", "20240101", "20240101", True),
    # Time zone offsets are ignored (compared as local times).
    ("DT", "20240101-20240101", "20240101120000+0100", True),
    ("DT", "20240101120000.4-20240101120001", "20240101120000.4+0100", True),
    ("DT", "20240101120000.4-20240101120001", "20240101120000.3+0100", False),
    ("DT", "20240101120000-20240101130000", "20240101123000-0500", True),
    # A single value with a negative offset is not a range.
    ("DT", "20240101120000-0500", "20240101120000-0500", True),
    ("DT", "20240101120000-0500", "20240101120000", True),
    ("DT", "20240101120000-0500", "20240101120001", False),
    # Both ends with offsets.
    ("DT", "20240101100000-0500-20240101140000-0500", "20240101120000", True),
    ("DT", "20240101100000-0500-20240101140000-0500", "20240101150000", False),
]

UID_LIST: list[Case] = [
    ("UI", "1.2.3", "1.2.3", True),
    ("UI", "1.2.3", "1.2.30", False),
    ("UI", "1.2.3\\1.2.4", "1.2.4", True),
    ("UI", "1.2.3\\1.2.4", "1.2.3", True),
    ("UI", "1.2.3\\1.2.4", "1.2.5", False),
    ("UI", "1.2.3\\1.2.4", ["1.2.9", "1.2.4"], True),
]

VALUE_LIST: list[Case] = [
    ("CS", "CT\\MR", "MR", True),
    ("CS", "CT\\MR", "CT", True),
    ("CS", "CT\\MR", "US", False),
    ("CS", "CT\\MR", ["US", "MR"], True),  # ModalitiesInStudy "CT\MR" vs a study with US+MR.
    ("CS", "CT\\MR", ["US", "CR"], False),
    ("CS", "C*\\XA", ["CT"], True),  # Each listed value may be a wildcard.
    ("PN", "smith^john\\doe^jane", "DOE^JANE", True),
    ("DA", "20240101\\20240105", "20240105", True),
    ("DA", "20240101\\20240105", "20240103", False),
]

MULTI_VALUED_RECORD: list[Case] = [
    ("CS", "AXIAL", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    ("CS", "LOCALIZER", ["ORIGINAL", "PRIMARY", "AXIAL"], False),
    ("CS", "AX*", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    ("DA", "20240101-20240131", ["20231231", "20240105"], True),
    ("DA", "20240101-20240131", ["20231231", "20240205"], False),
    ("PN", "doe^jane", ["SMITH^JOHN", "DOE^JANE"], True),
    ("IS", "2", ["1", "02"], True),
]

NUMERIC: list[Case] = [
    ("IS", "1", "01", True),
    ("IS", "01", "1", True),
    ("IS", " 1", "1 ", True),
    ("IS", "1", "10", False),
    ("IS", "2", "1", False),
    ("IS", "-3", "-003", True),
    ("IS", "+3", "3", True),
    ("IS", "1", "x", False),
    ("DS", "1.5", "1.50", True),
    ("DS", "1.5", "1.5e0", True),
    ("DS", "1.5", "1.6", False),
    ("US", "64", "64", True),
]

ALL_CASES = {
    "single": SINGLE_VALUE,
    "wildcard": WILDCARD,
    "no-wildcard-vr": NO_WILDCARD_VRS,
    "date": DATE,
    "time": TIME,
    "datetime": DATE_TIME,
    "uid-list": UID_LIST,
    "value-list": VALUE_LIST,
    "multi-valued-record": MULTI_VALUED_RECORD,
    "numeric": NUMERIC,
}


def _cases() -> list[object]:
    return [
        pytest.param(vr, query, record, expected, id=f"{group}:{vr}:{query!r}~{record!r}")
        for group, cases in ALL_CASES.items()
        for vr, query, record, expected in cases
    ]


@pytest.mark.parametrize(("vr", "query", "record", "expected"), _cases())
def test_match_value(vr: str, query: str, record: AttributeValue | None, expected: bool) -> None:
    assert match_value(Condition("Key", vr, query), record) is expected


# A record without the attribute, or with an empty value, never matches a non-universal
# condition -- even an open range or a wildcard that would match any text.
NON_UNIVERSAL = [
    ("LO", "123"),
    ("PN", "smith"),
    ("PN", "s*"),
    ("LO", "?*"),
    ("DA", "-20240101"),
    ("DA", "20240101-"),
    ("TM", "-2359"),
    ("DT", "19000101-"),
    ("UI", "1.2.3\\1.2.4"),
    ("UI", "1.2.3"),
    ("IS", "1"),
    ("IS", "0"),
    ("CS", "CT\\MR"),
]


@pytest.mark.parametrize("record", [None, "", [], [""], ["", ""]], ids=repr)
@pytest.mark.parametrize(("vr", "query"), NON_UNIVERSAL, ids=lambda x: str(x))
def test_empty_or_missing_record_never_matches(vr: str, query: str, record: AttributeValue | None) -> None:
    assert match_value(Condition("Key", vr, query), record) is False


@pytest.mark.parametrize("pattern", ["*", "**"])
@pytest.mark.parametrize("record", [None, "", [], "anything", ["A", "B"]], ids=repr)
def test_star_alone_is_universal_matching(pattern: str, record: AttributeValue | None) -> None:
    """C.2.2.2.4: '*' matches any sequence of characters, including a zero length value."""
    assert match_value(Condition("PatientName", "PN", pattern), record) is True


@pytest.mark.parametrize(
    ("vr", "value", "kind"),
    [
        ("UI", "1.2.3", "single"),
        ("UI", "1.2.3\\1.2.4", "uid-list"),
        ("UI", "1.2.*", "single"),
        ("DA", "20240101", "single"),
        ("DA", "20240101-20240131", "range"),
        ("DA", "-20240131", "range"),
        ("TM", "10-11", "range"),
        ("TM", "10*", "single"),
        ("DT", "20240101-20240102", "range"),
        ("DT", "20240101120000-0500", "single"),
        ("DT", "20240101120000+0100", "single"),
        ("DT", "2023-2024", "range"),
        ("LO", "12*", "wildcard"),
        ("LO", "1?", "wildcard"),
        ("LO", "12-34", "single"),
        ("PN", "smith", "single"),
    ],
)
def test_condition_kind(vr: str, value: str, kind: str) -> None:
    assert Condition("Key", vr, value).kind == kind


def test_match_all_needs_every_condition() -> None:
    record: dict[str, AttributeValue] = {"PatientID": "123", "StudyDate": "20240115", "Modality": "CT"}
    id_and_date = [Condition("PatientID", "LO", "123"), Condition("StudyDate", "DA", "20240101-20240131")]
    assert match_all(id_and_date, record)
    assert not match_all(id_and_date + [Condition("Modality", "CS", "MR")], record)
    assert not match_all([Condition("AccessionNumber", "SH", "A1")], record)  # Missing key.
    assert match_all([], record)
    assert match_all([], {})


# -- Query --------------------------------------------------------------------------


def test_query_json_round_trip() -> None:
    query = Query(
        level="SERIES",
        model="PATIENT",
        conditions=(
            Condition("PatientName", "PN", "Müller^J*"),
            Condition("ModalitiesInStudy", "CS", "CT\\MR"),
            Condition("StudyDate", "DA", "20240101-"),
            Condition("StudyInstanceUID", "UI", "1.2.3\\1.2.4"),
        ),
        return_keys=("PatientName", "ModalitiesInStudy", "StudyDate", "StudyInstanceUID", "SeriesNumber"),
    )
    wire = json.dumps(query.to_json(), ensure_ascii=False).encode("utf-8")
    back = Query.from_json(json.loads(wire))
    assert back == query
    assert back.condition("PatientName") == Condition("PatientName", "PN", "Müller^J*")
    assert back.condition("Modality") is None


def test_query_json_defaults_to_study_root() -> None:
    back = Query.from_json({"level": "STUDY", "conditions": [], "return_keys": []})
    assert back == Query(level="STUDY")
    assert back.model == "STUDY"


@pytest.mark.parametrize("level", ["", "study", "INSTANCE", "FRAME"])
def test_unknown_level_is_a_query_error(level: str) -> None:
    with pytest.raises(QueryError, match="QueryRetrieveLevel"):
        Query(level=level)


# -- properties -----------------------------------------------------------------------

_TEXT = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="*?\\\x00"), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(value=_TEXT, data=st.data())
def test_wildcard_from_the_value_itself_matches(value: str, data: st.DataObject) -> None:
    """Replacing any characters of a value by ? (or any run by *) still matches it."""
    stripped = value.strip()
    if not stripped:
        return
    positions = data.draw(st.sets(st.integers(0, len(stripped) - 1)))
    pattern = "".join("?" if i in positions else c for i, c in enumerate(stripped))
    start = data.draw(st.integers(0, len(stripped)))
    end = data.draw(st.integers(start, len(stripped)))
    starred = stripped[:start] + "*" + stripped[end:]
    for vr in ("LO", "PN"):
        if "?" in pattern:
            assert match_value(Condition("Key", vr, pattern), stripped)
        assert match_value(Condition("Key", vr, starred), stripped)


@settings(max_examples=200, deadline=None)
@given(low=st.dates(), high=st.dates(), record=st.dates())
def test_date_range_agrees_with_date_order(low, high, record) -> None:  # type: ignore[no-untyped-def]
    def da(day) -> str:  # type: ignore[no-untyped-def]
        return f"{day.year:04d}{day.month:02d}{day.day:02d}"  # strftime("%Y") drops leading zeros.

    expected = low <= record <= high
    assert match_value(Condition("StudyDate", "DA", f"{da(low)}-{da(high)}"), da(record)) is expected
    assert match_value(Condition("StudyDate", "DA", f"{da(low)}-"), da(record)) is (low <= record)
    assert match_value(Condition("StudyDate", "DA", f"-{da(high)}"), da(record)) is (record <= high)
