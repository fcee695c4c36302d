"""Checks on an A-ASSOCIATE-RQ before pynetdicom negotiates it, and the one-line
protocol events the DICOM front end logs.

pynetdicom 3.0.4 accepts a request with an unknown application context name or with no
presentation context at all, and its reactor thread dies with a traceback on an even or
duplicate presentation context ID (PS3.8 9.3.2.2: IDs are odd, 1-255, unique). The
acceptor (node/acceptor.py) runs `check_request` on every decoded A-ASSOCIATE-RQ PDU;
a request that fails is answered with the A-ASSOCIATE-RJ named here, as dcmtk and
Orthanc do, and never reaches pynetdicom's negotiation.

Every event line is `<stable name> key=value ...` with the peer address and the AE titles
(never patient data: an association carries none before its first DIMSE message).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_items import PresentationContextItemRQ

log = logging.getLogger(__name__)

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4): result, source, reason/diag.
RESULT_PERMANENT = 0x01
RESULT_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_PROVIDER_ACSE = 0x02
SOURCE_PROVIDER_PRESENTATION = 0x03

# A-ABORT reasons when the source is the service provider (PS3.8 table 9-26).
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER_VALUE = 0x06


class RejectReason(enum.StrEnum):
    """Why an association request was rejected; the `reason=` of dicom.association.rejected."""

    APPLICATION_CONTEXT = "application-context-not-supported"
    NO_PRESENTATION_CONTEXT = "no-presentation-context"
    PRESENTATION_CONTEXT_ID = "invalid-presentation-context-id"
    MALFORMED = "malformed-request"
    BUSY = "busy"
    CALLED_AE_TITLE = "called-ae-title-not-recognized"
    CALLING_AE_TITLE = "calling-ae-title-not-recognized"
    USER_IDENTITY = "user-identity-not-verified"
    PROTOCOL_VERSION = "protocol-version-not-supported"
    OTHER = "other"


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ to send: (result, source, diagnostic) and why."""

    reason: RejectReason
    result: int
    source: int
    diagnostic: int

    @classmethod
    def permanent(cls, reason: RejectReason, diagnostic: int = 0x01) -> "Rejection":
        return cls(reason, RESULT_PERMANENT, SOURCE_SERVICE_USER, diagnostic)


# The reject pynetdicom itself sends, mapped back to a reason for the log line.
_PYNETDICOM_REJECTIONS = {
    (SOURCE_PROVIDER_PRESENTATION, 0x02): RejectReason.BUSY,
    (SOURCE_PROVIDER_PRESENTATION, 0x01): RejectReason.BUSY,
    (SOURCE_SERVICE_USER, 0x07): RejectReason.CALLED_AE_TITLE,
    (SOURCE_SERVICE_USER, 0x03): RejectReason.CALLING_AE_TITLE,
    (SOURCE_SERVICE_USER, 0x02): RejectReason.APPLICATION_CONTEXT,
    (SOURCE_PROVIDER_ACSE, 0x01): RejectReason.USER_IDENTITY,
    (SOURCE_PROVIDER_ACSE, 0x02): RejectReason.PROTOCOL_VERSION,
}


def reason_of(source: int | None, diagnostic: int | None) -> RejectReason:
    return _PYNETDICOM_REJECTIONS.get((source or 0, diagnostic or 0), RejectReason.OTHER)


def check_request(pdu: A_ASSOCIATE_RQ) -> Rejection | None:
    """The rejection this A-ASSOCIATE-RQ deserves, or None if negotiation may go ahead.

    A protocol version other than 1 is rejected here (permanent, ACSE provider, protocol
    version not supported, PS3.8 9.3.4) like every other bad request, with one log line:
    the request's version field is then set to 1 so that pynetdicom's AE-6, which would
    reject it too but with an ERROR line of its own, hands it to EVT_REQUESTED."""
    if pdu.protocol_version != 0x0001:
        pdu.protocol_version = 0x0001
        return Rejection(RejectReason.PROTOCOL_VERSION, RESULT_PERMANENT, SOURCE_PROVIDER_ACSE, 0x02)
    if str(pdu.application_context_name or "") != DICOM_APPLICATION_CONTEXT:
        return Rejection.permanent(RejectReason.APPLICATION_CONTEXT, diagnostic=0x02)
    contexts = pdu.presentation_context
    if not contexts:
        return Rejection.permanent(RejectReason.NO_PRESENTATION_CONTEXT)
    seen: set[int] = set()
    for item in contexts:
        context_id = item.presentation_context_id
        if context_id is None or context_id % 2 == 0 or not 1 <= context_id <= 255 or context_id in seen:
            return Rejection.permanent(RejectReason.PRESENTATION_CONTEXT_ID)
        seen.add(context_id)
    try:
        pdu.to_primitive()
    except Exception:  # Whatever else pynetdicom cannot turn into a request primitive.
        return Rejection.permanent(RejectReason.MALFORMED)
    return None


