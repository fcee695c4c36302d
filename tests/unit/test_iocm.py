"""IHE IOCM rejection notes: which KOS documents are notes and what they reference."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pacsnode.node import iocm
from pacsnode.node.iocm import RejectionReason, rejection_note
from pacsnode.replication.delete_coordinator import DeleteScope


def note(code: str = "113001", scheme: str = "DCM", sop_class: str = iocm.KOS_SOP_CLASS_UID,
         references: dict[str, dict[str, list[str]]] | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "9.9.9"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, scheme, "title"
    ds.ConceptNameCodeSequence = [title]
    studies = []
    for study_uid, series_map in (references or {"1.1": {"1.1.1": ["1.1.1.1", "1.1.1.2"]}}).items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        series_items = []
        for series_uid, sops in series_map.items():
            series = Dataset()
            series.SeriesInstanceUID = series_uid
            items = []
            for sop in sops:
                item = Dataset()
                item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                item.ReferencedSOPInstanceUID = sop
                items.append(item)
            series.ReferencedSOPSequence = items
            series_items.append(series)
        study.ReferencedSeriesSequence = series_items
        studies.append(study)
    ds.CurrentRequestedProcedureEvidenceSequence = studies
    return ds


@pytest.mark.parametrize("code, reason", [("113001", RejectionReason.QUALITY),
                                          ("113037", RejectionReason.PATIENT_SAFETY),
                                          ("113038", RejectionReason.INCORRECT_WORKLIST_ENTRY),
                                          ("113039", RejectionReason.RETENTION_EXPIRED)])
def test_a_rejection_title_gives_its_reason_and_every_referenced_instance(code: str, reason: RejectionReason) -> None:
    found = rejection_note(note(code, references={"1.1": {"1.1.1": ["a", "b"], "1.1.2": ["c"]}, "2.2": {"2.2.1": ["d"]}}))
    assert found is not None and found.reason is reason
    assert found.scopes == (DeleteScope("1.1", "1.1.1", "a"), DeleteScope("1.1", "1.1.1", "b"),
                            DeleteScope("1.1", "1.1.2", "c"), DeleteScope("2.2", "2.2.1", "d"))


@pytest.mark.parametrize("kwargs", [{"code": "113000"},  # Of Interest: a KOS, not a rejection.
                                    {"scheme": "SRT"},
                                    {"sop_class": "1.2.840.10008.5.1.4.1.1.88.11"}])
def test_other_documents_are_not_notes(kwargs: dict[str, str]) -> None:
    assert rejection_note(note(**kwargs)) is None


def test_a_note_never_deletes_itself_and_skips_incomplete_references() -> None:
    found = rejection_note(note(references={"1.1": {"1.1.1": ["9.9.9", "x", ""]}, "": {"3.3.1": ["y"]}}))
    assert found is not None and found.scopes == (DeleteScope("1.1", "1.1.1", "x"),)


def test_too_many_references_are_refused() -> None:
    with pytest.raises(iocm.NoteError):
        rejection_note(note(references={"1.1": {"1.1.1": [f"1.{i}" for i in range(iocm.REFERENCES_MAX + 1)]}}))
