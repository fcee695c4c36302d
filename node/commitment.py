"""Storage Commitment Push Model SCP (PS3.4 Annex J) on the DICOM front end.

A modality sends N-ACTION (Request Storage Commitment: a Transaction UID and the
Referenced SOP Sequence of the instances it sent). The node answers the N-ACTION at once
(Success: the request is taken), then checks through the coordinator that every listed
instance is durable on all N owners of its study (replication/commitment.py; it waits up
to `storage_commitment_timeout_s` for missing copies), and sends the result as
N-EVENT-REPORT: event type 1 when every instance is committed, 2 with the Failed SOP
Sequence otherwise (Failure Reason 0x0112 no such object instance, 0x0119 class/instance
conflict, 0x0110 processing failure: fewer than N copies in time).

The report goes on the requesting association while it is still open; else on a new
association to the requesting AE, whose address is its entry in the C-MOVE destination
table (`destinations`), proposing the Storage Commitment Push Model with the SCP role
(SCP/SCU role selection, PS3.4 J.3.3). An AE that is not in that table cannot be
reached: the node logs `dicom.commitment.report_undeliverable` with its AE title.

pynetdicom public API only: the EVT_N_ACTION handler, Association.send_n_event_report,
AE.associate with build_context / build_role.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, build_role

from pacsnode.node.config import Destination, NodeConfig
from pacsnode.replication.commitment import CommitResult, CommitSettings, FailureReason, Reference

log = logging.getLogger(__name__)

SOP_CLASS_UID = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
SOP_INSTANCE_UID = "1.2.840.10008.1.20.1.1"  # Its well-known SOP Instance
TRANSFER_SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
ACTION_REQUEST_COMMITMENT = 1
EVENT_ALL_COMMITTED = 1
EVENT_SOME_FAILED = 2

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_INSTANCE = 0x0112
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_MISSING_ATTRIBUTE = 0x0120
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_RESOURCE_LIMITATION = 0x0213

FAILURE_REASONS = {  # PS3.4 J.3.3.1.1.3 Failure Reason
    FailureReason.NO_SUCH_INSTANCE: 0x0112,
    FailureReason.CLASS_CONFLICT: 0x0119,
    FailureReason.NOT_ON_ALL_OWNERS: 0x0110,
}

TRANSACTIONS_MAX = 32  # Commitments being checked at once on this node; more get 0x0213.
REFERENCES_MAX = 10_000  # Instances in one request; more get 0x0115.
REPORT_ATTEMPTS = 3  # New associations tried to deliver one report.
REPORT_RETRY_S = 10.0  # Between two of them.
# Wait for the response to a report sent on the requesting association. A modality that
# released its association just as the report went out never answers (pynetdicom ignores
# requests during release); the report then goes on a new association after this long.
SAME_ASSOCIATION_RESPONSE_S = 10.0


class InvalidRequest(Exception):
    """An N-ACTION the node cannot take; `status` is the N-ACTION status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_request(action_type_id: Any, requested_sop_instance_uid: Any,
                  information: Dataset | None) -> tuple[str, list[Reference]]:
    """(Transaction UID, references) of a Request Storage Commitment; raises InvalidRequest."""
    if action_type_id != ACTION_REQUEST_COMMITMENT:
        raise InvalidRequest(STATUS_NO_SUCH_ACTION, "only action type 1 (request commitment)")
    if str(requested_sop_instance_uid or "") != SOP_INSTANCE_UID:
        raise InvalidRequest(STATUS_NO_SUCH_INSTANCE, "requested SOP instance is not 1.2.840.10008.1.20.1.1")
    if information is None:
        raise InvalidRequest(STATUS_MISSING_ATTRIBUTE, "no action information")
    transaction_uid = str(information.get("TransactionUID", "") or "").strip()
    if not transaction_uid:
        raise InvalidRequest(STATUS_MISSING_ATTRIBUTE, "missing Transaction UID")
    items = information.get("ReferencedSOPSequence")
    if not items:
        raise InvalidRequest(STATUS_MISSING_ATTRIBUTE, "missing or empty Referenced SOP Sequence")
    if len(items) > REFERENCES_MAX:
        raise InvalidRequest(STATUS_INVALID_ARGUMENT, f"more than {REFERENCES_MAX} referenced instances")
    references = []
    for item in items:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not sop_class or not sop_instance:
            raise InvalidRequest(STATUS_MISSING_ATTRIBUTE, "a Referenced SOP item lacks its class or instance UID")
        references.append(Reference(sop_class, sop_instance))
    return transaction_uid, references


