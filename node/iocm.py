"""IHE IOCM rejection notes: a Key Object Selection document whose title is a rejection
code, received by C-STORE, deletes the instances it references (as dcm4chee's archive
hides them), through the cluster delete (replication/delete_coordinator.py).

Titles taken (Concept Name Code Sequence, coding scheme DCM; IHE RAD TF-3 IOCM):
113001 Rejected for Quality Reasons, 113037 Rejected for Patient Safety Reasons,
113038 Incorrect Modality Worklist Entry, 113039 Data Retention Policy Expired.
The referenced instances are those of Current Requested Procedure Evidence Sequence
(study > series > instance). The note itself is stored like any instance.

Only a dataset of the KOS SOP class is parsed (it is small, no pixel data); every other
C-STORE pays one string comparison. The C-STORE of a note answers Success only when
every referenced instance is deleted (or was not there); otherwise 0xA701 and the
modality sends the note again (storing it again is a duplicate; the deletes are
repeated, which is harmless).
"""

from __future__ import annotations

import enum
import io
import logging
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from pacsnode.replication.delete_coordinator import DeleteScope, DeleteStatus

log = logging.getLogger(__name__)

KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"
NOTE_BYTES_MAX = 16 * 1024 * 1024  # A larger "KOS" is not parsed as a note (logged).
REFERENCES_MAX = 10_000


class RejectionReason(enum.Enum):
    QUALITY = "113001"  # Rejected for Quality Reasons
    PATIENT_SAFETY = "113037"  # Rejected for Patient Safety Reasons
    INCORRECT_WORKLIST_ENTRY = "113038"  # Incorrect Modality Worklist Entry
    RETENTION_EXPIRED = "113039"  # Data Retention Policy Expired


class NoteError(Exception):
    """A rejection note that cannot be applied as sent (too large, too many references)."""


@dataclass(frozen=True)
class RejectionNote:
    reason: RejectionReason
    scopes: tuple[DeleteScope, ...]  # One per referenced instance.


def rejection_note(dataset: Dataset) -> RejectionNote | None:
    """The rejection a KOS dataset carries, or None when its title is no rejection code."""
    if str(dataset.get("SOPClassUID", "")) != KOS_SOP_CLASS_UID:
        return None
    reason = None
    for code in dataset.get("ConceptNameCodeSequence", []) or []:
        if str(code.get("CodingSchemeDesignator", "")).strip() != "DCM":
            continue
        try:
            reason = RejectionReason(str(code.get("CodeValue", "")).strip())
        except ValueError:
            continue
    if reason is None:
        return None
    own = str(dataset.get("SOPInstanceUID", ""))
    scopes: list[DeleteScope] = []
    for study in dataset.get("CurrentRequestedProcedureEvidenceSequence", []) or []:
        study_uid = str(study.get("StudyInstanceUID", "")).strip()
        for series in study.get("ReferencedSeriesSequence", []) or []:
            series_uid = str(series.get("SeriesInstanceUID", "")).strip()
            for item in series.get("ReferencedSOPSequence", []) or []:
                sop_uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
                if study_uid and series_uid and sop_uid and sop_uid != own:
                    scopes.append(DeleteScope(study_uid, series_uid, sop_uid))
    if len(scopes) > REFERENCES_MAX:
        raise NoteError(f"a rejection note may reference at most {REFERENCES_MAX} instances")
    return RejectionNote(reason, tuple(dict.fromkeys(scopes)))


def parse_note(part10: bytes) -> RejectionNote | None:
    """rejection_note() of Part-10 bytes; raises NoteError for a note too large to parse."""
    if len(part10) > NOTE_BYTES_MAX:
        raise NoteError("key object selection document too large to be read as a rejection note")
    return rejection_note(dcmread(io.BytesIO(part10), force=True))


class RejectionNotes:
    """Applies rejection notes through `archive.delete(scope)` (blocking)."""

    def __init__(self, archive: Any) -> None:
        self._archive = archive

    @staticmethod
    def supported(archive: Any) -> bool:
        return callable(getattr(archive, "delete", None))

    def apply(self, note: RejectionNote) -> bool:
        """True when every referenced instance is now deleted (or was not stored)."""
        failed = 0
        deleted = 0
        for scope in note.scopes:
            result = self._archive.delete(scope)
            if result.status == DeleteStatus.DELETED:
                deleted += 1
            elif result.status != DeleteStatus.NOT_FOUND:
                failed += 1
        log.info("dicom.iocm.rejection reason=%s referenced=%d deleted=%d failed=%d",
                 note.reason.name.lower(), len(note.scopes), deleted, failed)
        return failed == 0
