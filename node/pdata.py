"""A stored data set cut into P-DATA-TF PDUs, encoded here, without a copy.

pynetdicom 3.0.4 sends a DIMSE message's data set as one P-DATA primitive per fragment:
each is copied (`b"\\x00" + fragment`), queued to the DUL thread with a wake-up, run
through the state machine, wrapped in a P_DATA_TF object, encoded (copied again) and sent
with one `sendall`, and two notifications are triggered. For a 512x512 CT instance sent
to a peer that takes 16 KB PDUs that is 32 rounds of it, and it was most of the node's
CPU per retrieved instance (`bench/README.md`).

The C-STORE-RQ command set that goes before it is encoded here too (`store_command_pdu`):
pynetdicom builds a pydicom Dataset for it, encodes it twice (once for the group length)
and sends it as one more P-DATA primitive through the DUL thread; for C-GET that was ~15%
of the node's GIL time per retrieved instance (py-spy). It goes out in the same batch as
the data set's first PDUs.

`encode_data_set` gives the same bytes on the wire (PS3.8 9.3.5 and E.2: a PDU of type
0x04, one PDV item per PDU, message control header 0x00 for a data-set fragment and 0x02
for the last one) as batches of (header, fragment-view) buffers that the DUL writes with
one `sendmsg` each (node/acceptor.py). The fragments are slices of the payload: a
memoryview of the stored bytes is never copied; a big instance's streamed payload
(node/raw_send.py) is read a fragment at a time as the batches are made.

Pure: no I/O, no pynetdicom state; tests/unit/test_pdata.py compares the bytes with
pynetdicom's own encoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Protocol

# The last (here: only) command fragment's message control header (PS3.8 E.2: bit 0 set =
# command, bit 1 set = last fragment).
COMMAND_FRAGMENT_LAST = 0x03
C_STORE_RQ_FIELD = 0x0001
DATA_SET_PRESENT = 0x0001  # CommandDataSetType: anything but 0x0101 means a data set follows.
C_STORE_RSP_FIELD = 0x8001
NO_DATA_SET = 0x0101
_COMMAND_ELEMENT = struct.Struct("<HHL")  # Implicit VR little endian: group, element, length.
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
# A data-set fragment's message control header (PS3.8 E.2): bit 0 clear = data set, bit 1
# set = last fragment.
DATA_FRAGMENT = 0x00
DATA_FRAGMENT_LAST = 0x02
# Fragments for a peer that sets no maximum (Maximum Length Received 0): any size is
# allowed, so a big instance is not made one fragment (read whole) just because of that.
UNLIMITED_FRAGMENT_BYTES = 1 << 20
# One queued batch holds this many payload bytes (or one fragment, if larger); the DUL's
# outgoing queue holds at most node/acceptor.py's PROVIDER_QUEUE_PDUS_MAX batches.
BATCH_BYTES = 256 * 1024
# PDU header (type, reserved, length) + PDV item header (length, context id, control).
_HEADER = struct.Struct(">BBLLBB")
HEADER_BYTES = _HEADER.size  # 12


class Payload(Protocol):
    """What a data set to send must offer: its length and slices in order."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice) -> bytes | memoryview: ...


@dataclass(frozen=True)
class EncodedPData:
    """Whole P-DATA-TF PDUs of one message's data set, in order, as buffers to write:
    a 12-byte header, then its fragment, for each PDU."""

    buffers: tuple[bytes | memoryview, ...]
    size: int  # Bytes on the wire (sum of the buffers).
    pdus: int


def fragment_bytes(max_pdu_length: int) -> int:
    """The largest data-set fragment a peer with this Maximum Length Received takes: its
    PDU variable field holds one PDV item (4-byte length, context id, control header)."""
    if max_pdu_length <= 0:
        return UNLIMITED_FRAGMENT_BYTES
    if max_pdu_length <= 6:
        raise ValueError(f"maximum PDU length {max_pdu_length} leaves no room for data")
    return max_pdu_length - 6


def pdu_header(context_id: int, control: int, fragment_length: int) -> bytes:
    item_length = 2 + fragment_length
    return _HEADER.pack(0x04, 0x00, 4 + item_length, item_length, context_id, control)


