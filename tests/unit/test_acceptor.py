"""The acceptor subclasses pynetdicom internals: it runs on tested versions only, and its
negotiation checks and wake-ups behave as documented."""

from __future__ import annotations

import contextlib
import importlib.metadata
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ

from pacsnode.node import acceptor, association_guard
from pacsnode.node.association_guard import RejectReason
from tests.integration import rawpdu


def test_installed_pynetdicom_is_a_tested_version() -> None:
    """Fails on an untested pynetdicom: run tests/integration/test_protocol_hardening.py
    and the single-node tests on it, read its reactor changes, then add it to
    TESTED_PYNETDICOM_VERSIONS and to the pin in pyproject.toml."""
    installed = importlib.metadata.version("pynetdicom")
    assert installed in acceptor.TESTED_PYNETDICOM_VERSIONS, installed
    acceptor.check_pynetdicom_version()


def test_pyproject_pins_the_tested_version() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    pins = [v for v in acceptor.TESTED_PYNETDICOM_VERSIONS if f'"pynetdicom=={v}"' in text]
    assert pins, "pyproject.toml must pin pynetdicom to a version in TESTED_PYNETDICOM_VERSIONS"


def test_an_untested_version_is_refused_at_start() -> None:
    with pytest.raises(acceptor.UntestedPynetdicom, match="3.1.0"):
        acceptor.check_pynetdicom_version("3.1.0")


def _decoded(contexts: list[bytes] | None = None, **kwargs: str) -> A_ASSOCIATE_RQ:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(rawpdu.associate_rq(contexts, **kwargs))  # type: ignore[arg-type]
    return pdu


@pytest.mark.parametrize(
    ("contexts", "kwargs", "reason", "diagnostic"),
    [
        (None, {}, None, None),
        ([rawpdu.presentation_context(2, rawpdu.VERIFICATION, [rawpdu.IMPLICIT_VR_LE])], {},
         RejectReason.PRESENTATION_CONTEXT_ID, 1),
        ([rawpdu.presentation_context(3, rawpdu.VERIFICATION, [rawpdu.IMPLICIT_VR_LE]),
          rawpdu.presentation_context(3, rawpdu.CT_IMAGE_STORAGE, [rawpdu.IMPLICIT_VR_LE])], {},
         RejectReason.PRESENTATION_CONTEXT_ID, 1),
        ([], {}, RejectReason.NO_PRESENTATION_CONTEXT, 1),
        (None, {"application_context": "1.2.3"}, RejectReason.APPLICATION_CONTEXT, 2),
    ],
)
def test_check_request(contexts: list[bytes] | None, kwargs: dict[str, str], reason: RejectReason | None,
                       diagnostic: int | None) -> None:
    pdu = _decoded(contexts, **kwargs)
    rejection = association_guard.check_request(pdu)
    if reason is None:
        assert rejection is None
        return
    assert rejection is not None and rejection.reason is reason
    assert (rejection.result, rejection.source, rejection.diagnostic) == (1, 1, diagnostic)
    assert association_guard.make_negotiable(pdu)
    pdu.to_primitive()  # What crashed pynetdicom's reactor for an even ID now builds.


def test_reason_of_pynetdicom_rejections() -> None:
    assert association_guard.reason_of(3, 2) is RejectReason.BUSY
    assert association_guard.reason_of(1, 7) is RejectReason.CALLED_AE_TITLE
    assert association_guard.reason_of(9, 9) is RejectReason.OTHER


def test_waking_queue_wakes_and_checkpoint_clear_wakes() -> None:
    woken = threading.Event()
    q = acceptor._WakingQueue(woken.set)
    q.put("x")
    assert woken.is_set() and q.get_nowait() == "x"
    woken.clear()
    checkpoint = acceptor._Checkpoint(woken.set)
    checkpoint.set()
    checkpoint.clear()
    assert woken.is_set() and not checkpoint.is_set()


def test_waker_wakes_a_select_and_is_safe_after_close() -> None:
    import select

    waker = acceptor._Waker()
    start = time.monotonic()
    threading.Timer(0.05, waker.wake).start()
    ready, _, _ = select.select([waker], [], [], 2.0)
    assert ready and time.monotonic() - start < 1.0
    waker.drain()
    assert select.select([waker], [], [], 0)[0] == []
    waker.close()
    waker.wake()  # After close: nothing, no error, no write to a reused descriptor.


def test_waits_work_on_descriptors_above_select_s_limit() -> None:
    import os
    import resource
    import socket

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1500:
        pytest.skip("needs RLIMIT_NOFILE > 1500")
    left, right = socket.socketpair()
    high = os.dup2(left.fileno(), 1500)
    try:
        assert not acceptor._wait_readable([high], 0.05)
        right.sendall(b"x")
        assert acceptor._wait_readable([high], 1.0)
    finally:
        os.close(high)
        left.close()
        right.close()


def test_stored_bytes_are_sent_by_subclasses_not_by_patching_pynetdicom() -> None:
    """issue 10 item 4: raw sending lives in the node's association subclasses; pynetdicom's
    Association keeps its own send_c_store, and the C-MOVE requestor side (NodeAE.associate)
    builds RequestorAssociations."""
    import inspect

    from pynetdicom.association import Association

    assert inspect.getmodule(Association.send_c_store).__name__ == "pynetdicom.association"
    for cls in (acceptor.AcceptorAssociation, acceptor.RequestorAssociation):
        assert cls.send_c_store is not Association.send_c_store
        assert inspect.getmodule(cls.send_c_store) is acceptor
    ae = acceptor.NodeAE(ae_title="T")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 2
    ae.network_timeout = 2
    ae.connection_timeout = 2
    from pacsnode.sim.process import free_port

    assoc = ae.associate("127.0.0.1", free_port())  # Nothing listens: refused, never started.
    assert isinstance(assoc, acceptor.RequestorAssociation)
    assert not assoc.is_established


def test_associations_share_one_supported_context_table_that_negotiation_leaves_alone() -> None:
    """issue 10 item 2: no per-association deep copy of the ~130-context table. Every
    accepted association negotiates against the server's one table (copied once when the
    server starts), and negotiation -- role selection included -- does not change it."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, Verification

    from pacsnode.node.dicom import TRANSFER_SYNTAXES
    from pacsnode.sim.process import free_port

    server_ae = acceptor.NodeAE(ae_title="SHARED")
    server_ae.add_supported_context(Verification)
    server_ae.add_supported_context(CTImageStorage, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    accepted: list[object] = []
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_ESTABLISHED, lambda event: accepted.append(event.assoc))])

    def snapshot() -> list[tuple[str, list[str], object, object, object]]:
        return [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax], cx.scu_role, cx.scp_role,
                 cx.context_id) for cx in server.shared_contexts]

    before = snapshot()
    try:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        client.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2"])
        port = server.server_address[1]
        for roles in ([], [build_role(CTImageStorage, scp_role=True)]):
            assoc = client.associate("127.0.0.1", port, ae_title="SHARED", ext_neg=roles)
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        assert len(accepted) == 2
        for server_side in accepted:
            assert server_side.acceptor.supported_contexts is server.shared_contexts  # type: ignore[attr-defined]
        assert snapshot() == before
        server_ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2.1")  # A later AE change: not in the table.
        assert snapshot() == before
    finally:
        server_ae.shutdown()


def test_store_responses_are_encoded_here_only_while_the_hook_is_the_one_sent_handler() -> None:
    """issue 10: a plain C-STORE-RSP is one PDU the acceptor encodes itself (no pynetdicom
    message, no EVT_DIMSE_SENT). The requestor gets the same responses either way; the
    StoreResponseHook's direct form is told of each; a handler bound to EVT_DIMSE_SENT that
    is not the hook's gets every response as a pynetdicom message, as before."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from pacsnode.sim.process import free_port

    statuses = iter([0x0000, 0xA700, 0x0000, 0xB007, 0x0000, 0x0000])

    def on_store(event: Any) -> int:
        return next(statuses)

    direct: list[tuple[int, int]] = []
    hooked: list[int] = []
    foreign: list[int] = []
    server_ae = acceptor.NodeAE(ae_title="STORE")
    server_ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server_ae.store_response_hook = acceptor.StoreResponseHook(
        lambda event: hooked.append(int(event.message.command_set.Status)),
        lambda assoc, message_id, status: direct.append((message_id, status)))
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()), [(evt.EVT_C_STORE, on_store)])

    def store_two() -> list[int]:
        # The node's own requestor: pynetdicom's plain one can lose a fast response between
        # two send_c_store calls (README, "Known limits"; failed here once at load 15).
        client = acceptor.NodeAE(ae_title="CLIENT")
        client.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="STORE")
        assert assoc.is_established
        got = []
        for _ in range(2):
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
            ds.PatientID = "P"
            ds.file_meta = Dataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            response = assoc.send_c_store(ds)
            got.append(int(response.Status))
        assoc.release()
        return got

    try:
        assert store_two() == [0x0000, 0xA700]  # No handler bound to EVT_DIMSE_SENT.
        assert direct == [] and hooked == []
        server.bind(evt.EVT_DIMSE_SENT, server_ae.store_response_hook.handler)
        assert store_two() == [0x0000, 0xB007]  # Only the hook's handler: told directly.
        assert direct == [(1, 0x0000), (1, 0xB007)] and hooked == []  # send_c_store: message ID 1.
        server.bind(evt.EVT_DIMSE_SENT, lambda event: foreign.append(int(event.message.command_set.Status)))
        assert store_two() == [0x0000, 0x0000]  # Another handler too: pynetdicom's messages, to both.
        assert foreign == [0x0000, 0x0000] and hooked == [0x0000, 0x0000] and len(direct) == 2
    finally:
        server_ae.shutdown()


