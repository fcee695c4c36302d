"""node/pdata.py encodes a data set's P-DATA-TF PDUs itself; on the wire they must be the
bytes pynetdicom 3.0.4's own encoder makes (DIMSEMessage.encode_msg + P_DATA_TF.encode)."""

from __future__ import annotations

import os
import socket
import threading
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ
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


def test_send_buffers_writes_everything_in_order_through_partial_sends() -> None:
    """A small send buffer and a reader that drains slowly force partial sendmsg calls."""
    left, right = socket.socketpair()
    try:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        buffers = tuple(os.urandom(n) for n in (12, 70_000, 12, 1, 12, 200_000))
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
        _send_buffers(left, tuple(memoryview(b) for b in buffers))
        reader.join(timeout=10)
        assert bytes(received) == expected
    finally:
        left.close()
        right.close()
