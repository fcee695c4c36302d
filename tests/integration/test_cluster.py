"""Cluster data path: real node processes on 127.0.0.1 (N=3, W=2), dcmtk and pynetdicom.

Any node stores, finds and retrieves any study; every study lands on exactly its N
preference-list nodes; a killed node costs no failed store and gets its hints back.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from pacsnode.cli.status import collect
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.ring.placement import Member, Ring
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, start_all, wait_until

from . import clients
from .clients import file_dataset_bytes, identifier

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

FAST = [
    "--replication-factor", "3", "--write-quorum", "2",
    "--profile", "local",
    "--hint-replay-interval-ms", "300", "--replica-timeout-ms", "1500",
    "--token-salt", "0",  # The tokens expected_owners computes (test_sites.py covers chosen salts).
]
NAMES = ("n1", "n2", "n3", "n4")


def start_cluster(root: Path, names: tuple[str, ...], extra: list[str] | None = None, *,
                  entry_extra: list[str] | None = None) -> list[NodeProcess]:
    """`entry_extra`: more arguments for the first node only. The nodes start at once
    (sim/process.py start_all: their token salt is fixed by FAST), each joining through the first."""
    nodes: list[NodeProcess] = []
    for name in names:
        seeds = [nodes[0].peer_address] if nodes else []
        own = (entry_extra or []) if not nodes else []
        nodes.append(NodeProcess(root / name, node_id=name, seeds=seeds, extra_args=FAST + (extra or []) + own))
    start_all(nodes)
    addresses = [n.peer_address for n in nodes]
    assert wait_until(lambda: all(_member_count(a) == len(names) for a in addresses), 30), "membership did not converge"
    return nodes


def _member_count(address: str) -> int:
    try:
        return sum(1 for n in collect(address, timeout_s=2)["nodes"] if n["state"] == "alive" and n["reachable"])
    except Exception:
        return 0


def expected_owners(names: tuple[str, ...], study_uid: str, n: int = 3) -> set[str]:
    ring = Ring("pacsnode", [Member(node_id=name, host=socket.gethostname()) for name in names])
    return set(ring.owners_of_study(study_uid, n))


def local_sop_uids(peer_address: str, study_uid: str) -> set[str]:
    """The instances of a study a node holds itself (not as hints), via the peer protocol."""
    envelope = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="test")
    with grpc.insecure_channel(peer_address) as channel:
        reply = pb_grpc.DataStub(channel).ListStudy(
            pb.ListStudyRequest(envelope=envelope, study_instance_uid=study_uid), timeout=10)
    return {record.sop_instance_uid for record in reply.records}


def local_counts(nodes: list[NodeProcess]) -> dict[str, int]:
    data = collect(nodes[0].peer_address)
    return {n["node_id"]: n["local_instances"] for n in data["nodes"]}


def pending_hints(nodes: list[NodeProcess]) -> int:
    data = collect(nodes[0].peer_address)
    return sum(n.get("pending_hints") or 0 for n in data["nodes"] if n["reachable"])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("cluster")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def storescp(root: Path) -> Iterator[clients.StoreScp]:
    from pacsnode.sim.process import free_port

    with clients.StoreScp(root / "moved", free_port()) as scp:
        yield scp


@pytest.fixture(scope="module")
def cluster(root: Path, storescp: clients.StoreScp) -> Iterator[list[NodeProcess]]:
    # read_fault_window_ms 0: at the default (60 s) a named read right after the kill -9 below is
    # flagged incomplete (0xB000) when the dead node is a possible stand-in of the study (8e35c09,
    # cost in docs/sim.md "Read your writes"); this module checks the answers of the owners, as
    # test_partial_answers and test_dicomweb do.
    nodes = start_cluster(root, NAMES, ["--destination", f"STORESCP=127.0.0.1:{storescp.port}",
                                        "--read-fault-window-ms", "0"])
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def stored(cluster: list[NodeProcess], root: Path) -> list[datagen.ManifestEntry]:
    spec = datagen.StudySetSpec(patients=6, studies_per_patient=2, series_per_study=2, instances_per_series=3,
                                rows=32, cols=32, seed=31, latin1_fraction=0.3)
    manifest = datagen.write_study_set(spec, root / "studies")
    (root / "studies" / "manifest.json").unlink(missing_ok=True)
    result, acked = clients.storescu(cluster[0].dicom_port, [root / "studies"], extra=["+sd", "+r"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(acked) == len(manifest)
    # W=2 acknowledged; the third copy follows in the background.
    assert wait_until(lambda: sum(local_counts(cluster).values()) == 3 * len(manifest), 30), local_counts(cluster)
    return manifest


def test_each_study_lands_on_exactly_its_preference_list(cluster: list[NodeProcess],
                                                         stored: list[datagen.ManifestEntry]) -> None:
    by_study: dict[str, set[str]] = {}
    for entry in stored:
        by_study.setdefault(entry["study_uid"], set()).add(entry["sop_uid"])
    for study_uid, sop_uids in by_study.items():
        owners = expected_owners(NAMES, study_uid)
        for node in cluster:
            held = local_sop_uids(node.peer_address, study_uid)
            if node.node_id in owners:
                assert held == sop_uids, f"{node.node_id} should hold all of {study_uid}"
            else:
                assert held == set(), f"{node.node_id} is not an owner of {study_uid} but holds {len(held)}"
    assert sum(local_counts(cluster).values()) == 3 * len(stored)
    # Every replica's copy is the bytes that were sent.
    study_uid = stored[0]["study_uid"]
    for node in cluster:
        if node.node_id not in expected_owners(NAMES, study_uid):
            continue
        for entry in (e for e in stored if e["study_uid"] == study_uid):
            part10 = fetch_part10(node.peer_address, study_uid, entry["sop_uid"])
            assert clients.dataset_bytes(part10) == file_dataset_bytes(Path(entry["path"])), node.node_id


def ring_view(peer_address: str) -> pb.RingViewReply:
    envelope = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="test")
    with grpc.insecure_channel(peer_address) as channel:
        reply: pb.RingViewReply = pb_grpc.AdminStub(channel).RingView(pb.RingViewRequest(envelope=envelope), timeout=10)
    return reply


def test_ring_view_is_the_same_at_every_node_and_is_where_studies_live(
        cluster: list[NodeProcess], stored: list[datagen.ManifestEntry]) -> None:
    from pacsnode.ring.tokens import study_token

    views = [ring_view(node.peer_address) for node in cluster]
    layouts = [[(r.range.start, r.range.end, tuple(r.owner_ids)) for r in view.ranges] for view in views]
    assert all(layout == layouts[0] for layout in layouts[1:]), "nodes disagree on the ring"
    assert len(views[0].tokens) == len(NAMES) * 64 and views[0].settings.effective_replication_factor == 3
    assert {t.node_id for t in views[0].tokens} == set(NAMES)
    for study_uid in {entry["study_uid"] for entry in stored}:
        token = study_token(study_uid)
        owners = next(r.owner_ids for r in views[0].ranges
                      if (r.range.start < token <= r.range.end) or
                      (r.range.start >= r.range.end and (token > r.range.start or token <= r.range.end)))
        assert set(owners) == expected_owners(NAMES, study_uid)


def fetch_part10(peer_address: str, study_uid: str, sop_uid: str) -> bytes:
    """One replica's own copy of an instance, fetched over the peer protocol."""
    import zstandard

    envelope = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="test")
    with grpc.insecure_channel(peer_address) as channel:
        chunks = list(pb_grpc.DataStub(channel).FetchInstance(
            pb.FetchRequest(envelope=envelope, study_instance_uid=study_uid, sop_instance_uid=sop_uid), timeout=30))
    return zstandard.ZstdDecompressor().decompress(b"".join(chunk.data for chunk in chunks))


