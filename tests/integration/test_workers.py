"""`--dicom-workers 2`: the DICOM front end in two worker processes sharing the port
(and, by default, the node process serving one connection itself: the last tests).

Store, find and get go through the workers and the archive channel to the node; a kill -9
of the workers during a store loses nothing that was acknowledged, and the node restarts
them; SIGTERM of the node stops the workers and frees the port; kill -9 of the node
makes the workers exit at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from pacsnode.node import ca
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, free_port, port_open, wait_until

from . import clients
from .clients import HOST, identifier, scu_ae

# Every connection to a worker (dicom_local_associations 0): these tests are about the
# workers' path. The node serving one itself (the default) is tested below.
WORKERS = ["--dicom-workers", "2", "--dicom-local-associations", "0"]


def _worker_pids(node: NodeProcess) -> list[int]:
    pids: list[int] = []
    for match in re.finditer(r"dicom\.worker\.(?:started|restarted) worker=\d+ pid=(\d+)", node.log_text()):
        pids.append(int(match.group(1)))
    return pids


def _start(node_factory, extra: list[str] = []) -> NodeProcess:  # noqa: B006 (never mutated)
    node = node_factory.start("node-1", extra_args=[*WORKERS, *extra])
    assert wait_until(lambda: len(_worker_pids(node)) >= 2, 30), node.log_text()[-3000:]
    return node


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # A zombie (not yet reaped by its parent) is not alive.
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _ct(study_uid: str) -> object:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_store_find_get_through_workers(node_factory) -> None:
    node = _start(node_factory)
    assert not re.search(r"dicom\.association\.established", node.log_text())
    study = generate_uid()
    ae = scu_ae()
    ct = _ct(study)
    ae.add_requested_context(ct.SOPClassUID, [ct.file_meta.TransferSyntaxUID])
    assoc = ae.associate(HOST, node.dicom_port, ae_title="PACSNODE")
    assert assoc.is_established
    uids = []
    try:
        for _ in range(5):
            ds = _ct(study)
            assert assoc.send_c_store(ds).Status == 0x0000
            uids.append(ds.SOPInstanceUID)
    finally:
        assoc.release()
    # Bad input is answered as by the single-process front end, never Success.
    bad = clients.send_raw(node.dicom_port, str(ct.SOPClassUID), generate_uid(), "1.2.840.10008.1.2.1",
                           b"\x08\x00\x18\x00UI\xff\x00garbage")
    assert bad.Status not in (0x0000, -1)
    matches, status = clients.find(node.dicom_port, identifier("IMAGE", StudyInstanceUID=study, SOPInstanceUID=""))
    assert status == 0x0000
    assert sorted(str(m.SOPInstanceUID) for m in matches) == sorted(uids)
    result = clients.get(node.dicom_port, identifier("STUDY", StudyInstanceUID=study),
                         [(str(ct.SOPClassUID), str(ct.file_meta.TransferSyntaxUID))])
    assert result.final_status == 0x0000
    assert sorted(result.received) == sorted(uids)
    assert re.search(r"dicom\.association\.established", node.log_text())  # Worker events reach the node's log.

    # The workers' requests are in the node's /metrics (forwarded once a second).
    def counted() -> str:
        return urllib.request.urlopen(f"http://{HOST}:{node.http_port}/metrics", timeout=10).read().decode()

    expected = ['pacsnode_dimse_requests_total{service="C-STORE",status="0x0000"} 5.0',
                'pacsnode_dimse_requests_total{service="C-FIND",status="0x0000"} 1.0',
                'pacsnode_dimse_requests_total{service="C-GET",status="0x0000"} 1.0',
                'pacsnode_dimse_request_duration_seconds_count{service="C-STORE"} 6.0']
    assert wait_until(lambda: all(line in counted() for line in expected), 15), counted()[-3000:]


def _big_ct(study_uid: str) -> object:
    """A 512x512 CT slice of noise: its compressed copy is far over blob_file_bytes_min."""
    ds = _ct(study_uid)
    ds.Rows = ds.Columns = 512
    ds.PixelData = os.urandom(512 * 512 * 2)
    return ds


@pytest.mark.parametrize("spooled", [False, True], ids=["in-memory", "spooled"])
def test_big_instances_are_written_to_blob_files_by_the_worker(node_factory, spooled: bool) -> None:
    # The worker writes each big compressed copy into the store's blobs directory (from
    # memory, or streamed from its spool file) and the node names the file
    # (node/archive_channel.py); retrieval gives the same pixels back.
    node = _start(node_factory, ["--dataset-spool-threshold-bytes", "65536"] if spooled else [])
    study = generate_uid()
    sent = [_big_ct(study) for _ in range(3)]
    ae = scu_ae()
    ae.add_requested_context(sent[0].SOPClassUID, [sent[0].file_meta.TransferSyntaxUID])
    assoc = ae.associate(HOST, node.dicom_port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        for ds in sent:
            assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(sent[0]).Status == 0x0000  # A duplicate: nothing new kept.
    finally:
        assoc.release()
    blobs = node.data_dir / "store" / "blobs"
    files = [p for p in blobs.rglob("*") if p.is_file() and p.stat().st_size]  # Not the pool's empty files.
    assert len(files) == 3 and not [p for p in files if p.name.startswith(".tmp-")], files
    result = clients.get(node.dicom_port, identifier("STUDY", StudyInstanceUID=study),
                         [(str(sent[0].SOPClassUID), str(sent[0].file_meta.TransferSyntaxUID))])
    assert result.final_status == 0x0000
    assert ("dicom.store.spooled" in node.log_text()) is spooled
    for ds in sent:
        received = read_dataset(BytesIO(result.received[str(ds.SOPInstanceUID)]), False, True)
        assert received.PixelData == ds.PixelData


def test_kill_worker_mid_store_loses_nothing_acknowledged(node_factory) -> None:
    node = _start(node_factory)
    first = _worker_pids(node)
    study = generate_uid()
    acknowledged: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        while not stop.is_set():
            # The node's requestor: pynetdicom's plain one can miss a fast C-STORE response and
            # wait out its 60 s DIMSE timeout (clients.send_files): a likely cause of this test's
            # 62 s in one CI run (the thread then joined 60 s after stop); 13-17 s otherwise.
            ae = clients.requestor_ae()
            ae.add_requested_context(_ct(study).SOPClassUID, ["1.2.840.10008.1.2.1"])
            assoc = ae.associate(HOST, node.dicom_port, ae_title="PACSNODE")
            if not assoc.is_established:
                time.sleep(0.1)
                continue
            try:
                while not stop.is_set() and assoc.is_established:
                    ds = _ct(study)
                    try:
                        status = assoc.send_c_store(ds)
                    except Exception:
                        break
                    if "Status" in status and status.Status == 0x0000:
                        acknowledged.append(str(ds.SOPInstanceUID))
            finally:
                if assoc.is_established:
                    assoc.release()

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        assert wait_until(lambda: len(acknowledged) >= 5, 60)
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: len(_worker_pids(node)) >= 4, 60), node.log_text()[-2000:]
        count = len(acknowledged)
        assert wait_until(lambda: len(acknowledged) >= count + 5, 60)  # The restarted workers serve.
    finally:
        stop.set()
        thread.join(60)
    assert "dicom.worker.exited" in node.log_text()
    matches, status = clients.find(node.dicom_port, identifier("IMAGE", StudyInstanceUID=study, SOPInstanceUID=""))
    assert status == 0x0000
    assert set(acknowledged) <= {str(m.SOPInstanceUID) for m in matches}


def test_associations_refused_in_workers_are_counted_in_the_node_s_metrics(node_factory) -> None:
    node = _start(node_factory, ["--access-mode", "strict", "--known-ae", "VIEWER=echo"])
    for _ in range(3):  # A known AE asking a service it is not given, in whichever worker accepts it.
        ae = scu_ae("VIEWER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate(HOST, node.dicom_port, ae_title="PACSNODE")
        assert assoc.is_established
        statuses = [status.Status for status, _ in assoc.send_c_find(identifier("STUDY", StudyInstanceUID=""),
                                                                      StudyRootQueryRetrieveInformationModelFind)]
        assoc.release()
        assert statuses == [0x0124]  # Refused: not authorised.

    def metrics() -> str:
        return urllib.request.urlopen(f"http://{HOST}:{node.http_port}/metrics", timeout=10).read().decode()

    assert wait_until(lambda: "pacsnode_security_dicom_refused_total 3.0" in metrics(), 15), \
        [line for line in metrics().splitlines() if "refused" in line]
    worker = _worker_pids(node)[0]  # A worker that dies keeps its count in the node's total.
    os.kill(worker, signal.SIGKILL)
    assert wait_until(lambda: "dicom.worker.restarted" in node.log_text(), 30)
    assert "pacsnode_security_dicom_refused_total 3.0" in metrics()


def _left_files(node: NodeProcess) -> list[str]:
    """Spool files and blob temp files under the node's data directory."""
    spool_files = list((node.data_dir / "spool").glob("*")) if (node.data_dir / "spool").exists() else []
    temps = list((node.data_dir / "store" / "blobs").glob(".tmp-*"))
    return sorted(p.name for p in spool_files + temps)


