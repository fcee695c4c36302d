"""Who may use the HTTP port, and the audit trail of DICOMweb requests.

The HTTP counterpart of node/access.py and node/dicom_guard.py. A request is decided from
the path's class, the caller's address and the identity of its client certificate (the
TLS layer has already checked that certificate against the cluster CA, node/http_tls.py):

| path class | allowed when |
| --- | --- |
| `health`: /healthz, /readyz, /metrics | always (monitoring; no patient data) |
| `dicom-web`, `ui`, `api` (everything else) | the caller is on loopback and `loopback_trusted` (not in strict mode); or it sent a certificate of the cluster CA with the dicom-client or admin role; or, with no TLS and not in strict mode, anyone (a plain-HTTP node is unprotected and says so) |

Refusals: 401 without a client certificate, 403 with a certificate of a role that may not
use the port (a node certificate). Each is one log line `http.access.refused address=...
path_class=... reason=...` (never a UID or patient data) and a security-alert audit message.

`HttpAudit` writes QIDO-RS as query, WADO-RS as retrieve (instances transferred or
accessed) and STOW-RS as store messages, like the DIMSE ones, naming the caller's
certificate identity, or its address when it has none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pacsnode.node import ca
from pacsnode.node.access import is_loopback
from pacsnode.node.audit import MINOR_FAILURE, SUCCESS, AuditLog, Participant, Subject, record_delete
from pacsnode.node.ca import CertIdentity
from pacsnode.node.http_tls import client_certificate_pem
from pacsnode.replication.archive import InstanceLocation, WriteResult, WriteStatus
from pacsnode.replication.delete_coordinator import DeleteResult, DeleteScope
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Instance

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
HTTP_ROLES = frozenset({ca.ROLE_DICOM, ca.ROLE_ADMIN})  # Certificates that may use DICOMweb, the page, the API.


def path_class(path: str) -> str:
    """health, dicom-web, api or ui: the bounded name a log line and the policy use."""
    if path in OPEN_PATHS:
        return "health"
    if path == "/dicom-web" or path.startswith("/dicom-web/"):
        return "dicom-web"
    if path.startswith("/api/"):
        return "api"
    return "ui"


@dataclass(frozen=True)
class Caller:
    """Who sent an HTTP request: its address and, over HTTPS, its certificate's identity."""

    address: str
    identity: CertIdentity | None = None

    @property
    def user_id(self) -> str:
        """For the audit trail: `role:name` of the certificate, else the address."""
        return f"{self.identity.role}:{self.identity.name}" if self.identity else self.address

    def participant(self, role: str = "") -> Participant:
        return Participant(self.user_id, self.address, role=role)


class HttpDecision(NamedTuple):
    status: int  # 0: allowed; else 401 or 403.
    reason: str  # Stable word: open, loopback, certificate, no-client-certificate, certificate-role.

    @property
    def allowed(self) -> bool:
        return self.status == 0


class HttpAccess:
    """Decides each HTTP request from (path class, caller). Pure: no I/O."""

    def __init__(self, *, tls: bool, mode: str = "default", loopback_trusted: bool = True) -> None:
        self.tls = tls
        self.strict = mode == "strict"
        self.loopback_trusted = loopback_trusted and not self.strict  # As node/access.py.

    def decide(self, kind: str, caller: Caller) -> HttpDecision:
        if kind == "health":
            return HttpDecision(0, "open")
        if self.loopback_trusted and is_loopback(caller.address):
            return HttpDecision(0, "loopback")
        if caller.identity is not None:
            if caller.identity.role in HTTP_ROLES:
                return HttpDecision(0, "certificate")
            return HttpDecision(403, "certificate-role")
        if self.tls or self.strict:
            return HttpDecision(401, "no-client-certificate")
        return HttpDecision(0, "open")


_IDENTITIES: dict[bytes, CertIdentity | None] = {}
_IDENTITIES_MAX = 1024


def _identity(pem: bytes) -> CertIdentity | None:
    if pem not in _IDENTITIES:
        if len(_IDENTITIES) >= _IDENTITIES_MAX:
            _IDENTITIES.clear()
        _IDENTITIES[pem] = ca.identity_of_pem(pem)
    return _IDENTITIES[pem]


def caller_of_scope(scope: Scope) -> Caller:
    client = scope.get("client")
    address = str(client[0]) if client else ""
    pem = client_certificate_pem(scope)
    return Caller(address, _identity(pem) if pem is not None else None)


def caller_of(request: Request) -> Caller:
    """The caller the guard found (request.state.caller), or one from the connection."""
    caller = getattr(request.state, "caller", None)
    return caller if isinstance(caller, Caller) else caller_of_scope(request.scope)