def make_negotiable(pdu: A_ASSOCIATE_RQ) -> bool:
    """Drop the presentation context items of a request that will be rejected, so that
    pynetdicom can still build the A-ASSOCIATE indication the rejection answers.
    Returns False when even that is impossible (the caller aborts instead)."""
    pdu.variable_items = [item for item in pdu.variable_items if not isinstance(item, PresentationContextItemRQ)]
    try:
        pdu.to_primitive()
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------- events
def peer_fields(assoc: Any, titles: tuple[str, str] | None = None) -> str:
    """`address=... calling_ae_title=... called_ae_title=...` of an association, as far as
    known (`titles`: (calling, called) when the request is not yet on the association)."""
    try:
        address_info = assoc.requestor.address_info
        address = f"{address_info.address}:{address_info.port}"
    except Exception:
        address = "unknown"
    calling = called = ""
    try:
        primitive = assoc.requestor.primitive
        if titles is not None:
            calling, called = (str(t or "").strip() for t in titles)
        elif primitive is not None:
            calling = str(primitive.calling_ae_title or "").strip()
            called = str(primitive.called_ae_title or "").strip()
    except Exception:
        pass
    return f"address={address} calling_ae_title={_token(calling)} called_ae_title={_token(called)}"


def _token(text: str) -> str:
    """An AE title as one log token: printable, no spaces, '-' when empty."""
    cleaned = "".join(c if 0x21 <= ord(c) < 0x7F else "_" for c in text)[:16]
    return cleaned or "-"


def log_event(level: int, name: str, assoc: Any, *, titles: tuple[str, str] | None = None, **fields: Any) -> None:
    """One protocol event line: the stable name, the peer, then `key=value` fields."""
    extra = " ".join(f"{key}={value}" for key, value in fields.items())
    log.log(level, "%s %s%s", name, peer_fields(assoc, titles), f" {extra}" if extra else "")


# ----------------------------------------------------------------------------- handlers
def on_requested(event: Any) -> None:
    """EVT_REQUESTED: reject a request that check_request found wanting (the acceptor's
    reader stored the verdict on the association before pynetdicom saw the request)."""
    assoc = event.assoc
    rejection: Rejection | None = getattr(assoc, "rejection", None)
    if rejection is None:
        return
    log_event(logging.WARNING, "dicom.association.rejected", assoc, reason=rejection.reason.value,
              result=rejection.result, source=rejection.source, diagnostic=rejection.diagnostic)
    assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
    assoc.kill()  # As pynetdicom's own rejections: wait until the A-ASSOCIATE-RJ is out.


def on_rejected(event: Any) -> None:
    """EVT_REJECTED: pynetdicom rejected the request itself (busy, called AE title...)."""
    assoc = event.assoc
    primitive = assoc.acceptor.primitive
    source = getattr(primitive, "result_source", None)
    diagnostic = getattr(primitive, "diagnostic", None)
    reason = reason_of(source, diagnostic)
    fields: dict[str, Any] = {"reason": reason.value, "result": getattr(primitive, "result", None),
                              "source": source, "diagnostic": diagnostic}
    if reason is RejectReason.BUSY:
        active = len([a for a in assoc.ae.active_associations if a.is_acceptor])
        fields.update(active_associations=active, max_associations=assoc.ae.maximum_associations)
    log_event(logging.WARNING, "dicom.association.rejected", assoc, **fields)
