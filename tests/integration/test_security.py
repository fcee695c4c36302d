"""Protect patient data: a 3-node TLS cluster, DICOM TLS, access control, the audit trail,
and the attacks each of them must refuse with nothing changed.

Real node processes on 127.0.0.1; certificates from `pacsnode ca init` / `cert issue`;
dcmtk's storescu/findscu with +tls and pynetdicom with an ssl_context as DICOM clients.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import grpc
import httpx
import pytest
from cryptography import x509
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsnode.cli.status import collect
from pacsnode.node import ca
from pacsnode.node import peer_wire
from pacsnode.node.member_signing import MemberSigner
from pacsnode.node.tls import CHANNEL_OPTIONS, TlsFiles, channel_credentials
from pacsnode.ring import swim
from pacsnode.ring.members import MemberInfo
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, free_port, pacsnode_command, wait_until

from . import clients

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

NAMES = ("n1", "n2", "n3")
FAST = ["--profile", "local", "--hint-replay-interval-ms", "300", "--replica-timeout-ms", "1500"]
HOST = "127.0.0.1"


def pacsnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pacsnode_command() + list(args), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("security")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(root: Path) -> dict[str, Path]:
    """The cluster CA, a certificate per node, an admin's, a modality's; and the attackers'."""
    dirs = {name: root / f"tls-{name}" for name in (*NAMES, "admin", "modality")}
    assert pacsnode("ca", "init", str(root / "ca")).returncode == 0
    for name in NAMES:
        assert pacsnode("cert", "issue", "--ca", str(root / "ca"), "--out", str(dirs[name]), name).returncode == 0
    assert pacsnode("cert", "issue", "--ca", str(root / "ca"), "--out", str(dirs["admin"]), "ops", "--admin").returncode == 0
    assert pacsnode("cert", "issue", "--ca", str(root / "ca"), "--out", str(dirs["modality"]), "CT1",
                    "--dicom-client").returncode == 0
    # Another CA's certificate for n1, and an expired one of our CA for n2.
    ca.init_ca(root / "other-ca")
    ca.issue(root / "other-ca", root / "tls-other-ca-n1", "n1")
    dirs["other-ca-n1"] = root / "tls-other-ca-n1"
    expired_start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    ca.issue(root / "ca", root / "tls-expired-n2", "n2", valid_days=1, not_before=expired_start)
    dirs["expired-n2"] = root / "tls-expired-n2"
    return dirs


@pytest.fixture(scope="module")
def storescp(root: Path) -> Iterator[clients.StoreScp]:
    with clients.StoreScp(root / "moved", free_port()) as scp:
        yield scp