class HttpGuard:
    """ASGI middleware: decides each request (HttpAccess) and leaves the caller in request.state."""

    def __init__(self, app: ASGIApp, access: HttpAccess, audit: "HttpAudit") -> None:
        self._app = app
        self._access = access
        self._audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        caller = caller_of_scope(scope)
        kind = path_class(scope["path"])
        decision = self._access.decide(kind, caller)
        if decision.allowed:
            scope.setdefault("state", {})["caller"] = caller
            await self._app(scope, receive, send)
            return
        self._audit.refused(caller, kind, str(scope.get("method", "")), decision)
        text = ("a client certificate of the cluster CA is needed" if decision.status == 401
                else "this certificate may not use this port")
        await PlainTextResponse(text + "\n", status_code=decision.status)(scope, receive, send)


class HttpAudit:
    """DICOMweb requests in the audit trail (node/audit.py), as dicom_guard.py writes DIMSE ones."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.refused_count = 0

    def refused(self, caller: Caller, kind: str, method: str, decision: HttpDecision) -> None:
        self.refused_count += 1
        certificate = caller.identity.name if caller.identity else ""
        log.warning("http.access.refused address=%s path_class=%s method=%s certificate=%s reason=%s status=%d",
                    caller.address, kind, method[:16], certificate, decision.reason, decision.status)
        self.audit.record("security-alert", outcome=MINOR_FAILURE, event_type="restricted-function",
                          participants=[caller.participant()],
                          description=f"HTTP {kind} refused: {decision.reason}")

    def tls_refused(self, address: str, reason: str) -> None:
        """A failed HTTPS handshake (logged by node/http_tls.py): a security alert."""
        self.audit.record("security-alert", outcome=MINOR_FAILURE, event_type="node-authentication",
                          participants=[Participant("", address)], description=f"HTTPS handshake failed: {reason}")

    def searched(self, caller: Caller, query: Query, *, matches: int, complete: bool) -> None:
        keys = {condition.keyword: condition.value[:256] for condition in query.conditions}
        self.audit.record("query", action="E", outcome=SUCCESS if complete else MINOR_FAILURE,
                          participants=[caller.participant()],
                          subject=Subject(patient_id=keys.get("PatientID", ""),
                                          study_instance_uids=_uids(keys.get("StudyInstanceUID", "")),
                                          query={"QueryRetrieveLevel": query.level, **keys}),
                          description=f"QIDO-RS {query.level.lower()}: {matches} matches")

    def retrieved(self, caller: Caller, locations: Sequence[InstanceLocation], *, sent: int, outcome: str,
                  what: str) -> None:
        """WADO-RS: `what` is retrieve (instances sent) or metadata, frames, rendered, thumbnail (accessed)."""
        studies = sorted({location.study_instance_uid for location in locations})
        event = "instances-transferred" if what == "retrieve" else "instances-accessed"
        self.audit.record(event, action="R", outcome=outcome, participants=[caller.participant()],
                          subject=Subject(study_instance_uids=studies, instance_count=sent),
                          description=f"WADO-RS {what}: {sent} of {len(locations)} instances")

    def deleted(self, caller: Caller, scope: DeleteScope, result: DeleteResult) -> None:
        """DICOMweb DELETE (node/audit.py record_delete)."""
        record_delete(self.audit, caller.participant(), study_instance_uid=scope.study_instance_uid,
                      level=scope.level, status=result.status.value, instances=result.instances, via="DICOMweb")

    def stored(self, caller: Caller, instance: Instance, result: WriteResult | None) -> None:
        """STOW-RS, one message per instance (as C-STORE); result None: the write raised."""
        succeeded = result is not None and result.status == WriteStatus.SUCCESS
        patient = instance.attributes.get("PatientID")
        self.audit.record("instances-transferred", action="C", outcome=SUCCESS if succeeded else MINOR_FAILURE,
                          participants=[caller.participant(role="Source")],
                          subject=Subject(patient_id=str(patient) if isinstance(patient, str) else "",
                                          study_instance_uids=[instance.study_instance_uid], instance_count=1,
                                          sop_class_uid=instance.sop_class_uid),
                          description=f"STOW-RS {instance.sop_instance_uid}"
                          + ("" if succeeded else f": {result.status if result else 'error'}"))


def _uids(text: str) -> list[str]:
    return [uid for uid in text.split("\\") if uid] if text else []


__all__ = ["Caller", "HttpAccess", "HttpAudit", "HttpDecision", "HttpGuard", "caller_of", "path_class"]