def test_the_server_runs_no_full_collection_and_ended_associations_are_still_freed(monkeypatch) -> None:
    """pynetdicom's AssociationServer.service_actions runs gc.collect() every 60th call of
    serve_forever's loop (a 15-40 ms pause of the whole node, GIL held). AcceptorServer's
    does nothing; Python's own collector frees what an ended association leaves."""
    import gc
    import weakref

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from pacsnode.sim.process import free_port

    collections: list[int] = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(1) or real_collect(*args))
    server_ae = acceptor.NodeAE(ae_title="GCFREE")
    server_ae.add_supported_context(Verification)
    ended: list[weakref.ref[object]] = []
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_RELEASED, lambda event: ended.append(weakref.ref(event.assoc)))])
    try:
        for _ in range(150):  # pynetdicom's server would have collected twice.
            server.service_actions()
        assert collections == []
        client = AE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        for _ in range(20):
            assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="GCFREE")
            assert assoc.is_established
            assoc.release()
        assert collections == []
        deadline = time.monotonic() + 10
        while len(ended) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ended) == 20
        # What the automatic collector does in a busy node (allocation-triggered), forced here.
        deadline = time.monotonic() + 10
        while any(ref() is not None for ref in ended) and time.monotonic() < deadline:
            real_collect()
            time.sleep(0.05)
        assert all(ref() is None for ref in ended)
    finally:
        server.shutdown()