@pytest.fixture(scope="module")
def tls_storescp(root: Path, pki: dict[str, Path]) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp on DICOM TLS, with a certificate of the cluster CA (a C-MOVE destination)."""
    from pacsnode.sim.process import port_open

    ca.issue(root / "ca", root / "tls-scp", "tls-scp")
    port, out_dir = free_port(), root / "moved-tls"
    out_dir.mkdir()
    scp = root / "tls-scp"
    process = subprocess.Popen(["storescp", "+tls", str(scp / "key.pem"), str(scp / "cert.pem"), "+cf",
                                str(scp / "ca.pem"), "+B", "-aet", "TLSSCP", "-od", str(out_dir), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: port_open(port), 10)
        yield port, out_dir
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(root: Path, pki: dict[str, Path], storescp: clients.StoreScp,
            tls_storescp: tuple[int, Path]) -> Iterator[list[NodeProcess]]:
    nodes: list[NodeProcess] = []
    access = ["--loopback-trusted", "false",
              "--known-ae", "VIEWER=echo,store,find,get,move,move-to:STORESCP,move-to:TLSSCP",
              "--destination", f"TLSSCP=127.0.0.1:{tls_storescp[0]}+tls",
              "--known-ae", "OTHER=echo,find,move",
              "--destination", f"STORESCP=127.0.0.1:{storescp.port}",
              "--destination", f"ELSEWHERE=127.0.0.1:{free_port()}"]
    try:
        for name in NAMES:
            seeds = [nodes[0].peer_address] if nodes else []
            extra = FAST + access + ["--tls-dir", str(pki[name]), "--dicom-tls-port", str(free_port()),
                                     "--dicom-tls-client-cert", "required" if name == "n1" else "optional"]
            node = NodeProcess(root / name, node_id=name, seeds=seeds, extra_args=extra)
            nodes.append(node.start())
        admin = str(pki["admin"])
        assert wait_until(lambda: all(alive_count(n.peer_address, admin) == 3 for n in nodes), 30), \
            "TLS membership did not converge:\n" + nodes[1].log_text()[-3000:]
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def alive_count(address: str, tls_dir: str) -> int:
    try:
        return sum(1 for n in collect(address, timeout_s=2, tls_dir=tls_dir)["nodes"]
                   if n["state"] == "alive" and n["reachable"])
    except Exception:
        return 0


def tls_port(node: NodeProcess) -> int:
    return int(node.extra_args[node.extra_args.index("--dicom-tls-port") + 1])


def envelope(sender: str) -> pb.Envelope:
    return pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id=sender)


def channel(address: str, tls_dir: Path | None) -> grpc.Channel:
    if tls_dir is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(TlsFiles(tls_dir)), options=CHANNEL_OPTIONS)


def status_code(call: Any) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined, no-any-return]
    return None


# --------------------------------------------------------------------------- DICOM helpers
def client_context(pki: dict[str, Path], certificate: str | None = "modality") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["n1"] / "ca.pem"))
    if certificate is not None:
        context.load_cert_chain(pki[certificate] / "cert.pem", pki[certificate] / "key.pem")
    return context


def associate(port: int, calling: str, contexts: list[Any], tls: ssl.SSLContext | None = None, **kwargs: Any) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate(HOST, port, ae_title="PACSNODE", tls_args=(tls, "localhost") if tls else None, **kwargs)


def find_studies(port: int, calling: str, tls: ssl.SSLContext | None = None, **keys: str) -> tuple[list[Dataset], int]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.PatientID = ""
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    assoc = associate(port, calling, [StudyRootQueryRetrieveInformationModelFind], tls)
    assert assoc.is_established
    matches, final = [], -1
    try:
        for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                break
            if status.Status == 0xFF00:
                matches.append(found)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return matches, final


def move_study(port: int, calling: str, study_uid: str, destination: str) -> int:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    assoc = associate(port, calling, [StudyRootQueryRetrieveInformationModelMove])
    assert assoc.is_established
    final = -1
    try:
        for status, _ in assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove):
            if not status:
                break
            if status.Status != 0xFF00:
                final = int(status.Status)
    finally:
        assoc.release()
    return final


def get_study(port: int, calling: str, study_uid: str, contexts: list[tuple[str, str]],
              tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, bytes]]:
    received: dict[str, bytes] = {}

    def on_store(event: Any) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class, syntax in dict.fromkeys(contexts):
        ae.add_requested_context(sop_class, [syntax])
        roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate(HOST, port, ae_title="PACSNODE", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)],
                         tls_args=(tls, "localhost") if tls else None)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    final = -1
    try:
        for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            if status and status.Status != 0xFF00:
                final = int(status.Status)
    finally:
        assoc.release()
    return final, received


@pytest.fixture(scope="module")
def stored(cluster: list[NodeProcess], root: Path, pki: dict[str, Path]) -> list[datagen.ManifestEntry]:
    """Studies sent with dcmtk's storescu over DICOM TLS (client certificate) to n1."""
    spec = datagen.StudySetSpec(patients=2, studies_per_patient=2, series_per_study=1, instances_per_series=3,
                                rows=16, cols=16, seed=12)
    manifest = datagen.write_study_set(spec, root / "studies")
    (root / "studies" / "manifest.json").unlink(missing_ok=True)
    modality = pki["modality"]
    result, acked = clients.storescu(tls_port(cluster[0]), [root / "studies"], extra=[
        "+tls", str(modality / "key.pem"), str(modality / "cert.pem"), "+cf", str(modality / "ca.pem"),
        "+sd", "+r"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(acked) == len(manifest)
    admin = str(pki["admin"])
    assert wait_until(lambda: sum(n["local_instances"] or 0 for n in collect(
        cluster[0].peer_address, tls_dir=admin)["nodes"]) == 3 * len(manifest), 30)
    return manifest


# --------------------------------------------------------------------------- the TLS cluster works
def test_tls_cluster_stores_and_retrieves_through_every_node(cluster: list[NodeProcess], pki: dict[str, Path],
                                                             stored: list[datagen.ManifestEntry]) -> None:
    studies = {e["study_uid"] for e in stored}
    for node in cluster:  # Plain DICOM port, a known AE: each node finds every study (scatter over mTLS).
        found, status = find_studies(node.dicom_port, "VIEWER")
        assert status == 0 and {str(d.StudyInstanceUID) for d in found} == studies, node.node_id
    study_uid = stored[0]["study_uid"]
    entries = [e for e in stored if e["study_uid"] == study_uid]
    contexts = [(e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries]
    # C-GET over DICOM TLS (pynetdicom with an ssl_context) at n2: bytes exactly as sent.
    final, received = get_study(tls_port(cluster[1]), "VIEWER", study_uid, contexts, client_context(pki))
    assert final == 0 and set(received) == {e["sop_uid"] for e in entries}
    for entry in entries:
        assert received[entry["sop_uid"]] == clients.file_dataset_bytes(Path(entry["path"]))
    status = collect(cluster[2].peer_address, tls_dir=str(pki["admin"]))
    assert status["peer_tls"] is True and {n["state"] for n in status["nodes"]} == {"alive"}
    for node in cluster:
        assert wait_until(lambda: "security.tls node_id=" in node.log_text(), 10)
        assert "security.unprotected" not in node.log_text()


def https_client(pki: dict[str, Path], certificate: str | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(pki["admin"] / "ca.pem"))
    if certificate is not None:
        context.load_cert_chain(pki[certificate] / "cert.pem", pki[certificate] / "key.pem")
    return httpx.Client(verify=context, timeout=10)


def test_the_cluster_page_works_on_a_tls_node(cluster: list[NodeProcess], pki: dict[str, Path]) -> None:
    """/api/cluster asks the node's own peer port with the node's certificate (it used to ask
    without one, and a TLS node answered 503)."""
    with https_client(pki, "admin") as client:
        reply = client.get(f"https://{HOST}:{cluster[1].http_port}/api/cluster")
    assert reply.status_code == 200, reply.text
    view = reply.json()
    assert view["node_id"] == "n2" and view["peer_tls"] is True
    assert {(n["node_id"], n["state"], n["reachable"]) for n in view["nodes"]} == {
        (name, "alive", True) for name in NAMES}


def test_dcmtk_findscu_and_storescu_over_tls(cluster: list[NodeProcess], pki: dict[str, Path], root: Path,
                                             stored: list[datagen.ManifestEntry]) -> None:
    modality = pki["modality"]
    tls_args = ["+tls", str(modality / "key.pem"), str(modality / "cert.pem"), "+cf", str(modality / "ca.pem")]
    result, responses = clients.findscu(tls_port(cluster[2]), ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"],
                                        root / "findscu-tls", extra=[*tls_args, "-aet", "VIEWER"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert {str(d.StudyInstanceUID) for d in responses} == {e["study_uid"] for e in stored}
    # Anonymous TLS (no client certificate) is fine where client certificates are optional...
    result, acked = clients.storescu(tls_port(cluster[1]), [stored[0]["path"]],
                                     extra=["+tla", "+cf", str(modality / "ca.pem")])
    assert result.returncode == 0 and len(acked) == 1
    # ...and refused where they are required (n1).
    result, acked = clients.storescu(tls_port(cluster[0]), [stored[0]["path"]],
                                     extra=["+tla", "+cf", str(modality / "ca.pem")])
    assert result.returncode != 0 and not acked
    assert wait_until(lambda: "dicom.tls.refused" in cluster[0].log_text(), 5)


def test_plain_text_and_old_tls_on_the_dicom_tls_port_are_refused(cluster: list[NodeProcess],
                                                                  pki: dict[str, Path]) -> None:
    assoc = associate(tls_port(cluster[1]), "VIEWER", [Verification])  # Plain text to the TLS port.
    assert not assoc.is_established
    old = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        assoc = associate(tls_port(cluster[1]), "VIEWER", [Verification], old)
        assert not assoc.is_established
    except ssl.SSLError:
        pass  # This OpenSSL will not even offer TLS 1.1.
    good = associate(tls_port(cluster[1]), "VIEWER", [Verification], client_context(pki))
    assert good.is_established and good.send_c_echo().Status == 0
    good.release()


# --------------------------------------------------------------------------- attacks on the peer port
def test_plain_text_other_ca_and_expired_certificates_are_refused(cluster: list[NodeProcess],
                                                                  pki: dict[str, Path]) -> None:
    address = cluster[0].peer_address
    request = pb.StatusRequest(envelope=envelope("n1"))
    for attacker in (None, pki["other-ca-n1"], pki["expired-n2"]):
        with channel(address, attacker) as ch:
            code = status_code(lambda: pb_grpc.AdminStub(ch).Status(request, timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE, attacker
    with channel(address, pki["admin"]) as ch:  # The admin certificate of our CA is served.
        assert pb_grpc.AdminStub(ch).Status(pb.StatusRequest(envelope=envelope("pacsnode-cli")), timeout=5).members
    assert "Handshake failed" in cluster[0].log_text()
    result = pacsnode("status", "--node", address)  # The CLI without --tls-dir cannot reach a TLS node.
    assert result.returncode == 1


def test_a_node_certificate_cannot_speak_as_another_node(cluster: list[NodeProcess], pki: dict[str, Path],
                                                         stored: list[datagen.ManifestEntry]) -> None:
    n1 = cluster[0]
    with channel(n1.peer_address, pki["n3"]) as ch:
        ping = pb.PingRequest(envelope=envelope("n2"), sequence_number=1, target_id="n1")
        assert status_code(lambda: pb_grpc.MembershipStub(ch).Ping(ping, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        fetch = pb.FetchRequest(envelope=envelope("n2"), study_instance_uid=stored[0]["study_uid"],
                                sop_instance_uid=stored[0]["sop_uid"])
        code = status_code(lambda: list(pb_grpc.DataStub(ch).FetchInstance(fetch, timeout=5)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        ping = pb.PingRequest(envelope=envelope("n3"), sequence_number=1, target_id="n1")
        assert pb_grpc.MembershipStub(ch).Ping(ping, timeout=5).envelope.sender_id == "n1"  # As itself: fine.
    for certificate in ("admin", "modality"):  # Neither may gossip or fetch data.
        with channel(n1.peer_address, pki[certificate]) as ch:
            ping = pb.PingRequest(envelope=envelope("pacsnode-cli"), sequence_number=1, target_id="n1")
            assert status_code(lambda: pb_grpc.MembershipStub(ch).Ping(ping, timeout=5)) \
                == grpc.StatusCode.PERMISSION_DENIED
    assert "security.peer.refused" in n1.log_text()


def test_fetch_frames_is_served_to_a_node_as_itself_only(cluster: list[NodeProcess], pki: dict[str, Path],
                                                          stored: list[datagen.ManifestEntry]) -> None:
    """Data.FetchFrames on the mutual-TLS peer port: as the other data RPCs, a node's
    certificate speaking as itself is answered; as another node, or an admin's or a
    modality's certificate, PERMISSION_DENIED (the frames of a study are a node's business)."""
    n1 = cluster[0]
    entry = stored[0]

    def ask(certificate: str, sender: str) -> list[pb.FramesChunk]:
        request = pb.FetchFramesRequest(envelope=envelope(sender), study_instance_uid=entry["study_uid"],
                                        sop_instance_uid=entry["sop_uid"], frame_numbers=[1])
        with channel(n1.peer_address, pki[certificate]) as ch:
            return list(pb_grpc.DataStub(ch).FetchFrames(request, timeout=10))

    answer = ask("n3", "n3")
    assert answer[1].outcome == pb.FRAMES_OUTCOME_SENDING and answer[-1].last
    assert sum(len(message.data) for message in answer) == 16 * 16 * 2  # One 16 x 16 frame of 16 bits.
    for certificate, sender in (("n3", "n2"), ("admin", "pacsnode-cli"), ("modality", "CT1")):
        assert status_code(lambda: ask(certificate, sender)) == grpc.StatusCode.PERMISSION_DENIED, certificate
    assert status_code(lambda: ask("other-ca-n1", "n1")) is not None  # Another CA: no TLS handshake.


def test_the_store_stream_checks_every_request_against_the_certificate(cluster: list[NodeProcess],
                                                                       pki: dict[str, Path]) -> None:
    """Data.StoreStream (a long-lived stream of copies) is held to the peer port's rules
    as a call is: a node's certificate may not send as another node, in the first request or
    in a later one, and an admin or modality certificate may not send copies at all."""
    n1 = cluster[0]

    def headless(sender: str, request_id: int) -> pb.StoreStreamRequest:  # Refused INVALID if it gets through.
        return pb.StoreStreamRequest(envelope=envelope(sender), request_id=request_id, data=b"x")

    def outcomes(tls_dir: Path | None, requests: list[pb.StoreStreamRequest]) -> tuple[dict[int, int], Any]:
        seen: dict[int, int] = {}
        with channel(n1.peer_address, tls_dir) as ch:
            def run() -> None:
                for message in pb_grpc.DataStub(ch).StoreStream(iter(requests), timeout=10):
                    seen[message.request_id] = message.reply.outcome
            return seen, status_code(run)

    seen, code = outcomes(pki["n3"], [headless("n3", 1), headless("n3", 2)])  # As itself: served.
    assert code is None and seen == {1: pb.STORE_OUTCOME_REFUSED_INVALID, 2: pb.STORE_OUTCOME_REFUSED_INVALID}
    seen, code = outcomes(pki["n3"], [headless("n2", 1)])
    assert code == grpc.StatusCode.PERMISSION_DENIED and seen == {}
    seen, code = outcomes(pki["n3"], [headless("n3", 1), headless("n2", 2)])
    assert code == grpc.StatusCode.PERMISSION_DENIED and 2 not in seen
    for certificate in ("admin", "modality"):
        seen, code = outcomes(pki[certificate], [headless("pacsnode-cli", 1)])
        assert code == grpc.StatusCode.PERMISSION_DENIED and seen == {}, certificate
    seen, code = outcomes(None, [headless("n3", 1)])  # Plain text: not even a handshake.
    assert code == grpc.StatusCode.UNAVAILABLE


def test_forged_left_and_removed_are_refused_and_change_nothing(cluster: list[NodeProcess],
                                                                pki: dict[str, Path]) -> None:
    n1, n2 = cluster[0], cluster[1]
    forged = [
        ("n2", pb.MemberUpdate(node_id="n2", state=pb.MEMBER_STATE_LEFT, incarnation=99)),  # n3 posing as n2
        ("n3", pb.MemberUpdate(node_id="n2", state=pb.MEMBER_STATE_REMOVED)),  # a node may not remove
        ("n3", pb.MemberUpdate(node_id="n1", state=pb.MEMBER_STATE_LEFT)),  # asks n1 to leave
        ("n3", pb.MemberUpdate(node_id="", state=pb.MEMBER_STATE_LEFT)),
    ]
    for sender, member in forged:
        with channel(n1.peer_address, pki["n3"]) as ch:
            code = status_code(lambda: pb_grpc.MembershipStub(ch).Leave(
                pb.LeaveRequest(envelope=envelope(sender), member=member), timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (sender, member)
    with channel(n1.peer_address, None) as ch:  # Plain text: not even a handshake.
        code = status_code(lambda: pb_grpc.MembershipStub(ch).Leave(pb.LeaveRequest(
            envelope=envelope("n2"), member=pb.MemberUpdate(node_id="n2", state=pb.MEMBER_STATE_LEFT)), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
    admin = str(pki["admin"])
    for node in cluster:
        view = collect(node.peer_address, tls_dir=admin)
        assert {n["node_id"]: n["state"] for n in view["nodes"]} == {"n1": "alive", "n2": "alive", "n3": "alive"}
    # `pacsnode remove` with a node's certificate is refused too; the audit trail has the attempts.
    result = pacsnode("remove", "n2", "--node", n1.peer_address, "--tls-dir", str(pki["n3"]))
    assert result.returncode == 1 and "cannot send as" in result.stderr
    assert n2.alive
    audit = pacsnode("audit", "--data-dir", str(n1.data_dir), "--event", "security-alert", "--json")
    reasons = [json.loads(line)["EventIdentification"].get("EventOutcomeDescription", "")
               for line in audit.stdout.splitlines()]
    assert any("cannot send as 'n2'" in r for r in reasons) and any("only an admin" in r for r in reasons)


def test_forged_gossip_about_another_node_is_ignored(cluster: list[NodeProcess], pki: dict[str, Path]) -> None:
    """n3's own certificate, speaking as n3 (the peer guard lets it), gossips records about n2
    that only n2 (ALIVE, LEFT) or their named reporter (DEAD) may sign: n1 ignores every one,
    logs it, and every node keeps n2 alive at its own address and incarnation."""
    n1, n2 = cluster[0], cluster[1]
    admin = str(pki["admin"])
    before = {n["node_id"]: n for n in collect(n1.peer_address, tls_dir=admin)["nodes"]}["n2"]
    host, port = before["peer_address"].rsplit(":", 1)
    honest = MemberInfo(node_id="n2", peer_host=host, peer_port=int(port), generation=before["generation"],
                        dicom_host=host, ae_title="PACSNODE")
    hijacked = replace(honest, peer_host="127.0.0.1", peer_port=free_port())  # n2 "moved" to the attacker.
    signer = MemberSigner("pacsnode", TlsFiles(pki["n3"]))
    high = before["incarnation"] + 50
    forged = [
        signer.sign(swim.MemberUpdate(hijacked, swim.State.ALIVE, high, reporter_id="n3")),  # Signed by n3.
        swim.MemberUpdate(hijacked, swim.State.ALIVE, high + 1, reporter_id="n2"),  # Unsigned.
        signer.sign(swim.MemberUpdate(honest, swim.State.LEFT, high + 2, reporter_id="n3", lamport=99)),
        signer.sign(swim.MemberUpdate(honest, swim.State.DEAD, high + 3, reporter_id="n1")),  # n3 as n1.
        replace(signer.sign(swim.MemberUpdate(honest, swim.State.ALIVE, high + 4, reporter_id="n3")),
                reporter_id="n2"),  # n3's signature, relabelled as n2's own record.
        replace(signer.sign(swim.MemberUpdate(honest, swim.State.DEAD, before["incarnation"], reporter_id="n3")),
                incarnation=high + 5),  # What n3 may say, changed after signing.
    ]
    with channel(n1.peer_address, pki["n3"]) as ch:
        for update in forged:  # Each alone, so that every one is judged (a gossip round each).
            gossip = pb.PingRequest(envelope=envelope("n3"), sequence_number=0, target_id="n1",
                                    updates=[peer_wire.update_to_wire(update)])
            pb_grpc.MembershipStub(ch).Ping(gossip, timeout=5)  # Accepted as gossip; its records judged.
    assert wait_until(lambda: n1.log_text().count("membership.update.rejected node=n2") >= 6, 10), n1.log_text()[-3000:]
    log_text = n1.log_text()
    for reason in ("only n2 may say it is alive, not n3", "reason=unsigned", "only n2 may say it is left, not n3",
                   "reporter 'n1' but signed by n3", "reporter 'n2' but signed by n3",
                   "bad signature (claims n3)"):
        assert reason in log_text, reason
    for node in cluster:
        after = {n["node_id"]: n for n in collect(node.peer_address, tls_dir=admin)["nodes"]}["n2"]
        assert (after["state"], after["peer_address"], after["generation"]) == (
            "alive", before["peer_address"], before["generation"]), node.node_id
        assert after["incarnation"] < high, node.node_id
    assert n2.alive


# --------------------------------------------------------------------------- access control
def test_unknown_ae_c_find_is_refused_known_ae_is_answered(cluster: list[NodeProcess],
                                                           stored: list[datagen.ManifestEntry]) -> None:
    node = cluster[1]
    patient_id = stored[0]["patient_id"]
    found, status = find_studies(node.dicom_port, "STRANGER", PatientID=patient_id)
    assert status == 0x0124 and found == []
    found, status = find_studies(node.dicom_port, "VIEWER", PatientID=patient_id)
    assert status == 0 and found
    log = node.log_text()
    line = next(l for l in log.splitlines() if "dicom.access.refused" in l and "STRANGER" in l)
    assert "service=find" in line and "address=127.0.0.1" in line and "reason=unknown-ae" in line
    assert patient_id not in log  # The application log never names a patient.
    # Echo and store stay open to unknown AEs (Orthanc's defaults).
    assoc = associate(node.dicom_port, "STRANGER", [Verification])
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()


def test_c_move_to_a_destination_the_caller_may_not_use_is_refused(cluster: list[NodeProcess], root: Path,
                                                                   stored: list[datagen.ManifestEntry]) -> None:
    node = cluster[2]
    study_uid = stored[1]["study_uid"]
    moved = root / "moved"
    before = set(moved.rglob("*")) if moved.exists() else set()
    assert move_study(node.dicom_port, "OTHER", study_uid, "STORESCP") == 0xA801  # Not its destination.
    assert move_study(node.dicom_port, "STRANGER", study_uid, "STORESCP") == 0xA801  # Unknown AE.
    assert (set(moved.rglob("*")) if moved.exists() else set()) == before  # Nothing was sent.
    assert "reason=destination-not-allowed" in node.log_text()
    count = sum(1 for e in stored if e["study_uid"] == study_uid)
    assert move_study(node.dicom_port, "VIEWER", study_uid, "STORESCP") == 0
    assert wait_until(lambda: len([p for p in moved.rglob("*") if p.is_file()]) >= len(before) + count, 10)


def test_c_move_to_a_tls_destination(cluster: list[NodeProcess], stored: list[datagen.ManifestEntry],
                                     tls_storescp: tuple[int, Path]) -> None:
    study_uid = stored[2]["study_uid"]
    entries = [e for e in stored if e["study_uid"] == study_uid]
    assert move_study(cluster[1].dicom_port, "VIEWER", study_uid, "TLSSCP") == 0
    out_dir = tls_storescp[1]
    assert wait_until(lambda: len([p for p in out_dir.rglob("*") if p.is_file()]) == len(entries), 10)
    received = sorted(clients.file_dataset_bytes(p) for p in out_dir.rglob("*") if p.is_file())
    assert received == sorted(clients.file_dataset_bytes(Path(e["path"])) for e in entries)


def test_audit_trail_names_who_stored_queried_and_retrieved_a_patient(cluster: list[NodeProcess],
                                                                       stored: list[datagen.ManifestEntry]) -> None:
    patient_id = stored[0]["patient_id"]
    study_uid = stored[0]["study_uid"]
    n2 = cluster[1]
    find_studies(n2.dicom_port, "VIEWER", PatientID=patient_id)
    result = pacsnode("audit", "--data-dir", str(n2.data_dir), "--patient", patient_id, "--since", "1h", "--json")
    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    events = {m["EventIdentification"]["EventID"]["originalText"] for m in messages}
    assert "Query" in events
    # Each node audits what it served: n1 received the stores (over DICOM TLS), with patient and study.
    n1 = cluster[0]
    stores = pacsnode("audit", "--data-dir", str(n1.data_dir), "--patient", patient_id, "--event",
                      "instances-transferred", "--json")
    transfers = [json.loads(line) for line in stores.stdout.splitlines()]
    assert any(t["EventIdentification"]["EventActionCode"] == "C" and study_uid in json.dumps(t) for t in transfers)
    assert all(patient_id in json.dumps(t) or study_uid in json.dumps(t) for t in transfers)
    text = pacsnode("audit", "--data-dir", str(n1.data_dir), "--since", "1h").stdout
    assert "Network Configuration" in text and "Application Start" in text


# --------------------------------------------------------------------------- the README's TLS cluster
def readme_tls_lines() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## A TLS cluster"):]
    block = section[section.index("```sh") + len("```sh"):]
    block = block[:block.index("```")]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_the_readme_tls_cluster_runs_as_written(tmp_path: Path) -> None:
    """Every line of the README's TLS section, run in a shell on free ports."""
    import re

    ports = {port: str(free_port()) for port in ("11112", "11113", "11114", "2762", "2763", "2764",
                                                  "7001", "7002", "7003", "8042", "8043", "8044")}
    lines = [re.sub(r"\b(11112|11113|11114|2762|2763|2764|7001|7002|7003|8042|8043|8044)\b",
                    lambda m: ports[m.group(1)], line)
             for line in readme_tls_lines()]
    spec = datagen.StudySetSpec(patients=1, studies_per_patient=2, series_per_study=1, instances_per_series=2,
                                rows=16, cols=16, seed=5)
    manifest = datagen.write_study_set(spec, tmp_path / "studies")
    (tmp_path / "studies" / "manifest.json").unlink(missing_ok=True)
    # Only this environment's `pacsnode` goes first on PATH: pynetdicom installs a `storescu` of its own.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pacsnode").symlink_to(Path(pacsnode_command()[0]).resolve())
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    started: list[subprocess.Popen[bytes]] = []

    def shell(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    try:
        for line in lines:
            if line.endswith("&"):
                log = open(tmp_path / f"node-{len(started)}.log", "wb")
                started.append(subprocess.Popen(["bash", "-c", "exec " + line[:-1]], cwd=tmp_path, env=env,
                                                stdout=log, stderr=subprocess.STDOUT))
                log.close()
                continue
            if line.startswith("pacsnode status"):
                # Each try is a `pacsnode status` process (~0.5 s of CPU): not back to back while
                # the three nodes are still starting on the same cores.
                assert wait_until(lambda: shell(line).stdout.count(" alive ") == 3, 60, interval_s=0.5), shell(line)
                assert "UNPROTECTED" not in shell(line).stdout
                continue
            result = shell(line)
            assert result.returncode == 0, (line, result.stdout[-2000:], result.stderr[-2000:])
            if line.startswith("findscu"):
                assert all(e["study_uid"] in result.stdout + result.stderr for e in manifest)
            if line.startswith("curl"):  # DICOMweb over HTTPS with the viewer's certificate: every study.
                assert all(e["study_uid"] in result.stdout for e in manifest), result.stdout[-2000:]
            if line.startswith("pacsnode audit"):
                assert "DICOM Instances Transferred" in result.stdout and "Application Start" in result.stdout
        assert all(p.poll() is None for p in started)
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_strict_mode_and_an_unprotected_node_say_so(tmp_path: Path) -> None:
    """No tls_dir: the node starts as before and says it is unprotected. Strict access mode:
    an unknown calling AE title is rejected at association; a known one gets its services only."""
    node = NodeProcess(tmp_path / "s1", node_id="s1",
                       extra_args=["--access-mode", "strict", "--known-ae", "VIEWER=echo,store"]).start()
    try:
        assert wait_until(lambda: "security.unprotected" in node.log_text(), 10)  # Logged once listening.
        assert "HTTP port (DICOMweb)" in node.log_text() and f"http=plain http_port={node.http_port}" in node.log_text()
        http = f"http://127.0.0.1:{node.http_port}"  # Strict mode without TLS: DICOMweb closed, health open.
        assert httpx.get(http + "/dicom-web/studies").status_code == 401 and httpx.get(http + "/healthz").status_code == 200
        result = pacsnode("status", "--node", node.peer_address)
        assert result.returncode == 0 and "UNPROTECTED" in result.stdout
        stranger = associate(node.dicom_port, "STRANGER", [Verification])
        assert stranger.is_rejected and stranger.acceptor.primitive.diagnostic == 3  # Calling AE not recognised.
        viewer = associate(node.dicom_port, "VIEWER", [Verification])
        assert viewer.is_established and viewer.send_c_echo().Status == 0
        viewer.release()
        found, status = find_studies(node.dicom_port, "VIEWER")
        assert status == 0x0124 and not found  # Loopback is not trusted in strict mode.
        assert "reason=service-not-allowed" in node.log_text()
    finally:
        node.stop()


# --------------------------------------------------------------------------- certificate expiry and reload
def served_certificate(port: int, pki: dict[str, Path], verify: bool) -> x509.Certificate:
    """The certificate a TLS port presents to a new connection (the admin's as client certificate)."""
    context = ssl.create_default_context(cafile=str(pki["admin"] / "ca.pem"))
    context.check_hostname = False  # The peer port's certificate names pacsnode-peer; the CA is what we check.
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(pki["admin"] / "cert.pem", pki["admin"] / "key.pem")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((HOST, port), timeout=5) as raw, context.wrap_socket(raw) as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_certificate_reissued_after_expiry_is_presented_after_reload(root: Path, pki: dict[str, Path]) -> None:
    """e1's certificate expires while it runs: its peer port then presents an expired
    certificate, which new connections refuse (connections made before go on: TLS checks a
    certificate at the handshake), and member records e1 signs with it are refused. A
    certificate reissued into its tls_dir and SIGHUP: the peer port presents the new one to
    new connections and the cluster is whole, e1's record re-signed, without a restart."""
    ca.issue(root / "ca", root / "tls-e1", "e1")
    ca.issue(root / "ca", root / "tls-e2", "e2")
    admin = str(pki["admin"])
    nodes: list[NodeProcess] = []
    try:
        for name in ("e1", "e2"):
            seeds = [nodes[0].peer_address] if nodes else []
            nodes.append(NodeProcess(root / name, node_id=name, seeds=seeds,
                                     extra_args=FAST + ["--tls-dir", str(root / f"tls-{name}")]).start())
        e1, e2 = nodes
        assert e1.process is not None
        assert wait_until(lambda: alive_count(e2.peer_address, admin) == 2, 30), e2.log_text()[-3000:]
        # A certificate about to expire (in 8 s), loaded while still valid (independent of start-up time).
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=8)
        ca.issue(root / "ca", root / "tls-e1", "e1", valid_days=1, not_before=expires - datetime.timedelta(days=1))
        short = x509.load_pem_x509_certificate((root / "tls-e1" / "cert.pem").read_bytes())
        os.kill(e1.process.pid, signal.SIGHUP)
        assert wait_until(lambda: served_certificate(e1.peer_port, pki, verify=False).serial_number
                          == short.serial_number, 6), e1.log_text()[-3000:]
        time.sleep(max(0.0, (short.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
                       + 1))
        with pytest.raises(ssl.SSLCertVerificationError):  # Expired: a new connection refuses it.
            served_certificate(e1.peer_port, pki, verify=True)
        ca.issue(root / "ca", root / "tls-e1", "e1")  # Reissued, valid for 825 days.
        new_serial = x509.load_pem_x509_certificate((root / "tls-e1" / "cert.pem").read_bytes()).serial_number
        os.kill(e1.process.pid, signal.SIGHUP)
        assert wait_until(lambda: served_certificate(e1.peer_port, pki, verify=False).serial_number == new_serial,
                          15), e1.log_text()[-3000:]
        assert served_certificate(e1.peer_port, pki, verify=True).serial_number == new_serial
        assert wait_until(lambda: alive_count(e2.peer_address, admin) == 2, 30), e2.log_text()[-3000:]
        assert "security.tls.reloaded" in e1.log_text() and e1.alive
        # While expired, e1's own records (signed with the expired certificate) were refused, for that reason only.
        refused = [line for line in e2.log_text().splitlines() if "membership.update.rejected" in line]
        assert all("reporter=e1 reason=certificate of e1 is not valid now" in line for line in refused), refused
    finally:
        for node in nodes:
            node.stop()
