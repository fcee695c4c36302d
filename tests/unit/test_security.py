"""Unit tests of the security pieces: the CA, TLS directory checks, the peer guard, the
access policy and the audit trail (no processes, no sockets)."""

from __future__ import annotations

import datetime
import json
import os
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from pacsnode.node import audit, ca, tls
from pacsnode.node.access import AccessError, AccessPolicy, KnownAe
from pacsnode.node.config import ConfigError, NodeConfig
from pacsnode.node.security import NodeSecurity


@pytest.fixture
def authority(tmp_path: Path) -> Path:
    ca.init_ca(tmp_path / "ca")
    return tmp_path / "ca"


def test_ca_init_and_issue_write_the_files_with_private_keys(authority: Path, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(authority / "ca-key.pem").st_mode) == 0o600
    identity = ca.issue(authority, tmp_path / "n1", "n1")
    assert identity == ca.CertIdentity("n1", ca.ROLE_NODE)
    for name in ("ca.pem", "cert.pem", "key.pem"):
        assert (tmp_path / "n1" / name).exists()
    assert stat.S_IMODE(os.stat(tmp_path / "n1" / "key.pem").st_mode) == 0o600
    assert tls.TlsFiles(tmp_path / "n1").identity() == identity
    admin = ca.issue(authority, tmp_path / "ops", "ops", admin=True)
    assert admin.is_admin and tls.TlsFiles(tmp_path / "ops").identity() == admin
    issued = [json.loads(line) for line in (authority / ca.ISSUED_LOG).read_text().splitlines()]
    assert [(r["name"], r["role"]) for r in issued] == [("n1", ca.ROLE_NODE), ("ops", ca.ROLE_ADMIN)]
    with pytest.raises(ca.CaError, match="already there"):
        ca.init_ca(authority)
    with pytest.raises(ca.CaError, match="name must be"):
        ca.issue(authority, tmp_path / "bad", "no spaces")


def test_node_tls_files_must_name_this_node_and_be_of_its_ca_and_valid(authority: Path, tmp_path: Path) -> None:
    ca.issue(authority, tmp_path / "n1", "n1")
    assert tls.node_files(str(tmp_path / "n1"), "n1") is not None
    assert tls.node_files("", "n1") is None
    with pytest.raises(tls.TlsError, match="not node 'n2'"):
        tls.node_files(str(tmp_path / "n1"), "n2")
    ca.issue(authority, tmp_path / "ops", "n1", admin=True)
    with pytest.raises(tls.TlsError, match="pacsnode-admin"):
        tls.node_files(str(tmp_path / "ops"), "n1")
    ca.init_ca(tmp_path / "other")
    ca.issue(tmp_path / "other", tmp_path / "foreign", "n1")
    (tmp_path / "foreign" / "ca.pem").write_bytes((authority / "ca.pem").read_bytes())
    with pytest.raises(tls.TlsError, match="was not issued by"):
        tls.node_files(str(tmp_path / "foreign"), "n1")
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=5)
    ca.issue(authority, tmp_path / "old", "n1", valid_days=1, not_before=start)
    with pytest.raises(tls.TlsError, match="not valid now"):
        tls.node_files(str(tmp_path / "old"), "n1")
    with pytest.raises(tls.TlsError, match="cannot read"):
        tls.node_files(str(tmp_path / "missing"), "n1")