def _ct_get_handler(count: int) -> Callable[[Any], Any]:
    """An EVT_C_GET handler yielding `count` small CT data sets (sub-operations)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import CTImageStorage

    def on_get(event: Any) -> Any:
        yield count
        for _ in range(count):
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
            ds.PatientID = "P"
            ds.file_meta = Dataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            yield 0xFF00, ds
    return on_get


def test_pending_retrieve_responses_are_encoded_here_only_while_the_hook_is_the_one_sent_handler() -> None:
    """issue 10: the Pending C-GET-RSP sent after each sub-operation is one PDU the acceptor
    encodes itself (it took ~0.5 ms of the association thread per instance through
    pynetdicom). The requestor gets the same responses, counts included, either way; the
    hook's direct form is told of each; with another EVT_DIMSE_SENT handler bound, every
    response is a pynetdicom message, as before."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    from pacsnode.sim.process import free_port

    on_get = _ct_get_handler(3)

    direct: list[tuple[int, int]] = []
    hooked: list[int] = []
    foreign: list[int] = []
    server_ae = acceptor.NodeAE(ae_title="GET")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian])
    server_ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian], scu_role=True, scp_role=True)
    server_ae.store_response_hook = acceptor.StoreResponseHook(
        lambda event: hooked.append(int(event.message.command_set.Status)),
        lambda assoc, message_id, status: direct.append((message_id, status)))
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()), [(evt.EVT_C_GET, on_get)])
    store_statuses = iter([0x0000, 0xA700, 0x0000] * 3)

    def get() -> list[tuple[int, int, int, int, int]]:
        assoc, query = _get_requestor(server.server_address[1], lambda: next(store_statuses))
        got = [(int(status.Status), int(status.get("NumberOfRemainingSuboperations", -1)),
                int(status.NumberOfCompletedSuboperations), int(status.NumberOfFailedSuboperations),
                int(status.NumberOfWarningSuboperations))
               for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
        assoc.release()
        return got

    pending = [(0xFF00, 2, 1, 0, 0), (0xFF00, 1, 1, 1, 0), (0xFF00, 0, 2, 1, 0)]
    try:
        assert get()[:3] == pending  # No handler bound to EVT_DIMSE_SENT.
        assert direct == [] and hooked == []
        server.bind(evt.EVT_DIMSE_SENT, server_ae.store_response_hook.handler)
        responses = get()
        assert responses[:3] == pending and responses[3][0] == 0xB000  # Final: one failed.
        assert direct == [(1, 0xFF00)] * 3 and hooked == [0xB000]  # Only the final one as a message.
        server.bind(evt.EVT_DIMSE_SENT, lambda event: foreign.append(int(event.message.command_set.Status)))
        assert get()[:3] == pending
        assert foreign == [0xFF00] * 3 + [0xB000] and len(direct) == 3
    finally:
        server_ae.shutdown()


@contextlib.contextmanager
def _requested_association() -> Iterator[Any]:
    """A RequestorAssociation (NodeAE) established with a pynetdicom CT storage SCP; both
    shut down afterwards."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from pacsnode.sim.process import free_port

    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = scp.start_server(("127.0.0.1", free_port()), block=False)
    requestor = acceptor.NodeAE(ae_title="NODE")
    requestor.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    try:
        assoc = requestor.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
        assert isinstance(assoc, acceptor.RequestorAssociation) and assoc.is_established
        yield assoc
        assoc.release()
    finally:
        requestor.shutdown()
        scp.shutdown()


def _store_response() -> Any:
    from pynetdicom.dimse_primitives import C_STORE

    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo, primitive.Status = 1, 0x0000
    return primitive


def test_a_sender_holding_responses_keeps_the_reactor_off_the_dimse_queue() -> None:
    """issue 10 (C-MOVE sub-operations): while a sender on another thread holds responses,
    the requested association's reactor takes nothing off its DIMSE queue (a C-STORE
    response stays for the sender, without pausing the reactor); released, the reactor
    reads the queue again."""
    with _requested_association() as assoc:
        with assoc.responses_held():
            held = _store_response()
            assoc.dimse.msg_queue.put((1, held))  # Wakes the reactor.
            time.sleep(0.3)  # Time for the reactor to have taken it, had it looked.
            assert assoc._reactor_checkpoint.is_set()  # Not paused: only held.
            assert assoc.dimse.get_msg(block=False) == (1, held)
        assoc.dimse.msg_queue.put((1, _store_response()))
        deadline = time.monotonic() + 5
        while not assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert assoc.dimse.msg_queue.empty()  # The reactor reads its queue again.


def test_the_reactor_leaves_the_end_of_association_mark_for_a_sender() -> None:
    """A connection that ends puts pynetdicom's (None, None) mark on the DIMSE queue to wake
    a thread waiting for a response. The reactor, not paused yet by a sender on its way to
    wait (past its is_established check), must leave it: taken by the reactor, that
    sender's get_msg waited out the whole DIMSE timeout (60 s in
    test_kill_worker_mid_store_loses_nothing_acknowledged, about 1 run in 6 under load)."""
    with _requested_association() as assoc:
        assoc.dimse.msg_queue.put((None, None))  # Wakes the reactor.
        time.sleep(0.3)  # Time for the reactor to have taken it, had it looked.
        assert assoc._reactor_checkpoint.is_set()  # Not paused, not held: it looked.
        assert list(assoc.dimse.msg_queue.queue) == [(None, None)]  # Still there for the sender.
        assoc.dimse.get_msg(block=False)  # The sender takes it.
        assoc.dimse.msg_queue.put((1, _store_response()))
        deadline = time.monotonic() + 5
        while not assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert assoc.dimse.msg_queue.empty()  # Anything else it reads as before.


def test_a_sender_past_its_check_does_not_wait_on_an_association_whose_connection_is_gone() -> None:
    """The race behind test_kill_worker_mid_store_loses_nothing_acknowledged's 60 s (1 run
    in 6-7 under load), driven in order: a sender (pynetdicom's send_c_store) has paused
    the reactor and waits; the peer's connection drops (its process killed); the DUL puts
    the end-of-association mark (AA-4) and ends; the sender takes the mark and releases
    the reactor, and before the reactor has seen the abort (is_established still True) the
    next send_c_store is past its is_established check. Its wait must end at once (no
    response: an empty status), not after the DIMSE timeout (60 s) on a queue that no
    thread will ever put on again."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from pacsnode.sim.faultproxy import FaultProxy
    from pacsnode.sim.process import free_port, wait_until

    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = scp.start_server(("127.0.0.1", free_port()), block=False)
    requestor = acceptor.NodeAE(ae_title="NODE")
    requestor.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    requestor.dimse_timeout = 60
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, generate_uid()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        with FaultProxy() as proxy:
            port = proxy.add_link("scp", "127.0.0.1", server.server_address[1])
            assoc = requestor.associate("127.0.0.1", port, ae_title="SCP")
            assert isinstance(assoc, acceptor.RequestorAssociation) and assoc.is_established
            # The first sender pauses the reactor as pynetdicom's send_c_store does.
            assoc._is_paused = False
            assoc._reactor_checkpoint.clear()
            assert wait_until(lambda: assoc._is_paused, 10)
            proxy.reset("scp")  # The peer's connection drops.
            assoc.dul.join(10)
            assert not assoc.dul.is_alive()  # AA-4 ran: the DUL put its mark and ended.
            assert assoc.dimse.get_msg(block=True) == (None, None)  # The first sender's wait ends on the mark.
            # It would release the reactor now; the next sender pauses it again before it ran
            # (the checkpoint stays cleared here: the reactor stays where it was).
            assert assoc.is_established  # The abort is not seen yet: this sender passes its check.
            statuses: list[Any] = []
            sender = threading.Thread(target=lambda: statuses.append(assoc.send_c_store(dataset)), daemon=True)
            sender.start()
            sender.join(10)
            waiting = sender.is_alive()
            if waiting:
                assoc.dimse.msg_queue.put((None, None))  # Let it go (it would have waited 60 s).
                sender.join(10)
            assert not waiting, "send_c_store waited for a response on an association whose connection was gone"
            assert len(statuses) == 1 and "Status" not in statuses[0]  # No response.
            assert wait_until(lambda: not assoc.is_alive(), 10)  # The released reactor ended it.
            assert not assoc.is_established
    finally:
        requestor.shutdown()
        scp.shutdown()


def test_a_held_response_does_not_wake_the_reactor() -> None:
    """issue 10: a response put on the DIMSE queue while a sender holds responses does not
    wake the reactor (it woke, took the GIL and slept again once per C-MOVE sub-operation,
    between the response and the next request); the hold's end wakes it only when a
    message is left for it."""
    with _requested_association() as assoc:
        wakes: list[int] = []

        class _CountingEvent(threading.Event):
            def set(self) -> None:
                wakes.append(1)
                super().set()

        assoc._work = _CountingEvent()
        with assoc.responses_held():
            assoc.dimse.msg_queue.put((1, _store_response()))
            assert assoc.dimse.get_msg(block=False)[0] == 1  # The sender takes its response.
        assert wakes == []
        with assoc.responses_held():
            assoc.dimse.msg_queue.put((1, _store_response()))  # Left when the hold ends.
        assert wakes == [1]
        deadline = time.monotonic() + 5
        while not assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert assoc.dimse.msg_queue.empty()  # The reactor, woken, reads it.


def test_a_reactor_released_by_an_earlier_set_leaves_a_paused_senders_response() -> None:
    """pynetdicom's send_*() clear the reactor's checkpoint and poll `_is_paused`, which can
    still be True from the reactor's previous pause while the checkpoint's last set() has
    already released it: the reactor then ran on and took the sender's response ("Received
    unexpected C-STORE service message", then a 60 s DIMSE timeout; 2 of 12 runs of
    test_find_cancel_stops_the_stream at load 4.5). Its look at the queue after such a
    release (`_next_request`, called here as that reactor would) must find nothing while
    the checkpoint is cleared."""
    with _requested_association() as assoc:
        response = _store_response()
        assoc._reactor_checkpoint.clear()  # The sender's pause.
        assoc.dimse.msg_queue.put((1, response))
        assert assoc._next_request() == (None, None)
        assert assoc.dimse.get_msg(block=False) == (1, response)  # Still there for the sender.
        assoc._reactor_checkpoint.set()


def test_pynetdicoms_standard_logging_handlers_are_not_bound() -> None:
    """issue 10: pynetdicom's "standard" handlers build their debug lines whatever the log
    level; the one for a received A-ASSOCIATE-RQ is quadratic in the proposed contexts with
    roles (dcmtk getscu proposes ~120) and was the largest cost of accepting its
    association. Neither accepted nor requested associations have them bound."""
    from pynetdicom import AE, evt
    from pynetdicom._handlers import (
        standard_dimse_recv_handler,
        standard_dimse_sent_handler,
        standard_pdu_recv_handler,
        standard_pdu_sent_handler,
    )
    from pynetdicom.sop_class import Verification

    from pacsnode.sim.process import free_port

    standard = {standard_dimse_recv_handler, standard_dimse_sent_handler, standard_pdu_recv_handler,
                standard_pdu_sent_handler}
    events = (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)

    def bound(owner: Any) -> set[Any]:
        handlers = {handler[0] if isinstance(handler, tuple) else handler
                    for event in events for handler in owner.get_handlers(event)}
        return handlers & standard

    accepted: list[Any] = []
    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(Verification)
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_ESTABLISHED, lambda event: accepted.append(event.assoc))])
    try:
        assert bound(server) == set()
        client = acceptor.NodeAE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert assoc.is_established and bound(assoc) == set()
        assert assoc.send_c_echo().Status == 0x0000
        assert len(accepted) == 1 and bound(accepted[0]) == set()
        assoc.release()
        plain = AE(ae_title="PLAIN")  # pynetdicom's own association binds them: the check can fail.
        plain.add_requested_context(Verification)
        other = plain.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert bound(other) == standard
        other.release()
    finally:
        server_ae.shutdown()


