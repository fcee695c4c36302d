"""The node's hand-over of DICOM connections to its workers (node/workers.py
ConnectionHandOff), with real sockets: a listening TCP socket and two workers' HANDOFF
connections (socket pairs whose far ends stand for the workers)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pacsnode.node.archive_channel import ENDED, ENDED_WITH_SLOT, NO_SLOT, SLOT_GIVEN, AssociationSlots
from pacsnode.node.workers import ConnectionHandOff


class Worker:
    """A worker's end of its HANDOFF connection: takes the sockets as they come."""

    def __init__(self, handoff: ConnectionHandOff, reading: bool = True) -> None:
        self.node_side, self.side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.received: list[tuple[bytes, socket.socket]] = []
        threading.Thread(target=handoff.serve_worker, args=(self.node_side, {}), daemon=True).start()
        if reading:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message, fds, _flags, _address = socket.recv_fds(self.side, 1, 1)
            except OSError:
                return
            if not message:
                return
            self.received.append((message, socket.socket(fileno=fds[0])))

    def end(self, byte: bytes) -> None:
        self.side.send(byte)

    def close(self) -> None:
        for _message, conn in self.received:
            conn.close()
        self.side.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    yield sock
    sock.close()


def _until(check, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return bool(check())


def _connect(listener: socket.socket) -> socket.socket:
    return socket.create_connection(listener.getsockname(), timeout=5)


def test_connections_go_to_the_worker_with_the_fewest_open_and_carry_their_slot(listener: socket.socket) -> None:
    slots = AssociationSlots(3)
    handoff = ConnectionHandOff(listener, slots)
    first, second = Worker(handoff), Worker(handoff)
    assert _until(lambda: len(handoff.open_counts()) == 2)
    handoff.start()
    clients = [_connect(listener) for _ in range(4)]
    try:
        assert _until(lambda: len(first.received) + len(second.received) == 4)
        assert (len(first.received), len(second.received)) == (2, 2)
        # Three slots: three connections came with one, the fourth without (rejected busy by its worker).
        bytes_sent = sorted(message for w in (first, second) for message, _ in w.received)
        assert bytes_sent == sorted([SLOT_GIVEN] * 3 + [NO_SLOT])
        assert slots.in_use() == 3
        # The first worker's two end (one held a slot, if it had the slotless one: ENDED for that).
        for message, _conn in first.received:
            first.end(ENDED_WITH_SLOT if message == SLOT_GIVEN else ENDED)
        assert _until(lambda: handoff.open_counts().count(0) == 1)
        assert _until(lambda: slots.in_use() == sum(m == SLOT_GIVEN for m, _ in second.received))
        clients += [_connect(listener) for _ in range(2)]  # Both to the worker with none open.
        assert _until(lambda: len(first.received) == 4)
        assert len(second.received) == 2
    finally:
        handoff.close()
        for client in clients:
            client.close()
        first.close()
        second.close()


def test_a_worker_that_stops_taking_connections_is_passed_over_not_waited_for(listener: socket.socket) -> None:
    handoff = ConnectionHandOff(listener, AssociationSlots(10_000))
    stuck = Worker(handoff, reading=False)  # Never reads: its queue fills.
    stuck.side.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.node_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
    taking = Worker(handoff)
    assert _until(lambda: len(handoff.open_counts()) == 2)
    handoff.start()
    count = 300
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            clients.append(_connect(listener))
        # Every connection was handed to one of them: the stuck worker's queue filled, and
        # the accept loop went on with the other instead of blocking on it.
        assert _until(lambda: handoff.handed == count, 10)
        assert len(taking.received) > count // 2
    finally:
        handoff.close()
        for client in clients:
            client.close()
        stuck.close()
        taking.close()


def test_a_connection_accepted_with_no_worker_is_closed(listener: socket.socket) -> None:
    handoff = ConnectionHandOff(listener, None, wait_s=0.2)
    handoff.start()
    client = _connect(listener)
    try:
        assert client.recv(1) == b""  # Closed by the node once no worker came.
    except ConnectionResetError:
        pass
    finally:
        client.close()
        handoff.close()