def test_a_node_refuses_to_start_with_a_key_others_can_read(authority: Path, tmp_path: Path) -> None:
    ca.issue(authority, tmp_path / "n1", "n1")
    os.chmod(tmp_path / "n1" / "key.pem", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        NodeSecurity(NodeConfig(node_id="n1", data_dir=tmp_path / "data", tls_dir=str(tmp_path / "n1")))


class FakeContext:
    def __init__(self, pem: bytes | None) -> None:
        self._pem = pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._pem]} if self._pem else {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


@pytest.fixture
def contexts(authority: Path, tmp_path: Path) -> dict[str, Any]:
    ca.issue(authority, tmp_path / "n1", "n1")
    ca.issue(authority, tmp_path / "ops", "ops", admin=True)
    ca.issue(authority, tmp_path / "ct", "CT1", dicom_client=True)
    return {name: FakeContext((tmp_path / name / "cert.pem").read_bytes()) for name in ("n1", "ops", "ct")} | {
        "none": FakeContext(None)}


def test_peer_guard_sender_must_be_the_certificates_node(contexts: dict[str, Any]) -> None:
    alerts: list[tuple[str, ...]] = []
    guard = tls.PeerGuard(True, alert=lambda *a: alerts.append(a))
    assert guard.problem("n1", contexts["n1"], "Ping") is None
    assert guard.problem("n2", contexts["n1"], "Ping") == (grpc.StatusCode.PERMISSION_DENIED,
                                                           "certificate of node n1 cannot send as 'n2'")
    assert guard.problem("n1", contexts["none"], "Ping")[1] == "no pacsnode certificate"  # type: ignore[index]
    assert guard.problem("pacsnode-cli", contexts["ops"], "Status") is None
    assert guard.problem("pacsnode-cli", contexts["ops"], "Ping") is not None  # Admins do not gossip.
    assert guard.problem("n1", contexts["ops"], "Status") is not None  # ...nor pose as a node.
    assert guard.problem("CT1", contexts["ct"], "Status") is not None  # DICOM clients stay off the peer port.
    assert guard.refused == 5 and len(alerts) == 5
    assert tls.PeerGuard(False).problem("anyone", contexts["none"], "Ping") is None  # Plain text: as before.


def test_peer_guard_leave_and_join_rules(contexts: dict[str, Any]) -> None:
    guard = tls.PeerGuard(True)
    assert guard.leave_problem(contexts["n1"], target="n2", removing=True, me="n2") is not None
    assert guard.leave_problem(contexts["n1"], target="x", removing=True, me="n2") is not None
    assert guard.leave_problem(contexts["n1"], target="", removing=False, me="n2") is not None
    assert guard.leave_problem(contexts["n1"], target="n1", removing=False, me="n2") is None  # Its own LEFT.
    assert guard.leave_problem(contexts["ops"], target="x", removing=True, me="n2") is None
    assert guard.leave_problem(contexts["ops"], target="", removing=False, me="n2") is None
    assert guard.join_problem("n1", "n1") is None and guard.join_problem("n2", "n1") is not None
    assert tls.PeerGuard(False).leave_problem(contexts["none"], target="", removing=True, me="n2") is None


# --------------------------------------------------------------------------- access control
def test_known_ae_parsing() -> None:
    viewer = KnownAe.parse("VIEWER@10.0.0.5,10.0.0.6=find,get,move-to:WS2")
    assert viewer.hosts == ("10.0.0.5", "10.0.0.6") and viewer.services == {"find", "get"}
    assert viewer.move_to == ("WS2",) and str(viewer) == "VIEWER@10.0.0.5,10.0.0.6=find,get,move-to:WS2"
    assert KnownAe.parse("CT1").services == {"echo", "store", "find", "get", "move"}
    for bad in ("=find", "TOOLONGAETITLE1234", "A=delete"):
        with pytest.raises(AccessError):
            KnownAe.parse(bad)


@pytest.mark.parametrize("mode, loopback, ae, address, service, allowed, reason", [
    ("default", True, "ANY", "127.0.0.1", "find", True, "loopback"),
    ("default", True, "ANY", "10.0.0.9", "echo", True, "open"),
    ("default", True, "ANY", "10.0.0.9", "store", True, "open"),
    ("default", True, "ANY", "10.0.0.9", "find", False, "unknown-ae"),
    ("default", False, "ANY", "127.0.0.1", "get", False, "unknown-ae"),
    ("default", True, "VIEWER", "10.0.0.5", "find", True, "known"),
    ("default", True, "VIEWER", "10.0.0.5", "store", False, "service-not-allowed"),
    ("default", True, "VIEWER", "10.0.0.7", "find", False, "host-mismatch"),
    ("default", True, "VIEWER", "10.0.0.7", "echo", True, "open"),
    ("strict", True, "ANY", "127.0.0.1", "echo", False, "unknown-ae"),
    ("strict", True, "VIEWER", "10.0.0.5", "move", True, "known"),
    ("strict", True, "VIEWER", "10.0.0.7", "echo", False, "host-mismatch"),
])
def test_access_policy(mode: str, loopback: bool, ae: str, address: str, service: str, allowed: bool,
                       reason: str) -> None:
    policy = AccessPolicy((KnownAe.parse("VIEWER@10.0.0.5=echo,find,get,move"),), mode=mode,
                          loopback_trusted=loopback)
    assert policy.allows(ae, address, service) == (allowed, reason)


def test_move_destinations() -> None:
    policy = AccessPolicy((KnownAe.parse("VIEWER=move"), KnownAe.parse("WS=move,move-to:VIEWER"),
                           KnownAe.parse("HUB=move,move-to:*")), destinations=("VIEWER", "WS", "PRINTER"))
    assert policy.allows_move("VIEWER", "10.0.0.5", "VIEWER").allowed  # To itself.
    assert policy.allows_move("VIEWER", "10.0.0.5", "WS") == (False, "destination-not-allowed")
    assert policy.allows_move("WS", "10.0.0.6", "VIEWER").allowed
    assert policy.allows_move("HUB", "10.0.0.7", "PRINTER").allowed
    assert policy.allows_move("HUB", "10.0.0.7", "NOWHERE") == (False, "unknown-destination")
    assert policy.allows_move("ANY", "127.0.0.1", "PRINTER") == (True, "loopback")
    assert policy.allows_move("ANY", "10.0.0.8", "PRINTER") == (False, "unknown-ae")


# --------------------------------------------------------------------------- audit trail
def test_audit_messages_are_a5_shaped_and_selected_by_patient_and_time(tmp_path: Path) -> None:
    log = audit.AuditLog(tmp_path / "audit.jsonl", "n1")
    log.record("instances-transferred", action="C", participants=[audit.Participant("CT1", "10.0.0.1")],
               subject=audit.Subject(patient_id="P1", study_instance_uids=["1.2.3"], instance_count=1))
    log.record("instances-transferred", action="R", participants=[audit.Participant("VIEWER", "10.0.0.2")],
               subject=audit.Subject(study_instance_uids=["1.2.3"], instance_count=4))  # By study only.
    log.record("query", participants=[audit.Participant("VIEWER", "10.0.0.2")],
               subject=audit.Subject(patient_id="P2", query={"PatientID": "P2"}))
    log.close()
    messages = list(audit.read(tmp_path / "audit.jsonl"))
    assert len(messages) == 3
    first = messages[0]
    assert set(first) == {"EventIdentification", "ActiveParticipant", "AuditSourceIdentification",
                          "ParticipantObjectIdentification"}
    assert first["EventIdentification"]["EventID"] == {"csd-code": "110104", "codeSystemName": "DCM",
                                                       "originalText": "DICOM Instances Transferred"}
    assert first["AuditSourceIdentification"]["AuditSourceID"] == "n1"
    about_p1 = audit.select(messages, patient_id="P1")
    assert [m["EventIdentification"]["EventActionCode"] for m in about_p1] == ["C", "R"]  # The retrieve, too.
    assert len(audit.select(messages, patient_id="P2", event="query")) == 1
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    assert audit.select(messages, since=future) == []
    assert "VIEWER" in audit.render(about_p1)
    assert audit.parse_since("2h") < datetime.datetime.now(datetime.timezone.utc)
    with pytest.raises(ValueError):
        audit.parse_since("yesterday")