def test_scu_context_table_picks_the_context_pynetdicom_would_and_is_made_once() -> None:
    """issue 10: C-GET/C-MOVE sub-operations look their presentation context up in a table
    made once per association (node/raw_send.py scu_context_table) instead of pynetdicom's
    sort and scan of every accepted context, twice per sub-operation. The table's first
    match is the context `_get_valid_context(..., "scu", allow_conversion=False)` returns;
    contexts where we may not act as SCU are not in it."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelGet

    from pacsnode.node import raw_send
    from pacsnode.sim.process import free_port

    syntaxes = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"]
    accepted: list[Any] = []
    server_ae = acceptor.NodeAE(ae_title="GET")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in (CTImageStorage, MRImageStorage):
        server_ae.add_supported_context(sop_class, syntaxes, scu_role=True, scp_role=True)
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_ESTABLISHED, lambda event: accepted.append(event.assoc))])
    try:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for syntax in syntaxes:  # One context per syntax, CT twice in Explicit VR LE.
            client.add_requested_context(CTImageStorage, syntax)
        client.add_requested_context(CTImageStorage, syntaxes[0])
        client.add_requested_context(MRImageStorage, syntaxes[1])  # No SCP role for MR: we are not its SCU.
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="GET",
                                 ext_neg=[build_role(CTImageStorage, scp_role=True)])
        assert assoc.is_established and len(accepted) == 1
        server_side = accepted[0]
        table = server_side.scu_contexts()
        assert server_side.scu_contexts() is table  # Made once.
        assert set(table) == {CTImageStorage}
        assert [syntax for syntax, _ in table[CTImageStorage]] == [syntaxes[0], syntaxes[1], syntaxes[2], syntaxes[0]]
        for syntax in syntaxes:
            first = next(context_id for accepted_syntax, context_id in table[CTImageStorage] if accepted_syntax == syntax)
            expected = server_side._get_valid_context(CTImageStorage, syntax, "scu", allow_conversion=False)
            assert first == expected.context_id
        assert raw_send.scu_context_table(server_side.accepted_contexts) == table
        assoc.release()
    finally:
        server_ae.shutdown()


def test_an_accepted_association_request_builds_its_primitive_once() -> None:
    """issue 10: association_guard.check_request builds the A-ASSOCIATE primitive to see
    that it can be built, pynetdicom's AE-6 built it again (pydicom validates every UID
    each time: ~2-4 ms for getscu's ~120 contexts). The acceptor's DUL decodes requests
    as _AssociateRQ, which keeps the first; a request changed for its rejection
    (make_negotiable) builds a new one."""
    from pynetdicom import evt
    from pynetdicom.sop_class import Verification

    from pacsnode.sim.process import free_port

    built: list[int] = []

    class Counting(acceptor._AssociateRQ):
        def to_primitive(self) -> Any:
            primitive = super().to_primitive()
            built.append(id(primitive))
            return primitive

    pdu = Counting()
    pdu.decode(rawpdu.associate_rq(None))
    assert association_guard.check_request(pdu) is None
    first = pdu.to_primitive()
    assert pdu.to_primitive() is first and len(set(built)) == 1  # One primitive, however often asked.
    pdu.forget_primitive()
    assert pdu.to_primitive() is not first

    rejected = acceptor._AssociateRQ()
    rejected.decode(rawpdu.associate_rq([rawpdu.presentation_context(2, rawpdu.VERIFICATION, [rawpdu.IMPLICIT_VR_LE])]))
    assert association_guard.check_request(rejected) is not None
    rejected.forget_primitive()
    assert association_guard.make_negotiable(rejected)
    assert rejected.to_primitive().presentation_context_definition_list == []

    # A real association: the DUL decodes the request as _AssociateRQ.
    seen: list[Any] = []
    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(Verification)
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_ESTABLISHED, lambda event: seen.append(event.assoc))])
    try:
        client = acceptor.NodeAE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert len(seen) == 1
        decoded = seen[0].dul._decode_pdu(bytearray(rawpdu.associate_rq(None)))
        assert isinstance(decoded[0], acceptor._AssociateRQ) and decoded[1] == "Evt6"
    finally:
        server_ae.shutdown()


def test_sub_operation_responses_skip_pynetdicoms_pdu_decoding_only_while_nothing_watches_pdus() -> None:
    """issue 10: a C-STORE-RSP to a C-GET sub-operation, one plain command in one PDV, goes
    from the DUL to DIMSE directly (no PDU objects, event queue or state machine), and the
    counts are the same as pynetdicom's way; with a handler bound to EVT_PDU_RECV every PDU
    takes pynetdicom's way (the handler sees it)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    from pacsnode.sim.process import free_port

    on_get = _ct_get_handler(4)

    accepted: list[Any] = []
    seen_pdus: list[str] = []
    server_ae = acceptor.NodeAE(ae_title="GET")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian])
    server_ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian], scu_role=True, scp_role=True)
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_C_GET, on_get),
                                    (evt.EVT_ESTABLISHED, lambda event: accepted.append(event.assoc))])
    answers = iter([0x0000, 0xB007, 0xA700, 0x0000] * 2)

    def get() -> list[tuple[int, int, int, int]]:
        assoc, query = _get_requestor(server.server_address[1], lambda: next(answers))
        got = [(int(status.Status), int(status.NumberOfCompletedSuboperations),
                int(status.NumberOfWarningSuboperations), int(status.NumberOfFailedSuboperations))
               for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
        assoc.release()
        return got

    try:
        direct = get()
        assert direct[-1] == (0xB000, 2, 1, 1)
        assert accepted[0].dul.store_responses_direct == 4
        server.bind(evt.EVT_PDU_RECV, lambda event: seen_pdus.append(type(event.pdu).__name__))
        assert get() == direct
        assert accepted[1].dul.store_responses_direct == 0
        assert seen_pdus.count("P_DATA_TF") >= 4 + 2  # The four responses, the C-GET's command and identifier.
    finally:
        server_ae.shutdown()


def _get_requestor(port: int, answer: Any) -> tuple[Any, Any]:
    """A C-GET requestor (CT storage SCP role, each sub-operation answered `answer()`)
    associated with the test server at `port`, and a STUDY-level query for study 1.2.3."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    client = AE(ae_title="CLIENT")
    client.add_requested_context(StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian)
    client.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = client.associate("127.0.0.1", port, ae_title="GET", ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: answer())])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    return assoc, query


def test_ending_an_association_waits_for_the_dul_instead_of_sleeping_10_ms() -> None:
    """issue 10 item 1: pynetdicom's Association.kill looks at the DUL every 10 ms until it
    is idle (Sta1). A requestor's thread gets the A-RELEASE confirmation a moment before
    its DUL thread has closed the connection and reached Sta1, so a release (each C-MOVE
    sub-association's, before the final C-MOVE-RSP) often cost 10 ms more; an acceptor's
    thread slept in 10 ms steps until the peer closed. Here both wait on the DUL. The
    requestor's DUL is held in the connection-close handler for 30 ms, so the old loop
    could not have missed its 10 ms sleep. Every time.sleep called from pynetdicom's own
    Association.kill (its 10 ms loop) is seen through Python's profile hook
    (sys.setprofile / threading.setprofile: nothing of pynetdicom's is replaced)."""
    import sys
    import threading

    import pynetdicom.association

    sleeps: list[str] = []
    kill_code = pynetdicom.association.Association.kill.__code__

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and arg is time.sleep and frame.f_code is kill_code:
            sleeps.append(threading.current_thread().name)

    threading.setprofile(watch)
    sys.setprofile(watch)
    try:
        _end_an_association_both_ways(sleeps)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


def _end_an_association_both_ways(sleeps: list[str]) -> None:
    from pynetdicom import evt
    from pynetdicom.sop_class import Verification

    from pacsnode.sim.process import free_port

    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(Verification)
    accepted: list[Any] = []
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_ESTABLISHED, lambda event: accepted.append(event.assoc))])
    try:
        client = acceptor.NodeAE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER",
                                 evt_handlers=[(evt.EVT_CONN_CLOSE, lambda event: time.sleep(0.03))])
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert assoc.is_released and not assoc.dul.is_alive()
        accepted[0].join(5)
        assert not accepted[0].is_alive() and not accepted[0].dul.is_alive()
        assert sleeps == []  # No 10 ms sleep in pynetdicom's kill, on either side.
    finally:
        server_ae.shutdown()


