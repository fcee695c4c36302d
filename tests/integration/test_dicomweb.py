"""DICOMweb on real node processes, with clients no one here wrote: dicomweb-client
(Python API and its command line), dcmtk's storescu and findscu, httpx for headers.

Three nodes with N=1 (each study on one node): any node answers for the whole cluster,
a STOW through one node is found by C-FIND and QIDO through the others, WADO returns
the stored bytes, and once a study's only owner is killed a search naming it answers
503 and a search of everything 206, each with its Warning.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from pacsnode.sim import datagen
from pacsnode.sim.process import wait_until

from . import clients
from .test_cluster import expected_owners, start_cluster
from .test_partial_answers import _settled

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

NAMES = ("w1", "w2", "w3")


def _url(node: object) -> str:
    return f"http://127.0.0.1:{node.http_port}"  # type: ignore[attr-defined]


def test_dicomweb_across_a_cluster(tmp_path: Path) -> None:
    # read_fault_window_ms 0: a study whose owner is alive is answered whole right after
    # the kill below (within the window, a dead possible hint holder flags it as well).
    nodes = start_cluster(tmp_path, NAMES, ["--replication-factor", "1", "--write-quorum", "1",
                                            "--read-fault-window-ms", "0"])
    try:
        by_name = {node.node_id: node for node in nodes}
        assert wait_until(lambda: all(httpx.get(_url(n) + "/readyz").status_code == 200 for n in nodes), 30)
        assert httpx.get(_url(nodes[0]) + "/healthz").text == "ok\n"
        assert wait_until(lambda: _settled(nodes), 60), "ranges still filling"

        # Half the studies by C-STORE (storescu) through w1, half by STOW-RS through w2.
        spec = datagen.StudySetSpec(patients=8, series_per_study=1, instances_per_series=2, seed=5, rows=32, cols=32)
        manifest = datagen.write_study_set(spec, tmp_path / "data")
        dimse = [e for e in manifest if e["patient_id"] < manifest[len(manifest) // 2]["patient_id"]]
        web = [e for e in manifest if e not in dimse]
        result, acked = clients.storescu(nodes[0].dicom_port, [e["path"] for e in dimse])
        assert len(acked) == len(dimse), result.stdout + result.stderr
        stored = DICOMwebClient(_url(nodes[1]) + "/dicom-web").store_instances(
            [dcmread(e["path"]) for e in web])
        assert len(stored.ReferencedSOPSequence) == len(web)

        # Every node answers for the whole cluster.
        studies = {e["study_uid"] for e in manifest}
        for node in nodes:
            found = DICOMwebClient(_url(node) + "/dicom-web").search_for_studies()
            assert {s["0020000D"]["Value"][0] for s in found} == studies
        _result, responses = clients.findscu(nodes[2].dicom_port, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID="],
                                             tmp_path / "find")
        assert {str(r.StudyInstanceUID) for r in responses} == studies

        # WADO-RS through a node that does not own the study: the stored bytes.
        entry = next(e for e in web if "w3" not in expected_owners(NAMES, e["study_uid"], 1))
        client = DICOMwebClient(_url(nodes[2]) + "/dicom-web")
        retrieved = client.retrieve_instance(entry["study_uid"], entry["series_uid"], entry["sop_uid"],
                                             media_types=(("application/dicom", "*"),))
        assert retrieved.PixelData == dcmread(entry["path"]).PixelData
        reply = httpx.get(f"{_url(nodes[2])}/dicom-web/studies/{entry['study_uid']}/series/{entry['series_uid']}"
                          f"/instances/{entry['sop_uid']}")
        assert Path(entry["path"]).read_bytes() in reply.content  # Byte for byte, inside its part.
        metadata = client.retrieve_series_metadata(entry["study_uid"], entry["series_uid"])
        assert len(metadata) == 2
        # Its pixel data at the BulkDataURI /metadata names (read from the owner too).
        mine = next(m for m in metadata if m["00080018"]["Value"][0] == entry["sop_uid"])
        assert client.retrieve_bulkdata(mine["7FE00010"]["BulkDataURI"]) == [bytes(dcmread(entry["path"]).PixelData)]

        # dicomweb-client's command line, too.
        command = shutil.which("dicomweb_client", path=str(Path(sys.executable).parent))
        if command:
            cli = subprocess.run([command, "--url", _url(nodes[0]) + "/dicom-web", "search", "studies",
                                  "--filter", f"PatientID={entry['patient_id']}"],
                                 capture_output=True, text=True, timeout=60)
            assert cli.returncode == 0 and entry["study_uid"] in cli.stdout, cli.stderr[-2000:]
            shown = subprocess.run([command, "--url", _url(nodes[1]) + "/dicom-web", "retrieve", "instances",
                                    "--study", entry["study_uid"], "--series", entry["series_uid"],
                                    "--instance", entry["sop_uid"], "metadata", "--prettify"],
                                   capture_output=True, text=True, timeout=60)
            assert shown.returncode == 0 and entry["sop_uid"] in shown.stdout, shown.stderr[-2000:]
            assert "BulkDataURI" in shown.stdout
            extra = datagen.write_study_set(datagen.StudySetSpec(patients=1, series_per_study=1, instances_per_series=1,
                                                                 seed=77, rows=8, cols=8), tmp_path / "cli")
            sent = subprocess.run([command, "--url", _url(nodes[2]) + "/dicom-web", "store", "instances",
                                   extra[0]["path"]], capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr[-2000:]
            assert DICOMwebClient(_url(nodes[0]) + "/dicom-web").search_for_studies(
                search_filters={"StudyInstanceUID": extra[0]["study_uid"]})

        # Metrics count DIMSE and HTTP requests by service and status.
        text = httpx.get(_url(nodes[0]) + "/metrics").text
        assert f'pacsnode_dimse_requests_total{{service="C-STORE",status="0x0000"}} {float(len(dimse))}' in text
        assert 'pacsnode_dimse_request_duration_seconds_count{service="C-STORE"}' in text
        writes = next(line for line in text.splitlines() if line.startswith("pacsnode_store_write_duration_seconds_count"))
        assert float(writes.split()[-1]) > 0  # Every local copy written (primary, replica or hint) is timed.
        assert 'pacsnode_ring_members{state="alive"} 3.0' in text
        assert "pacsnode_store_missing_blob_files 0.0" in text  # Records whose blob file is gone (none here).
        cluster = httpx.get(_url(nodes[1]) + "/api/cluster").json()
        assert sorted(n["node_id"] for n in cluster["nodes"]) == list(NAMES)

        # Kill the only owner of one study: a search naming it is 503, a search of
        # everything is 206, both with their Warning; never a plain 200.
        lost = next(e for e in manifest if expected_owners(NAMES, e["study_uid"], 1) == {"w3"})
        by_name["w3"].kill()
        entry_url = _url(nodes[0]) + "/dicom-web"
        named = httpx.get(f"{entry_url}/studies?StudyInstanceUID={lost['study_uid']}", timeout=60)
        assert named.status_code == 503, named.text
        assert named.headers["warning"].startswith('299 pacsnode "incomplete: 1 study')
        everything = httpx.get(f"{entry_url}/studies", timeout=60)
        assert everything.status_code == 206 and "incomplete" in everything.headers["warning"]
        assert 0 < len(everything.json()) < len(studies)
        wado = httpx.get(f"{entry_url}/studies/{lost['study_uid']}", timeout=60)
        assert wado.status_code == 503 and "incomplete" in wado.headers["warning"]
        readable = next(e for e in manifest if expected_owners(NAMES, e["study_uid"], 1) != {"w3"})
        whole = httpx.get(f"{entry_url}/studies?StudyInstanceUID={readable['study_uid']}", timeout=60)
        assert whole.status_code == 200 and len(whole.json()) == 1
    finally:
        for node in nodes:
            node.stop(timeout_s=15)
