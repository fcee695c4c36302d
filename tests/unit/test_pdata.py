"""node/pdata.py encodes a data set's P-DATA-TF PDUs itself; on the wire they must be the
bytes pynetdicom 3.0.4's own encoder makes (DIMSEMessage.encode_msg + P_DATA_TF.encode)."""

from __future__ import annotations

import os
import socket
import threading
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from pacsnode.node import pdata
from pacsnode.node.acceptor import _send_buffers


def _pynetdicom_data_pdus(payload: bytes, context_id: int, max_pdu_length: int) -> bytes:
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request.Priority = 2
    request.DataSet = BytesIO(payload)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    primitives = list(message.encode_msg(context_id, max_pdu_length))
    data = [p for p in primitives if not p.presentation_data_value_list[0][1][0] & 0x01]  # Data-set fragments.
    return b"".join(P_DATA_TF(p).encode() for p in data)


def _ours(payload: bytes | memoryview, context_id: int, max_pdu_length: int, batch_bytes: int) -> bytes:
    return b"".join(bytes(buffer) for batch in pdata.encode_data_set(payload, context_id, max_pdu_length, batch_bytes)
                    for buffer in batch.buffers)


@pytest.mark.parametrize("size", [1, 5, 16_376, 16_377, 100_000, 525_534])
@pytest.mark.parametrize("max_pdu_length", [16_382, 16_384, 65_536, 7])
def test_same_bytes_as_pynetdicom(size: int, max_pdu_length: int) -> None:
    payload = os.urandom(size)
    expected = _pynetdicom_data_pdus(payload, 5, max_pdu_length)
    assert _ours(payload, 5, max_pdu_length, pdata.BATCH_BYTES) == expected
    assert _ours(memoryview(payload), 5, max_pdu_length, 1) == expected  # One PDU per batch.


def test_unlimited_peer_gets_bounded_fragments() -> None:
    """Maximum Length Received 0 (no limit): pynetdicom sends one fragment; any split is
    valid, and a big payload is cut into 1 MiB fragments so it is never read whole."""
    payload = os.urandom(2 * pdata.UNLIMITED_FRAGMENT_BYTES + 3)
    batches = list(pdata.encode_data_set(payload, 1, 0))
    fragments = [bytes(b) for batch in batches for b in batch.buffers[1::2]]
    assert [len(f) for f in fragments] == [pdata.UNLIMITED_FRAGMENT_BYTES] * 2 + [3]
    assert b"".join(fragments) == payload
    headers = [bytes(b) for batch in batches for b in batch.buffers[0::2]]
    assert [h[-1] for h in headers] == [pdata.DATA_FRAGMENT] * 2 + [pdata.DATA_FRAGMENT_LAST]


