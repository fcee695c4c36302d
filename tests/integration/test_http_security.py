"""The HTTP port of a TLS node: HTTPS only, client certificates of the cluster CA, access
control, and DICOMweb in the audit trail.

One real node process on 127.0.0.1 with `--tls-dir`, in strict mode with
`loopback_trusted = false` (loopback is the only address here, so strict mode stands in for
a caller on another host); clients are httpx and dicomweb-client with certificates from
node/ca.py, as `pacsnode cert issue` writes them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import shutil
import ssl
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import requests
from cryptography import x509
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session
from pydicom import dcmread

from pacsnode.node import ca
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, free_port, wait_until

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("http-security")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(root: Path) -> dict[str, Path]:
    """The cluster CA; the node's certificate, a viewer's, an admin's, another node's; another CA's viewer."""
    ca.init_ca(root / "ca")
    dirs = {name: root / f"tls-{name}" for name in ("h1", "viewer", "admin", "n2", "other-ca-viewer")}
    ca.issue(root / "ca", dirs["h1"], "h1")
    ca.issue(root / "ca", dirs["viewer"], "WS1", dicom_client=True)
    ca.issue(root / "ca", dirs["admin"], "ops", admin=True)
    ca.issue(root / "ca", dirs["n2"], "n2")
    ca.init_ca(root / "other-ca")
    ca.issue(root / "other-ca", dirs["other-ca-viewer"], "WS1", dicom_client=True)
    return dirs


@pytest.fixture(scope="module")
def node(root: Path, pki: dict[str, Path]) -> Iterator[NodeProcess]:
    process = NodeProcess(root / "h1", node_id="h1", extra_args=[
        "--profile", "local", "--replication-factor", "1", "--write-quorum", "1", "--tls-dir", str(pki["h1"]),
        "--access-mode", "strict", "--loopback-trusted", "false", "--known-ae", "VIEWER=echo",
        "--dicom-tls-port", str(free_port())]).start()
    try:
        assert wait_until(lambda: _ready(process, pki), 30), process.log_text()[-3000:]
        yield process
    finally:
        process.stop()


def _url(node: NodeProcess, path: str = "") -> str:
    return f"https://{HOST}:{node.http_port}{path}"


def _client(pki: dict[str, Path], certificate: str | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(pki["h1"] / "ca.pem"))
    if certificate is not None:
        context.load_cert_chain(pki[certificate] / "cert.pem", pki[certificate] / "key.pem")
    return httpx.Client(verify=context, timeout=10)