def test_an_accepted_association_is_made_once_on_the_servers_thread_with_pynetdicoms_handlers() -> None:
    """issue 10 item 1 (the raw-PDU row): pynetdicom's threaded server starts a thread per
    connection only to make the association and start the association's own thread; its
    Association.__init__ made pynetdicom's ACSE, DUL (three queues) and DIMSE, which the
    node replaced, and bound every default and server handler one `bind` at a time. Here
    the association is made on the server's thread, its providers once, its handler table
    at once: seen through Python's profile hook (nothing of pynetdicom's is replaced).
    The table is the one pynetdicom's way gives (standard logging left out)."""
    from pynetdicom import evt
    from pynetdicom._globals import MODE_ACCEPTOR
    from pynetdicom.acse import ACSE
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.sop_class import Verification

    from pacsnode.sim.process import free_port

    watched = {DULServiceProvider.__init__.__code__: "DULServiceProvider.__init__",
               ACSE.__init__.__code__: "ACSE.__init__",
               DIMSEServiceProvider.__init__.__code__: "DIMSEServiceProvider.__init__",
               Association.__init__.__code__: "Association.__init__",
               Association.bind.__code__: "Association.bind"}
    create_code = acceptor.AcceptorRequestHandler._create_association.__code__
    calls: list[tuple[str, str]] = []

    own_subclasses = (acceptor.AcceptorACSE, acceptor.AcceptorDIMSE)  # Whose __init__ calls the base's: ours.

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            name = watched.get(frame.f_code) or ("create" if frame.f_code is create_code else None)
            if name is None or threading.current_thread() is threading.main_thread():
                return
            if not isinstance(frame.f_locals.get("self"), own_subclasses):
                calls.append((name, threading.current_thread().name))

    from pynetdicom import AE

    accepted: list[Any] = []
    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(Verification)
    threading.setprofile(watch)  # Before the server's thread starts: it is watched too.
    try:
        server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                       [(evt.EVT_ESTABLISHED, lambda event: accepted.append(event.assoc)),
                                        (evt.EVT_C_ECHO, lambda event: 0x0000)])
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    server.bind(evt.EVT_CONN_CLOSE, lambda event: None)
    try:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        threading.setprofile(watch)
        try:
            assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
            assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
            assoc.release()
            assert len(accepted) == 1
            accepted[0].join(5)
        finally:
            threading.setprofile(None)  # type: ignore[arg-type]
        calls = list(calls)
        assert [name for name, _ in calls if name != "create"] == []
        creators = [thread for name, thread in calls if name == "create"]
        assert len(creators) == 1 and creators[0].startswith("AcceptorServer@")

        reference = Association(server_ae, MODE_ACCEPTOR)  # pynetdicom's way, as the handler did it.
        acceptor._unbind_standard_logging(reference)
        for event, bound in server._handlers.items():
            if event.is_intervention and bound:
                reference.bind(event, *bound)
            elif isinstance(event, evt.NotificationEvent):
                for handler in bound:
                    reference.bind(event, handler[0], handler[1])

        def table(owner: Any) -> dict[Any, Any]:
            return {event: bound for event, bound in owner._handlers.items() if bound}

        assert len(accepted) == 1 and table(accepted[0]) == table(reference)
        assert accepted[0].get_handlers(evt.EVT_C_ECHO)[0] is server._handlers[evt.EVT_C_ECHO][0]
    finally:
        server_ae.shutdown()


def test_echo_requests_are_decoded_here_only_while_the_hook_is_the_one_received_handler() -> None:
    """issue 10 item 1: a plain C-ECHO-RQ is decoded with struct (node/pdata.py
    parse_echo_request) instead of into a pydicom Dataset by pynetdicom's DIMSEMessage, and
    EVT_DIMSE_RECV is not triggered for it: with nothing bound to that event, or only the
    StoreResponseHook's `received`, whose direct form is told instead. A handler bound to
    EVT_DIMSE_RECV that is not the hook's gets the request as a pynetdicom message, as
    before. pynetdicom's decoding is watched through Python's profile hook."""
    import sys

    from pynetdicom import AE, evt
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.sop_class import Verification

    from pacsnode.sim.process import free_port

    decode_code = DIMSEMessage.decode_msg.__code__
    decoded: list[str] = []

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is decode_code \
                and isinstance(frame.f_locals.get("assoc"), acceptor.AcceptorAssociation):
            decoded.append(threading.current_thread().name)  # The server's decoding, not the client's.

    echoes: list[int] = []
    direct: list[tuple[int, int]] = []
    hooked: list[int] = []
    foreign: list[int] = []
    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(Verification)
    server_ae.store_response_hook = acceptor.StoreResponseHook(
        lambda event: None, lambda assoc, message_id, status: None,
        lambda event: hooked.append(int(event.message.command_set.MessageID)),
        lambda assoc, command_field, message_id: direct.append((command_field, message_id)))
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_C_ECHO, lambda event: echoes.append(int(event.request.MessageID)) or 0)])

    def echo(message_id: int) -> int:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert assoc.is_established
        status = int(assoc.send_c_echo(msg_id=message_id).Status)
        assoc.release()
        return status

    try:
        threading.setprofile(watch)
        sys.setprofile(watch)
        try:
            assert echo(5) == 0x0000  # Nothing bound to EVT_DIMSE_RECV.
            assert decoded == [] and direct == [] and hooked == []
            hook = server_ae.store_response_hook
            assert hook.received is not None
            server.bind(evt.EVT_DIMSE_RECV, hook.received)
            assert echo(6) == 0x0000  # Only the hook's handler: told directly.
            assert decoded == [] and direct == [(0x0030, 6)] and hooked == []
            server.bind(evt.EVT_DIMSE_RECV, lambda event: foreign.append(int(event.message.command_set.MessageID)))
            assert echo(7) == 0x0000  # Another handler too: pynetdicom's message, to both.
            assert len(decoded) == 1 and foreign == [7] and hooked == [7] and direct == [(0x0030, 6)]
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
        assert echoes == [5, 6, 7]
    finally:
        server_ae.shutdown()