def _command_element(element: int, value: bytes) -> bytes:
    return _COMMAND_ELEMENT.pack(0x0000, element, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii")
    return encoded + pad if len(encoded) % 2 else encoded


def _command_pdu(context_id: int, max_pdu_length: int, elements: list[bytes]) -> bytes | None:
    """A command set (its group length first) as one P-DATA-TF PDU, marked last; None when
    the peer's maximum PDU length cannot take it in one fragment."""
    body = b"".join(elements)
    command = _command_element(0x0000, _UL.pack(len(body))) + body
    if 0 < max_pdu_length < len(command) + 6:
        return None
    return pdu_header(context_id, COMMAND_FRAGMENT_LAST, len(command)) + command


def _response_elements(command_field: int, message_id_responded: int, status: int, sop_class_uid: str | None,
                       data_set_type: int) -> list[bytes]:
    """The elements every response command set starts with, in tag order (an unset UID left out)."""
    elements = [_command_element(0x0002, _padded(sop_class_uid, b"\x00"))] if sop_class_uid is not None else []
    return elements + [
        _command_element(0x0100, _US.pack(command_field)),
        _command_element(0x0120, _US.pack(message_id_responded)),
        _command_element(0x0800, _US.pack(data_set_type)),
        _command_element(0x0900, _US.pack(status)),
    ]


def store_command_pdu(context_id: int, max_pdu_length: int, *, message_id: int, priority: int,
                      sop_class_uid: str, sop_instance_uid: str, move_originator_aet: str | None = None,
                      move_originator_message_id: int | None = None) -> bytes | None:
    """One P-DATA-TF PDU carrying a C-STORE-RQ command set (PS3.7 9.3.1.1 and E.1: implicit
    VR little endian, group 0000 in tag order, UIDs padded with NUL and AE titles with a
    space to even length), as the last and only command fragment. None when the peer's
    maximum PDU length is too small to take it in one fragment (the caller then lets
    pynetdicom cut it)."""
    elements = [
        _command_element(0x0002, _padded(sop_class_uid, b"\x00")),
        _command_element(0x0100, _US.pack(C_STORE_RQ_FIELD)),
        _command_element(0x0110, _US.pack(message_id)),
        _command_element(0x0700, _US.pack(priority)),
        _command_element(0x0800, _US.pack(DATA_SET_PRESENT)),
        _command_element(0x1000, _padded(sop_instance_uid, b"\x00")),
    ]
    if move_originator_aet is not None:
        elements.append(_command_element(0x1030, _padded(move_originator_aet, b" ")))
    if move_originator_message_id is not None:
        elements.append(_command_element(0x1031, _US.pack(move_originator_message_id)))
    return _command_pdu(context_id, max_pdu_length, elements)


def store_response_pdu(context_id: int, max_pdu_length: int, *, message_id_responded: int, status: int,
                       sop_class_uid: str | None, sop_instance_uid: str | None) -> bytes | None:
    """One P-DATA-TF PDU carrying a C-STORE-RSP command set (PS3.7 9.3.1.2) with no Error
    Comment or Offending Element, as pynetdicom 3.0.4 encodes it (an unset UID is left
    out); None when the peer's maximum PDU length cannot take it in one fragment."""
    return _plain_response_pdu(context_id, max_pdu_length, C_STORE_RSP_FIELD, message_id_responded, status,
                               sop_class_uid, sop_instance_uid)


C_ECHO_RSP_FIELD = 0x8030


def echo_response_pdu(context_id: int, max_pdu_length: int, *, message_id_responded: int, status: int,
                      sop_class_uid: str | None) -> bytes | None:
    """One P-DATA-TF PDU carrying a C-ECHO-RSP command set (PS3.7 9.3.5.2) with no Error
    Comment, as pynetdicom 3.0.4 encodes it; None when it does not fit one fragment."""
    return _plain_response_pdu(context_id, max_pdu_length, C_ECHO_RSP_FIELD, message_id_responded, status,
                               sop_class_uid, None)


def _plain_response_pdu(context_id: int, max_pdu_length: int, command_field: int, message_id_responded: int,
                        status: int, sop_class_uid: str | None, sop_instance_uid: str | None) -> bytes | None:
    elements = _response_elements(command_field, message_id_responded, status, sop_class_uid, NO_DATA_SET)
    if sop_instance_uid is not None:
        elements.append(_command_element(0x1000, _padded(sop_instance_uid, b"\x00")))
    return _command_pdu(context_id, max_pdu_length, elements)


C_GET_RSP_FIELD = 0x8010
C_MOVE_RSP_FIELD = 0x8021
RETRIEVE_RESPONSE_FIELDS = frozenset({C_GET_RSP_FIELD, C_MOVE_RSP_FIELD})


def retrieve_response_pdu(context_id: int, max_pdu_length: int, *, command_field: int, message_id_responded: int,
                          status: int, sop_class_uid: str | None, remaining: int | None, completed: int | None,
                          failed: int | None, warning: int | None) -> bytes | None:
    """One P-DATA-TF PDU carrying a C-GET-RSP or C-MOVE-RSP command set (PS3.7 9.3.3.2,
    9.3.4.2) with no Identifier, Error Comment or Offending Element -- the Pending response
    sent after each sub-operation -- as pynetdicom 3.0.4 encodes it (an unset field is left
    out); None when the peer's maximum PDU length cannot take it in one fragment."""
    if command_field not in RETRIEVE_RESPONSE_FIELDS:
        raise ValueError(f"not a C-GET-RSP or C-MOVE-RSP command field: 0x{command_field:04X}")
    elements = _response_elements(command_field, message_id_responded, status, sop_class_uid, NO_DATA_SET)
    for element, count in ((0x1020, remaining), (0x1021, completed), (0x1022, failed), (0x1023, warning)):
        if count is not None:
            elements.append(_command_element(element, _US.pack(count)))
    return _command_pdu(context_id, max_pdu_length, elements)


C_FIND_RSP_FIELD = 0x8020


def find_response_pdus(context_id: int, max_pdu_length: int, *, message_id_responded: int, status: int,
                       sop_class_uid: str | None, identifier: bytes) -> EncodedPData | None:
    """A Pending C-FIND-RSP (PS3.7 9.1.2.1.2) with its Identifier, as pynetdicom 3.0.4
    encodes it: the command set (no Error Comment or Offending Element; an unset UID left
    out) in one PDU, then the encoded Identifier's data-set PDUs. None when the command
    does not fit one fragment of the peer's maximum PDU length."""
    return FindResponses(context_id, max_pdu_length, message_id_responded=message_id_responded, status=status,
                         sop_class_uid=sop_class_uid).encode(identifier)


class FindResponses:
    """find_response_pdus for every Pending response of one C-FIND: their command sets are
    the same bytes (message id, status, SOP class), so it is encoded once, and a row's
    Identifier that fits one fragment (any row of a usual query) is one PDU header
    before it."""

    def __init__(self, context_id: int, max_pdu_length: int, *, message_id_responded: int, status: int,
                 sop_class_uid: str | None) -> None:
        self._context_id = context_id
        self._max_pdu_length = max_pdu_length
        self._fragment_bytes = fragment_bytes(max_pdu_length)
        self._command_pdu = _command_pdu(context_id, max_pdu_length, _response_elements(
            C_FIND_RSP_FIELD, message_id_responded, status, sop_class_uid, DATA_SET_PRESENT))

    def encode(self, identifier: bytes) -> EncodedPData | None:
        """The response with this encoded Identifier; None when the command does not fit
        one fragment of the peer's maximum PDU length."""
        command_pdu = self._command_pdu
        if command_pdu is None:
            return None
        if 0 < len(identifier) <= self._fragment_bytes:
            header = pdu_header(self._context_id, DATA_FRAGMENT_LAST, len(identifier))
            return EncodedPData((command_pdu, header, identifier), len(command_pdu) + HEADER_BYTES + len(identifier), 2)
        buffers: list[bytes | memoryview] = [command_pdu]
        size, pdus = len(command_pdu), 1
        for batch in encode_data_set(identifier, self._context_id, self._max_pdu_length, batch_bytes=1 << 62):
            buffers.extend(batch.buffers)
            size += batch.size
            pdus += batch.pdus
        return EncodedPData(tuple(buffers), size, pdus)


@dataclass(frozen=True)
class StoreResponse:
    """The fields of a plain C-STORE-RSP command set (see parse_store_response)."""

    message_id_responded: int
    status: int
    sop_class_uid: str | None
    sop_instance_uid: str | None


_STORE_RESPONSE_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000))