def test_batches_account_for_every_byte_and_do_not_copy() -> None:
    payload = memoryview(os.urandom(300_000))
    batches = list(pdata.encode_data_set(payload, 3, 16_384, batch_bytes=64 * 1024))
    assert sum(b.pdus for b in batches) == -(-300_000 // (16_384 - 6))
    assert sum(b.size for b in batches) == 300_000 + pdata.HEADER_BYTES * sum(b.pdus for b in batches)
    assert all(sum(len(x) for x in b.buffers) == b.size for b in batches)
    assert all(isinstance(fragment, memoryview) and fragment.obj is payload.obj
               for b in batches for fragment in b.buffers[1::2])
    assert not list(pdata.encode_data_set(b"", 3, 16_384))


def test_a_peer_maximum_without_room_for_data_is_refused() -> None:
    with pytest.raises(ValueError):
        list(pdata.encode_data_set(b"x", 1, 6))


@pytest.mark.parametrize("sizes", [(12, 70_000, 12, 1, 12, 200_000), (12, 0, 70_000, 0, 12, 0),
                                   (12, 300) * 600])  # Empty buffers; more than one sendmsg's 512.
def test_send_buffers_writes_everything_in_order_through_partial_sends(sizes: tuple[int, ...]) -> None:
    """A small send buffer and a reader that drains slowly force partial sendmsg calls."""
    left, right = socket.socketpair()
    try:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        buffers = tuple(os.urandom(n) for n in sizes)
        expected = b"".join(buffers)
        received = bytearray()

        def drain() -> None:
            while len(received) < len(expected):
                chunk = right.recv(3000)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        # Views as the payload's slices, bytes as the PDU headers, one view of 2-byte items.
        mixed = tuple(memoryview(b) if i % 3 else b for i, b in enumerate(buffers))
        mixed = tuple(memoryview(b).cast("H") if i == 2 and len(b) % 2 == 0 and len(b) else b
                      for i, b in enumerate(mixed))
        _send_buffers(left, mixed)
        reader.join(timeout=10)
        assert bytes(received) == expected
    finally:
        left.close()
        right.close()


# ----------------------------------------------------------------- the command set
from hypothesis import given, settings
from hypothesis import strategies as st

_UIDS = st.from_regex(r"\A[12](\.[1-9][0-9]{0,8}){1,7}\Z").filter(lambda uid: len(uid) <= 64)  # UIDs: 64 at most.
_AE_TITLES = st.from_regex(r"\A[A-Z0-9_]{1,16}\Z")


def _pynetdicom_command_pdus(context_id: int, max_pdu_length: int, **fields: object) -> bytes:
    request = C_STORE()
    for name, value in fields.items():
        setattr(request, name, value)
    request.DataSet = BytesIO(b"\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    primitives = list(message.encode_msg(context_id, max_pdu_length))
    command = [p for p in primitives if p.presentation_data_value_list[0][1][0] & 0x01]
    return b"".join(P_DATA_TF(p).encode() for p in command)


@settings(max_examples=200, deadline=None)
@given(sop_class=_UIDS, sop_instance=_UIDS, message_id=st.integers(0, 0xFFFF), priority=st.sampled_from([0, 1, 2]),
       originator=st.none() | _AE_TITLES, originator_id=st.none() | st.integers(0, 0xFFFF),
       context_id=st.sampled_from([1, 3, 255]), max_pdu_length=st.sampled_from([0, 16_384, 262_144]))
def test_store_command_is_pynetdicoms_bytes(sop_class: str, sop_instance: str, message_id: int, priority: int,
                                            originator: str | None, originator_id: int | None, context_id: int,
                                            max_pdu_length: int) -> None:
    expected = _pynetdicom_command_pdus(
        context_id, max_pdu_length, MessageID=message_id, Priority=priority, AffectedSOPClassUID=sop_class,
        AffectedSOPInstanceUID=sop_instance, MoveOriginatorApplicationEntityTitle=originator,
        MoveOriginatorMessageID=originator_id)
    ours = pdata.store_command_pdu(context_id, max_pdu_length, message_id=message_id, priority=priority,
                                   sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                   move_originator_aet=originator, move_originator_message_id=originator_id)
    assert ours == expected


@settings(max_examples=200, deadline=None)
@given(sop_class=st.none() | _UIDS, sop_instance=st.none() | _UIDS, message_id=st.integers(0, 0xFFFF),
       status=st.sampled_from([0x0000, 0xA700, 0xA701, 0xA900, 0xB000, 0xC000, 0x0117, 0x0122, 0x0124]),
       context_id=st.sampled_from([1, 3, 255]), max_pdu_length=st.sampled_from([0, 16_384, 262_144]))
def test_store_response_is_pynetdicoms_bytes(sop_class: str | None, sop_instance: str | None, message_id: int,
                                             status: int, context_id: int, max_pdu_length: int) -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.AffectedSOPInstanceUID = sop_instance
    response.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu_length))
    ours = pdata.store_response_pdu(context_id, max_pdu_length, message_id_responded=message_id, status=status,
                                    sop_class_uid=sop_class, sop_instance_uid=sop_instance)
    assert ours == expected


@settings(max_examples=200, deadline=None)
@given(command=st.sampled_from(["C_GET", "C_MOVE"]), sop_class=st.none() | _UIDS, message_id=st.integers(0, 0xFFFF),
       status=st.sampled_from([0xFF00, 0xFF01]),
       counts=st.lists(st.none() | st.integers(0, 0xFFFF), min_size=4, max_size=4),
       context_id=st.sampled_from([1, 3, 255]), max_pdu_length=st.sampled_from([0, 16_384, 262_144]))
