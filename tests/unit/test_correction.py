"""Corrections (replication/correction.py): validation, the overlay, and version ordering."""

from __future__ import annotations

import itertools

import pytest

from pacsnode.replication.correction import (
    Correction,
    CorrectionRefusal,
    InvalidCorrection,
    apply,
    check_changes,
    correction_of_entry,
    is_correction_entry,
)
from pacsnode.replication.hlc import Version, is_mark

STUDY = "1.2.3.4"


def test_only_the_documented_attributes_may_change() -> None:
    assert check_changes({"PatientName": " Doe^Jane ", "PatientID": "P2"}) == {"PatientName": "Doe^Jane",
                                                                             "PatientID": "P2"}
    with pytest.raises(InvalidCorrection) as refused:
        check_changes({"Modality": "CT"})
    assert refused.value.reason is CorrectionRefusal.NOT_CORRECTABLE and refused.value.keyword == "Modality"
    with pytest.raises(InvalidCorrection) as refused:
        check_changes({})
    assert refused.value.reason is CorrectionRefusal.NOTHING_TO_CHANGE


@pytest.mark.parametrize("keyword,value", [
    ("PatientID", ""), ("PatientID", "A\\B"), ("PatientBirthDate", "19991301"), ("PatientSex", "X"),
    ("StudyID", "x" * 17), ("PatientName", "a=b=c=d"), ("PatientName", "x\ny"), ("AccessionNumber", "é"),
])
def test_bad_values_are_refused_without_echoing_them(keyword: str, value: str) -> None:
    with pytest.raises(InvalidCorrection) as refused:
        check_changes({keyword: value})
    assert refused.value.reason is CorrectionRefusal.BAD_VALUE
    assert value.strip() not in str(refused.value) or not value.strip()


def test_overlay_puts_the_values_over_the_attributes() -> None:
    correction = Correction.of(STUDY, {"PatientName": "New^Name"}, Version(5, 0, "a"))
    original = {"PatientName": "Old^Name", "PatientID": "P1"}
    assert apply(original, correction) == {"PatientName": "New^Name", "PatientID": "P1"}
    assert original["PatientName"] == "Old^Name"  # A copy.
    assert apply(original, None) == original


def test_later_change_wins_per_keyword_in_any_order() -> None:
    first = Correction.of(STUDY, {"PatientName": "A", "PatientID": "P1"}, Version(10, 0, "n1"))
    second = Correction.of(STUDY, {"PatientName": "B"}, Version(10, 1, "n2"))
    third = Correction.of(STUDY, {"PatientID": "P3"}, Version(9, 0, "n3"))  # Older than first's PatientID.
    results = set()
    for order in itertools.permutations([first, second, third]):
        merged = order[0].merge(order[1]).merge(order[2])
        results.add(merged.dumps())
        assert merged.values() == {"PatientName": "B", "PatientID": "P1"}
        assert merged.version == Version(10, 1, "n2")
    assert len(results) == 1  # Same overlay whatever order the replicas saw them in.
    merged = first.merge(second)
    assert merged.merge(second) == merged and merged.covers(first) and not first.covers(second)


def test_json_and_listing_entry_round_trip() -> None:
    correction = Correction.of(STUDY, {"PatientName": "Müller^Ö", "StudyID": "7"}, Version(3, 2, "node-1"))
    assert Correction.loads(correction.dumps()) == correction
    content = correction.entry_content()
    assert is_correction_entry(content) and not is_mark(content)
    assert correction_of_entry(content) == correction