def find_final_response_pdu(context_id: int, max_pdu_length: int, *, message_id_responded: int, status: int,
                            sop_class_uid: str | None) -> bytes | None:
    """One P-DATA-TF PDU carrying a C-FIND's final response (PS3.7 9.1.2.1.2: no Identifier)
    with no Error Comment or Offending Element, as pynetdicom 3.0.4 encodes it; None when it
    does not fit one fragment."""
    return _plain_response_pdu(context_id, max_pdu_length, C_FIND_RSP_FIELD, message_id_responded, status,
                               sop_class_uid, None)


def _command_elements(command: bytes | memoryview, allowed: frozenset[int]) -> dict[int, memoryview] | None:
    """The elements of a whole command set (implicit VR little endian, group 0000) by
    element number, when every one is in `allowed`, none repeats and the lengths add up;
    else None."""
    view = memoryview(command)
    position, end = 0, len(view)
    values: dict[int, memoryview] = {}
    while position < end:
        if end - position < 8:
            return None
        group, element, length = _COMMAND_ELEMENT.unpack_from(view, position)
        position += 8
        if group != 0x0000 or element not in allowed or element in values or length > end - position:
            return None
        values[element] = view[position:position + length]
        position += length
    return values


def parse_store_response(command: bytes | memoryview) -> StoreResponse | None:
    """A whole command set (implicit VR little endian, group 0000) that is a C-STORE-RSP
    with no data set and nothing but the elements `store_response_pdu` writes (Affected
    SOP Class/Instance UID optional): its fields. None for anything else -- another
    command, an Error Comment or Offending Element, a length that does not add up -- which
    the caller leaves to pynetdicom's decoder."""
    values = _command_elements(command, _STORE_RESPONSE_ELEMENTS)
    if values is None:
        return None
    end = len(command)
    try:
        if _UL.unpack(values[0x0000])[0] != end - 12 or _US.unpack(values[0x0100])[0] != C_STORE_RSP_FIELD \
                or _US.unpack(values[0x0800])[0] != NO_DATA_SET:
            return None
        message_id, status = _US.unpack(values[0x0120])[0], _US.unpack(values[0x0900])[0]
    except (KeyError, struct.error):
        return None

    def uid(element: int) -> str | None:
        raw = values.get(element)
        return None if raw is None else bytes(raw).rstrip(b"\x00 ").decode("ascii", "replace")

    return StoreResponse(message_id, status, uid(0x0002), uid(0x1000))


