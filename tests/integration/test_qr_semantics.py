"""Query/retrieve semantics a conformance tester checked (issue 11): sequence return keys
carry the stored items, a key below the query level matches nothing, patient counts
cover all of the patient's studies, and C-GET refuses a wildcard or a missing unique
key with 0xA900 and no phantom sub-operation."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess

from . import clients
from .clients import identifier


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("qr")
    process = NodeProcess(root / "data")
    process.start()
    spec = datagen.StudySetSpec(patients=1, studies_per_patient=2, series_per_study=1, instances_per_series=2,
                                rows=8, cols=8, seed=77, modalities=("CT",))
    manifest = datagen.write_study_set(spec, root / "files")
    paths = [Path(e["path"]) for e in manifest]
    # The first study's instances carry a ProcedureCodeSequence with one item.
    from pydicom import dcmread

    first_study = manifest[0]["study_uid"]
    for path in paths:
        dataset = dcmread(path)
        if dataset.StudyInstanceUID == first_study:
            code = Dataset()
            code.CodeValue = "CTHEAD"
            code.CodingSchemeDesignator = "99LOCAL"
            code.CodeMeaning = "CT head"
            dataset.ProcedureCodeSequence = Sequence([code])
            dataset.save_as(path, enforce_file_format=True)
    statuses = clients.send_files(process.dicom_port, paths)
    assert set(statuses.values()) == {0}, statuses
    process.manifest = manifest  # type: ignore[attr-defined]
    yield process
    process.stop()


def test_sequence_return_key_carries_the_stored_items(node: NodeProcess) -> None:
    first_study = node.manifest[0]["study_uid"]  # type: ignore[attr-defined]
    query = identifier("STUDY", StudyInstanceUID=first_study)
    query.ProcedureCodeSequence = []
    found, status = clients.find(node.dicom_port, query)
    assert status == 0 and len(found) == 1
    items = found[0].ProcedureCodeSequence
    assert len(items) == 1 and items[0].CodeValue == "CTHEAD" and items[0].CodeMeaning == "CT head"


def test_a_key_below_the_query_level_matches_nothing(node: NodeProcess) -> None:
    found, status = clients.find(node.dicom_port, identifier("STUDY", StudyInstanceUID="", Modality="CT"))
    assert status == 0 and found == []
    found, status = clients.find(node.dicom_port, identifier("STUDY", StudyInstanceUID="", Modality=""))
    assert status == 0 and len(found) == 2  # Empty: a return key, harmless.


def test_patient_counts_are_the_patients_not_the_matches(node: NodeProcess) -> None:
    entry = node.manifest[0]  # type: ignore[attr-defined]
    query = identifier("PATIENT", PatientID=entry["patient_id"], NumberOfPatientRelatedStudies="")
    found, status = clients.patient_root_find(node.dicom_port, query)
    assert status == 0 and len(found) == 1 and int(found[0].NumberOfPatientRelatedStudies) == 2


def test_patient_counts_asked_at_study_level_count_all_of_the_patients_studies(node: NodeProcess) -> None:
    """Study Root, STUDY level: NumberOfPatientRelated* are optional keys there (PS3.4
    Table C.6-5) and count the patient's studies, series and instances (C.3.4), not only
    the studies that matched. Orthanc 1.10.1 returns them empty at this level."""
    manifest = node.manifest  # type: ignore[attr-defined]
    first_study = manifest[0]["study_uid"]
    query = identifier("STUDY", StudyInstanceUID=first_study, NumberOfPatientRelatedStudies="",
                       NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="",
                       NumberOfStudyRelatedInstances="")
    found, status = clients.find(node.dicom_port, query)
    assert status == 0 and len(found) == 1
    row = found[0]
    assert row.StudyInstanceUID == first_study
    assert int(row.NumberOfPatientRelatedStudies) == 2
    assert int(row.NumberOfPatientRelatedSeries) == len({e["series_uid"] for e in manifest})
    assert int(row.NumberOfPatientRelatedInstances) == len(manifest)
    assert int(row.NumberOfStudyRelatedInstances) == sum(1 for e in manifest if e["study_uid"] == first_study)
    # Both studies asked for: both rows, each with the patient's totals (not one counted as the other's).
    found, status = clients.find(node.dicom_port, identifier("STUDY", StudyInstanceUID="",
                                                             NumberOfPatientRelatedStudies=""))
    assert status == 0 and len(found) == 2
    assert [int(row.NumberOfPatientRelatedStudies) for row in found] == [2, 2]


@pytest.mark.parametrize("keys", [{"StudyInstanceUID": "1.2.*"}, {"StudyInstanceUID": "*"}, {"PatientName": "X*"}])
def test_get_refuses_wildcards_and_missing_unique_keys_without_phantom_sub_operations(node: NodeProcess,
                                                                                       keys: dict[str, str]) -> None:
    result = clients.get(node.dicom_port, identifier("STUDY", **keys), [("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")])
    assert result.final_status == 0xA900
    assert result.failed == 0 and result.completed == 0 and not result.received


def _move(port: int, study_uid: str, destination: str) -> Dataset:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    ae = clients.scu_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    final = Dataset()
    try:
        for status, _identifier in assoc.send_c_move(identifier("STUDY", StudyInstanceUID=study_uid), destination,
                                                      StudyRootQueryRetrieveInformationModelMove):
            if status and status.Status != 0xFF00:
                final = status
    finally:
        assoc.release()
    return final


def test_move_to_a_configured_destination_that_is_down_is_a_sub_operation_failure(tmp_path: Path) -> None:
    import socket
    import time

    from pacsnode.sim.process import free_port

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # Accepts TCP, never answers an A-ASSOCIATE-RQ.
    down_port = free_port()
    node = NodeProcess(tmp_path / "data", extra_args=[
        "--destination", f"DOWN=127.0.0.1:{down_port}",
        "--destination", f"SILENT=127.0.0.1:{silent.getsockname()[1]}",
        "--acse-timeout-s", "2", "--move-connect-timeout-s", "2"])
    node.start()
    try:
        manifest = datagen.write_study_set(datagen.StudySetSpec(patients=1, instances_per_series=3, rows=8, cols=8,
                                                                seed=78), tmp_path / "files")
        assert set(clients.send_files(node.dicom_port, [Path(e["path"]) for e in manifest]).values()) == {0}
        study = manifest[0]["study_uid"]
        for destination, bound_s in (("DOWN", 3.0), ("SILENT", 6.0)):
            start = time.monotonic()
            final = _move(node.dicom_port, study, destination)
            elapsed = time.monotonic() - start
            assert final.Status == 0xA702, (destination, hex(final.Status))
            assert final.NumberOfFailedSuboperations == 3 and final.NumberOfCompletedSuboperations == 0
            assert destination in final.ErrorComment
            assert elapsed < bound_s, (destination, elapsed)
        assert _move(node.dicom_port, study, "NOBODY").Status == 0xA801  # Unknown: still 0xA801.
        assert "dicom.move.destination_unreachable" in node.log_text()
    finally:
        node.stop()
        silent.close()


def test_a_sub_operation_without_a_response_is_one_line_and_a_failure(tmp_path: Path) -> None:
    """A C-MOVE destination that accepts the association and the C-STORE but never
    answers: after dimse_timeout_s the sub-operation fails, the sub-association is
    aborted, and the node logs dicom.retrieve.no_response (not pynetdicom's ERROR lines)."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from pacsnode.sim.process import free_port

    release = threading.Event()

    def never_answer(event: object) -> int:
        release.wait(30)
        return 0

    destination = AE(ae_title="MUTE")
    destination.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, never_answer)])
    node = NodeProcess(tmp_path / "data", extra_args=["--destination", f"MUTE=127.0.0.1:{port}",
                                                      "--dimse-timeout-s", "2"])
    node.start()
    try:
        manifest = datagen.write_study_set(datagen.StudySetSpec(patients=1, instances_per_series=1, rows=8, cols=8,
                                                                seed=79, modalities=("CT",)), tmp_path / "files")
        assert set(clients.send_files(node.dicom_port, [Path(e["path"]) for e in manifest]).values()) == {0}
        final = _move(node.dicom_port, manifest[0]["study_uid"], "MUTE")
        assert final.NumberOfFailedSuboperations == 1 and final.NumberOfCompletedSuboperations == 0
        log = node.log_text()
        assert "dicom.retrieve.no_response" in log and "reason=dimse-timeout" in log, log[-3000:]
        assert "called_ae_title=MUTE" in log
        # pynetdicom's retrieve service class says the sub-operation failed (one line,
        # with our reason); not its own "DIMSE timeout reached", never a traceback.
        assert "DIMSE timeout reached" not in log and "has no attribute" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        release.set()
        node.stop()
        server.shutdown()