def test_pending_retrieve_response_is_pynetdicoms_bytes(command: str, sop_class: str | None, message_id: int,
                                                        status: int, counts: list[int | None], context_id: int,
                                                        max_pdu_length: int) -> None:
    from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
    from pynetdicom.dimse_primitives import C_GET, C_MOVE

    primitive_class, message_class, field = {"C_GET": (C_GET, C_GET_RSP, pdata.C_GET_RSP_FIELD),
                                             "C_MOVE": (C_MOVE, C_MOVE_RSP, pdata.C_MOVE_RSP_FIELD)}[command]
    response = primitive_class()
    response.MessageID = message_id
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.Status = status
    response.Identifier = None
    remaining, completed, failed, warning = counts
    response.NumberOfRemainingSuboperations = remaining
    response.NumberOfCompletedSuboperations = completed
    response.NumberOfFailedSuboperations = failed
    response.NumberOfWarningSuboperations = warning
    message = message_class()
    message.primitive_to_message(response)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu_length))
    ours = pdata.retrieve_response_pdu(context_id, max_pdu_length, command_field=field, message_id_responded=message_id,
                                       status=status, sop_class_uid=sop_class, remaining=remaining,
                                       completed=completed, failed=failed, warning=warning)
    assert ours == expected


def test_pending_retrieve_response_too_big_for_the_peers_pdu_is_left_to_pynetdicom() -> None:
    fields = dict(command_field=pdata.C_GET_RSP_FIELD, message_id_responded=1, status=0xFF00,
                  sop_class_uid="1.2.840.10008.5.1.4.1.2.2.3", remaining=3, completed=1, failed=0, warning=0)
    response = pdata.retrieve_response_pdu(1, 0, **fields)  # type: ignore[arg-type]
    assert response is not None
    fits = len(response) - pdata.HEADER_BYTES + 6
    assert pdata.retrieve_response_pdu(1, fits, **fields) == response  # type: ignore[arg-type]
    assert pdata.retrieve_response_pdu(1, fits - 1, **fields) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pdata.retrieve_response_pdu(1, 0, **{**fields, "command_field": 0x8001})  # type: ignore[arg-type]


def _pynetdicom_response_command(**fields: object) -> bytes:
    response = C_STORE()
    for name, value in fields.items():
        setattr(response, name, value)
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    (pdu,) = [P_DATA_TF(p).encode() for p in message.encode_msg(1, 0)]
    return pdu[pdata.HEADER_BYTES:]


@settings(max_examples=200, deadline=None)
@given(sop_class=st.none() | _UIDS, sop_instance=st.none() | _UIDS, message_id=st.integers(0, 0xFFFF),
       status=st.integers(0, 0xFFFF))
def test_store_response_parse_reads_what_pynetdicom_wrote(sop_class: str | None, sop_instance: str | None,
                                                          message_id: int, status: int) -> None:
    command = _pynetdicom_response_command(MessageIDBeingRespondedTo=message_id, AffectedSOPClassUID=sop_class,
                                           AffectedSOPInstanceUID=sop_instance, Status=status)
    assert pdata.parse_store_response(command) == pdata.StoreResponse(message_id, status, sop_class, sop_instance)


def test_store_response_parse_leaves_anything_else_to_pynetdicom() -> None:
    plain = dict(MessageIDBeingRespondedTo=3, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                 AffectedSOPInstanceUID="1.2.3.4", Status=0xA700)
    command = _pynetdicom_response_command(**plain)
    assert pdata.parse_store_response(command) is not None
    assert pdata.parse_store_response(_pynetdicom_response_command(**plain, ErrorComment="disk full")) is None
    assert pdata.parse_store_response(_pynetdicom_response_command(**plain, OffendingElement=[0x00100010])) is None
    for cut in (1, 7, 8, 20, len(command) - 1):
        assert pdata.parse_store_response(command[:cut]) is None
    wrong_length = command[:8] + (len(command)).to_bytes(4, "little") + command[12:]
    assert pdata.parse_store_response(wrong_length) is None
    # A C-STORE-RQ command (a data set follows) and a C-ECHO-RSP are not C-STORE responses.
    request = pdata.store_command_pdu(1, 0, message_id=1, priority=0, sop_class_uid="1.2", sop_instance_uid="1.3")
    assert request is not None and pdata.parse_store_response(request[pdata.HEADER_BYTES:]) is None
    from pynetdicom.dimse_messages import C_ECHO_RSP
    from pynetdicom.dimse_primitives import C_ECHO

    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo, echo.Status = 1, 0
    message = C_ECHO_RSP()
    message.primitive_to_message(echo)
    (pdu,) = [P_DATA_TF(p).encode() for p in message.encode_msg(1, 0)]
    assert pdata.parse_store_response(pdu[pdata.HEADER_BYTES:]) is None