C_ECHO_RQ_FIELD = 0x0030
_ECHO_REQUEST_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0800))


@dataclass(frozen=True)
class EchoRequest:
    """The fields of a C-ECHO-RQ command set (see parse_echo_request)."""

    message_id: int
    sop_class_uid: str


def parse_echo_request(command: bytes | memoryview) -> EchoRequest | None:
    """A whole command set (implicit VR little endian, group 0000) that is a C-ECHO-RQ
    (PS3.7 9.3.5.1) with its five elements and nothing else -- group length, Affected SOP
    Class UID, command field, Message ID, no data set -- as pynetdicom and dcmtk send it:
    its fields. None for anything else (another command, another element, a length that
    does not add up, the same element twice), which the caller leaves to pynetdicom."""
    values = _command_elements(command, _ECHO_REQUEST_ELEMENTS)
    if values is None:
        return None
    end = len(command)
    if len(values) != len(_ECHO_REQUEST_ELEMENTS):
        return None
    try:
        if _UL.unpack(values[0x0000])[0] != end - 12 or _US.unpack(values[0x0100])[0] != C_ECHO_RQ_FIELD \
                or _US.unpack(values[0x0800])[0] != NO_DATA_SET:
            return None
        message_id = _US.unpack(values[0x0110])[0]
    except struct.error:
        return None
    return EchoRequest(message_id, bytes(values[0x0002]).rstrip(b"\x00 ").decode("ascii", "replace"))