def test_retrieved_instances_and_pending_responses_are_written_by_the_associations_thread() -> None:
    """issue 10 item 2: a C-GET's C-STORE requests of stored bytes and its Pending responses
    are written to the socket by the association's own thread when the DUL has nothing
    queued (AcceptorDUL.send_encoded), instead of being handed to the DUL thread (a queue
    put, a wake-up through its pipe and a turn of its loop per message). The requestor
    gets every instance's bytes, whole and in order, and every count."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE, build_role, evt
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    from pacsnode.node import raw_send
    from pacsnode.sim.process import free_port

    prefix = b"not sent"  # What load() returns before the data set's offset (a Part-10 header).

    def stored_bytes(index: int) -> tuple[str, bytes]:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.PatientID = f"P{index}"
        ds.BitsAllocated = 8
        ds.PixelData = bytes([index]) * (40_000 + 2 * index)  # Several PDUs for a 16 KB peer.
        encoded = encode(ds, False, True)
        assert encoded is not None
        return str(ds.SOPInstanceUID), encoded

    instances = [stored_bytes(index) for index in range(5)]

    def on_get(event: Any) -> Any:
        yield len(instances)
        for uid, data in instances:
            yield 0xFF00, raw_send.StoredDataset(sop_class_uid=CTImageStorage, sop_instance_uid=uid,
                                                 transfer_syntax_uid=ExplicitVRLittleEndian,
                                                 load=lambda data=data: (prefix + data, len(prefix)))

    accepted: list[Any] = []
    server_ae = acceptor.NodeAE(ae_title="GET")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian])
    server_ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian], scu_role=True, scp_role=True)
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_C_GET, on_get), (evt.EVT_ESTABLISHED, lambda e: accepted.append(e.assoc))])
    received: list[tuple[str, bytes]] = []

    def on_store(event: Any) -> int:
        received.append((str(event.request.AffectedSOPInstanceUID), bytes(event.request.DataSet.getvalue())))
        return 0x0000

    try:
        client = AE(ae_title="CLIENT")
        client.maximum_pdu_size = 16_384
        client.add_requested_context(StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian)
        client.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="GET",
                                 ext_neg=[build_role(CTImageStorage, scp_role=True)],
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        statuses = [(int(status.Status), int(status.NumberOfCompletedSuboperations))
                    for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
        assoc.release()
        assert statuses == [(0xFF00, 1), (0xFF00, 2), (0xFF00, 3), (0xFF00, 4), (0xFF00, 5), (0x0000, 5)]
        assert received == instances
        # Each instance's request (one batch) and its Pending response: 10 writes by the
        # association's thread; the final response goes pynetdicom's way (the DUL thread).
        assert accepted[0].dul.encoded_sent_direct == 10
    finally:
        server_ae.shutdown()


def test_a_stored_dataset_holds_no_elements_and_a_failed_one_is_listed_by_its_uid() -> None:
    """issue 10 item 2: a StoredDataset (one per retrieved instance) is made without pydicom
    elements; its two UIDs are what pynetdicom's retrieve service classes read of it, as
    attributes (hasattr, then the value, for the Failed SOP Instance UID List)."""
    from pacsnode.node import raw_send

    stored = raw_send.StoredDataset(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4",
                                    transfer_syntax_uid="1.2.840.10008.1.2.1", load=lambda: (b"", 0))
    assert len(stored) == 0 and list(stored.keys()) == []
    assert stored  # pynetdicom's retrieve loops send a yielded data set only if it is truthy.
    assert (stored.SOPClassUID, stored.SOPInstanceUID) == ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")
    assert hasattr(stored, "SOPInstanceUID") and stored.stored_transfer_syntax == "1.2.840.10008.1.2.1"


def test_handlers_given_to_the_server_for_the_logging_events_stay_bound() -> None:
    """Only pynetdicom's standard logging handlers are unbound from EVT_DIMSE_RECV,
    EVT_DIMSE_SENT, EVT_PDU_RECV and EVT_PDU_SENT: handlers of one's own given to
    start_server for those events were dropped with them. They see the association's PDUs."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from pacsnode.sim.process import free_port

    from pynetdicom.pdu import A_ASSOCIATE_RQ, A_RELEASE_RQ

    sent: list[str] = []
    received: list[Any] = []

    def on_sent(event: Any) -> None:
        sent.append(type(event.pdu).__name__)

    def on_received(event: Any) -> None:
        received.append(event.pdu)

    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(Verification)
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_PDU_SENT, on_sent), (evt.EVT_PDU_RECV, on_received)])
    try:
        assert [handler[0] for handler in server.get_handlers(evt.EVT_PDU_SENT)] == [on_sent]
        assert [handler[0] for handler in server.get_handlers(evt.EVT_PDU_RECV)] == [on_received]
        client = AE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()
        deadline = time.monotonic() + 5
        while "A_RELEASE_RP" not in sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sent[0] == "A_ASSOCIATE_AC" and sent[-1] == "A_RELEASE_RP"
        assert isinstance(received[0], A_ASSOCIATE_RQ) and any(isinstance(pdu, A_RELEASE_RQ) for pdu in received)
    finally:
        server_ae.shutdown()


