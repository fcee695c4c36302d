"""The node process's own front end as a receiver of the hand-off (node/workers.py
ConnectionHandOff.serve_local, dicom_local_associations): it takes a connection while it
serves fewer than its maximum, the workers get the rest, and it takes every connection
while no worker is registered. Real sockets: a listening TCP socket and socket pairs whose
far ends stand for the node's front end and the workers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pacsnode.node.archive_channel import ENDED, ENDED_WITH_SLOT, NO_SLOT, SLOT_GIVEN, AssociationSlots
from pacsnode.node.workers import ConnectionHandOff

from .test_connection_handoff import Worker, _connect, _until


class Local(Worker):
    """The node front end's end of its pair (registered by serve_local, not serve_worker)."""

    def __init__(self, handoff: ConnectionHandOff, local_max: int) -> None:  # noqa: super's thread not wanted
        self.node_side, self.side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.received: list[tuple[bytes, socket.socket]] = []
        handoff.serve_local(self.node_side, local_max)
        threading.Thread(target=self._read, daemon=True).start()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    yield sock
    sock.close()


@pytest.mark.parametrize("local_max", [1, 2])
def test_the_node_takes_connections_up_to_its_maximum_then_the_workers_do(listener: socket.socket,
                                                                           local_max: int) -> None:
    slots = AssociationSlots(5)
    handoff = ConnectionHandOff(listener, slots)
    local = Local(handoff, local_max)
    first, second = Worker(handoff), Worker(handoff)
    assert _until(lambda: len(handoff.open_counts()) == 3)
    handoff.start()
    clients: list[socket.socket] = []
    try:
        for count in range(1, local_max + 1):  # One after another: the node's own.
            clients.append(_connect(listener))
            assert _until(lambda: len(local.received) == count)
        assert handoff.local_open() == local_max
        clients += [_connect(listener) for _ in range(4)]
        assert _until(lambda: len(first.received) + len(second.received) == 4)
        assert (len(first.received), len(second.received)) == (2, 2)  # Fewest open, as before.
        assert len(local.received) == local_max
        # max_associations counts the node's connections too: five slots, the rest came without.
        sent = [message for end in (local, first, second) for message, _ in end.received]
        assert sorted(sent) == sorted([SLOT_GIVEN] * 5 + [NO_SLOT] * (local_max + 4 - 5))
        # One of the node's ends (with its slot, if it had one): the next connection is the node's again.
        message, _conn = local.received[0]
        local.end(ENDED_WITH_SLOT if message == SLOT_GIVEN else ENDED)
        assert _until(lambda: handoff.local_open() == local_max - 1)
        clients.append(_connect(listener))
        assert _until(lambda: len(local.received) == local_max + 1)
        assert len(first.received) + len(second.received) == 4
    finally:
        handoff.close()
        for client in clients:
            client.close()
        for end in (local, first, second):
            end.close()


def test_with_no_worker_registered_the_node_serves_every_connection(listener: socket.socket) -> None:
    handoff = ConnectionHandOff(listener, AssociationSlots(10), wait_s=0.2)
    local = Local(handoff, 1)
    assert _until(lambda: len(handoff.open_counts()) == 1)
    handoff.start()
    clients = [_connect(listener) for _ in range(3)]  # Over its maximum, but no worker is up (a restart).
    try:
        assert _until(lambda: len(local.received) == 3)
        worker = Worker(handoff)  # A worker back: the next goes to it (the node has its one and more).
        assert _until(lambda: len(handoff.open_counts()) == 2)
        clients.append(_connect(listener))
        assert _until(lambda: len(worker.received) == 1)
        assert len(local.received) == 3
        worker.close()
    finally:
        handoff.close()
        for client in clients:
            client.close()
        local.close()