def test_find_at_every_node_returns_every_study_once_at_every_level(cluster: list[NodeProcess],
                                                                    stored: list[datagen.ManifestEntry]) -> None:
    studies = {e["study_uid"] for e in stored}
    patients = {e["patient_id"] for e in stored}
    for node in cluster:
        found, status = clients.find(node.dicom_port, identifier("STUDY", StudyInstanceUID="",
                                                                 NumberOfStudyRelatedInstances=""))
        uids = [str(ds.StudyInstanceUID) for ds in found]
        assert status == 0 and sorted(uids) == sorted(studies), node.node_id
        for ds in found:
            assert int(ds.NumberOfStudyRelatedInstances) == sum(1 for e in stored if e["study_uid"] == ds.StudyInstanceUID)
        found, status = clients.patient_root_find(node.dicom_port, identifier(
            "PATIENT", PatientID="", NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances=""))
        assert status == 0 and sorted(str(ds.PatientID) for ds in found) == sorted(patients), node.node_id
        for ds in found:
            assert int(ds.NumberOfPatientRelatedInstances) == sum(1 for e in stored if e["patient_id"] == ds.PatientID)
        found, status = clients.find(node.dicom_port, identifier("SERIES", StudyInstanceUID="", SeriesInstanceUID=""))
        assert status == 0
        assert sorted(str(ds.SeriesInstanceUID) for ds in found) == sorted({e["series_uid"] for e in stored})
        found, status = clients.find(node.dicom_port, identifier("IMAGE", StudyInstanceUID="", SOPInstanceUID=""))
        assert status == 0 and sorted(str(ds.SOPInstanceUID) for ds in found) == sorted(e["sop_uid"] for e in stored)
    # dcmtk's findscu at one node, too.
    result, responses = clients.findscu(cluster[2].dicom_port, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"],
                                        cluster[2].data_dir.parent / "findscu")
    assert sorted(str(ds.StudyInstanceUID) for ds in responses) == sorted(studies)


