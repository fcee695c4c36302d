"""Send stored instances over DICOM byte-for-byte, without decoding them.

pynetdicom's C-GET and C-MOVE service classes send what a handler yields with
`Association.send_c_store(dataset)`, which re-encodes a decoded pydicom Dataset. An
archive must return exactly the bytes it received, in the transfer syntax it received
them in. `StoredDataset` carries those bytes. The node's association subclasses
(node/acceptor.py: `AcceptorAssociation` for C-GET, `RequestorAssociation` for the
sub-associations of C-MOVE, created by `NodeAE.associate`) override `send_c_store` with
`send_c_store_or_stored`: a `StoredDataset` is sent as its raw bytes on a presentation
context of its own transfer syntax, anything else goes through pynetdicom unchanged. No
pynetdicom class is changed at run time.

If the peer did not accept the stored transfer syntax but accepted another uncompressed
one, and the stored one is uncompressed too, the instance is transcoded losslessly
(decoded and re-encoded by pydicom). A compressed instance is never transcoded: the
sub-operation fails and the instance is listed in Failed SOP Instance UID List.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
import logging
import socket
import threading
import time
from io import BytesIO
from typing import Any, Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from pacsnode.node.association_guard import log_event
from pacsnode.node.blob_files import Part10Stream, StreamPayload

log = logging.getLogger(__name__)

UNCOMPRESSED = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
)


class StoredDataset(Dataset):
    """A Dataset stand-in that holds an instance's stored bytes instead of decoded elements.
    It holds no elements at all: SOPClassUID and SOPInstanceUID (all that pynetdicom's
    retrieve service classes and this module read of it) are properties. Made as pydicom
    elements they were most of the ~40 us it took to make one, once per retrieved instance."""

    def __init__(
        self,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        load: Callable[[], tuple["bytes | Part10Stream", int]],
        sent: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        # Set with object.__setattr__: Dataset would treat these as DICOM elements.
        object.__setattr__(self, "_pacsnode_sop_class_uid", sop_class_uid)
        object.__setattr__(self, "_pacsnode_sop_instance_uid", sop_instance_uid)
        object.__setattr__(self, "_pacsnode_transfer_syntax", transfer_syntax_uid)
        object.__setattr__(self, "_pacsnode_load", load)
        object.__setattr__(self, "_pacsnode_sent", sent)

    def __bool__(self) -> bool:
        """True, holding no elements: pynetdicom's retrieve loops send a yielded data set
        only if it is truthy (a Dataset's truth is its element count)."""
        return True

    @property
    def SOPClassUID(self) -> str:  # noqa: N802 -- the DICOM keyword, as pynetdicom reads it.
        return str(object.__getattribute__(self, "_pacsnode_sop_class_uid"))

    @property
    def SOPInstanceUID(self) -> str:  # noqa: N802
        return str(object.__getattribute__(self, "_pacsnode_sop_instance_uid"))

    @property
    def stored_transfer_syntax(self) -> str:
        return str(object.__getattribute__(self, "_pacsnode_transfer_syntax"))

    def load(self) -> tuple["bytes | Part10Stream", int]:
        """(Part-10 bytes, or a Part10Stream of a blob file; dataset offset); raises if
        the instance cannot be read."""
        loader = object.__getattribute__(self, "_pacsnode_load")
        result: tuple[bytes | Part10Stream, int] = loader()
        return result

    def sent(self) -> None:
        """The C-STORE request has been handed to the association (written, or queued to be);
        its response is awaited next. The read-ahead (node/dicom.py) starts the next reads
        here: run while the sender waits for the peer, not on the way from one response to
        the next request, where a reader thread taking the GIL delayed the sender."""
        callback = object.__getattribute__(self, "_pacsnode_sent")
        if callback is not None:
            callback()


_AE_TITLE_MAX = 16
_UID_MAX = 64


@dataclass(frozen=True)
class StoreRequest:
    """The fields of a C-STORE-RQ for a sub-operation (PS3.7 9.3.1.1). The node's
    associations encode its command set from these (node/acceptor.py send_store_request,
    node/pdata.py store_command_pdu): pynetdicom's C_STORE primitive validated each UID
    again (a regex per UID, a tenth of the sending thread's GIL time per retrieved
    instance) for values the store gave."""

    message_id: int
    priority: int
    sop_class_uid: str
    sop_instance_uid: str
    move_originator_aet: str | None = None
    move_originator_message_id: int | None = None

    def checked(self) -> "StoreRequest":
        """This request as pynetdicom 3.0.4's setters take it with their default
        configuration: ValueError (the sub-operation fails, as it did in the setter) for a
        message id out of 0-65535, a priority other than 0-2, or a UID longer than 64
        characters (and an empty UID, which pynetdicom left out of the request); a Move Originator AE title longer than 16
        characters, not ASCII or with a control character or backslash is left out (None),
        as pynetdicom leaves it out."""
        for name, number in (("MessageID", self.message_id), ("MoveOriginatorMessageID",
                                                              self.move_originator_message_id)):
            if number is not None and not 0 <= number <= 0xFFFF:
                raise ValueError(f"{name} {number} is not a US value")
        if self.priority not in (0, 1, 2):
            raise ValueError(f"Priority {self.priority} is not 0, 1 or 2")
        for name, uid in (("AffectedSOPClassUID", self.sop_class_uid),
                          ("AffectedSOPInstanceUID", self.sop_instance_uid)):
            # Empty: pynetdicom left the element out (a request no peer may accept); not
            # ASCII: pdata's encoding raises (UnicodeEncodeError). Both fail the sub-operation.
            if not uid or len(uid) > _UID_MAX:
                raise ValueError(f"invalid {name} {uid!r}")
        aet = self.move_originator_aet
        if aet is not None and (len(aet) > _AE_TITLE_MAX or not aet.isascii() or "\\" in aet
                                or any(ord(character) < 0x20 or ord(character) == 0x7F for character in aet)):
            return replace(self, move_originator_aet=None)
        return self

    def primitive(self, payload: "bytes | memoryview | StreamPayload") -> C_STORE:
        """pynetdicom's C_STORE primitive of this request (its setters validate)."""
        request = C_STORE()
        request.MessageID = self.message_id
        request.Priority = self.priority
        request.MoveOriginatorApplicationEntityTitle = self.move_originator_aet
        request.MoveOriginatorMessageID = self.move_originator_message_id
        request.AffectedSOPClassUID = self.sop_class_uid
        request.AffectedSOPInstanceUID = self.sop_instance_uid
        request.DataSet = _DatasetView(payload)
        return request


def send_c_store_or_stored(
    assoc: Association, send_c_store: Callable[..., Dataset], dataset: Any, *args: Any, **kwargs: Any
) -> Dataset:
    """The body of the association subclasses' send_c_store: a StoredDataset goes out as its
    stored bytes, anything else through pynetdicom's own `send_c_store` (passed in)."""
    if isinstance(dataset, StoredDataset):
        return _send_stored(assoc, dataset, *args, **kwargs)
    return send_c_store(dataset, *args, **kwargs)


def _scu_contexts(assoc: Association, sop_class_uid: str) -> list[tuple[str, int]]:
    """(transfer syntax, context id) of each accepted context in which we may send a
    C-STORE of this SOP class (we are its SCU), in context id order: the contexts
    pynetdicom's `_get_valid_context(sop_class, syntax, "scu", allow_conversion=False)`
    picks from, first match wins. The node's associations keep this table from the first
    sub-operation on (`scu_contexts`): pynetdicom sorts and scans every accepted context
    twice per sub-operation otherwise (~120 for dcmtk's getscu)."""
    table = getattr(assoc, "scu_contexts", None)
    if table is not None:
        found: list[tuple[str, int]] = table().get(sop_class_uid, [])
        return found
    return scu_context_table(assoc.accepted_contexts).get(sop_class_uid, [])


def scu_context_table(accepted_contexts: list[Any]) -> dict[str, list[tuple[str, int]]]:
    """{SOP class UID: [(transfer syntax, context id), ...]} of accepted contexts in our
    SCU role, in context id order (see _scu_contexts)."""
    table: dict[str, list[tuple[str, int]]] = {}
    for cx in sorted(accepted_contexts, key=lambda cx: int(cx.context_id or 0)):
        if cx.as_scu is True and cx.context_id is not None:
            table.setdefault(str(cx.abstract_syntax), []).append((str(cx.transfer_syntax[0]), int(cx.context_id)))
    return table


def _send_stored(
    assoc: Association,
    stored: StoredDataset,
    msg_id: int = 1,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Dataset:
    if not assoc.is_established:
        raise RuntimeError("association is not established")
    contexts = _scu_contexts(assoc, str(stored.SOPClassUID))
    part10, offset = stored.load()  # Raises on a missing or corrupt blob: sub-op fails.
    try:
        return _send_loaded(assoc, stored, part10, offset, contexts, msg_id, priority, originator_aet,
                            originator_id)
    finally:
        if isinstance(part10, Part10Stream):
            part10.close()


def _send_loaded(assoc: Association, stored: StoredDataset, part10: "bytes | Part10Stream", offset: int,
                 contexts: list[tuple[str, int]], msg_id: int, priority: int, originator_aet: str | None,
                 originator_id: int | None) -> Dataset:
    accepted = [syntax for syntax, _context_id in contexts]
    sop_class = str(stored.SOPClassUID)
    sop_instance = str(stored.SOPInstanceUID)
    stored_syntax = stored.stored_transfer_syntax
    payload: bytes | memoryview | StreamPayload
    if stored_syntax in accepted:
        syntax = stored_syntax
        if isinstance(part10, Part10Stream):
            payload = part10.payload(offset)  # Decompressed fragment by fragment as it is sent.
        else:
            payload = memoryview(part10)[offset:]  # Not a copy: a 200 MB instance was held twice.
    else:
        fallback = [s for s in accepted if s in UNCOMPRESSED]
        if stored_syntax not in UNCOMPRESSED or not fallback:
            raise ValueError(
                f"peer accepted no presentation context for {sop_class} in {stored_syntax} "
                f"(accepted: {accepted or 'none'}); compressed instances are never transcoded"
            )
        syntax = fallback[0]
        if isinstance(part10, Part10Stream):
            part10 = part10.read_all()  # Transcoding decodes the whole instance anyway.
        payload = _transcode(part10, syntax)
    context_id = next(context_id for accepted_syntax, context_id in contexts if accepted_syntax == syntax)
    request = StoreRequest(msg_id, priority, sop_class, sop_instance, originator_aet, originator_id)
    send_store_request = getattr(assoc.dimse, "send_store_request", None)
    if send_store_request is not None:
        # The node's associations (node/acceptor.py): the command set is encoded from these
        # fields, checked as pynetdicom's setters check them, without a C_STORE primitive.
        checked = request.checked()
        send: Callable[[], None] = lambda: send_store_request(checked, context_id, payload)  # noqa: E731
    else:
        primitive = request.primitive(payload)
        send = lambda: assoc.dimse.send_msg(primitive, context_id)  # noqa: E731
    response = _exchange(assoc, send, stored.sent)
    if response is None:
        reason = _no_response(assoc, sop_instance)
        # pynetdicom's retrieve service classes count an exception as a failed sub-operation.
        raise SubOperationNoResponse(f"no response to the C-STORE of {sop_instance} ({reason.value})")
    return assoc._check_received_status(response)


def _exchange(assoc: Association, send: Callable[[], None], sent: Callable[[], None]) -> Any:
    """Send the request, call `sent`, and wait for its response (None if none came),
    keeping the association's reactor from taking the response off the DIMSE queue
    meanwhile."""
    if threading.current_thread() is assoc:
        # C-GET sub-operations: we run on the reactor's own thread, inside its handler;
        # nothing else reads the queue.
        send()
        sent()
        flush_deferred_responses()
        return assoc.dimse.get_msg(block=True)[1]
    held = getattr(assoc, "responses_held", None)
    if held is not None:
        # The node's associations (node/acceptor.py): a flag the reactor reads with its
        # queue check, no pause handshake (C-MOVE sub-operations).
        with held():
            send()
            sent()
            flush_deferred_responses()
            return assoc.dimse.get_msg(block=True)[1]
    # As pynetdicom's own send_c_store: pause the reactor, send, wait for the response.
    # pynetdicom 3.0.4 checks a pause flag that can be stale (the reactor sets it just
    # before a wait that does not block while the checkpoint is still set), and the reactor
    # can then take our C-STORE response off the queue ("Received unexpected C-STORE
    # service message"). Clearing the flag ourselves makes us wait for a fresh pause.
    assoc._reactor_checkpoint.clear()
    assoc._is_paused = False
    deadline = time.monotonic() + 30
    while not assoc._is_paused:
        if time.monotonic() > deadline:
            assoc._reactor_checkpoint.set()
            raise RuntimeError("association reactor did not pause")
        time.sleep(0.0001)
    try:
        send()
        sent()
        flush_deferred_responses()
        return assoc.dimse.get_msg(block=True)[1]
    finally:
        assoc._reactor_checkpoint.set()


def flush_deferred_responses() -> None:
    """Send the Pending C-MOVE response that the calling thread's association holds back
    (node/acceptor.py AcceptorDIMSE.flush_deferred), if it is one of the node's
    associations: pynetdicom's retrieve loop runs on the C-MOVE association's own thread."""
    flush = getattr(threading.current_thread(), "flush_deferred_responses", None)
    if flush is not None:
        flush()


class SubOperationNoResponse(Exception):
    """A C-STORE sub-operation got no response (the sub-operation failed)."""


class NoResponse(enum.StrEnum):
    """Why a C-STORE sub-operation got no response (`reason=` of dicom.retrieve.no_response)."""

    ABORTED = "aborted"                      # The peer sent an A-ABORT.
    CONNECTION_CLOSED = "connection-closed"  # The connection dropped.
    DIMSE_TIMEOUT = "dimse-timeout"          # Nothing within dimse_timeout_s: we abort.


def _no_response(assoc: Association, sop_instance_uid: str) -> NoResponse:
    """pynetdicom's `_handle_no_response` decisions (abort after a DIMSE timeout), with
    one line of ours instead of its ERROR lines; the sub-operation counts as failed."""
    if assoc.acse.is_aborted("a-abort"):
        reason = NoResponse.ABORTED
    elif assoc.acse.is_aborted("a-p-abort"):
        reason = NoResponse.CONNECTION_CLOSED
    else:
        reason = NoResponse.DIMSE_TIMEOUT
    log_event(logging.WARNING, "dicom.retrieve.no_response", assoc, sop_instance_uid=sop_instance_uid,
              reason=reason.value)
    if reason is NoResponse.DIMSE_TIMEOUT and assoc.is_established:
        assoc.abort()
    return reason


def stored_payload(primitive: Any) -> "bytes | memoryview | StreamPayload | None":
    """The stored data set of a C-STORE request made by `_send_stored`, to be sent as
    encoded PDUs (node/acceptor.py, node/pdata.py); None for any other message."""
    if not isinstance(primitive, C_STORE):
        return None
    dataset = primitive.DataSet
    if not isinstance(dataset, _DatasetView):
        return None
    payload: bytes | memoryview | StreamPayload = dataset.getvalue()
    return payload


class _DatasetView(BytesIO):
    """The data set to send, as pynetdicom 3.0.4's DIMSE encoder reads it: `getvalue()`,
    then slices of it for the P-DATA fragments. Returns a view of the stored bytes, where
    BytesIO(bytes[offset:]) would have copied the whole data set first."""

    def __init__(self, payload: "bytes | memoryview | StreamPayload") -> None:
        super().__init__()
        self._payload = payload

    def getvalue(self) -> Any:
        return self._payload


def _transcode(part10: bytes, syntax: str) -> bytes:
    """Re-encode an uncompressed instance in another uncompressed transfer syntax."""
    dataset = dcmread(BytesIO(part10))
    target = UID(syntax)
    encoded = encode(dataset, target.is_implicit_VR, target.is_little_endian, False)
    if encoded is None:
        raise ValueError(f"could not re-encode instance in {syntax}")
    return encoded


def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off on every DICOM socket (a response otherwise
    waits ~40 ms for the peer's delayed ACK). The node's associations, accepted and
    requested, also re-arm TCP_QUICKACK after every read and never poll (node/acceptor.py)."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as error:
        log.debug("dicom.nodelay.failed error=%s", error)