def test_store_response_too_big_for_the_peers_pdu_is_left_to_pynetdicom() -> None:
    fields = dict(message_id_responded=1, status=0, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                  sop_instance_uid="1.2.3.4")
    response = pdata.store_response_pdu(1, 0, **fields)  # type: ignore[arg-type]
    assert response is not None
    fits = len(response) - pdata.HEADER_BYTES + 6
    assert pdata.store_response_pdu(1, fits, **fields) == response  # type: ignore[arg-type]
    assert pdata.store_response_pdu(1, fits - 1, **fields) is None  # type: ignore[arg-type]


def test_store_command_too_big_for_the_peers_pdu_is_left_to_pynetdicom() -> None:
    fields = dict(message_id=1, priority=2, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4")
    command = pdata.store_command_pdu(1, 0, **fields)  # type: ignore[arg-type]
    assert command is not None
    fits = len(command) - pdata.HEADER_BYTES + 6  # The PDU's variable field: one PDV item.
    assert pdata.store_command_pdu(1, fits, **fields) == command  # type: ignore[arg-type]
    assert pdata.store_command_pdu(1, fits - 1, **fields) is None  # type: ignore[arg-type]


def test_command_goes_first_in_the_first_batch() -> None:
    command = b"C" * 20
    payload = os.urandom(300_000)
    batches = list(pdata.with_command(command, pdata.encode_data_set(payload, 1, 16_384)))
    plain = list(pdata.encode_data_set(payload, 1, 16_384))
    assert batches[0].buffers[0] == command
    assert b"".join(bytes(b) for batch in batches for b in batch.buffers) == command + b"".join(
        bytes(b) for batch in plain for b in batch.buffers)
    assert batches[0].size == len(command) + plain[0].size and batches[0].pdus == plain[0].pdus + 1
    assert list(pdata.with_command(command, iter(()))) == [pdata.EncodedPData((command,), 20, 1)]


@settings(max_examples=60, deadline=None)
@given(sop_class=st.none() | st.sampled_from(["1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.1.1"]),
       message_id=st.integers(0, 0xFFFF), status=st.sampled_from([0xFF00, 0xFF01]),
       identifier_size=st.sampled_from([2, 10, 300, 16_376, 16_377, 40_000]),
       context_id=st.sampled_from([1, 3, 255]), max_pdu_length=st.sampled_from([0, 16_384, 262_144]))
def test_pending_find_response_is_pynetdicoms_bytes(sop_class: str | None, message_id: int, status: int,
                                                    identifier_size: int, context_id: int,
                                                    max_pdu_length: int) -> None:
    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND

    identifier = os.urandom(identifier_size)
    response = C_FIND()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.Status = status
    response.Identifier = BytesIO(identifier)
    message = C_FIND_RSP()
    message.primitive_to_message(response)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu_length))
    ours = pdata.find_response_pdus(context_id, max_pdu_length, message_id_responded=message_id, status=status,
                                    sop_class_uid=sop_class, identifier=identifier)
    assert ours is not None
    assert b"".join(bytes(buffer) for buffer in ours.buffers) == expected
    assert ours.size == len(expected)