def _ready(node: NodeProcess, pki: dict[str, Path]) -> bool:
    try:
        with _client(pki, None) as client:
            return client.get(_url(node, "/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


def _dicomweb(node: NodeProcess, pki: dict[str, Path], certificate: str) -> DICOMwebClient:
    session: requests.Session = create_session()
    session.trust_env = False  # Else REQUESTS_CA_BUNDLE, when set, wins over session.verify (requests#3829).
    session.verify = str(pki["h1"] / "ca.pem")
    session.cert = (str(pki[certificate] / "cert.pem"), str(pki[certificate] / "key.pem"))
    return DICOMwebClient(_url(node, "/dicom-web"), session=session)


def _audit(node: NodeProcess) -> list[dict[str, object]]:
    text = (node.data_dir / "audit.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_plain_http_to_the_https_port_is_refused(node: NodeProcess, pki: dict[str, Path]) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{HOST}:{node.http_port}/dicom-web/studies", timeout=10)
    with _client(pki, "viewer") as client:  # The node still serves.
        assert client.get(_url(node, "/healthz")).text == "ok\n"
    # One line for the failed handshake, with the address and a reason class; no traceback.
    assert wait_until(lambda: "http.tls.refused address=127.0.0.1 reason=plain-text" in node.log_text(), 5), \
        node.log_text()[-2000:]
    assert "Traceback" not in node.log_text()


def test_a_certificate_of_another_ca_is_refused(node: NodeProcess, pki: dict[str, Path]) -> None:
    context = ssl.create_default_context(cafile=str(pki["h1"] / "ca.pem"))
    context.load_cert_chain(pki["other-ca-viewer"] / "cert.pem", pki["other-ca-viewer"] / "key.pem")
    with httpx.Client(verify=context, timeout=10) as client, pytest.raises(httpx.HTTPError):
        client.get(_url(node, "/dicom-web/studies"))
    assert wait_until(lambda: "http.tls.refused address=127.0.0.1 reason=certificate" in node.log_text(), 5), \
        node.log_text()[-2000:]
    assert wait_until(lambda: any("HTTPS handshake failed: certificate" in json.dumps(m) for m in _audit(node)), 5)


def test_health_is_open_data_needs_a_viewer_or_admin_certificate(node: NodeProcess, pki: dict[str, Path]) -> None:
    with _client(pki, None) as anonymous:
        assert anonymous.get(_url(node, "/healthz")).status_code == 200
        assert anonymous.get(_url(node, "/metrics")).status_code == 200
        for path in ("/dicom-web/studies?PatientID=PAT-SECRET", "/ui/", "/api/cluster"):
            assert anonymous.get(_url(node, path)).status_code == 401, path
    with _client(pki, "n2") as other_node:  # A node certificate of our CA is not a viewer's.
        assert other_node.get(_url(node, "/dicom-web/studies")).status_code == 403
    with _client(pki, "admin") as admin:
        assert admin.get(_url(node, "/dicom-web/studies")).status_code == 200
    log = node.log_text()
    assert "http.access.refused address=127.0.0.1 path_class=dicom-web" in log
    assert "reason=no-client-certificate status=401" in log and "reason=certificate-role status=403" in log
    assert "path_class=ui" in log and "path_class=api" in log
    assert "PAT-SECRET" not in log


def test_dicomweb_with_a_viewer_certificate_is_audited(node: NodeProcess, pki: dict[str, Path],
                                                        root: Path) -> None:
    spec = datagen.StudySetSpec(patients=1, series_per_study=1, instances_per_series=2, seed=11, rows=16, cols=16)
    manifest = datagen.write_study_set(spec, root / "data")
    client = _dicomweb(node, pki, "viewer")
    stored = client.store_instances([dcmread(entry["path"]) for entry in manifest])
    assert len(stored.ReferencedSOPSequence) == len(manifest)
    patient_id, study_uid = manifest[0]["patient_id"], manifest[0]["study_uid"]
    found = client.search_for_studies(search_filters={"PatientID": patient_id})
    assert [s["0020000D"]["Value"][0] for s in found] == [study_uid]
    instances = client.retrieve_study(study_uid, media_types=(("application/dicom", "*"),))
    assert len(instances) == len(manifest)
    assert len(client.retrieve_study_metadata(study_uid)) == len(manifest)

    def by(event: str, action: str) -> list[dict[str, object]]:
        return [m for m in _audit(node) if m["EventIdentification"]["EventID"]["originalText"] == event  # type: ignore[index]
                and m["EventIdentification"]["EventActionCode"] == action]  # type: ignore[index]

    def requestor(message: dict[str, object]) -> dict[str, object]:
        return next(p for p in message["ActiveParticipant"] if p["UserIsRequestor"])  # type: ignore[attr-defined]

    viewer = "pacsnode-dicom:WS1"
    assert wait_until(lambda: len(by("DICOM Instances Accessed", "R")) >= 1, 10)
    stores = [m for m in by("DICOM Instances Transferred", "C") if requestor(m)["UserID"] == viewer]
    assert len(stores) == len(manifest)
    assert all(patient_id in json.dumps(m) and study_uid in json.dumps(m) for m in stores)
    queries = [m for m in by("Query", "E") if requestor(m)["UserID"] == viewer]
    assert any(patient_id in json.dumps(m) and "QIDO-RS" in json.dumps(m) for m in queries)
    retrieves = [m for m in by("DICOM Instances Transferred", "R") if requestor(m)["UserID"] == viewer]
    assert retrieves and study_uid in json.dumps(retrieves[-1])
    assert requestor(retrieves[-1])["NetworkAccessPointID"] == HOST
    assert "WADO-RS retrieve: 2 of 2 instances" in json.dumps(retrieves[-1])
    refusals = [m for m in by("Security Alert", "E") if "HTTP dicom-web refused" in json.dumps(m)]
    assert refusals  # The refused requests of the test before (module-scoped node).


def test_a_tls_node_sends_its_audit_trail_to_a_syslog_receiver(root: Path, pki: dict[str, Path]) -> None:
    """`--audit-syslog HOST:PORT`: the node's audit messages reach a real TLS receiver
    (tests/unit/test_audit_syslog.py has the receiver, the framing and the failure cases)."""
    from tests.unit.test_audit_syslog import Receiver

    ca.issue(root / "ca", root / "tls-syslog", "syslog")
    receiver = Receiver(root / "tls-syslog", free_port())
    port = receiver.listener.getsockname()[1]
    process = NodeProcess(root / "n2", node_id="n2", extra_args=[
        "--profile", "local", "--replication-factor", "1", "--write-quorum", "1", "--tls-dir", str(pki["n2"]),
        "--audit-syslog", f"127.0.0.1:{port}"])
    try:
        process.start()
        assert wait_until(lambda: any(b"Application Start" in m for m in receiver.messages), 15), \
            process.log_text()[-2000:]
        assert receiver.peers[0] == "n2"
        with _client(pki, "admin") as client:
            metrics = client.get(f"https://{HOST}:{process.http_port}/metrics").text
        assert re.search(r"^pacsnode_security_audit_syslog_dropped_total 0(\.0)?$", metrics, re.M), metrics[-1500:]
        sent = re.search(r"^pacsnode_security_audit_syslog_sent_total ([0-9.]+)$", metrics, re.M)
        assert sent is not None and float(sent.group(1)) >= 1
    finally:
        process.stop()
        receiver.close()


def _served_serial(port: int, pki: dict[str, Path], alpn: list[str] | None = None) -> int:
    context = ssl.create_default_context(cafile=str(pki["h1"] / "ca.pem"))
    context.check_hostname = False  # The peer port's certificate names pacsnode-peer; the CA is what we check.
    context.load_cert_chain(pki["admin"] / "cert.pem", pki["admin"] / "key.pem")
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection((HOST, port), timeout=5) as raw, context.wrap_socket(raw) as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_the_certificate_for_https_and_the_peer_port(node: NodeProcess, pki: dict[str, Path],
                                                                   root: Path) -> None:
    """Reissue the node's certificate in its tls_dir, send SIGHUP: new connections get the new
    one on the HTTPS port and the peer port, without a restart; audited as a certificate change.
    (Runs last in this module: it changes the node's certificate.)"""
    old = _served_serial(node.http_port, pki)
    ca.issue(root / "ca", pki["h1"], "h1")
    new = x509.load_pem_x509_certificate((pki["h1"] / "cert.pem").read_bytes()).serial_number
    assert new != old
    assert node.process is not None
    os.kill(node.process.pid, signal.SIGHUP)
    assert wait_until(lambda: _served_serial(node.http_port, pki) == new, 10), node.log_text()[-2000:]
    assert _served_serial(node.peer_port, pki, ["h2"]) == new
    assert "security.tls.reloaded" in node.log_text()
    assert any("certificate changed" in json.dumps(m) for m in _audit(node))
    with _client(pki, "viewer") as client:  # Still serving, with the new certificate.
        assert client.get(_url(node, "/dicom-web/studies")).status_code == 200


def test_sighup_reloads_the_certificate_for_dicom_tls(node: NodeProcess, pki: dict[str, Path], root: Path) -> None:
    """DICOM TLS: after a reissue and SIGHUP, new associations get the new certificate; one
    opened before keeps its connection (and the certificate it was made with) and works.
    (After the test above: it changes the node's certificate again.)"""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    port = int(node.extra_args[node.extra_args.index("--dicom-tls-port") + 1])
    old = _served_serial(port, pki)
    context = ssl.create_default_context(cafile=str(pki["h1"] / "ca.pem"))
    context.check_hostname = False  # The CA is what we check; the certificate names the node, not 127.0.0.1.
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(Verification)
    before = ae.associate(HOST, port, ae_title="PACSNODE", tls_args=(context, None))
    try:
        assert before.is_established and before.send_c_echo().Status == 0
        ca.issue(root / "ca", pki["h1"], "h1")
        new = x509.load_pem_x509_certificate((pki["h1"] / "cert.pem").read_bytes()).serial_number
        assert new != old
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGHUP)
        assert wait_until(lambda: _served_serial(port, pki) == new, 10), node.log_text()[-2000:]
        after = ae.associate(HOST, port, ae_title="PACSNODE", tls_args=(context, None))
        assert after.is_established and after.send_c_echo().Status == 0
        served = after.dul.socket.socket.getpeercert(binary_form=True)
        assert x509.load_der_x509_certificate(served).serial_number == new
        after.release()
        assert before.send_c_echo().Status == 0  # The old connection goes on.
        assert x509.load_der_x509_certificate(
            before.dul.socket.socket.getpeercert(binary_form=True)).serial_number == old
    finally:
        if before.is_established:
            before.release()
