"""An ack is a promise: kill -9, SIGTERM and a really full disk while instances arrive.

After each, every instance that got Success is there byte-identical, and nothing
half-written shows (every instance C-FIND reports can be retrieved intact, and the
study counters agree with the instances found).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, wait_until

from . import clients
from .clients import file_dataset_bytes, identifier

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")


def _image_count(port: int, study_uids: set[str]) -> int:
    total = 0
    for study_uid in study_uids:
        found, status = clients.find(port, identifier("IMAGE", StudyInstanceUID=study_uid, SOPInstanceUID=""))
        total += len(found) if status == 0 else 0
    return total


def _start_storescu(port: int, directory: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")
    process = subprocess.Popen(["storescu", "-v", "-aec", "PACSNODE", "+sd", "+r", "127.0.0.1", str(port),
                                str(directory)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process


class PynetdicomSender(threading.Thread):
    """Sends files one by one on its own association and records which got Success."""

    def __init__(self, port: int, paths: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.paths = paths
        self.acked: list[Path] = []
        self.failed: list[tuple[Path, str]] = []

    def run(self) -> None:
        from pydicom import dcmread

        ae = clients.scu_ae()
        for path in self.paths[:1]:
            meta = dcmread(path, stop_before_pixels=True).file_meta
            ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
        for sop_class in {str(dcmread(p, stop_before_pixels=True).file_meta.MediaStorageSOPClassUID)
                          for p in self.paths}:
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1"])
        try:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSNODE")
        except Exception as error:  # The node may die before we connect.
            self.failed.append((Path("-"), repr(error)))
            return
        if not assoc.is_established:
            return
        for path in self.paths:
            try:
                status = assoc.send_c_store(path)
            except Exception as error:
                self.failed.append((path, repr(error)))
                break
            if "Status" in status and status.Status == 0:
                self.acked.append(path)
            else:
                break
        if assoc.is_established:
            assoc.release()


def _verify_after_restart(node: NodeProcess, manifest: list[datagen.ManifestEntry], acked: set[str]) -> None:
    by_path = {e["path"]: e for e in manifest}
    study_uids = {e["study_uid"] for e in manifest}
    contexts = list({(e["sop_class_uid"], e["transfer_syntax_uid"]) for e in manifest})
    # Every acked instance: present and byte-identical.
    by_study: dict[str, list[datagen.ManifestEntry]] = {}
    for path in acked:
        entry = by_path[path]
        by_study.setdefault(entry["study_uid"], []).append(entry)
    for study_uid, entries in by_study.items():
        result = clients.get(node.dicom_port, identifier("STUDY", StudyInstanceUID=study_uid), contexts)
        for entry in entries:
            assert entry["sop_uid"] in result.received, f"acked instance {entry['sop_uid']} is lost"
            assert result.received[entry["sop_uid"]] == file_dataset_bytes(Path(entry["path"]))
    # Nothing half-written: what C-FIND shows is retrievable, and the counters agree.
    for study_uid in study_uids:
        images, status = clients.find(node.dicom_port, identifier("IMAGE", StudyInstanceUID=study_uid,
                                                                  SOPInstanceUID=""))
        assert status == 0
        studies, _ = clients.find(node.dicom_port, identifier("STUDY", StudyInstanceUID=study_uid,
                                                              NumberOfStudyRelatedInstances=""))
        if not images:
            assert not studies
            continue
        assert int(studies[0].NumberOfStudyRelatedInstances) == len(images)
        result = clients.get(node.dicom_port, identifier("STUDY", StudyInstanceUID=study_uid), contexts)
        assert result.final_status == 0 and len(result.received) == len(images)
        for entry in (e for e in manifest if e["sop_uid"] in result.received):
            assert result.received[entry["sop_uid"]] == file_dataset_bytes(Path(entry["path"]))


def test_kill_9_while_storing_loses_no_acknowledged_instance(node_factory, tmp_path: Path) -> None:
    spec = datagen.StudySetSpec(patients=6, studies_per_patient=1, series_per_study=2, instances_per_series=25,
                                rows=160, cols=160, seed=21)
    manifest = datagen.write_study_set(spec, tmp_path / "a")
    extra = datagen.write_study_set(datagen.StudySetSpec(patients=2, series_per_study=2, instances_per_series=40,
                                                         rows=160, cols=160, seed=22), tmp_path / "b")
    node = node_factory.start("victim")
    storescu_log = tmp_path / "storescu.log"
    storescu = _start_storescu(node.dicom_port, tmp_path / "a", storescu_log)
    sender = PynetdicomSender(node.dicom_port, [Path(e["path"]) for e in extra])
    sender.start()
    study_uids = {e["study_uid"] for e in manifest} | {e["study_uid"] for e in extra}
    assert wait_until(lambda: _image_count(node.dicom_port, study_uids) >= 60, 60), "stores did not start"
    node.kill()
    storescu.wait(timeout=60)
    sender.join(timeout=60)
    acked = set(clients.acked_files(storescu_log.read_text(errors="replace")))
    acked |= {str(p) for p in sender.acked}
    total = len(manifest) + len(extra)
    assert 0 < len(acked) < total, f"the kill should land mid-transfer (acked {len(acked)} of {total})"
    node.start()
    _verify_after_restart(node, manifest + extra, acked)


def test_sigterm_while_storing_shuts_down_cleanly(node_factory, tmp_path: Path) -> None:
    spec = datagen.StudySetSpec(patients=4, series_per_study=2, instances_per_series=30, rows=128, cols=128, seed=23)
    manifest = datagen.write_study_set(spec, tmp_path / "a")
    node = node_factory.start("term")
    storescu_log = tmp_path / "storescu.log"
    storescu = _start_storescu(node.dicom_port, tmp_path / "a", storescu_log)
    study_uids = {e["study_uid"] for e in manifest}
    assert wait_until(lambda: _image_count(node.dicom_port, study_uids) >= 20, 60)
    started = time.monotonic()
    code = node.stop(timeout_s=60)
    assert code == 0, node.log_text()[-3000:]
    assert time.monotonic() - started < 30
    storescu.wait(timeout=60)
    log = node.log_text()
    assert "node.signal signal=SIGTERM" in log and "node.stopped" in log
    acked = set(clients.acked_files(storescu_log.read_text(errors="replace")))
    node.start()
    _verify_after_restart(node, manifest, acked)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a small tmpfs")
def test_really_full_disk_answers_A700_and_keeps_serving(node_factory, tmp_path: Path) -> None:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.decode(errors='replace')}")
    try:
        spec = datagen.StudySetSpec(patients=1, series_per_study=4, instances_per_series=100, rows=256, cols=256,
                                    seed=24, pixel_fill="random")
        manifest = datagen.write_study_set(spec, tmp_path / "data")
        node = NodeProcess(mount_point / "node", node_id="full", extra_args=["--disk-free-bytes-min", "0"],
                           log_path=tmp_path / "full.log")
        node_factory.nodes.append(node)
        node.start()
        statuses = clients.send_files(node.dicom_port, [Path(e["path"]) for e in manifest])
        values = list(statuses.values())
        assert 0xA700 in values, f"the disk never filled: {set(values)}"
        assert set(values) <= {0x0000, 0xA700, 0xA701}, set(values)
        assert node.alive and clients.echo(node.dicom_port) == 0
        acked = {path for path, status in statuses.items() if status == 0}
        assert acked
        assert node.stop() == 0, node.log_text()[-2000:]
        # The operator adds space (the node's log is outside the mount); restart and check.
        subprocess.run(["mount", "-o", "remount,size=96m", str(mount_point)], check=True)
        node.start()
        _verify_after_restart(node, manifest, acked)
    finally:
        for node in node_factory.nodes:
            node.stop()
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