@pytest.mark.parametrize("point", ["spooling", "compressing"])
def test_a_dead_worker_s_spool_and_temp_files_are_removed(node_factory, tmp_path: Path, point: str) -> None:
    """kill -9 of a worker in the middle of a big C-STORE: the node removes the spool file
    or blob temp file it left (known by its PID) before it starts the replacement, and
    leaves alone a temp file of another live process."""
    entry = datagen.write_large_instance(tmp_path / "big", size_bytes=24_000_000, seed=1201)
    node = node_factory.start("node-1", extra_args=["--dicom-workers", "1", "--dicom-local-associations", "0",
                                                    "--dataset-spool-threshold-bytes",
                                                    str(1 << 20)])
    assert wait_until(lambda: len(_worker_pids(node)) >= 1, 30), node.log_text()[-3000:]
    worker = _worker_pids(node)[0]
    blobs = node.data_dir / "store" / "blobs"
    other = blobs / f".tmp-{node.process.pid}_inflight.zst"  # The node's own, being written: kept.
    other.write_bytes(b"x")
    storescu = subprocess.Popen(["storescu", "-aec", "PACSNODE", HOST, str(node.dicom_port), str(entry["path"])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if point == "spooling":
            caught = wait_until(lambda: bool(list((node.data_dir / "spool").glob(f"*{worker}_*"))), 30, 0.001)
        else:
            caught = wait_until(lambda: bool(list(blobs.glob(f".tmp-{worker}_*"))), 30, 0.001)
        assert caught, _left_files(node)
        os.kill(worker, signal.SIGKILL)
        assert storescu.wait(timeout=60) != 0  # Never acknowledged.
    finally:
        if storescu.poll() is None:
            storescu.kill()
            storescu.wait()
    assert wait_until(lambda: "dicom.worker.restarted" in node.log_text(), 30), node.log_text()[-3000:]
    assert _left_files(node) == [other.name]
    assert f"dicom.worker.files_removed pid={worker}" in node.log_text()
    other.unlink()
    assert wait_until(lambda: port_open(node.dicom_port), 30)  # The replacement listens.
    assert clients.send_files(node.dicom_port, [Path(str(entry["path"]))]) == {str(entry["path"]): 0}
    assert _left_files(node) == []
    assert "Traceback" not in node.log_text()


def test_a_node_killed_mid_spool_clears_the_spool_when_its_workers_start(node_factory, tmp_path: Path) -> None:
    entry = datagen.write_large_instance(tmp_path / "big", size_bytes=24_000_000, seed=1202)
    node = node_factory.start("node-1", extra_args=["--dicom-workers", "1", "--dicom-local-associations", "0",
                                                    "--dataset-spool-threshold-bytes",
                                                    str(1 << 20)])
    assert wait_until(lambda: len(_worker_pids(node)) >= 1, 30), node.log_text()[-3000:]
    storescu = subprocess.Popen(["storescu", "-aec", "PACSNODE", HOST, str(node.dicom_port), str(entry["path"])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: bool(list((node.data_dir / "spool").glob("*"))), 30, 0.001)
        node.kill()
        assert storescu.wait(timeout=60) != 0
    finally:
        if storescu.poll() is None:
            storescu.kill()
            storescu.wait()
    assert list((node.data_dir / "spool").glob("*"))  # What the crash left ...
    node.start()
    assert wait_until(lambda: len(_worker_pids(node)) >= 2, 30), node.log_text()[-3000:]
    assert _left_files(node) == []  # ... is gone once the workers start.
    assert "dicom.spool.cleared files=1" in node.log_text()


def test_sigterm_stops_workers_and_kill9_of_node_takes_them_down(node_factory) -> None:
    node = _start(node_factory)
    pids = _worker_pids(node)
    assert node.stop() == 0
    assert not any(_alive(pid) for pid in pids)
    assert "dicom.workers.stopped" in node.log_text()
    assert _port_free(node.dicom_port)

    node.start()
    assert wait_until(lambda: len(_worker_pids(node)) >= 4, 30)
    pids = _worker_pids(node)[-2:]
    assert all(_alive(pid) for pid in pids)
    node.kill()
    assert wait_until(lambda: not any(_alive(pid) for pid in pids), 10)
    assert wait_until(lambda: _port_free(node.dicom_port), 10)


def test_max_associations_shared_between_workers(node_factory, tmp_path: Path) -> None:
    # The workers take slots from the node (node/archive_channel.py AssociationSlots): with
    # max_associations 3 and two workers, three associations are accepted wherever the
    # kernel hands them, a fourth is refused busy (a fixed ceil(3 / 2) = 2 per worker let
    # it in whenever the first three were split 2 + 1), and a slot given back is taken again.
    node = _start(node_factory, ["--max-associations", "3"])

    def associate() -> Any:
        ae = scu_ae()
        ae.add_requested_context("1.2.840.10008.1.1")
        return ae.associate(HOST, node.dicom_port, ae_title="PACSNODE")

    held: list[Any] = []

    def three_held() -> bool:
        # The harness's port probes (NodeProcess.start) are handed to the workers too, each
        # with a slot given back when the worker has seen it close: at load that can come
        # after the first associations, which are then refused busy. Until all three are in.
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        held.clear()
        held.extend(associate() for _ in range(3))
        return all(assoc.is_established for assoc in held)

    try:
        assert wait_until(three_held, 10, 0.2)
        extra = associate()
        assert extra.is_rejected
        assert "dicom.association.rejected" in node.log_text() and "reason=busy" in node.log_text()
        held.pop().release()

        def again() -> bool:  # The slot comes back when the released connection closes.
            assoc = associate()
            held.append(assoc)
            return bool(assoc.is_established)

        assert wait_until(again, 10)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def _served_serial(port: int, ca_file: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False  # The CA is what we check.
    with socket.create_connection((HOST, port), timeout=5) as raw, context.wrap_socket(raw) as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_dicom_tls_audit_and_reload_through_workers(node_factory, tmp_path: Path) -> None:
    """With workers: DICOM TLS on the TLS port (a store over TLS), plain text there refused,
    the DICOM audit trail written by the node for what the workers did, and a certificate
    reload (SIGHUP to the node) reaching every worker's TLS listener."""
    ca.init_ca(tmp_path / "ca")
    ca.issue(tmp_path / "ca", tmp_path / "tls", "node-1")
    ca_file = tmp_path / "tls" / "ca.pem"
    tls_port = free_port()
    node = _start(node_factory, ["--tls-dir", str(tmp_path / "tls"), "--dicom-tls-port", str(tls_port)])
    study = generate_uid()
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    ae = scu_ae()
    ct = _ct(study)
    ae.add_requested_context(ct.SOPClassUID, [ct.file_meta.TransferSyntaxUID])
    for _ in range(4):  # Several associations: the kernel spreads them over both workers.
        assoc = ae.associate(HOST, tls_port, ae_title="PACSNODE", tls_args=(context, None))
        assert assoc.is_established
        try:
            assert assoc.send_c_store(_ct(study)).Status == 0x0000
        finally:
            assoc.release()
    plain = ae.associate(HOST, tls_port, ae_title="PACSNODE")  # Plain text to the TLS port.
    assert not plain.is_established
    assert wait_until(lambda: "reason_class=plain-text" in node.log_text(), 10), node.log_text()[-2000:]
    audit_path = node.data_dir / "audit.jsonl"

    def stores() -> list[dict[str, object]]:
        messages = [json.loads(line) for line in audit_path.read_text().splitlines() if line.strip()]
        return [m for m in messages if "DICOM Instances Transferred" in json.dumps(m) and study in json.dumps(m)]

    assert wait_until(lambda: len(stores()) == 4, 10), audit_path.read_text()[-2000:]
    assert "Login" in audit_path.read_text()  # The associations (user-authentication), from the workers.
    old = _served_serial(tls_port, ca_file)
    ca.issue(tmp_path / "ca", tmp_path / "tls", "node-1")
    new = x509.load_pem_x509_certificate((tmp_path / "tls" / "cert.pem").read_bytes()).serial_number
    assert new != old
    assert node.process is not None
    os.kill(node.process.pid, signal.SIGHUP)
    assert wait_until(lambda: node.log_text().count("dicom.worker.tls_reloaded") >= 2, 10), node.log_text()[-2000:]
    assert all(_served_serial(tls_port, ca_file) == new for _ in range(8))  # Whichever worker answers.


def _established_by_process(pids: list[int], port: int) -> list[int]:
    """How many established TCP connections on local `port` each process holds (its fds
    matched against /proc/net/tcp by socket inode)."""
    inodes: dict[str, int] = {}
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes[fields[9]] = 1
    counts = []
    for pid in pids:
        held = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held += 1
        counts.append(held)
    return counts


def test_connections_are_spread_evenly_over_the_workers(node_factory) -> None:
    # The node accepts on the DICOM port and hands each connection to the worker with the
    # fewest open ones (node/workers.py ConnectionHandOff). With SO_REUSEPORT the kernel
    # picked by a hash of the addresses: six associations split 3 + 3 in 20 of 64 cases,
    # and one worker (one GIL) could get all of them.
    node = _start(node_factory)
    pids = _worker_pids(node)

    def associate() -> Any:
        ae = scu_ae()
        ae.add_requested_context("1.2.840.10008.1.1")
        return ae.associate(HOST, node.dicom_port, ae_title="PACSNODE")

    held = []
    try:
        for _ in range(6):
            held.append(associate())
        assert all(assoc.is_established for assoc in held)
        assert _established_by_process(pids, node.dicom_port) == [3, 3]
        for assoc in held[:3]:  # Three end; whichever worker served them gets the next three.
            assoc.release()
        held = held[3:]
        assert wait_until(lambda: sum(_established_by_process(pids, node.dicom_port)) == 3, 10)
        time.sleep(1.0)  # Each worker's one-byte notice of an ended connection reaches the node (not
        # observable from outside the node; 0.3 s was once too short at load ~10).
        for _ in range(3):
            held.append(associate())
        assert _established_by_process(pids, node.dicom_port) == [3, 3]
        assert all(assoc.send_c_echo().Status == 0 for assoc in held)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()


def test_the_node_serves_one_connection_itself_and_hands_further_ones_to_workers(node_factory) -> None:
    # dicom_local_associations 1 (the default): the node process serves a connection while
    # it serves none (one sender at the one-process cost), the workers get the others; a
    # C-STORE through either is stored; max_associations counts the node's one too.
    node = node_factory.start("node-1", extra_args=["--dicom-workers", "2", "--max-associations", "4"])
    assert wait_until(lambda: len(_worker_pids(node)) >= 2, 30), node.log_text()[-3000:]
    assert node.process is not None
    pids = [node.process.pid, *_worker_pids(node)]
    study = generate_uid()
    ct = _ct(study)

    def associate() -> Any:
        ae = scu_ae()
        ae.add_requested_context(ct.SOPClassUID, [ct.file_meta.TransferSyntaxUID])
        return ae.associate(HOST, node.dicom_port, ae_title="PACSNODE")

    def settled(expected: list[int]) -> bool:
        return _established_by_process(pids, node.dicom_port) == expected

    held: list[Any] = []
    stored: list[str] = []

    def store(assoc: Any) -> None:
        ds = _ct(study)
        assert assoc.send_c_store(ds).Status == 0x0000
        stored.append(str(ds.SOPInstanceUID))

    try:
        # The harness's port probes went to the node too: wait until it has seen them end.
        assert wait_until(lambda: settled([0, 0, 0]), 10)
        time.sleep(1.0)
        held.append(associate())
        assert held[0].is_established
        assert settled([1, 0, 0])  # The node itself.
        store(held[0])
        held.extend(associate() for _ in range(3))
        assert all(assoc.is_established for assoc in held)
        assert sorted(_established_by_process(pids, node.dicom_port)[1:]) == [1, 2]  # The workers.
        assert _established_by_process(pids, node.dicom_port)[0] == 1
        for assoc in held[1:]:
            store(assoc)
        extra = associate()  # A fifth: max_associations 4 holds for the node's and the workers' together.
        assert extra.is_rejected
        held.pop(0).release()  # The node's own ends: it takes the next one again.
        assert wait_until(lambda: _established_by_process(pids, node.dicom_port)[0] == 0, 10)
        time.sleep(1.0)  # The pair's one-byte notice reaches the accept loop.
        held.append(associate())
        assert held[-1].is_established
        assert _established_by_process(pids, node.dicom_port)[0] == 1
        store(held[-1])
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    matches, status = clients.find(node.dicom_port, identifier("IMAGE", StudyInstanceUID=study, SOPInstanceUID=""))
    assert status == 0x0000
    assert sorted(str(m.SOPInstanceUID) for m in matches) == sorted(stored)
    assert node.stop() == 0  # SIGTERM: a clean stop (the port's closed connections may sit in TIME_WAIT).
    assert not port_open(node.dicom_port)
    assert "Traceback" not in node.log_text()