def test_pending_find_response_too_big_for_the_peers_pdu_is_left_to_pynetdicom() -> None:
    fields = dict(message_id_responded=1, status=0xFF00, sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1",
                  identifier=b"\x10\x00\x10\x00\x02\x00\x00\x00AB")
    response = pdata.find_response_pdus(1, 0, **fields)  # type: ignore[arg-type]
    assert response is not None
    command = response.buffers[0]
    fits = len(command) - pdata.HEADER_BYTES + 6
    assert pdata.find_response_pdus(1, fits, **fields) is not None  # type: ignore[arg-type]
    assert pdata.find_response_pdus(1, fits - 1, **fields) is None  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(sop_class=st.none() | st.just("1.2.840.10008.1.1"), message_id=st.integers(0, 0xFFFF),
       status=st.sampled_from([0x0000, 0x0122, 0x0210, 0xC000]), context_id=st.sampled_from([1, 3, 255]),
       max_pdu_length=st.sampled_from([0, 16_384]))
def test_echo_response_is_pynetdicoms_bytes(sop_class: str | None, message_id: int, status: int, context_id: int,
                                            max_pdu_length: int) -> None:
    from pynetdicom.dimse_messages import C_ECHO_RSP
    from pynetdicom.dimse_primitives import C_ECHO

    response = C_ECHO()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.Status = status
    message = C_ECHO_RSP()
    message.primitive_to_message(response)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu_length))
    assert pdata.echo_response_pdu(context_id, max_pdu_length, message_id_responded=message_id, status=status,
                                   sop_class_uid=sop_class) == expected


def _pynetdicom_echo_request_command(**fields: Any) -> bytes:
    """The command set (after the message control header) pynetdicom encodes for a C-ECHO-RQ."""
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO

    primitive = C_ECHO()
    for keyword, value in fields.items():
        setattr(primitive, keyword, value)
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    (pdu,) = [P_DATA_TF(p).encode() for p in message.encode_msg(1, 0)]
    assert pdu[pdata.HEADER_BYTES - 1] == pdata.COMMAND_FRAGMENT_LAST
    return pdu[pdata.HEADER_BYTES:]


@pytest.mark.parametrize("message_id", [1, 7, 65535])
def test_echo_request_parse_reads_pynetdicoms_encoding(message_id: int) -> None:
    command = _pynetdicom_echo_request_command(MessageID=message_id, AffectedSOPClassUID="1.2.840.10008.1.1")
    assert pdata.parse_echo_request(command) == pdata.EchoRequest(message_id, "1.2.840.10008.1.1")


def test_echo_request_parse_leaves_anything_else_to_pynetdicom() -> None:
    command = _pynetdicom_echo_request_command(MessageID=3, AffectedSOPClassUID="1.2.840.10008.1.1")
    assert pdata.parse_echo_request(command) is not None
    for cut in (1, 7, 8, 20, len(command) - 1):
        assert pdata.parse_echo_request(command[:cut]) is None
    wrong_length = command[:8] + (len(command)).to_bytes(4, "little") + command[12:]
    assert pdata.parse_echo_request(wrong_length) is None
    # One more element (a Priority), the same element twice, a C-STORE-RSP, a C-STORE-RQ: not a plain C-ECHO-RQ.
    extra = command + bytes.fromhex("00000007") + (2).to_bytes(4, "little") + (0).to_bytes(2, "little")
    assert pdata.parse_echo_request(extra) is None
    twice = command + command[12:]
    assert pdata.parse_echo_request(twice) is None
    response = _pynetdicom_response_command(MessageIDBeingRespondedTo=3, AffectedSOPClassUID="1.2.840.10008.1.1",
                                            AffectedSOPInstanceUID="1.2.3", Status=0)
    assert pdata.parse_echo_request(response) is None
    request = pdata.store_command_pdu(1, 0, message_id=1, priority=0, sop_class_uid="1.2", sop_instance_uid="1.3")
    assert request is not None and pdata.parse_echo_request(request[pdata.HEADER_BYTES:]) is None


@settings(max_examples=60, deadline=None)
@given(sop_class=st.none() | st.sampled_from(["1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.31"]),
       message_id=st.integers(0, 0xFFFF), status=st.sampled_from([0x0000, 0xFE00, 0xA700, 0xC000, 0x0122]),
       context_id=st.sampled_from([1, 3, 255]), max_pdu_length=st.sampled_from([0, 16_384]))
