"""IHE IOCM rejection note on a real node: a KOS titled 113001 (Rejected for Quality
Reasons), sent by C-STORE, deletes the instances it references; the others stay."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pacsnode.node import iocm
from pacsnode.sim import datagen

from . import clients
from .clients import identifier

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")


def _rejection_note(code: str, study: str, series: str, sops: list[str]) -> Dataset:
    kos = Dataset()
    kos.SOPClassUID, kos.SOPInstanceUID = iocm.KOS_SOP_CLASS_UID, "9.9.9"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, "DCM", "Rejected for Quality Reasons"
    kos.ConceptNameCodeSequence = [title]
    evidence, series_item = Dataset(), Dataset()
    evidence.StudyInstanceUID, series_item.SeriesInstanceUID = study, series
    items = []
    for sop in sops:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", sop
        items.append(item)
    series_item.ReferencedSOPSequence = items
    evidence.ReferencedSeriesSequence = [series_item]
    kos.CurrentRequestedProcedureEvidenceSequence = [evidence]
    return kos


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "dicom-workers"])
def test_a_rejection_note_deletes_what_it_references(node_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     workers: int) -> None:
    # Through DICOM workers the note is read by the worker and its deletes go to the node
    # over the worker channel (node/archive_channel.py DELETE).
    node = node_factory.start("iocm-1", extra_args=["--dicom-workers", str(workers), "--dicom-local-associations", "0"])
    spec = datagen.StudySetSpec(patients=1, studies_per_patient=1, series_per_study=1, instances_per_series=3,
                                rows=16, cols=16, seed=61)
    manifest = datagen.write_study_set(spec, tmp_path / "study")
    statuses = clients.send_files(node.dicom_port, [Path(e["path"]) for e in manifest])
    assert set(statuses.values()) == {0}
    study, series = manifest[0]["study_uid"], manifest[0]["series_uid"]
    rejected = [e["sop_uid"] for e in manifest[:2]]
    kos = _rejection_note("113001", study, series, rejected)
    kos.StudyInstanceUID, kos.SeriesInstanceUID, kos.Modality = study, "9.9.9.1", "KO"
    kos.PatientID = manifest[0]["patient_id"]
    kos.file_meta = FileMetaDataset()
    kos.file_meta.MediaStorageSOPClassUID = iocm.KOS_SOP_CLASS_UID
    kos.file_meta.MediaStorageSOPInstanceUID = kos.SOPInstanceUID
    kos.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    assert clients.send_files(node.dicom_port, [path]) == {str(path): 0}
    found, status = clients.find(node.dicom_port, identifier("IMAGE", StudyInstanceUID=study, SOPInstanceUID=""))
    assert status == 0
    left = {str(ds.SOPInstanceUID) for ds in found}
    assert left == {manifest[2]["sop_uid"], "9.9.9"}  # The third image and the note itself.
    assert "dicom.iocm.rejection reason=quality referenced=2 deleted=2 failed=0" in node.log_text()
