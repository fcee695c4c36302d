"""Access control and the audit trail around the DICOM front end's handlers.

`DicomGuard.wrap(handlers)` takes the front end's (event, handler) list and returns one in
which each DIMSE handler first asks the access policy (node/access.py) and answers a
refusal itself, and whose requests are written to the audit trail (node/audit.py). The
handlers themselves are unchanged. `DicomGuard.archive(archive)` wraps the front end's
Archive so that a store is audited with the patient and study it names, without reading
the dataset a second time.

Refusals: C-ECHO, C-STORE, C-FIND and C-GET answer 0x0124 (Refused: Not Authorized);
C-MOVE answers 0xA801 (Move Destination Unknown): pynetdicom's C-MOVE service sends no
other refusal before it opens the sub-association, and the caller learns nothing about
which destinations exist. In strict mode an unknown calling AE title is rejected at
association time (A-ASSOCIATE-RJ, reason 3: calling AE title not recognised).
Each refusal is one log line with AE title, address and reason, never patient data.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

from pydicom.dataset import Dataset
from pynetdicom import evt

from pacsnode.node import identifier as request_identifier
from pacsnode.node.access import AccessPolicy, KnownAe
from pacsnode.node.audit import MAJOR_FAILURE, MINOR_FAILURE, SUCCESS, AuditLog, Participant, Subject
from pacsnode.replication.archive import InstanceLocation, RetrievePlan, WriteResult, WriteStatus
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes, Instance

log = logging.getLogger(__name__)

STATUS_NOT_AUTHORIZED = 0x0124
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
# An association's received instances are audited per study when its connection closes;
# one that stays open longer writes what it received at its next store after this long.
TRANSFER_FLUSH_S = 60.0

_SERVICE_OF = {
    evt.EVT_C_ECHO: "echo",
    evt.EVT_C_STORE: "store",
    evt.EVT_C_FIND: "find",
    evt.EVT_C_GET: "get",
    evt.EVT_C_MOVE: "move",
    evt.EVT_N_ACTION: "store",  # Storage Commitment: asked by whoever may store.
}


def _refusal(comment: str) -> Dataset:
    status = Dataset()
    status.Status = STATUS_NOT_AUTHORIZED
    status.ErrorComment = comment[:64]
    return status


def _caller(event: Any) -> tuple[str, str]:
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)


def _identifier_keys(event: Any) -> dict[str, str]:
    """The non-empty keys of a query or retrieve identifier (for the audit trail only)."""
    keys: dict[str, str] = {}
    try:
        # Read from its bytes when that can be done for certain (node/identifier.py: no
        # pydicom Dataset; the C-FIND handler reuses it), else pydicom's Dataset.
        fast = request_identifier.of_request(event)
        for element in (fast if fast is not None else event.identifier):
            if element.keyword and element.VR != "SQ" and element.value not in (None, "", b""):
                keys[element.keyword] = str(element.value)[:256]
    except Exception:  # An undecodable identifier: the handler answers it; audit what we have.
        pass
    return keys


_ROWS_SENT = "_pacsnode_find_rows_sent"


def count_sent_row(event: Any) -> None:
    """A C-FIND handler sent a Pending response itself (node/dicom.py through the
    association's send_find_row) instead of yielding it: the audit trail's match count
    (`guarded`, which counts the yielded ones) includes it."""
    setattr(event, _ROWS_SENT, getattr(event, _ROWS_SENT, 0) + 1)


class _TransferKey(NamedTuple):
    study_instance_uid: str
    patient_id: str
    sop_class_uid: str
    failure: str  # "" when stored; else the WriteStatus name.


@dataclass
class _Transfers:
    """The instances one association stored, not yet written to the audit trail."""

    ae_title: str
    address: str
    since: float
    counts: dict[_TransferKey, int] = field(default_factory=dict)
    closed: bool = False


class _Request(threading.local):
    """The DICOM request running on this association thread (for the audited archive)."""

    assoc: Any = None
    ae_title = ""
    address = ""
    studies: dict[str, str]  # study uid -> patient id (when the query named one)
    instances = 0


class DicomGuard:
    def __init__(self, policy: AccessPolicy, audit: AuditLog) -> None:
        self.policy = policy
        self.audit = audit
        self._request = _Request()
        self.refused = 0
        self._transfers: "weakref.WeakKeyDictionary[Any, _Transfers]" = weakref.WeakKeyDictionary()
        self._transfers_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any, audit: AuditLog | None) -> "DicomGuard":
        policy = AccessPolicy(tuple(config.known_aes), mode=config.access_mode,
                              loopback_trusted=config.loopback_trusted,
                              destinations=tuple(d.ae_title for d in config.destinations))
        return cls(policy, audit or AuditLog(None, config.node_id))

    def configure(self, ae: Any) -> None:
        """Strict mode: unknown calling AE titles are rejected at association time."""
        if self.policy.strict:
            ae.require_calling_aet = self.policy.known_titles()

    def archive(self, archive: Any) -> "AuditedArchive":
        return AuditedArchive(archive, self)

    # ------------------------------------------------------------------ wrapping
    def wrap(self, handlers: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        wrapped: list[tuple[Any, Any]] = []
        for event, handler in handlers:
            service = _SERVICE_OF.get(event)
            if event == evt.EVT_N_ACTION:
                wrapped.append((event, self._action("store", handler)))
            elif service == "echo" or service == "store":
                wrapped.append((event, self._plain(service, handler)))
            elif service == "find":
                wrapped.append((event, self._find(handler)))
            elif service == "get":
                wrapped.append((event, self._retrieve("get", handler)))
            elif service == "move":
                wrapped.append((event, self._retrieve("move", handler)))
            else:
                wrapped.append((event, handler))
        wrapped += [
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._flush_transfers),
        ]
        return wrapped

    def _check(self, event: Any, service: str) -> str | None:
        """None when allowed; else the refusal reason (logged and audited here)."""
        ae_title, address = _caller(event)
        decision = self.policy.allows(ae_title, address, service)
        if decision.allowed:
            return None
        self._refused(service, ae_title, address, decision.reason)
        return decision.reason

    def _refused(self, service: str, ae_title: str, address: str, reason: str) -> None:
        self.refused += 1
        log.warning("dicom.access.refused service=%s calling_ae_title=%s address=%s reason=%s",
                    service, ae_title, address, reason)
        self.audit.record("security-alert", outcome=MINOR_FAILURE, event_type="restricted-function",
                          participants=[Participant(ae_title, address)],
                          description=f"{service} refused: {reason}")

    def _begin(self, event: Any) -> None:
        request = self._request
        request.assoc = event.assoc
        request.ae_title, request.address = _caller(event)
        request.studies = {}
        request.instances = 0

    def _plain(self, service: str, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        @functools.wraps(handler)
        def guarded(event: Any) -> Any:
            reason = self._check(event, service)
            if reason is not None:
                return _refusal(f"not authorized: {reason}")
            self._begin(event)
            return handler(event)

        return guarded

    def _action(self, service: str, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """An N-ACTION handler answers (status, reply): the refusal too."""
        @functools.wraps(handler)
        def guarded(event: Any) -> Any:
            reason = self._check(event, service)
            if reason is not None:
                return _refusal(f"not authorized: {reason}"), None
            self._begin(event)
            return handler(event)

        return guarded

    def _find(self, handler: Callable[[Any], Iterator[Any]]) -> Callable[[Any], Iterator[Any]]:
        @functools.wraps(handler)
        def guarded(event: Any) -> Iterator[Any]:
            reason = self._check(event, "find")
            if reason is not None:
                yield _refusal(f"not authorized: {reason}"), None
                return
            self._begin(event)
            ae_title, address = _caller(event)
            keys = _identifier_keys(event)
            matches, final = 0, SUCCESS
            try:
                for status, identifier in handler(event):
                    if status == 0xFF00:
                        matches += 1
                    elif not isinstance(status, int) or status not in (0x0000, 0xFE00):
                        final = MINOR_FAILURE
                    yield status, identifier
            except GeneratorExit:
                raise
            except Exception:
                final = MAJOR_FAILURE
                raise
            finally:
                self.audit.record("query", action="E", outcome=final,
                                  participants=[Participant(ae_title, address)],
                                  subject=Subject(patient_id=keys.get("PatientID", ""),
                                                  study_instance_uids=_uids(keys.get("StudyInstanceUID", "")),
                                                  query=keys, sop_class_uid=str(event.request.AffectedSOPClassUID)),
                                  description=f"{matches + getattr(event, _ROWS_SENT, 0)} matches")

        return guarded

    def _retrieve(self, service: str, handler: Callable[[Any], Iterator[Any]]) -> Callable[[Any], Iterator[Any]]:
        @functools.wraps(handler)
        def guarded(event: Any) -> Iterator[Any]:
            ae_title, address = _caller(event)
            destination = str(event.move_destination or "").strip() if service == "move" else ""
            reason = self._check(event, service)
            if reason is None and service == "move":
                decision = self.policy.allows_move(ae_title, address, destination)
                if not decision.allowed:
                    reason = decision.reason
                    if reason != "unknown-destination":  # The handler logs an unknown one itself.
                        self._refused(f"move to {destination}", ae_title, address, reason)
            if reason is not None:
                if service == "move":
                    yield None, None  # 0xA801
                else:
                    yield 1
                    yield _refusal(f"not authorized: {reason}"), None
                return
            self._begin(event)
            keys = _identifier_keys(event)
            outcome = SUCCESS
            try:
                yield from handler(event)
            except GeneratorExit:
                raise
            except Exception:
                outcome = MAJOR_FAILURE
                raise
            finally:
                participants = [Participant(ae_title, address)]
                if destination:
                    participants.append(Participant(destination, requestor=False, role="Destination"))
                studies = getattr(self._request, "studies", {}) or {}
                self.audit.record("instances-transferred", action="R", outcome=outcome, participants=participants,
                                  subject=Subject(patient_id=keys.get("PatientID", ""),
                                                  study_instance_uids=sorted(studies) or _uids(
                                                      keys.get("StudyInstanceUID", "")),
                                                  instance_count=self._request.instances),
                                  description=f"C-{service.upper()}" + (f" to {destination}" if destination else ""))

        return guarded

    # ------------------------------------------------------------------ association events
    def _on_established(self, event: Any) -> None:
        ae_title, address = _caller(event)
        self.audit.record("user-authentication", event_type="login", participants=[Participant(ae_title, address)],
                          description=f"association to {str(event.assoc.acceptor.ae_title).strip()}")

    def _on_rejected(self, event: Any) -> None:
        # The acceptor logs the rejection, with its reason (node/association_guard.py); here
        # it goes to the audit trail only.
        ae_title, address = _caller(event)
        self.audit.record("user-authentication", outcome=MINOR_FAILURE, event_type="login",
                          participants=[Participant(ae_title, address)], description="association rejected")

    def _on_closed(self, event: Any) -> None:
        ae_title, address = _caller(event)
        self.audit.record("user-authentication", event_type="logout", participants=[Participant(ae_title, address)])

    def tls_refused(self, address: str, reason: str) -> None:
        self.audit.record("security-alert", outcome=MINOR_FAILURE, event_type="node-authentication",
                          participants=[Participant("", address)], description=f"DICOM TLS handshake failed: {reason}")

    # ------------------------------------------------------------------ archive calls
    def stored(self, assoc: Any, instance: Instance, result: WriteResult) -> None:
        """Count a C-STORE towards its association's transfer of that study (written when
        the connection closes, or after `TRANSFER_FLUSH_S`): one DICOM Instances Transferred
        message per study, SOP class and outcome, as PS3.15 A.5.3.7 describes a transfer."""
        patient = instance.attributes.get("PatientID")
        key = _TransferKey(instance.study_instance_uid, str(patient) if isinstance(patient, str) else "",
                           instance.sop_class_uid, "" if result.status == WriteStatus.SUCCESS else str(result.status))
        if assoc is None:  # Not from a DICOM association's handler: nothing to gather it with.
            self._write_transfers(_Transfers(self._request.ae_title, self._request.address, 0.0), {key: 1})
            return
        now = time.monotonic()
        with self._transfers_lock:
            transfers = self._transfers.get(assoc)
            if transfers is None:
                transfers = self._transfers[assoc] = _Transfers(self._request.ae_title, self._request.address, now)
            if transfers.closed:  # Answered after its connection closed: written at once.
                due = {key: 1}
            else:
                transfers.counts[key] = transfers.counts.get(key, 0) + 1
                if now - transfers.since < TRANSFER_FLUSH_S:
                    return
                due, transfers.counts, transfers.since = transfers.counts, {}, now
        self._write_transfers(transfers, due)

    def association(self) -> Any:
        """The association whose request runs on this thread (None outside a DICOM handler)."""
        return self._request.assoc

    def _flush_transfers(self, event: Any) -> None:
        """The connection closed (released, aborted, dropped or timed out): write its transfers."""
        with self._transfers_lock:
            transfers = self._transfers.get(event.assoc)
            if transfers is None:
                ae_title, address = _caller(event)
                self._transfers[event.assoc] = _Transfers(ae_title, address, 0.0, closed=True)
                return
            due, transfers.counts, transfers.closed = transfers.counts, {}, True
        self._write_transfers(transfers, due)

    def _write_transfers(self, transfers: "_Transfers", due: dict["_TransferKey", int]) -> None:
        for key, count in due.items():
            self.audit.record("instances-transferred", action="C",
                              outcome=MINOR_FAILURE if key.failure else SUCCESS,
                              participants=[Participant(transfers.ae_title, transfers.address, role="Source")],
                              subject=Subject(patient_id=key.patient_id, study_instance_uids=[key.study_instance_uid],
                                              instance_count=count, sop_class_uid=key.sop_class_uid),
                              description=f"C-STORE {count} instances" + (f": {key.failure}" if key.failure else ""))

    def located(self, locations: list[InstanceLocation]) -> None:
        request = self._request
        request.studies = {location.study_instance_uid: "" for location in locations}
        request.instances = len(locations)


def _uids(text: str) -> list[str]:
    return [u for u in text.split("\\") if u] if text else []


class AuditedArchive:
    """The front end's Archive with stores and retrieves reported to the guard."""

    def __init__(self, archive: Any, guard: DicomGuard) -> None:
        self._archive = archive
        self._guard = guard

    def store(self, instance: Instance) -> WriteResult:
        result: WriteResult = self._archive.store(instance)
        self._guard.stored(self._guard.association(), instance, result)
        return result

    def find(self, query: Query, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Attributes]:
        return self._archive.find(query, is_cancelled)  # type: ignore[no-any-return]

    def locate(self, query: Query) -> RetrievePlan:
        plan: RetrievePlan = self._archive.locate(query)
        self._guard.located(plan.locations)
        return plan

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        return self._archive.read(location)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._archive, name)


__all__ = ["AuditedArchive", "DicomGuard", "KnownAe"]
