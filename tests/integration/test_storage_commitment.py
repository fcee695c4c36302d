"""Storage Commitment Push Model against a real 3-node cluster (N=3, W=2), pynetdicom as
the modality (dcmtk ships no Storage Commitment SCU).

A commitment is reported only when every one of an instance's N owners holds it; an
unknown instance fails with 0x0112, one stored under another SOP class with 0x0119; with
an owner down the node waits `storage_commitment_timeout_s`, then fails the instances
with 0x0110, and commits them once the owner is back and its hints were replayed. The
report comes on the requesting association while it is open, else on a new association
to the modality's listener (its entry in the node's destination table).
"""

from __future__ import annotations

import queue
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, free_port, wait_until

from . import clients
from .test_cluster import local_sop_uids, start_cluster

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

MODALITY = "MODALITY"
TIMEOUT_S = 6
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"


class Modality:
    """A modality's Storage Commitment SCU: requests commitment, takes N-EVENT-REPORTs on
    the requesting association or on its own listener (SCP role on a new association)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reports: queue.Queue[tuple[str, int, Dataset]] = queue.Queue()
        self.ae = AE(ae_title=MODALITY)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        self.ae.add_requested_context(StorageCommitmentPushModel)
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        self.server = self.ae.start_server(("127.0.0.1", port), block=False,
                                           evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_new)])

    def _on_new(self, event: Any) -> tuple[int, None]:
        self.reports.put(("new", event.event_type, event.event_information))
        return 0x0000, None

    def _on_same(self, event: Any) -> tuple[int, None]:
        self.reports.put(("same", event.event_type, event.event_information))
        return 0x0000, None

    def request(self, node_port: int, references: list[tuple[str, str]], *, wait_open_s: float = 0.0
                ) -> tuple[str, int]:
        """N-ACTION Request Storage Commitment; keep the association open up to
        `wait_open_s` for the report. Returns (transaction uid, N-ACTION status)."""
        info = Dataset()
        transaction_uid = generate_uid()
        info.TransactionUID = transaction_uid
        items = []
        for sop_class, sop_instance in references:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            items.append(item)
        info.ReferencedSOPSequence = items
        assoc = self.ae.associate("127.0.0.1", node_port, ae_title="PACSNODE",
                                  evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_same)])
        assert assoc.is_established
        try:
            status, _reply = assoc.send_n_action(info, 1, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
            deadline = time.monotonic() + wait_open_s
            while time.monotonic() < deadline and self.reports.empty() and assoc.is_established:
                time.sleep(0.05)
        finally:
            if assoc.is_established:
                assoc.release()
        return transaction_uid, int(status.Status)

    def report(self, transaction_uid: str, timeout_s: float) -> tuple[str, int, Dataset]:
        deadline = time.monotonic() + timeout_s
        while True:
            via, event_type, info = self.reports.get(timeout=max(0.1, deadline - time.monotonic()))
            if info.TransactionUID == transaction_uid:
                return via, event_type, info

    def close(self) -> None:
        self.server.shutdown()


def _answered(node: NodeProcess, transaction_uid: str, via: str) -> bool:
    """The node saw the modality's N-EVENT-REPORT response (not just sent the report)."""
    return wait_until(lambda: f"dicom.commitment.reported transaction_uid={transaction_uid} via={via} "
                      in node.log_text(), 5)


def _committed(info: Dataset) -> set[str]:
    return {str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])}


def _failed(info: Dataset) -> dict[str, int]:
    return {str(item.ReferencedSOPInstanceUID): int(item.FailureReason) for item in info.get("FailedSOPSequence", [])}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("commitment")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def modality() -> Iterator[Modality]:
    scu = Modality(free_port())
    yield scu
    scu.close()


@pytest.fixture(scope="module")
def cluster(root: Path, modality: Modality) -> Iterator[list[NodeProcess]]:
    nodes = start_cluster(root, ("c1", "c2", "c3"), ["--storage-commitment-timeout-s", str(TIMEOUT_S),
                                                     "--destination", f"{MODALITY}=127.0.0.1:{modality.port}"])
    yield nodes
    for node in nodes:
        node.stop()


def _study_set(root: Path, name: str, seed: int) -> list[datagen.ManifestEntry]:
    spec = datagen.StudySetSpec(patients=1, studies_per_patient=2, series_per_study=1, instances_per_series=3,
                                rows=16, cols=16, seed=seed)
    manifest = datagen.write_study_set(spec, root / name)
    return manifest


def _store(node: NodeProcess, manifest: list[datagen.ManifestEntry]) -> None:
    statuses = clients.send_files(node.dicom_port, [Path(e["path"]) for e in manifest])
    assert all(status == 0 for status in statuses.values()), statuses


def _refs(manifest: list[datagen.ManifestEntry]) -> list[tuple[str, str]]:
    return [(e["sop_class_uid"], e["sop_uid"]) for e in manifest]


