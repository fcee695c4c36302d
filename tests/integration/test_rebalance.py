"""Rebalance and anti-entropy on real processes: a node joins while storescu is sending, a
node whose data dir was wiped comes back. Every study ends on exactly its N owners."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pacsnode.cli.status import collect, metrics
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, pacsnode_command, wait_until

from . import clients
from .clients import file_dataset_bytes, identifier
from .test_cluster import FAST, expected_owners, local_sop_uids, start_cluster

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

REPAIR = ["--anti-entropy-interval-ms", "2000"]


def placement_is_exact(nodes: list[NodeProcess], names: tuple[str, ...], manifest: list[datagen.ManifestEntry]) -> bool:
    by_study: dict[str, set[str]] = {}
    for entry in manifest:
        by_study.setdefault(entry["study_uid"], set()).add(entry["sop_uid"])
    for study_uid, sop_uids in by_study.items():
        owners = expected_owners(names, study_uid)
        for node in nodes:
            held = local_sop_uids(node.peer_address, study_uid)
            if held != (sop_uids if node.node_id in owners else set()):
                return False
    return True


def test_join_while_storing_moves_only_the_new_share(tmp_path: Path) -> None:
    names = ("j1", "j2", "j3")
    nodes = start_cluster(tmp_path, names, REPAIR)
    joined: NodeProcess | None = None
    try:
        first = datagen.StudySetSpec(patients=12, series_per_study=2, instances_per_series=4, rows=64, cols=64,
                                     seed=41)
        before = datagen.write_study_set(first, tmp_path / "before")
        (tmp_path / "before" / "manifest.json").unlink(missing_ok=True)
        result, acked = clients.storescu(nodes[0].dicom_port, [tmp_path / "before"], extra=["+sd", "+r"])
        assert len(acked) == len(before), result.stdout[-2000:]
        during = datagen.write_study_set(datagen.StudySetSpec(
            patients=12, series_per_study=2, instances_per_series=4, rows=64, cols=64, seed=42), tmp_path / "during")
        (tmp_path / "during" / "manifest.json").unlink(missing_ok=True)
        log_path = tmp_path / "storescu.log"
        with open(log_path, "wb") as log:
            storescu = subprocess.Popen(["storescu", "-v", "-aec", "PACSNODE", "+sd", "+r", "127.0.0.1",
                                         str(nodes[1].dicom_port), str(tmp_path / "during")],
                                        stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        joined = NodeProcess(tmp_path / "j4", node_id="j4", seeds=[nodes[0].peer_address], extra_args=FAST + REPAIR)
        joined.start()
        assert storescu.wait(timeout=120) == 0
        acked_during = clients.acked_files(log_path.read_text(errors="replace"))
        assert len(acked_during) == len(during), "a store failed during the join"
        everyone = nodes + [joined]
        all_names = names + ("j4",)
        manifest = before + during
        assert wait_until(lambda: placement_is_exact(everyone, all_names, manifest), 90), \
            {n["node_id"]: n["local_instances"] for n in collect(nodes[0].peer_address)["nodes"]}
        converged_s = time.monotonic() - started
        pulled = metrics(joined.peer_address)["pacsnode.repair.pulled_bytes"]
        owned = collect(joined.peer_address)["nodes"]
        own_bytes = next(n["stored_bytes"] for n in owned if n["node_id"] == "j4")
        # Data moved to the new node: what it pulled by repair (writes that reached it
        # directly are not moves). Bound from the issue: <= 1.05 x what it ends up owning.
        assert pulled <= 1.05 * own_bytes, (pulled, own_bytes)
        dropped = sum(metrics(n.peer_address)["pacsnode.repair.instances_dropped_count"] for n in nodes)
        print(f"\njoin under load: converged in {converged_s:.1f} s; moved {pulled / 1e6:.2f} MB to j4, which owns "
              f"{own_bytes / 1e6:.2f} MB ({pulled / own_bytes:.2f}x); old owners dropped {dropped:.0f} instances")
        # Any node still answers for everything.
        found, status = clients.find(joined.dicom_port, identifier("STUDY", StudyInstanceUID=""))
        assert status == 0 and len(found) == len({e["study_uid"] for e in manifest})
    finally:
        for node in nodes + ([joined] if joined else []):
            node.stop()


def test_wiped_data_dir_converges_back(tmp_path: Path) -> None:
    names = ("w1", "w2", "w3", "w4")
    nodes = start_cluster(tmp_path, names, REPAIR)
    try:
        spec = datagen.StudySetSpec(patients=10, series_per_study=2, instances_per_series=3, rows=64, cols=64, seed=43)
        manifest = datagen.write_study_set(spec, tmp_path / "data")
        (tmp_path / "data" / "manifest.json").unlink(missing_ok=True)
        result, acked = clients.storescu(nodes[0].dicom_port, [tmp_path / "data"], extra=["+sd", "+r"])
        assert len(acked) == len(manifest)
        assert wait_until(lambda: placement_is_exact(nodes, names, manifest), 30)
        victim = nodes[2]
        victim.stop()
        shutil.rmtree(victim.data_dir)
        started = time.monotonic()
        victim.start()
        assert wait_until(lambda: placement_is_exact(nodes, names, manifest), 60), "the wiped node did not refill"
        print(f"\nwiped data dir: full share back in {time.monotonic() - started:.1f} s")
        # Its copies are the bytes that were sent.
        study_uid = next(e["study_uid"] for e in manifest if victim.node_id in expected_owners(names, e["study_uid"]))
        entries = [e for e in manifest if e["study_uid"] == study_uid]
        result_get = clients.get(victim.dicom_port, identifier("STUDY", StudyInstanceUID=study_uid),
                                 [(e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries])
        assert result_get.final_status == 0
        for entry in entries:
            assert result_get.received[entry["sop_uid"]] == file_dataset_bytes(Path(entry["path"]))
    finally:
        for node in nodes:
            node.stop()


def test_leave_under_load_keeps_every_study_at_n_copies(tmp_path: Path) -> None:
    """`pacsnode leave` on one of four nodes while storescu sends through another: no store
    fails, the leaver exits once its ranges are with their new owners, and every study ends
    on exactly its N owners among the three that stay."""
    names = ("l1", "l2", "l3", "l4")
    nodes = start_cluster(tmp_path, names, REPAIR)
    try:
        before = datagen.write_study_set(datagen.StudySetSpec(
            patients=8, series_per_study=2, instances_per_series=3, rows=64, cols=64, seed=44), tmp_path / "before")
        result, acked = clients.storescu(nodes[0].dicom_port, [tmp_path / "before"], extra=["+sd", "+r"])
        assert len(acked) == len(before), result.stdout[-2000:]
        during = datagen.write_study_set(datagen.StudySetSpec(
            patients=8, series_per_study=2, instances_per_series=4, rows=64, cols=64, seed=45), tmp_path / "during")
        log_path = tmp_path / "storescu.log"
        with open(log_path, "wb") as log:
            storescu = subprocess.Popen(["storescu", "-v", "-aec", "PACSNODE", "+sd", "+r", "127.0.0.1",
                                         str(nodes[1].dicom_port), str(tmp_path / "during")],
                                        stdout=log, stderr=subprocess.STDOUT)
        leaver = nodes[3]
        started = time.monotonic()
        leave = subprocess.run([*pacsnode_command(), "leave", "--node", leaver.peer_address, "--timeout-s", "120"],
                               capture_output=True, text=True, timeout=180)
        assert leave.returncode == 0, leave.stdout + leave.stderr
        assert storescu.wait(timeout=120) == 0
        acked_during = clients.acked_files(log_path.read_text(errors="replace"))
        assert len(acked_during) == len(during), "a store failed while a node was leaving"
        assert wait_until(lambda: not leaver.alive, 60), "the leaver did not exit"
        stayers = nodes[:3]
        assert wait_until(lambda: placement_is_exact(stayers, names[:3], before + during), 90)
        print(f"\nleave under load: {leaver.node_id} handed over and exited; exact placement on the other three "
              f"{time.monotonic() - started:.1f} s after `pacsnode leave`")
    finally:
        for node in nodes:
            node.stop()
