"""Corrections on real node processes (N=3, W=2): `pacsnode modify` and `pacsnode merge-patient`
through one node; C-FIND and C-GET through another show the new values; the stored bytes
stay as received; a replica down during the modify has it after it is back (anti-entropy)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from pydicom import dcmread

from pacsnode.node.codec import decompress
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.replication.matching import Condition, Query
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, pacsnode_command, wait_until

from . import clients
from .clients import identifier
from .test_cluster import local_sop_uids, start_cluster

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

NAMES = ("m1", "m2", "m3")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("modify")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(root: Path) -> Iterator[list[NodeProcess]]:
    nodes = start_cluster(root, NAMES)
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def studies(cluster: list[NodeProcess], root: Path) -> dict[str, list[datagen.ManifestEntry]]:
    spec = datagen.StudySetSpec(patients=3, studies_per_patient=1, series_per_study=1, instances_per_series=2,
                                rows=16, cols=16, seed=43)
    manifest = datagen.write_study_set(spec, root / "studies")
    (root / "studies" / "manifest.json").unlink(missing_ok=True)
    result, acked = clients.storescu(cluster[0].dicom_port, [root / "studies"], extra=["+sd", "+r"])
    assert result.returncode == 0 and len(acked) == len(manifest), result.stdout[-2000:] + result.stderr[-2000:]
    by_study: dict[str, list[datagen.ManifestEntry]] = {}
    for entry in manifest:
        by_study.setdefault(entry["study_uid"], []).append(entry)
    for study_uid, entries in by_study.items():
        assert wait_until(lambda: all(len(local_sop_uids(n.peer_address, study_uid)) == len(entries)
                                      for n in cluster), 30)
    return by_study


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pacsnode_command() + [args[0], "--node", node.peer_address, *args[1:]],
                          capture_output=True, text=True, timeout=120)


def _study_row(node: NodeProcess, study_uid: str) -> tuple[str, str]:
    found, status = clients.find(node.dicom_port, identifier("STUDY", StudyInstanceUID=study_uid, PatientName="",
                                                             PatientID=""))
    assert status == 0 and len(found) == 1
    return str(found[0].PatientName), str(found[0].PatientID)


def _studies_of(node: NodeProcess, patient_id: str) -> set[str]:
    found, status = clients.find(node.dicom_port, identifier("STUDY", PatientID=patient_id, StudyInstanceUID=""))
    assert status == 0
    return {str(ds.StudyInstanceUID) for ds in found}


def _envelope() -> pb.Envelope:
    return pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="test")


def _local_row(node: NodeProcess, study_uid: str) -> dict[str, object]:
    """The study row this node's own store answers (no coordinator, no other replica)."""
    query = Query("STUDY", (Condition("StudyInstanceUID", "UI", study_uid),), ("PatientName", "PatientID"))
    with grpc.insecure_channel(node.peer_address) as channel:
        rows = [json.loads(r.attributes_json) for r in pb_grpc.DataStub(channel).Query(
            pb.QueryRequest(envelope=_envelope(), query_json=json.dumps(query.to_json()).encode()), timeout=10)
            if r.attributes_json]
    return rows[0] if rows else {}


def _stored_part10(node: NodeProcess, study_uid: str, sop_uid: str) -> bytes:
    with grpc.insecure_channel(node.peer_address) as channel:
        chunks = list(pb_grpc.DataStub(channel).FetchInstance(
            pb.FetchRequest(envelope=_envelope(), study_instance_uid=study_uid, sop_instance_uid=sop_uid), timeout=10))
    return decompress(b"".join(c.data for c in chunks), sop_uid)


def _source(root: Path, entry: datagen.ManifestEntry) -> Path:
    path = Path(entry["path"])
    return path if path.is_absolute() else root / "studies" / path


def test_modify_through_one_node_is_seen_through_another(
        cluster: list[NodeProcess], studies: dict[str, list[datagen.ManifestEntry]], root: Path) -> None:
    study_uid, entries = sorted(studies.items())[0]
    old_patient = entries[0]["patient_id"]
    result = _cli(cluster[0], "modify", "--study", study_uid, "--set", "PatientName=Corrected^Name",
                  "--set", "PatientID=NEWID1")
    assert result.returncode == 0, result.stdout + result.stderr
    for node in cluster:
        assert _study_row(node, study_uid) == ("Corrected^Name", "NEWID1"), node.node_id
        assert _local_row(node, study_uid).get("PatientName") == "Corrected^Name", node.node_id
    assert study_uid in _studies_of(cluster[2], "NEWID1")
    assert study_uid not in _studies_of(cluster[2], old_patient)
    # C-GET through another node: the headers carry the correction, pixel data as stored.
    out = root / "get-modified"
    clients.getscu(cluster[2].dicom_port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"], out)
    got = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in out.glob("*"))}
    assert set(got) == {e["sop_uid"] for e in entries}
    for entry in entries:
        original = dcmread(_source(root, entry))
        sent = got[entry["sop_uid"]]
        assert (str(sent.PatientName), sent.PatientID) == ("Corrected^Name", "NEWID1")
        assert sent.PixelData == original.PixelData and sent.StudyDate == original.StudyDate
        # The bytes received stay stored as they were, on every replica.
        for node in cluster:
            assert _stored_part10(node, study_uid, entry["sop_uid"]).endswith(
                clients.file_dataset_bytes(_source(root, entry))), node.node_id
    # Stored again as first sent: a duplicate; the correction still applies.
    again, _acked = clients.storescu(cluster[1].dicom_port, [_source(root, e) for e in entries])
    assert again.returncode == 0
    assert _study_row(cluster[1], study_uid) == ("Corrected^Name", "NEWID1")


def test_attributes_outside_the_documented_set_are_refused(
        cluster: list[NodeProcess], studies: dict[str, list[datagen.ManifestEntry]]) -> None:
    study_uid = sorted(studies)[0]
    result = _cli(cluster[1], "modify", "--study", study_uid, "--set", "Modality=CT")
    assert result.returncode == 2 and "Modality" in result.stderr
    result = _cli(cluster[1], "modify", "--study", "1.2.3.999.1", "--set", "PatientName=X")
    assert result.returncode == 3, result.stdout + result.stderr


def test_merge_patient_moves_every_study_and_a_replica_down_gets_it_back(
        cluster: list[NodeProcess], studies: dict[str, list[datagen.ManifestEntry]]) -> None:
    (first, first_entries), (second, second_entries) = sorted(studies.items())[1:3]
    down = cluster[1]
    down.kill()
    try:
        result = _cli(cluster[0], "merge-patient", "--from", second_entries[0]["patient_id"], "--to",
                      first_entries[0]["patient_id"], "--set", "PatientName=Merged^Patient")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 studies" in result.stdout
        assert _studies_of(cluster[2], first_entries[0]["patient_id"]) == {first, second}
        assert _study_row(cluster[2], second) == ("Merged^Patient", first_entries[0]["patient_id"])
    finally:
        down.start()
    # Missed while down: anti-entropy (the correction's entry is in the digests) brings it.
    assert wait_until(lambda: _local_row(down, second).get("PatientName") == "Merged^Patient", 60), \
        _local_row(down, second)
    assert _studies_of(down, second_entries[0]["patient_id"]) == set()