def event_report(transaction_uid: str, result: CommitResult, retrieve_ae_title: str) -> tuple[int, Dataset]:
    """(Event Type ID, Event Information) of the N-EVENT-REPORT for `result` (PS3.4 J.3.3.1.1)."""
    info = Dataset()
    info.TransactionUID = transaction_uid
    info.RetrieveAETitle = retrieve_ae_title
    if result.committed:
        info.ReferencedSOPSequence = [_item(reference) for reference in result.committed]
    if not result.failed:
        return EVENT_ALL_COMMITTED, info
    failed = []
    for reference, reason in result.failed:
        item = _item(reference)
        item.FailureReason = FAILURE_REASONS[reason]
        failed.append(item)
    info.FailedSOPSequence = failed
    return EVENT_SOME_FAILED, info


def _item(reference: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class_uid
    item.ReferencedSOPInstanceUID = reference.sop_instance_uid
    return item


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


@dataclass
class _Transaction:
    transaction_uid: str
    assoc: Any  # The requesting association (the report goes there while it is open).
    calling_ae_title: str
    references: list[Reference]
    started: float


class CommitmentScp:
    """The N-ACTION handler and the N-EVENT-REPORT sender of one front end.

    `archive.commit(references, settings)` starts the check and returns a future;
    `tls_args(destination)` gives AE.associate's TLS arguments for a `+tls` destination."""

    def __init__(self, config: NodeConfig, ae: Any, archive: Any,
                 tls_args: Callable[[Destination], dict[str, Any]]) -> None:
        self._config = config
        self._ae = ae
        self._archive = archive
        self._tls_args = tls_args
        self._settings = CommitSettings(timeout_s=config.storage_commitment_timeout_s)
        self._lock = threading.Lock()
        self._pending: dict[int, concurrent.futures.Future[CommitResult]] = {}
        self._ids = itertools.count(1)
        self._reporters = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="pacsnode-stgcmt")
        self._stopping = threading.Event()
        self.reports_sent = 0

    @staticmethod
    def supported(archive: Any) -> bool:
        """Only an archive with a cluster check serves it (the node's, or a DICOM worker's
        channel to it)."""
        return callable(getattr(archive, "commit", None))

    # ------------------------------------------------------------------ N-ACTION
    def on_n_action(self, event: Any) -> tuple[Dataset, Dataset | None]:
        request = event.request
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            try:
                information = event.action_information
            except Exception as error:  # Undecodable dataset.
                raise InvalidRequest(STATUS_PROCESSING_FAILURE, "cannot decode the action information") from error
            transaction_uid, references = parse_request(request.ActionTypeID, request.RequestedSOPInstanceUID,
                                                        information)
        except InvalidRequest as error:
            log.warning("dicom.commitment.rejected reason=%s status=0x%04X calling_ae_title=%s",
                        error.reason, error.status, calling)
            return _status(error.status, error.reason), None
        with self._lock:
            if self._stopping.is_set() or len(self._pending) >= TRANSACTIONS_MAX:
                log.warning("dicom.commitment.rejected reason=busy pending=%d calling_ae_title=%s",
                            len(self._pending), calling)
                return _status(STATUS_RESOURCE_LIMITATION, "too many commitments in progress; retry"), None
            key = next(self._ids)
            transaction = _Transaction(transaction_uid, event.assoc, calling, references, time.monotonic())
            future = self._archive.commit(references, self._settings)
            self._pending[key] = future
        log.info("dicom.commitment.requested transaction_uid=%s instances=%d calling_ae_title=%s",
                 transaction_uid, len(references), calling)
        future.add_done_callback(lambda done: self._finished(key, transaction, done))
        return _status(STATUS_SUCCESS), None

    def _finished(self, key: int, transaction: _Transaction, future: "concurrent.futures.Future[CommitResult]") -> None:
        """On the node's loop thread: hand the report to a reporter thread (it blocks)."""
        with self._lock:
            self._pending.pop(key, None)
        if future.cancelled():
            log.warning("dicom.commitment.abandoned transaction_uid=%s reason=node-stopping",
                        transaction.transaction_uid)
            return
        error = future.exception()
        if error is not None:
            log.error("dicom.commitment.failed transaction_uid=%s error=%s", transaction.transaction_uid,
                      type(error).__name__)
            result = CommitResult(committed=(), failed=tuple((r, FailureReason.NOT_ON_ALL_OWNERS)
                                                             for r in transaction.references))
        else:
            result = future.result()
        try:
            self._reporters.submit(self._report, transaction, result)
        except RuntimeError:  # Shut down meanwhile.
            log.warning("dicom.commitment.abandoned transaction_uid=%s reason=node-stopping",
                        transaction.transaction_uid)

    # ------------------------------------------------------------------ N-EVENT-REPORT
    def _report(self, transaction: _Transaction, result: CommitResult) -> None:
        event_type, info = event_report(transaction.transaction_uid, result, self._config.ae_title)
        log.info("dicom.commitment.decided transaction_uid=%s committed=%d failed=%d rounds=%d elapsed_ms=%d",
                 transaction.transaction_uid, len(result.committed), len(result.failed), result.rounds,
                 int((time.monotonic() - transaction.started) * 1000))
        if transaction.assoc.is_established and self._send_same(transaction, event_type, info):
            return
        destination = self._config.destination(transaction.calling_ae_title)
        if destination is None:
            log.error("dicom.commitment.report_undeliverable transaction_uid=%s calling_ae_title=%s "
                      "reason=association-closed-and-ae-not-in-destinations", transaction.transaction_uid,
                      transaction.calling_ae_title)
            return
        for attempt in range(1, REPORT_ATTEMPTS + 1):
            if self._send_new(transaction, destination, event_type, info):
                return
            if attempt < REPORT_ATTEMPTS and self._stopping.wait(REPORT_RETRY_S):
                break
        log.error("dicom.commitment.report_failed transaction_uid=%s destination=%s attempts=%d",
                  transaction.transaction_uid, destination, REPORT_ATTEMPTS)

    def _send_same(self, transaction: _Transaction, event_type: int, info: Dataset) -> bool:
        assoc = transaction.assoc
        try:
            assoc.dimse_timeout = min(self._config.dimse_timeout_s, SAME_ASSOCIATION_RESPONSE_S)
            status, _reply = assoc.send_n_event_report(info, event_type, SOP_CLASS_UID, SOP_INSTANCE_UID)
        except Exception as error:  # Closed under us, no usable context: use a new association.
            log.info("dicom.commitment.same_association_failed transaction_uid=%s error=%s",
                     transaction.transaction_uid, type(error).__name__)
            return False
        code = status.get("Status") if status is not None else None
        if code is None:
            log.info("dicom.commitment.same_association_failed transaction_uid=%s error=no-response",
                     transaction.transaction_uid)
            return False
        self._sent(transaction, "same-association", event_type, int(code))
        return True

    def _send_new(self, transaction: _Transaction, destination: Destination, event_type: int, info: Dataset) -> bool:
        try:
            assoc = self._ae.associate(
                destination.host, destination.port,
                contexts=[build_context(SOP_CLASS_UID, TRANSFER_SYNTAXES)],
                ae_title=destination.ae_title,
                ext_neg=[build_role(SOP_CLASS_UID, scp_role=True)],
                max_pdu=self._config.max_pdu_bytes,
                **self._tls_args(destination),
            )
        except Exception as error:
            log.warning("dicom.commitment.associate_failed transaction_uid=%s destination=%s error=%s",
                        transaction.transaction_uid, destination, type(error).__name__)
            return False
        if not assoc.is_established:
            log.warning("dicom.commitment.associate_failed transaction_uid=%s destination=%s error=not-accepted",
                        transaction.transaction_uid, destination)
            return False
        try:
            status, _reply = assoc.send_n_event_report(info, event_type, SOP_CLASS_UID, SOP_INSTANCE_UID)
        except Exception as error:
            log.warning("dicom.commitment.report_send_failed transaction_uid=%s destination=%s error=%s",
                        transaction.transaction_uid, destination, type(error).__name__)
            assoc.abort()
            return False
        code = status.get("Status") if status is not None else None
        if assoc.is_established:
            assoc.release()
        if code is None:
            return False
        self._sent(transaction, "new-association", event_type, int(code))
        return True

    def _sent(self, transaction: _Transaction, via: str, event_type: int, code: int) -> None:
        self.reports_sent += 1
        log.info("dicom.commitment.reported transaction_uid=%s via=%s event_type=%d response_status=0x%04X",
                 transaction.transaction_uid, via, event_type, code)

    def stop(self) -> None:
        """Cancel the checks in progress (their reports are not sent; the modality asks again)."""
        self._stopping.set()
        with self._lock:
            pending = list(self._pending.values())
        for future in pending:
            future.cancel()
        self._reporters.shutdown(wait=False, cancel_futures=True)
