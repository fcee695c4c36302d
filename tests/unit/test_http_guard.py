"""The HTTP port's access rules (node/http_guard.py), table-driven, and the guard in an app."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.middleware import Middleware
from starlette.testclient import TestClient

from pacsnode.node.audit import AuditLog
from pacsnode.node.ca import ROLE_ADMIN, ROLE_DICOM, ROLE_NODE, CertIdentity
from pacsnode.node.http_guard import Caller, HttpAccess, HttpAudit, HttpGuard, path_class

VIEWER = CertIdentity("CT1", ROLE_DICOM)
ADMIN = CertIdentity("ops", ROLE_ADMIN)
NODE = CertIdentity("n2", ROLE_NODE)


@pytest.mark.parametrize("path, kind", [
    ("/healthz", "health"), ("/readyz", "health"), ("/metrics", "health"),
    ("/dicom-web/studies", "dicom-web"), ("/dicom-web", "dicom-web"), ("/api/cluster", "api"),
    ("/ui/", "ui"), ("/", "ui"), ("/viewer/index.html", "ui"), ("/healthz/../dicom-web", "ui"),
    ("/dicom-webx", "ui"),
])
def test_path_classes(path: str, kind: str) -> None:
    assert path_class(path) == kind


@pytest.mark.parametrize("tls, mode, loopback_trusted, kind, address, identity, expected", [
    # Health, readiness and metrics are open to anyone, whatever the mode.
    (True, "strict", False, "health", "10.0.0.9", None, (0, "open")),
    # Plain HTTP, default mode: open (the node says it is unprotected).
    (False, "default", True, "dicom-web", "10.0.0.9", None, (0, "open")),
    (False, "default", True, "dicom-web", "127.0.0.1", None, (0, "loopback")),
    # TLS, default mode: loopback trusted; elsewhere a certificate of the right role.
    (True, "default", True, "dicom-web", "::1", None, (0, "loopback")),
    (True, "default", True, "dicom-web", "10.0.0.9", None, (401, "no-client-certificate")),
    (True, "default", True, "ui", "10.0.0.9", None, (401, "no-client-certificate")),
    (True, "default", True, "api", "10.0.0.9", VIEWER, (0, "certificate")),
    (True, "default", True, "dicom-web", "10.0.0.9", ADMIN, (0, "certificate")),
    (True, "default", True, "dicom-web", "10.0.0.9", NODE, (403, "certificate-role")),
    (True, "default", False, "dicom-web", "127.0.0.1", None, (401, "no-client-certificate")),
    # Strict mode trusts no address, with or without TLS.
    (True, "strict", True, "dicom-web", "127.0.0.1", None, (401, "no-client-certificate")),
    (False, "strict", True, "dicom-web", "127.0.0.1", None, (401, "no-client-certificate")),
    (True, "strict", True, "dicom-web", "127.0.0.1", VIEWER, (0, "certificate")),
    (True, "strict", True, "dicom-web", "127.0.0.1", NODE, (403, "certificate-role")),
])
def test_decisions(tls: bool, mode: str, loopback_trusted: bool, kind: str, address: str,
                   identity: CertIdentity | None, expected: tuple[int, str]) -> None:
    access = HttpAccess(tls=tls, mode=mode, loopback_trusted=loopback_trusted)
    assert tuple(access.decide(kind, Caller(address, identity))) == expected


def test_the_guard_refuses_logs_and_audits(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    audit = HttpAudit(AuditLog(tmp_path / "audit.jsonl", "n1"))

    async def page(request):  # type: ignore[no-untyped-def]
        return PlainTextResponse(request.state.caller.user_id)

    app = Starlette(routes=[Route("/healthz", page), Route("/dicom-web/studies", page)],
                    middleware=[Middleware(HttpGuard, access=HttpAccess(tls=True), audit=audit)])
    client = TestClient(app)  # Its client address, "testclient", is not loopback.
    assert client.get("/healthz").text == "testclient"
    refused = client.get("/dicom-web/studies?PatientID=SECRET")
    assert refused.status_code == 401
    assert audit.refused_count == 1
    line = next(r.getMessage() for r in caplog.records if "http.access.refused" in r.getMessage())
    assert "path_class=dicom-web" in line and "reason=no-client-certificate" in line and "SECRET" not in line
    assert "HTTP dicom-web refused" in (tmp_path / "audit.jsonl").read_text()