def test_final_find_response_is_pynetdicoms_bytes(sop_class: str | None, message_id: int, status: int,
                                                  context_id: int, max_pdu_length: int) -> None:
    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND

    response = C_FIND()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = sop_class
    response.Status = status
    message = C_FIND_RSP()
    message.primitive_to_message(response)
    expected = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu_length))
    assert pdata.find_final_response_pdu(context_id, max_pdu_length, message_id_responded=message_id, status=status,
                                         sop_class_uid=sop_class) == expected


def _pynetdicom_store_request_command(**fields: object) -> bytes:
    """The command set bytes (without PDU or PDV headers) pynetdicom encodes for a C-STORE-RQ."""
    request = C_STORE()
    for name, value in fields.items():
        setattr(request, name, value)
    request.DataSet = BytesIO(b"\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    primitives = list(message.encode_msg(1, 0))
    return b"".join(p.presentation_data_value_list[0][1][1:] for p in primitives
                    if p.presentation_data_value_list[0][1][0] & 0x01)


@settings(max_examples=200, deadline=None)
@given(sop_class=_UIDS, sop_instance=_UIDS, message_id=st.integers(0, 0xFFFF), priority=st.sampled_from([0, 1, 2]),
       originator=st.none() | _AE_TITLES, originator_id=st.integers(0, 0xFFFF))
def test_store_request_parse_gives_what_pynetdicom_decodes(sop_class: str, sop_instance: str, message_id: int,
                                                           priority: int, originator: str | None,
                                                           originator_id: int) -> None:
    fields: dict[str, object] = {"MessageID": message_id, "AffectedSOPClassUID": sop_class,
                                 "AffectedSOPInstanceUID": sop_instance, "Priority": priority}
    if originator is not None:
        fields |= {"MoveOriginatorApplicationEntityTitle": originator, "MoveOriginatorMessageID": originator_id}
    command = _pynetdicom_store_request_command(**fields)
    message = C_STORE_RQ()
    message.encoded_command_set = BytesIO(command)
    from pynetdicom.dsutils import decode

    message.command_set = decode(BytesIO(command), True, True)
    message.data_set = BytesIO(b"\x00\x00")
    decoded = message.message_to_primitive()
    parsed = pdata.parse_store_request(command)
    assert parsed == pdata.StoreRequest(
        int(decoded.MessageID), int(decoded.Priority), str(decoded.AffectedSOPClassUID),
        str(decoded.AffectedSOPInstanceUID),
        None if decoded.MoveOriginatorApplicationEntityTitle is None else str(decoded.MoveOriginatorApplicationEntityTitle),
        None if decoded.MoveOriginatorMessageID is None else int(decoded.MoveOriginatorMessageID))


def test_store_request_parse_leaves_anything_else_to_pynetdicom() -> None:
    command = _pynetdicom_store_request_command(MessageID=3, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                                                AffectedSOPInstanceUID="1.2.3.4", Priority=0)
    assert pdata.parse_store_request(command) is not None
    for cut in (1, 7, 8, 20, len(command) - 1):
        assert pdata.parse_store_request(command[:cut]) is None
    wrong_length = command[:8] + (len(command)).to_bytes(4, "little") + command[12:]
    assert pdata.parse_store_request(wrong_length) is None
    assert pdata.parse_store_request(command + command[12:]) is None  # Every element twice.
    # An element a C-STORE-RQ does not have (Status), no data set, two UIDs in one value.
    extra = command + bytes.fromhex("00000009") + (2).to_bytes(4, "little") + (0).to_bytes(2, "little")
    assert pdata.parse_store_request(extra) is None
    no_data = command.replace(bytes.fromhex("00000008") + (2).to_bytes(4, "little") + (0x0001).to_bytes(2, "little"),
                              bytes.fromhex("00000008") + (2).to_bytes(4, "little") + (0x0101).to_bytes(2, "little"))
    assert no_data != command and pdata.parse_store_request(no_data) is None
    two = _pynetdicom_store_request_command(MessageID=3, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                                            AffectedSOPInstanceUID="1.2.3.4", Priority=0)
    two = two.replace(b"1.2.3.4\x00", b"1.2\\3.4\x00")
    assert pdata.parse_store_request(two) is None
    echo = _pynetdicom_echo_request_command(MessageID=3, AffectedSOPClassUID="1.2.840.10008.1.1")
    assert pdata.parse_store_request(echo) is None
