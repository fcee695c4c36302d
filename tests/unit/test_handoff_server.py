"""A worker's side of the connection hand-over (node/dicom_worker.py HandoffServer), with
real sockets and pynetdicom: each handed connection's end goes back to the node exactly
once, with the slot it came with. pynetdicom ends a connection closed before its
A-ASSOCIATE-RQ twice over (AA-5's EVT_CONN_CLOSE, then the reactor's shutdown_request);
each extra ENDED_WITH_SLOT gave back a slot another association of the worker held, and
max_associations let one more in (the test harness's port probes right before
test_max_associations_shared_between_workers: its CI failure of stop 31)."""

from __future__ import annotations

import array
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE, evt

from pacsnode.node import acceptor, association_guard
from pacsnode.node.archive_channel import ENDED, ENDED_WITH_SLOT, NO_SLOT, SLOT_GIVEN
from pacsnode.node.dicom_worker import HandoffServer

VERIFICATION = "1.2.840.10008.1.1"


class Worker:
    """A HandoffServer serving (as a worker's does) and the node's side of its channel."""

    def __init__(self, reject: bool = False) -> None:
        self.node_side, worker_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ae = AE(ae_title="PACSNODE")
        ae.add_supported_context(VERIFICATION)
        ae.acse_timeout = 5
        handlers = [(evt.EVT_C_ECHO, lambda event: 0x0000)]
        if reject:
            handlers.append((evt.EVT_REQUESTED, self._reject))
        self.server = ae.make_server(("127.0.0.1", 0), evt_handlers=handlers, server_class=HandoffServer)
        self.server.handoff = worker_side
        ae._servers.append(self.server)
        self.server.bind(evt.EVT_CONN_OPEN, self.server.on_open)
        self.server.bind(evt.EVT_CONN_CLOSE, self.server.connection_ended)
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": acceptor.ACCEPT_POLL_S}, daemon=True)
        self._thread.start()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.ends = b""

    @staticmethod
    def _reject(event: evt.Event) -> None:  # As a worker rejects one without a slot (busy).
        event.assoc.rejection = association_guard.Rejection(association_guard.RejectReason.BUSY,
                                                            association_guard.RESULT_TRANSIENT,
                                                            association_guard.SOURCE_PROVIDER_PRESENTATION, 0x02)
        association_guard.on_requested(event)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def hand(self, slot: bytes) -> None:
        """The node's hand-over of the next connection to this port."""
        conn, _address = self.listener.accept()
        with conn:
            self.node_side.sendmsg([slot], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))])

    def read_ends(self, quiet_s: float = 1.5, timeout_s: float = 15.0) -> bytes:
        """The end bytes sent back until none came for quiet_s."""
        deadline = time.monotonic() + timeout_s
        self.node_side.settimeout(quiet_s)
        while time.monotonic() < deadline:
            try:
                data = self.node_side.recv(64)
            except TimeoutError:
                break
            if not data:
                break
            self.ends += data
        return self.ends

    def close(self) -> None:
        self.server.shutdown()
        self.node_side.close()
        self.listener.close()


@pytest.fixture
def worker() -> Iterator[Worker]:
    made = Worker()
    yield made
    made.close()


def _associate(port: int) -> object:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = 10
    ae.add_requested_context(VERIFICATION)
    return ae.associate("127.0.0.1", port, ae_title="PACSNODE")


def test_a_connection_closed_before_its_request_is_reported_ended_once(worker: Worker) -> None:
    # A port probe (the test harness's own, a load balancer's health check): connect, close.
    for _ in range(3):
        probe = socket.create_connection(("127.0.0.1", worker.port))
        worker.hand(SLOT_GIVEN)
        probe.close()
    assert worker.read_ends() == ENDED_WITH_SLOT * 3
    assert worker.server.handed_open() == 0


def test_a_released_association_is_reported_ended_once_with_its_slot(worker: Worker) -> None:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(_associate(worker.port)))
    thread.start()
    worker.hand(SLOT_GIVEN)
    thread.join(15)
    assoc = result[0]
    assert assoc.is_established  # type: ignore[attr-defined]
    assert worker.read_ends(quiet_s=0.3) == b""  # Held while it is open.
    assoc.release()  # type: ignore[attr-defined]
    assert worker.read_ends() == ENDED_WITH_SLOT


def test_a_rejected_association_is_reported_ended_once() -> None:
    worker = Worker(reject=True)
    try:
        for slot in (NO_SLOT, SLOT_GIVEN):
            result: list[object] = []
            thread = threading.Thread(target=lambda: result.append(_associate(worker.port)))
            thread.start()
            worker.hand(slot)
            thread.join(15)
            assert result[0].is_rejected  # type: ignore[attr-defined]
        assert worker.read_ends() == ENDED + ENDED_WITH_SLOT
    finally:
        worker.close()