def test_a_moves_pending_responses_after_the_first_go_out_once_the_next_request_is_out() -> None:
    """issue 10: a C-MOVE's Pending responses after its first are held back until the next
    sub-operation's C-STORE request has gone out to the destination (then written while
    the destination stores it, not between its response and the next request); the last
    one before the sub-association's release. The requestor gets every response, counts
    and order as before. The node's thread records, in order, each instance's load and
    each Pending response as it goes out (the hook's direct form)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom import AE, build_context, evt
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

    from pacsnode.node import raw_send
    from pacsnode.sim.process import free_port

    order: list[str] = []
    instances = []
    for index in range(3):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CTImageStorage, generate_uid(), f"P{index}"
        encoded = encode(ds, False, True)
        assert encoded is not None
        instances.append((str(ds.SOPInstanceUID), encoded))

    destination = AE(ae_title="DEST")
    destination.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    dest_server = destination.start_server(("127.0.0.1", free_port()), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def loaded(index: int, data: bytes) -> tuple[bytes, int]:
        order.append(f"load {index}")
        return data, 0

    def on_move(event: Any) -> Any:
        yield "127.0.0.1", dest_server.server_address[1], {"contexts": [build_context(CTImageStorage,
                                                                                      [ExplicitVRLittleEndian])]}
        yield len(instances)
        for index, (uid, data) in enumerate(instances):
            yield 0xFF00, raw_send.StoredDataset(sop_class_uid=CTImageStorage, sop_instance_uid=uid,
                                                 transfer_syntax_uid=ExplicitVRLittleEndian,
                                                 load=lambda index=index, data=data: loaded(index, data))

    server_ae = acceptor.NodeAE(ae_title="MOVE")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove, [ExplicitVRLittleEndian])
    server_ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    server_ae.store_response_hook = acceptor.StoreResponseHook(
        lambda event: None, lambda assoc, message_id, status: order.append(f"pending {status:04X}"))
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()), [(evt.EVT_C_MOVE, on_move)])
    server.bind(evt.EVT_DIMSE_SENT, server_ae.store_response_hook.handler)
    try:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(StudyRootQueryRetrieveInformationModelMove, ExplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="MOVE")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        statuses = [(int(status.Status), int(status.get("NumberOfRemainingSuboperations", -1)),
                     int(status.NumberOfCompletedSuboperations))
                    for status, _identifier in assoc.send_c_move(query, "DEST",
                                                                 StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
        assert statuses == [(0xFF00, 2, 1), (0xFF00, 1, 2), (0xFF00, 0, 3), (0x0000, 0, 3)]
        assert received == [uid for uid, _data in instances]
        # The first Pending response at once; the second once instance 2's request is out;
        # the third (after the last sub-operation) before the sub-association's release.
        assert order == ["load 0", "pending FF00", "load 1", "load 2", "pending FF00", "pending FF00"]
    finally:
        server_ae.shutdown()
        destination.shutdown()


def test_a_finds_pending_responses_are_written_together() -> None:
    """issue 10: a C-FIND's Pending responses (its first too) are held back and written
    FIND_ROWS_PER_WRITE at a time (one send each), the rest with the final response;
    a ~200-row answer was one write per row. The requestor gets every row, in order, and
    the final Success."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from pacsnode.sim.process import free_port

    rows = 2 * acceptor.FIND_ROWS_PER_WRITE + 8

    def on_find(event: Any) -> Any:
        for index in range(rows):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.PatientID = f"P{index:03d}"
            yield 0xFF00, identifier

    accepted: list[Any] = []
    server_ae = acceptor.NodeAE(ae_title="FIND")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian])
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_C_FIND, on_find), (evt.EVT_ESTABLISHED, lambda e: accepted.append(e.assoc))])
    try:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="FIND")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = "*"
        answers = [(int(status.Status), identifier.PatientID if identifier is not None else None)
                   for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
        assoc.release()
        assert answers == [(0xFF00, f"P{index:03d}") for index in range(rows)] + [(0x0000, None)]
        # Two full groups, the last 8 with the final response: 3 writes by the association's
        # thread, not one per row (4 when the first row went out alone).
        assert accepted[0].dul.encoded_sent_direct == 3
    finally:
        server_ae.shutdown()


def test_a_find_handler_sends_its_rows_itself_and_pynetdicom_only_the_final() -> None:
    """issue 10: the node's C-FIND handler sends each Pending response with its encoded
    identifier itself (AcceptorDIMSE.send_find_row, held back and written 16 at a time
    like pynetdicom's), yielding nothing: pynetdicom, which encoded every identifier with
    pydicom's writer and ran its loop per row, sends only the final response."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from pacsnode.sim.process import free_port

    rows = 2 * acceptor.FIND_ROWS_PER_WRITE + 8
    sent: list[bool] = []

    def on_find(event: Any) -> Any:
        for index in range(rows):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.PatientID = f"P{index:03d}"
            encoded = encode(identifier, False, True)
            sent.append(event.assoc.dimse.send_find_row(int(event.context.context_id), int(event.request.MessageID),
                                                        str(event.request.AffectedSOPClassUID), encoded))
        yield from ()

    accepted: list[Any] = []
    server_ae = acceptor.NodeAE(ae_title="FIND")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian])
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_C_FIND, on_find), (evt.EVT_ESTABLISHED, lambda e: accepted.append(e.assoc))])
    try:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="FIND")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = "*"
        answers = [(int(status.Status), identifier.PatientID if identifier is not None else None)
                   for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
        assoc.release()
        assert sent == [True] * rows
        assert answers == [(0xFF00, f"P{index:03d}") for index in range(rows)] + [(0x0000, None)]
        assert accepted[0].dul.encoded_sent_direct == 3
    finally:
        server_ae.shutdown()


def test_a_find_s_held_rows_go_out_before_the_handler_waits_for_more() -> None:
    """issue 10: every Pending response is held back now, the first too; a handler that is
    about to wait for more rows (node/dicom.py stop_or_wait, before the archive's wait)
    flushes what is held (raw_send.flush_deferred_responses), so the requestor has the
    rows so far while the node waits: here the handler waits until the requestor has
    seen its first row."""
    import threading

    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from pacsnode.node import raw_send
    from pacsnode.sim.process import free_port

    first_seen = threading.Event()
    waited: list[bool] = []

    def on_find(event: Any) -> Any:
        for index in range(2):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.PatientID = f"P{index}"
            event.assoc.dimse.send_find_row(int(event.context.context_id), int(event.request.MessageID),
                                            str(event.request.AffectedSOPClassUID), encode(identifier, False, True))
            if index == 0:
                raw_send.flush_deferred_responses()
                waited.append(first_seen.wait(10))
        yield from ()

    server_ae = acceptor.NodeAE(ae_title="FIND")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian])
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()), [(evt.EVT_C_FIND, on_find)])
    try:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="FIND")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = "*"
        answers = []
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            answers.append((int(status.Status), identifier.PatientID if identifier is not None else None))
            first_seen.set()
        assoc.release()
        assert waited == [True]
        assert answers == [(0xFF00, "P0"), (0xFF00, "P1"), (0x0000, None)]
    finally:
        server_ae.shutdown()


def test_a_find_s_final_response_is_written_by_the_associations_thread() -> None:
    """issue 10: a C-FIND's final response (no Identifier) is encoded by the node
    (pdata.find_final_response_pdu, pynetdicom's bytes) and written by the association's own
    thread after the Pending responses held back, instead of going through pynetdicom's
    message, pydicom encoding and the DUL thread (about half of a one-row C-FIND's CPU). The
    requestor gets every row and the final status, in order."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from pacsnode.sim.process import free_port

    def on_find(event: Any) -> Any:
        for index in range(3):
            row = Dataset()
            row.QueryRetrieveLevel = "STUDY"
            row.PatientID = f"P{index}"
            yield 0xFF00, row

    accepted: list[Any] = []
    server_ae = acceptor.NodeAE(ae_title="FIND")
    server_ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian])
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_C_FIND, on_find), (evt.EVT_ESTABLISHED, lambda e: accepted.append(e.assoc))])
    try:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ImplicitVRLittleEndian)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="FIND")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = ""
        answers = [(int(status.Status), identifier.PatientID if identifier is not None else None)
                   for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
        assoc.release()
        assert answers == [(0xFF00, "P0"), (0xFF00, "P1"), (0xFF00, "P2"), (0x0000, None)]
        # The three Pending responses (a command PDU and an Identifier PDU each) held and
        # written with the final response (one PDU): one write by the association's thread,
        # 7 PDUs (two writes when the first row went out alone; 6 PDUs when the final
        # response went pynetdicom's way).
        assert (accepted[0].dul.encoded_sent_direct, accepted[0].dul.encoded_pdus_direct) == (1, 7)
    finally:
        server_ae.shutdown()


def test_store_requests_are_made_into_primitives_here_only_while_the_hook_is_the_one_received_handler() -> None:
    """issue 10: the C-STORE-RQ primitive is built from the command set's bytes (node/pdata.py
    parse_store_request) instead of by pynetdicom's message_to_primitive, with the same
    fields (a C-MOVE's originator included) and data set, and EVT_DIMSE_RECV not triggered:
    with nothing bound to that event, or only the StoreResponseHook's `received`, whose
    direct form is told instead. A handler bound to EVT_DIMSE_RECV that is not the hook's
    gets pynetdicom's message and primitive, as before (watched through the profile hook)."""
    import sys

    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pynetdicom import AE, evt
    from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
    from pynetdicom.sop_class import CTImageStorage

    from pacsnode.sim.process import free_port

    built_code = DIMSEMessage.message_to_primitive.__code__
    built: list[str] = []

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is built_code and isinstance(frame.f_locals.get("self"), C_STORE_RQ):
            built.append(threading.current_thread().name)  # Only the server receives a C-STORE-RQ.

    seen: list[tuple[int, str, str, int, str | None, int | None, bytes]] = []
    direct: list[tuple[int, int]] = []
    hooked: list[int] = []
    foreign: list[int] = []

    def on_store(event: Any) -> int:
        request = event.request
        data = request.DataSet
        seen.append((int(request.MessageID), str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                     int(request.Priority), request.MoveOriginatorApplicationEntityTitle,
                     request.MoveOriginatorMessageID, bytes(data.getvalue())))
        return 0x0000

    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(CTImageStorage)
    server_ae.store_response_hook = acceptor.StoreResponseHook(
        lambda event: None, lambda assoc, message_id, status: None,
        lambda event: hooked.append(int(event.message.command_set.MessageID)),
        lambda assoc, command_field, message_id: direct.append((command_field, message_id)))
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()), [(evt.EVT_C_STORE, on_store)])
    ds = dcmread(get_testdata_file("CT_small.dcm"))

    def store(message_id: int, originator: str | None) -> int:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(CTImageStorage, "1.2.840.10008.1.2")
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert assoc.is_established
        status = int(assoc.send_c_store(ds, msg_id=message_id, priority=2, originator_aet=originator,
                                        originator_id=9 if originator else None).Status)
        assoc.release()
        return status

    try:
        threading.setprofile(watch)
        sys.setprofile(watch)
        try:
            assert store(5, None) == 0x0000  # Nothing bound to EVT_DIMSE_RECV.
            assert built == [] and direct == [] and hooked == []
            hook = server_ae.store_response_hook
            assert hook.received is not None
            server.bind(evt.EVT_DIMSE_RECV, hook.received)
            assert store(6, "MOVER") == 0x0000  # Only the hook's handler: told directly.
            assert built == [] and direct == [(0x0001, 6)] and hooked == []
            server.bind(evt.EVT_DIMSE_RECV, lambda event: foreign.append(int(event.message.command_set.MessageID)))
            assert store(7, "MOVER") == 0x0000  # Another handler too: pynetdicom's message, to both.
            assert len(built) == 1 and foreign == [7] and hooked == [7] and direct == [(0x0001, 6)]
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
        sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        assert [s[:6] for s in seen] == [(5, sop_class, sop_instance, 2, None, None),
                                         (6, sop_class, sop_instance, 2, "MOVER", 9),
                                         (7, sop_class, sop_instance, 2, "MOVER", 9)]
        assert seen[0][6] == seen[1][6] == seen[2][6] and len(seen[0][6]) > len(ds.PixelData)
    finally:
        server_ae.shutdown()


