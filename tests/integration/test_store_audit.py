"""The audit trail of C-STORE: one DICOM Instances Transferred message per study, SOP class
and outcome for each association, written when its connection closes, however it closes
(released, aborted, or dropped with neither), never one message per instance."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread
from pynetdicom import evt

from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, wait_until

from . import clients


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("store-audit")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def node(root: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(root / "n1", node_id="n1").start()
    try:
        yield process
    finally:
        process.stop()


def _studies(root: Path, name: str, seed: int) -> dict[str, list[Path]]:
    spec = datagen.StudySetSpec(patients=1, studies_per_patient=2, series_per_study=1, instances_per_series=3,
                                rows=8, cols=8, seed=seed)
    by_study: dict[str, list[Path]] = {}
    for entry in datagen.write_study_set(spec, root / name):
        by_study.setdefault(entry["study_uid"], []).append(Path(entry["path"]))
    assert len(by_study) == 2
    return by_study


def _associate(port: int, calling: str, paths: list[Path]) -> Any:
    ae = clients.scu_ae(calling)
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(str(meta.file_meta.MediaStorageSOPClassUID), [str(meta.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    return assoc


def _store_transfers(node: NodeProcess, calling: str) -> list[dict[str, Any]]:
    path = node.data_dir / "audit.jsonl"
    if not path.exists():
        return []
    messages = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in messages
            if m["EventIdentification"]["EventID"]["originalText"] == "DICOM Instances Transferred"
            and m["EventIdentification"]["EventActionCode"] == "C"
            and any(p.get("UserID") == calling for p in m["ActiveParticipant"])]


def _counts(messages: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in messages:
        for item in message["ParticipantObjectIdentification"]:
            if item["ParticipantObjectTypeCodeRole"] == "3":
                counts[item["ParticipantObjectID"]] = counts.get(item["ParticipantObjectID"], 0) + \
                    item["ParticipantObjectDescription"]["NumberOfInstances"]
    return counts


def _one_per_study(node: NodeProcess, calling: str, studies: dict[str, list[Path]]) -> bool:
    messages = _store_transfers(node, calling)
    return len(messages) == len(studies) and _counts(messages) == {uid: len(group) for uid, group in studies.items()}


def _send(assoc: Any, paths: list[Path]) -> None:
    for path in paths:
        assert assoc.send_c_store(path).Status == 0


def test_a_released_association_is_audited_once_per_study(node: NodeProcess, root: Path) -> None:
    studies = _studies(root, "released", seed=71)
    paths = [p for group in studies.values() for p in group]
    assoc = _associate(node.dicom_port, "AUDREL", paths)
    _send(assoc, paths)
    assert _store_transfers(node, "AUDREL") == []  # Gathered until the connection closes.
    assoc.release()
    assert wait_until(lambda: len(_store_transfers(node, "AUDREL")) == 2, 10), _store_transfers(node, "AUDREL")
    messages = _store_transfers(node, "AUDREL")
    assert _counts(messages) == {uid: len(group) for uid, group in studies.items()}
    assert {m["EventIdentification"]["EventOutcomeIndicator"] for m in messages} == {"0"}
    assert {m["EventIdentification"]["EventOutcomeDescription"] for m in messages} == {"C-STORE 3 instances"}
    patient = dcmread(paths[0], stop_before_pixels=True).PatientID
    assert all(patient in json.dumps(m) for m in messages)


def test_an_aborted_association_is_audited(node: NodeProcess, root: Path) -> None:
    studies = _studies(root, "aborted", seed=72)
    paths = [p for group in studies.values() for p in group]
    assoc = _associate(node.dicom_port, "AUDABORT", paths)
    _send(assoc, paths)
    assoc.abort()
    assert wait_until(lambda: _one_per_study(node, "AUDABORT", studies), 10), _store_transfers(node, "AUDABORT")


def test_a_dropped_connection_is_audited(node: NodeProcess, root: Path) -> None:
    studies = _studies(root, "dropped", seed=73)
    paths = [p for group in studies.values() for p in group]
    sockets: list[socket.socket] = []
    ae = clients.scu_ae("AUDDROP")
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(str(meta.file_meta.MediaStorageSOPClassUID), [str(meta.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="PACSNODE",
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: sockets.append(event.assoc.dul.socket.socket))])
    assert assoc.is_established and sockets
    _send(assoc, paths)
    sockets[0].shutdown(socket.SHUT_RDWR)  # No A-RELEASE, no A-ABORT: the TCP connection just ends.
    assert wait_until(lambda: _one_per_study(node, "AUDDROP", studies), 15), _store_transfers(node, "AUDDROP")
    assoc.abort()


def _queries(node: NodeProcess, calling: str) -> list[dict[str, Any]]:
    path = node.data_dir / "audit.jsonl"
    if not path.exists():
        return []
    messages = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in messages if m["EventIdentification"]["EventID"]["originalText"] == "Query"
            and any(p.get("UserID") == calling for p in m["ActiveParticipant"])]


def test_a_c_find_is_audited_with_its_match_count(node: NodeProcess, root: Path) -> None:
    """The node's C-FIND handler sends its rows itself (not yielded to pynetdicom): the
    audit trail's query message still counts them (it said "0 matches" for every query)."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    studies = _studies(root, "queried", seed=73)
    paths = [p for group in studies.values() for p in group]
    assoc = _associate(node.dicom_port, "AUDFINDS", paths)
    _send(assoc, paths)
    assoc.release()
    ae = clients.scu_ae("AUDFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="PACSNODE")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = dcmread(paths[0], stop_before_pixels=True).PatientID
    query.StudyInstanceUID = ""
    statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    assoc.release()
    assert statuses == [0xFF00, 0xFF00, 0x0000]
    assert wait_until(lambda: len(_queries(node, "AUDFIND")) == 1, 10), _queries(node, "AUDFIND")
    assert _queries(node, "AUDFIND")[0]["EventIdentification"]["EventOutcomeDescription"] == "2 matches"
