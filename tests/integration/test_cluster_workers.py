"""A cluster whose entry node runs its DICOM front end in worker processes (dicom_workers).

A worker writes an instance's compressed blob of blob_file_bytes_min or more to a file and
the node process maps it (node/archive_channel.py); the copies to the other owners are sent
from that map. Before node/peer_wire.py's payload_bytes, protobuf refused the map
(TypeError) and every such C-STORE through a worker in a cluster failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsnode.node.store import RocksStore
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, wait_until

from . import clients
from .clients import file_dataset_bytes
from .test_cluster import expected_owners, fetch_part10, local_counts, local_sop_uids, start_cluster

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

NAMES = ("w1", "w2", "w3")


def test_stores_through_dicom_workers_reach_every_owner_as_sent(tmp_path: Path) -> None:
    spec = datagen.StudySetSpec(patients=2, series_per_study=1, instances_per_series=4, rows=256, cols=256, seed=5)
    manifest = datagen.write_study_set(spec, tmp_path / "studies")
    (tmp_path / "studies" / "manifest.json").unlink(missing_ok=True)
    nodes: list[NodeProcess] = []
    try:
        # The entry node w1 with one DIMSE worker; blobs of 16 KiB or more are files the worker writes.
        nodes = start_cluster(tmp_path, NAMES, ["--blob-file-bytes-min", "16384"],
                              entry_extra=["--dicom-workers", "1", "--dicom-local-associations", "0"])
        result, acked = clients.storescu(nodes[0].dicom_port, [tmp_path / "studies"], extra=["+sd", "+r"])
        assert len(acked) == len(manifest), result.stdout[-2000:] + result.stderr[-2000:]
        assert wait_until(lambda: sum(local_counts(nodes).values()) == 3 * len(manifest), 30), local_counts(nodes)
        for entry in manifest:
            assert expected_owners(NAMES, entry["study_uid"]) == set(NAMES)
            for node in nodes:
                assert entry["sop_uid"] in local_sop_uids(node.peer_address, entry["study_uid"]), node.node_id
                part10 = fetch_part10(node.peer_address, entry["study_uid"], entry["sop_uid"])
                assert clients.dataset_bytes(part10) == file_dataset_bytes(Path(entry["path"])), node.node_id
    finally:
        for node in nodes:
            node.stop()
    # The WADO-RS /metadata entry was built by the entry node from the worker's file and kept
    # by every node (the owners got it with the copy instead of each building its own).
    headers: dict[str, set[bytes]] = {}
    for name in NAMES:
        store = RocksStore(tmp_path / name / "store", disk_free_bytes_min=0)
        try:
            for entry in manifest:
                records = {r.sop_instance_uid: r for r in store.instances(entry["study_uid"])}
                header = store.instance_header(entry["study_uid"], entry["sop_uid"],
                                               records[entry["sop_uid"]].content_hash)
                assert header is not None, f"{name} holds no /metadata entry for an instance"
                headers.setdefault(entry["sop_uid"], set()).add(header)
        finally:
            store.close()
    assert all(len(kept) == 1 for kept in headers.values())
