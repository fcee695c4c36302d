"""Deletes on real node processes (N=3, W=2): `pacsnode delete` and DICOMweb DELETE through
any node; gone from C-FIND, C-GET and every replica's store; a replica down during the
delete learns it when it is back; a re-store of the same files afterwards is stored anew."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, pacsnode_command, wait_until

from . import clients
from .clients import identifier
from .test_cluster import local_sop_uids, start_cluster

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

NAMES = ("d1", "d2", "d3")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("deletes")
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
    spec = datagen.StudySetSpec(patients=3, studies_per_patient=1, series_per_study=2, instances_per_series=2,
                                rows=16, cols=16, seed=41)
    manifest = datagen.write_study_set(spec, root / "studies")
    (root / "studies" / "manifest.json").unlink(missing_ok=True)
    _store(cluster[0], root / "studies", len(manifest))
    by_study: dict[str, list[datagen.ManifestEntry]] = {}
    for entry in manifest:
        by_study.setdefault(entry["study_uid"], []).append(entry)
    for study_uid, entries in by_study.items():
        assert wait_until(lambda: all(len(local_sop_uids(n.peer_address, study_uid)) == len(entries)
                                      for n in cluster), 30)
    return by_study


def _store(node: NodeProcess, path: Path, count: int) -> None:
    result, acked = clients.storescu(node.dicom_port, [path], extra=["+sd", "+r"])
    assert result.returncode == 0 and len(acked) == count, result.stdout[-2000:] + result.stderr[-2000:]


def _found(node: NodeProcess, study_uid: str) -> set[str]:
    found, status = clients.find(node.dicom_port, identifier("IMAGE", StudyInstanceUID=study_uid, SOPInstanceUID=""))
    assert status == 0
    return {str(ds.SOPInstanceUID) for ds in found}


def _retrieved(node: NodeProcess, study_uid: str, out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    clients.getscu(node.dicom_port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"], out)
    return len(list(out.glob("*"))) if out.exists() else 0


def _cli_delete(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pacsnode_command() + ["delete", "--node", node.peer_address, *args],
                          capture_output=True, text=True, timeout=120)


def _http_delete(node: NodeProcess, path: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}/dicom-web{path}", method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_pacsnode_delete_of_a_series_then_the_study_through_any_node(
        cluster: list[NodeProcess], studies: dict[str, list[datagen.ManifestEntry]], root: Path) -> None:
    study_uid, entries = sorted(studies.items())[0]
    series = entries[0]["series_uid"]
    in_series = {e["sop_uid"] for e in entries if e["series_uid"] == series}
    result = _cli_delete(cluster[2], "--study", study_uid, "--series", series)
    assert result.returncode == 0, result.stdout + result.stderr
    rest = {e["sop_uid"] for e in entries} - in_series
    for node in cluster:
        assert local_sop_uids(node.peer_address, study_uid) == rest, node.node_id
        assert _found(node, study_uid) == rest, node.node_id
    result = _cli_delete(cluster[1], "--instance", sorted(rest)[0])  # Its study looked up by the node.
    assert result.returncode == 0, result.stdout + result.stderr
    result = _cli_delete(cluster[0], "--study", study_uid)
    assert result.returncode == 0, result.stdout + result.stderr
    for node in cluster:
        assert local_sop_uids(node.peer_address, study_uid) == set(), node.node_id
        assert _found(node, study_uid) == set(), node.node_id
        assert _retrieved(node, study_uid, root / f"get-{node.node_id}") == 0, node.node_id
    assert _cli_delete(cluster[0], "--study", study_uid).returncode == 3  # Not found now.
    assert _http_delete(cluster[1], f"/studies/{study_uid}") == 404


def test_a_replica_down_during_a_dicomweb_delete_learns_it_and_a_re_store_is_new(
        cluster: list[NodeProcess], studies: dict[str, list[datagen.ManifestEntry]], root: Path) -> None:
    study_uid, entries = sorted(studies.items())[1]
    down = cluster[1]
    down.kill()
    assert _http_delete(cluster[0], f"/studies/{study_uid}") == 204  # W=2 of the 3 owners.
    assert _found(cluster[2], study_uid) == set()
    assert len(local_sop_uids(cluster[2].peer_address, study_uid)) == 0
    down.start()
    # The tombstones kept as hints for it are replayed when it answers again.
    assert wait_until(lambda: local_sop_uids(down.peer_address, study_uid) == set(), 30), \
        local_sop_uids(down.peer_address, study_uid)
    assert wait_until(lambda: _found(down, study_uid) == set(), 15)
    # The same files again: a new instance of each SOP Instance UID, on every replica.
    files = root / "again"
    files.mkdir()
    for entry in entries:
        source = Path(entry["path"])
        shutil.copy(source if source.is_absolute() else root / "studies" / source, files / source.name)
    _store(cluster[2], files, len(entries))
    sops = {e["sop_uid"] for e in entries}
    for node in cluster:
        assert _found(node, study_uid) == sops, node.node_id
        assert wait_until(lambda: local_sop_uids(node.peer_address, study_uid) == sops, 15), node.node_id
    assert _retrieved(down, study_uid, root / "get-again") == len(entries)