def _non_owner(cluster: list[NodeProcess], study_uid: str) -> NodeProcess:
    owners = expected_owners(NAMES, study_uid)
    return next(node for node in cluster if node.node_id not in owners)


def test_get_and_move_at_a_node_without_a_copy(cluster: list[NodeProcess], stored: list[datagen.ManifestEntry],
                                               storescp: clients.StoreScp, root: Path) -> None:
    study_uid = stored[0]["study_uid"]
    entries = [e for e in stored if e["study_uid"] == study_uid]
    node = _non_owner(cluster, study_uid)
    assert local_sop_uids(node.peer_address, study_uid) == set()
    contexts = [(e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries]
    result = clients.get(node.dicom_port, identifier("STUDY", StudyInstanceUID=study_uid), contexts)
    assert result.final_status == 0 and len(result.received) == len(entries)
    for entry in entries:
        assert result.received[entry["sop_uid"]] == file_dataset_bytes(Path(entry["path"]))
    out = root / "getscu"
    result_dcmtk = clients.getscu(node.dicom_port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"], out)
    assert result_dcmtk.returncode == 0, result_dcmtk.stderr[-2000:]
    for entry in entries:
        assert file_dataset_bytes(out / entry["sop_uid"]) == file_dataset_bytes(Path(entry["path"]))
    other = stored[-1]["study_uid"]
    mover = _non_owner(cluster, other)
    result_move = clients.movescu(mover.dicom_port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={other}"],
                                  "STORESCP")
    assert result_move.returncode == 0, result_move.stderr[-2000:]
    for entry in (e for e in stored if e["study_uid"] == other):
        moved = [p for p in storescp.out_dir.iterdir() if p.name.endswith(entry["sop_uid"])]
        assert moved and file_dataset_bytes(moved[0]) == file_dataset_bytes(Path(entry["path"]))


def test_large_multiframe_instance_crosses_nodes_in_chunks(cluster: list[NodeProcess], root: Path) -> None:
    entry = datagen.write_large_instance(root / "large", size_bytes=42_000_000, seed=5)
    path = Path(entry["path"])
    entry_node = _non_owner(cluster, entry["study_uid"])
    status = clients.send_files(entry_node.dicom_port, [path])
    assert status[str(path)] == 0
    owners = expected_owners(NAMES, entry["study_uid"])
    assert wait_until(lambda: sum(entry["sop_uid"] in local_sop_uids(n.peer_address, entry["study_uid"])
                                  for n in cluster) == 3, 60)
    for node in cluster:
        held = entry["sop_uid"] in local_sop_uids(node.peer_address, entry["study_uid"])
        assert held == (node.node_id in owners)
    result = clients.get(entry_node.dicom_port, identifier("IMAGE", StudyInstanceUID=entry["study_uid"],
                                                           SOPInstanceUID=entry["sop_uid"]),
                         [(entry["sop_class_uid"], entry["transfer_syntax_uid"])])
    assert result.final_status == 0
    assert result.received[entry["sop_uid"]] == file_dataset_bytes(path)


def test_peer_port_refuses_garbage_and_other_clusters(cluster: list[NodeProcess]) -> None:
    node = cluster[1]
    host, port = node.peer_address.split(":")
    for garbage in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 8):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(garbage)
            sock.settimeout(2)
            try:
                sock.recv(1024)
            except OSError:
                pass
    envelope = pb.Envelope(cluster_id="someone-else", protocol_version=PROTOCOL_VERSION, sender_id="intruder")
    with grpc.insecure_channel(node.peer_address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.AdminStub(channel).Status(pb.StatusRequest(envelope=envelope), timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as missing:
            pb_grpc.DataStub(channel).ListStudy(pb.ListStudyRequest(study_instance_uid="1.2.3"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "peer.refused" in node.log_text()
    assert clients.echo(node.dicom_port) == 0
    assert collect(node.peer_address)["node_id"] == node.node_id


def test_kill_9_one_node_stores_keep_succeeding_and_hints_come_back(cluster: list[NodeProcess],
                                                                    root: Path) -> None:
    victim = cluster[3]
    entry_node = cluster[1]
    spec = datagen.StudySetSpec(patients=8, studies_per_patient=1, series_per_study=1, instances_per_series=10,
                                rows=64, cols=64, seed=32)
    manifest = datagen.write_study_set(spec, root / "during-kill")
    (root / "during-kill" / "manifest.json").unlink(missing_ok=True)
    log_path = root / "during-kill.log"
    # The kill comes first: on a quiet machine the 80 stores can all finish within the half
    # second a kill in the middle of them used to wait, and no store then needed a hint.
    killed_at = time.monotonic()
    victim.kill()
    with open(log_path, "wb") as log:
        storescu = subprocess.Popen(["storescu", "-v", "-aec", "PACSNODE", "+sd", "+r", "127.0.0.1",
                                     str(entry_node.dicom_port), str(root / "during-kill")],
                                    stdout=log, stderr=subprocess.STDOUT)
    assert storescu.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    output = log_path.read_text(errors="replace")
    acked = clients.acked_files(output)
    assert len(acked) == len(manifest), f"failed stores while a node was down:\n{output[-3000:]}"
    assert "Store Response (" not in output.replace("Store Response (Success)", ""), output[-3000:]
    # Finds and retrieves still complete while it is down.
    studies = {e["study_uid"] for e in manifest}
    found, status = clients.find(cluster[0].dicom_port, identifier("STUDY", StudyInstanceUID=""))
    assert status == 0 and studies <= {str(ds.StudyInstanceUID) for ds in found}
    study_uid = manifest[0]["study_uid"]
    entries = [e for e in manifest if e["study_uid"] == study_uid]
    result = clients.get(cluster[2].dicom_port, identifier("STUDY", StudyInstanceUID=study_uid),
                         [(e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries])
    assert result.final_status == 0 and len(result.received) == len(entries)
    assert pending_hints(cluster) > 0 or all(victim.node_id not in expected_owners(NAMES, s) for s in studies)
    # Restart: hints are replayed and the node holds its full share.
    victim.start()
    assert wait_until(lambda: pending_hints(cluster) == 0, 60), "hints were not handed back"
    for study_uid in studies:
        expected = {e["sop_uid"] for e in manifest if e["study_uid"] == study_uid}
        held = local_sop_uids(victim.peer_address, study_uid)
        if victim.node_id in expected_owners(NAMES, study_uid):
            assert held == expected
        else:
            assert held == set()
    print(f"\nkill -9 during storescu: {len(acked)} of {len(manifest)} stores succeeded; "
          f"hints back {time.monotonic() - killed_at:.1f} s after the kill")


def test_store_fails_when_fewer_than_w_replicas_can_take_it(tmp_path: Path) -> None:
    """Three nodes, two of a study's three owners killed: no stand-in exists, so a store
    of that study must fail (never a false Success) within the deadline."""
    names = ("t1", "t2", "t3")
    nodes = start_cluster(tmp_path, names)
    try:
        spec = datagen.StudySetSpec(patients=1, seed=33, rows=16, cols=16)
        manifest = datagen.write_study_set(spec, tmp_path / "data")
        survivor = nodes[0]
        for node in nodes[1:]:
            node.kill()
        path = Path(manifest[0]["path"])
        started = time.monotonic()
        status = clients.send_files(survivor.dicom_port, [path])[str(path)]
        elapsed = time.monotonic() - started
        assert status in (0xA700, 0xA701), f"expected a failure status, got {status:#06x}"
        assert elapsed < 30
        assert "replication.write.failed" in survivor.log_text()
    finally:
        for node in nodes:
            node.stop()