def test_committed_once_every_owner_holds_each_instance_on_the_same_association(
        cluster: list[NodeProcess], modality: Modality, root: Path) -> None:
    manifest = _study_set(root, "all", seed=51)
    _store(cluster[0], manifest)
    transaction_uid, status = modality.request(cluster[0].dicom_port, _refs(manifest), wait_open_s=20)
    assert status == 0
    via, event_type, info = modality.report(transaction_uid, 20)
    assert (via, event_type) == ("same", 1)
    assert _committed(info) == {e["sop_uid"] for e in manifest} and not _failed(info)
    assert _answered(cluster[0], transaction_uid, "same-association")
    # What the node committed is true: every node (all three are owners) holds every instance itself.
    for node in cluster:
        for study_uid in {e["study_uid"] for e in manifest}:
            assert {e["sop_uid"] for e in manifest if e["study_uid"] == study_uid} <= \
                local_sop_uids(node.peer_address, study_uid)


def test_unknown_and_misclassed_instances_fail_at_once(
        cluster: list[NodeProcess], modality: Modality, root: Path) -> None:
    manifest = _study_set(root, "mixed", seed=52)
    _store(cluster[0], manifest)
    unknown = generate_uid()
    wrong_class = manifest[1]
    references = [_refs(manifest)[0], ("1.2.840.10008.5.1.4.1.1.7", unknown),
                  ("1.2.840.10008.5.1.4.1.1.7", wrong_class["sop_uid"])]
    # Asked of another node than the one that received the instances: it finds their studies by a scatter.
    transaction_uid, status = modality.request(cluster[1].dicom_port, references, wait_open_s=20)
    assert status == 0
    via, event_type, info = modality.report(transaction_uid, 20)
    assert (via, event_type) == ("same", 2)
    assert _committed(info) == {manifest[0]["sop_uid"]}
    assert _failed(info) == {unknown: 0x0112, wrong_class["sop_uid"]: 0x0119}


def test_an_owner_down_fails_after_the_timeout_on_a_new_association_then_commits_once_it_is_back(
        cluster: list[NodeProcess], modality: Modality, root: Path) -> None:
    down = cluster[2]
    down.kill()
    try:
        manifest = _study_set(root, "down", seed=53)
        _store(cluster[0], manifest)  # W=2: acknowledged with one owner down; its copies wait as hints.
        started = time.monotonic()
        transaction_uid, status = modality.request(cluster[0].dicom_port, _refs(manifest))
        assert status == 0
        via, event_type, info = modality.report(transaction_uid, TIMEOUT_S + 20)
        assert time.monotonic() - started >= TIMEOUT_S - 0.5  # It waited for the missing copies.
        # The modality released its association at once: the report came on a new one.
        assert (via, event_type) == ("new", 2) and not _committed(info)
        assert _answered(cluster[0], transaction_uid, "new-association")
        assert _failed(info) == {e["sop_uid"]: 0x0110 for e in manifest}
    finally:
        down.restart()
    # Back: hints are replayed to it; a new request commits everything.
    transaction_uid, status = modality.request(cluster[1].dicom_port, _refs(manifest))
    assert status == 0
    _via, event_type, info = modality.report(transaction_uid, TIMEOUT_S + 20)
    assert event_type == 1, _failed(info)
    assert _committed(info) == {e["sop_uid"] for e in manifest}
    assert wait_until(lambda: all(e["sop_uid"] in local_sop_uids(down.peer_address, e["study_uid"])
                                  for e in manifest), 5)


def test_a_malformed_request_is_refused(cluster: list[NodeProcess], modality: Modality) -> None:
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", cluster[0].dicom_port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        no_transaction = Dataset()
        no_transaction.ReferencedSOPSequence = []
        status, _ = assoc.send_n_action(no_transaction, 1, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        assert int(status.Status) == 0x0120
        info = Dataset()
        info.TransactionUID = generate_uid()
        status, _ = assoc.send_n_action(info, 2, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        assert int(status.Status) == 0x0123
    finally:
        assoc.release()


def test_committed_through_dicom_workers(node_factory, modality: Modality, root: Path) -> None:  # type: ignore[no-untyped-def]
    # A worker takes the N-ACTION, the node checks the copies (ChannelArchive.commit over
    # the worker channel), the worker sends the N-EVENT-REPORT on the same association.
    node = node_factory.start("commit-workers", extra_args=[
        "--dicom-workers", "2", "--dicom-local-associations", "0", "--storage-commitment-timeout-s", str(TIMEOUT_S),
        "--destination", f"{MODALITY}=127.0.0.1:{modality.port}"])
    assert wait_until(lambda: node.log_text().count("dicom.worker.started") >= 2, 30)
    manifest = _study_set(root, "workers", seed=57)
    _store(node, manifest)
    unknown = ("1.2.840.10008.5.1.4.1.1.2", generate_uid())
    transaction_uid, status = modality.request(node.dicom_port, [*_refs(manifest), unknown], wait_open_s=20)
    assert status == 0
    via, event_type, info = modality.report(transaction_uid, 20)
    assert (via, event_type) == ("same", 2)  # Some failed: event type 2.
    assert _committed(info) == {e["sop_uid"] for e in manifest}
    assert _failed(info) == {unknown[1]: 0x0112}