def test_the_request_is_read_and_the_accept_and_release_answers_sent_by_the_associations_thread() -> None:
    """issue 10 (the raw-PDU echo row): pynetdicom's acceptor started the DUL thread, waited
    until it ran, let it read the A-ASSOCIATE-RQ and hand it over, then queued the
    A-ASSOCIATE-AC back to it; the A-RELEASE-RP took the same way back. Here the
    association's thread reads the request (the DUL thread waits on its gate meanwhile)
    and writes both answers itself, before the handlers of EVT_ACCEPTED and EVT_RELEASED
    run: those see the answer already sent (Sta6, and Sta13 or Sta1 once the peer
    closed), which the queued way could not promise."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from pacsnode.sim.process import free_port

    readers: list[str] = []
    read_code = acceptor.AcceptorDUL._read_pdu_data.__code__

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is read_code:
            readers.append(threading.current_thread().name)

    seen: dict[str, str] = {}
    accepted: list[Any] = []

    def on_accepted(event: Any) -> None:
        seen["accepted"] = event.assoc.dul.state_machine.current_state
        accepted.append(event.assoc)

    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(Verification)
    threading.setprofile(watch)
    try:
        server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()), [
            (evt.EVT_ACCEPTED, on_accepted),
            (evt.EVT_RELEASED, lambda event: seen.setdefault("released", event.assoc.dul.state_machine.current_state)),
            (evt.EVT_C_ECHO, lambda event: 0x0000)])
        client = AE(ae_title="CLIENT")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert assoc.is_released and len(accepted) == 1
        accepted[0].join(5)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        server_ae.shutdown()
    assert seen["accepted"] == "Sta6" and seen["released"] in {"Sta13", "Sta1"}
    assert accepted[0].dul.direct_actions == 2
    assert not accepted[0].is_alive() and not accepted[0].dul.is_alive()
    assert readers and readers[0] == accepted[0].name  # The request: on the association's thread.


def test_acceptor_queues_make_one_condition_and_still_wake_a_waiting_getter() -> None:
    """A queue.Queue makes three Conditions; the acceptor's queues (five per association)
    one each, shared by getters and putters (only one side ever waits on each)."""
    queue_ = acceptor._LightQueue()
    assert queue_.not_empty is queue_.not_full is queue_.all_tasks_done
    got: list[int] = []
    getter = threading.Thread(target=lambda: got.append(queue_.get(timeout=5)))
    getter.start()
    time.sleep(0.05)
    queue_.put(7)
    getter.join(5)
    assert got == [7]
    bounded = acceptor._LightQueue(maxsize=1)
    bounded.put(1)
    putter = threading.Thread(target=lambda: bounded.put(2, timeout=5))
    putter.start()
    time.sleep(0.05)
    assert bounded.get(False) == 1
    putter.join(5)
    assert bounded.get(False) == 2


def test_a_store_requests_command_set_is_read_here_and_a_spooled_data_set_gets_its_uids(tmp_path: Path) -> None:
    """issue 10 (stop 33): a C-STORE-RQ's command set is read from its bytes when it arrives
    (AcceptorDIMSE._start_store_request), not decoded into a pydicom Dataset by pynetdicom's
    decode_msg, while nothing but the hook watches EVT_DIMSE_RECV; a data set spooled to a
    file meanwhile still starts with the File Meta of the request's SOP Class and Instance
    (its prefix is made from the fields read here). With another EVT_DIMSE_RECV handler the
    command set is decoded as before (its handler reads message.command_set)."""
    import sys

    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pynetdicom import AE, evt
    from pynetdicom import dsutils
    from pynetdicom.sop_class import CTImageStorage

    from pacsnode.node import spool
    from pacsnode.sim.process import free_port

    decode_code = dsutils.decode.__code__
    decoded: list[str] = []

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is decode_code \
                and isinstance(threading.current_thread(), (acceptor.AcceptorDUL, acceptor.AcceptorAssociation)):
            decoded.append(threading.current_thread().name)  # The server's threads only.

    stored: list[tuple[str, str, bool, bytes]] = []
    foreign: list[int] = []

    def on_store(event: Any) -> int:
        data = event.request.DataSet
        path = data.finish()
        meta = dcmread(path).file_meta
        stored.append((str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), data.spooled,
                       data.getvalue()))
        data.close()
        return 0x0000

    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(CTImageStorage)
    server_ae.spool = acceptor.SpoolSettings(threshold_bytes=1024, size_max_bytes=1 << 24,
                                             budget=spool.InflightBudget(1 << 24), directory=tmp_path / "spool")
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()), [(evt.EVT_C_STORE, on_store)])
    ds = dcmread(get_testdata_file("CT_small.dcm"))

    def store() -> int:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(CTImageStorage, "1.2.840.10008.1.2")
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert assoc.is_established
        status = int(assoc.send_c_store(ds).Status)
        assoc.release()
        return status

    try:
        threading.setprofile(watch)
        sys.setprofile(watch)
        try:
            assert store() == 0x0000
            assert decoded == []
            server.bind(evt.EVT_DIMSE_RECV, lambda event: foreign.append(int(event.message.command_set.MessageID)))
            assert store() == 0x0000
            assert len(decoded) >= 1 and foreign == [1]
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
        expected = (str(ds.SOPClassUID), str(ds.SOPInstanceUID), True)
        assert [entry[:3] for entry in stored] == [expected, expected]
        assert stored[0][3] == stored[1][3] and len(stored[0][3]) > len(ds.PixelData)
    finally:
        server_ae.shutdown()


def test_pdata_pdus_go_to_dimse_directly_only_while_nothing_watches_pdus() -> None:
    """issue 10 (stop 33): a C-STORE's P-DATA-TF PDUs (command, and a data set cut into many
    PDUs by a small maximum PDU length) go from the DUL to DIMSE as P-DATA primitives
    directly (AcceptorDUL._deliver_pdata: no PDU objects, event queue or state machine), and
    the handler gets the same request and data set as pynetdicom's way, which every PDU
    takes while a handler is bound to EVT_PDU_RECV (the handler sees them); the fragments
    written to the data set directly (_continue_store_request) are the ones pynetdicom's
    decode_msg writes once something watches EVT_DIMSE_RECV."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from pacsnode.sim.process import free_port

    accepted: list[Any] = []
    seen_pdus: list[str] = []
    stored: list[tuple[int, str, bytes]] = []

    def on_store(event: Any) -> int:
        request = event.request
        stored.append((int(request.MessageID), str(request.AffectedSOPInstanceUID), bytes(request.DataSet.getvalue())))
        return 0x0000

    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(CTImageStorage)
    server_ae.maximum_pdu_size = 4096  # CT_small's data set: ten PDUs.
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()),
                                   [(evt.EVT_C_STORE, on_store),
                                    (evt.EVT_ESTABLISHED, lambda event: accepted.append(event.assoc))])
    ds = dcmread(get_testdata_file("CT_small.dcm"))

    def store(message_id: int) -> int:
        client = AE(ae_title="CLIENT")
        client.add_requested_context(CTImageStorage, "1.2.840.10008.1.2")
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds, msg_id=message_id + index).Status) for index in range(2)]
        assoc.release()
        return max(statuses)

    try:
        assert store(1) == 0x0000
        pdus = 2 * (1 + -(-len(stored[0][2]) // (4096 - 6)))  # Per C-STORE: the command, the data set's PDUs.
        assert accepted[0].dul.pdata_direct == pdus
        server.bind(evt.EVT_PDU_RECV, lambda event: seen_pdus.append(type(event.pdu).__name__))
        assert store(3) == 0x0000
        assert accepted[1].dul.pdata_direct == 0 and seen_pdus.count("P_DATA_TF") == pdus
        # And with a handler on EVT_DIMSE_RECV, pynetdicom's decode_msg receives every fragment
        # (AcceptorDIMSE._start_store_request and _continue_store_request stand aside).
        server.bind(evt.EVT_DIMSE_RECV, lambda event: None)
        assert store(5) == 0x0000
        assert [entry[:2] for entry in stored] == [(index, str(ds.SOPInstanceUID)) for index in range(1, 7)]
        assert len({entry[2] for entry in stored}) == 1 and len(stored[0][2]) > len(ds.PixelData)
    finally:
        server_ae.shutdown()