_STORE_REQUEST_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031))
_STORE_REQUEST_REQUIRED = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000))


@dataclass(frozen=True)
class StoreRequest:
    """The fields of a C-STORE-RQ command set (see parse_store_request)."""

    message_id: int
    priority: int
    sop_class_uid: str
    sop_instance_uid: str
    move_originator_aet: str | None
    move_originator_message_id: int | None


def parse_store_request(command: bytes | memoryview) -> StoreRequest | None:
    """A whole command set (implicit VR little endian, group 0000) that is a C-STORE-RQ
    with a data set (PS3.7 9.3.1.1): group length, Affected SOP Class UID, command field,
    Message ID, Priority, data set type, Affected SOP Instance UID, and the Move Originator
    AE Title and Message ID or neither: its fields. None for anything else (another
    command or element, a length that does not add up, an element twice, a value of more
    than one item), which the caller leaves to pynetdicom's decoder."""
    values = _command_elements(command, _STORE_REQUEST_ELEMENTS)
    if values is None or not _STORE_REQUEST_REQUIRED <= values.keys() or (0x1030 in values) != (0x1031 in values):
        return None
    try:
        if _UL.unpack(values[0x0000])[0] != len(command) - 12 or _US.unpack(values[0x0100])[0] != C_STORE_RQ_FIELD \
                or _US.unpack(values[0x0800])[0] == NO_DATA_SET:
            return None
        message_id, priority = _US.unpack(values[0x0110])[0], _US.unpack(values[0x0700])[0]
        originator_id = _US.unpack(values[0x1031])[0] if 0x1031 in values else None
    except struct.error:
        return None
    texts: list[str | None] = []
    for element in (0x0002, 0x1000, 0x1030):
        raw = values.get(element)
        if raw is None:
            texts.append(None)
            continue
        value = bytes(raw)
        if b"\\" in value or not value.isascii():
            return None  # More than one value, or not a UID or AE title: pynetdicom's way.
        texts.append(value.rstrip(b"\x00 ").decode("ascii") if element != 0x1030 else value.strip(b" ").decode("ascii"))
    sop_class, sop_instance, originator = texts
    assert sop_class is not None and sop_instance is not None
    return StoreRequest(message_id, priority, sop_class, sop_instance, originator, originator_id)


def with_command(command_pdu: bytes, batches: Iterator[EncodedPData]) -> Iterator[EncodedPData]:
    """The data set's batches with the command's PDU written first, in the first batch."""
    first = next(batches, None)
    if first is None:
        yield EncodedPData((command_pdu,), len(command_pdu), 1)
        return
    yield EncodedPData((command_pdu, *first.buffers), len(command_pdu) + first.size, first.pdus + 1)
    yield from batches


def encode_data_set(payload: Payload, context_id: int, max_pdu_length: int,
                    batch_bytes: int = BATCH_BYTES) -> Iterator[EncodedPData]:
    """The data set's PDUs, in batches of about `batch_bytes` of payload. An empty payload
    yields nothing (a message without a data set sends none)."""
    total = len(payload)
    step = fragment_bytes(max_pdu_length)
    position = 0
    buffers: list[bytes | memoryview] = []
    size = 0
    pdus = 0
    batched = 0
    while position < total:
        end = min(position + step, total)
        fragment = payload[position:end]
        control = DATA_FRAGMENT_LAST if end == total else DATA_FRAGMENT
        buffers.append(pdu_header(context_id, control, end - position))
        buffers.append(fragment)
        size += HEADER_BYTES + (end - position)
        pdus += 1
        batched += end - position
        position = end
        if batched >= batch_bytes or position == total:
            yield EncodedPData(tuple(buffers), size, pdus)
            buffers, size, pdus, batched = [], 0, 0, 0
