"""The association acceptor: pynetdicom's server, association and DUL, subclassed so that
a peer cannot hold the node with half a PDU, an idle association costs no CPU, and a
peer's protocol mistake ends its association cleanly (A-ABORT or A-ASSOCIATE-RJ, one log
line) instead of killing a reactor thread with a traceback.

What pynetdicom 3.0.4 does and what the subclasses change:

- Its DUL thread reads a PDU with blocking `recv` calls on a socket with no timeout. A peer
  that sends part of a PDU holds the association (and a `max_associations` slot) for
  ever. `AcceptorDUL._read_pdu_data` reads each PDU against a deadline (`acse_timeout_s`
  before the association is established, `network_timeout_s` after), refuses a P-DATA-TF
  PDU longer than the maximum we advertised, and aborts on an unknown PDU type at once.
- Both of its reactors poll: the DUL thread sleeps 1 ms when idle, the association thread
  1 ms between looks at its queues (the node used to shorten both to 0.2 ms, about 20% of
  a core per idle association). Here the DUL thread waits in `select` on its socket and a
  wake-up pipe, and the association thread on an Event; every queue another thread puts
  work on wakes them. Idle, each wakes a few times a second for its timers.
- An exception while decoding a DIMSE message or running the state machine kills the DUL
  thread with a traceback and leaves the peer without an A-ABORT. Here it is one line and
  an A-ABORT.
- A thread waiting for a response (pynetdicom's send_*(), the node's C-GET/C-MOVE
  sub-operations) is woken on an association that ends only by the one (None, None) mark
  AA-2/3/4 put on the DIMSE queue: a second wait (a sender that took the mark and sent
  again before the reactor had seen the abort) lasted the whole DIMSE timeout. Here the
  DUL's end closes the DIMSE queue (_MessageQueue): no wait outlives the connection.
- Requests that association_guard.check_request refuses are rejected before negotiation;
  the request primitive that check builds is the one negotiation uses (_AssociateRQ:
  pynetdicom would build it again), and pynetdicom's standard logging handlers, which
  build their debug lines whatever the log level, are not bound.
- It decodes every A-ASSOCIATE-RQ item, negotiates the presentation contexts and encodes
  the A-ASSOCIATE-AC anew, validating every UID each time (~15 ms of CPU for dcmtk's
  getscu and its ~120 contexts). Here the same items, the same proposal and the same
  answer are taken from the AE's request memo (node/request_memo.py: _AssociateRQ,
  AcceptorACSE, AcceptorDUL._send_accept); the answer's bytes are pynetdicom's.
- Its Association.kill looks at the DUL every 10 ms until it is idle; a requestor's
  thread gets the A-RELEASE confirmation just before its DUL is idle, so releases (each
  C-MOVE sub-association's) often took 10 ms more. Here kill waits on the DUL.
- Its senders of a request on another thread than the reactor's (C-MOVE sub-operations)
  pause the reactor with a 0.1 ms poll; here they hold responses (responses_held), a
  flag the reactor reads with its queue check (and a message put meanwhile does not
  wake it). Pending C-GET/C-MOVE responses, like C-STORE responses, are encoded here as
  one PDU each; a C-MOVE's after its first go out once the next sub-operation's request
  is out (AcceptorDIMSE._send_pending_retrieve_response).
- It sends a data set as one P-DATA primitive per fragment, each through its queue, state
  machine, PDU objects and notifications (32 rounds for a CT slice to a 16 KB peer). A
  C-STORE of stored bytes (C-GET/C-MOVE sub-operations) goes out here as encoded PDUs
  (node/pdata.py), batches of them per `sendmsg`, written in Sta6 by the sender's own
  thread when the DUL has nothing queued (AcceptorDUL.send_encoded; under the DUL's send
  lock, which its thread holds for each state-machine action and each write), by the DUL
  thread otherwise. The encoded responses go the same way.

These are private parts of pynetdicom (its reactor loops are copied here, changed where
said), so the node runs only on a pynetdicom version it was tested with
(`check_pynetdicom_version`, and tests/unit/test_acceptor.py fails on any other).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import struct
import functools
import threading
import time
from copy import copy, deepcopy
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, cast

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom import _config as _pynetdicom_config
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.acse import ACSE
from pynetdicom._globals import DEFAULT_MAX_LENGTH, MODE_ACCEPTOR, MODE_REQUESTOR
from pynetdicom.association import Association, ServiceUser
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RQ, A_RELEASE_RP
from pynetdicom.pdu_items import PresentationContextItemRQ, UserInformationItem
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_RELEASE, P_DATA
from pynetdicom.presentation import negotiate_as_acceptor, negotiate_unrestricted
from pynetdicom.timer import Timer
from pynetdicom.transport import AddressInformation, AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from pacsnode.node import association_guard, codec, pdata, raw_send, request_memo, spool
from pacsnode.replication.model import CorruptBlob
from pacsnode.node.association_guard import (
    ABORT_INVALID_PARAMETER_VALUE,
    ABORT_REASON_NOT_SPECIFIED,
    ABORT_UNRECOGNIZED_PDU,
    log_event,
)

log = logging.getLogger(__name__)

# The versions whose private reactor code the subclasses below were written against and
# tested with. pyproject.toml pins the same; add a version here only after the tests in
# tests/unit/test_acceptor.py and tests/integration/test_protocol_hardening.py pass on it.
TESTED_PYNETDICOM_VERSIONS = frozenset({"3.0.4"})

# Non-P-DATA PDUs (association request, release, abort) are small; an A-ASSOCIATE-RQ with
# 128 presentation contexts of 20 transfer syntaxes each is about 70 KB.
CONTROL_PDU_BYTES_MAX = 1 << 20
# Outgoing PDUs queued per association before the sender waits (16 x 256 KiB = 4 MiB).
PROVIDER_QUEUE_PDUS_MAX = 16
# Longest sleep of either reactor when nothing happens (their timers are checked then).
IDLE_WAKE_S = 0.5
# Longest wait of AcceptorAssociation.kill between looks at the DUL (it is woken at Sta1).
_KILL_WAIT_S = 0.01
_PDU_TYPES = frozenset(range(0x01, 0x08))
_PDV_LENGTH = struct.Struct(">L")
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
STATUS_MOVE_UNABLE_TO_PERFORM = 0xA702  # Refused: out of resources, unable to perform sub-operations.
_PENDING_STATUSES = frozenset({0xFF00, 0xFF01})  # C-GET/C-MOVE: sub-operations are continuing.
# A C-FIND's Pending responses written together (AcceptorDIMSE._send_pending_find_response).
FIND_ROWS_PER_WRITE = 16


class UntestedPynetdicom(RuntimeError):
    """The installed pynetdicom is not one the acceptor was tested with."""


def check_pynetdicom_version(version: str | None = None) -> None:
    """Refuse to run the acceptor on a pynetdicom it was not tested with (start-up check)."""
    installed = version or str(pynetdicom.__version__)
    if installed not in TESTED_PYNETDICOM_VERSIONS:
        raise UntestedPynetdicom(
            f"pynetdicom {installed} is installed; the DICOM acceptor subclasses pynetdicom internals and was "
            f"tested with {', '.join(sorted(TESTED_PYNETDICOM_VERSIONS))} only (see node/acceptor.py)"
        )


# ----------------------------------------------------------------------------- wake-ups
class _Waker:
    """A pipe the DUL thread selects on beside its socket; other threads write a byte to it."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._read_fd

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write_fd, b"\x00")
            except OSError:  # Full pipe: a wake-up is pending anyway.
                pass

    def drain(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._read_fd)
            os.close(self._write_fd)


class _LightQueue(queue.Queue):  # type: ignore[type-arg]
    """queue.Queue with one Condition instead of three (not_empty, not_full and
    all_tasks_done are the same object): each threading.Condition costs a few
    microseconds to make, and an association made five queues (bench/README.md,
    "Association turn-around"). Correct because on every queue of the acceptor only
    one side ever waits: on the unbounded ones only getters (a put never blocks), on
    the bounded _ProviderQueue only putters (its one getter, the DUL thread, never
    blocks); a notify meant for the other side can only wake a waiter that finds its
    condition still false and waits again. join()/task_done() are not used."""

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self._init(maxsize)
        self.mutex = threading.Lock()
        self.not_empty = self.not_full = self.all_tasks_done = threading.Condition(self.mutex)
        self.unfinished_tasks = 0


class _WakingQueue(_LightQueue):
    """A queue that calls `wake` after every put."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _MessageQueue(_WakingQueue):
    """The DIMSE message queue (received requests and responses), which its association's
    DUL closes when its thread ends (AcceptorDUL.run_reactor): from then on a get that
    finds it empty returns at once instead of waiting. pynetdicom's only wake-up for a
    thread waiting for a response on an association that ends is the one (None, None) mark
    AA-2/3/4 put, and one mark wakes one wait: a sender that took it, then sent again
    before the reactor had seen the abort (still established, past its check), waited the
    whole DIMSE timeout on a queue that no thread would put on again
    (test_kill_worker_mid_store_loses_nothing_acknowledged: 60 s instead of ~15 s, 1 run in
    6-7 under load; tests/unit/test_acceptor.py drives the race). Closed is a state, not
    an item: every later wait sees it. Items put before the close are still taken first."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__(wake)
        self.closed = False

    def close(self) -> None:
        """No more messages will come: wake every waiting getter, and let none wait again."""
        with self.mutex:
            self.closed = True
            self.not_empty.notify_all()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """queue.Queue.get, raising queue.Empty at once when empty and closed."""
        if not block:
            return super().get(False)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.not_empty:
            while not self._qsize():
                if self.closed:
                    raise queue.Empty
                if deadline is None:
                    self.not_empty.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise queue.Empty
                self.not_empty.wait(remaining)
            item = self._get()
            self.not_full.notify()
            return item


class _ProviderQueue(_WakingQueue):
    """The DUL's outgoing queue, bounded: a DIMSE message is cut into PDUs as the DUL
    sends them, instead of all at once (a 200 MB instance was held a second time as PDUs
    waiting in this queue). A put waits for room while the DUL thread lives; once it has
    stopped, nothing will be sent and the item is dropped."""

    def __init__(self, wake: Callable[[], None], dul: "AcceptorDUL", maxsize: int) -> None:
        super().__init__(wake)
        self.maxsize = maxsize
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if threading.current_thread() is self._dul:
            # The DUL never waits for itself; its own puts are rare and small.
            with self.mutex:
                self._put(item)
                self.unfinished_tasks += 1
                self.not_empty.notify()
            return
        while True:
            try:
                super().put(item, True, IDLE_WAKE_S)
                return
            except queue.Full:
                if self._dul.ident is not None and not self._dul.is_alive():
                    return


class _Checkpoint(threading.Event):
    """The association reactor's pause flag: clearing it (a sender wants the reactor to
    pause) wakes the reactor so that it reaches the pause at once."""

    def __init__(self, on_clear: Callable[[], None]) -> None:
        super().__init__()
        self._on_clear = on_clear

    def clear(self) -> None:
        super().clear()
        self._on_clear()


def _wait_readable(descriptors: list[int], timeout_s: float) -> bool:
    """Wait until one of `descriptors` is readable (or hung up); False on timeout. poll,
    not select: select cannot watch a descriptor numbered 1024 or more, and a node with a
    large RocksDB store holds that many files."""
    poller = select.poll()
    for descriptor in descriptors:
        poller.register(descriptor, select.POLLIN | select.POLLPRI)
    try:
        return bool(poller.poll(max(0, int(timeout_s * 1000 + 0.999))))
    except (OSError, ValueError):  # A descriptor closed under us: let the caller look again.
        return True


def _timer_running(timer: Any) -> bool:
    return timer.timeout is not None and timer._start_time is not None and timer._end_time is None


# ----------------------------------------------------------------------------- DUL
class _AssociateRQ(A_ASSOCIATE_RQ):
    """An A-ASSOCIATE-RQ whose request primitive is built once: association_guard's
    check_request builds it to see that it can be, and pynetdicom's AE-6 builds it again
    (for dcmtk's getscu, ~120 presentation contexts with roles, each build was ~2-4 ms of
    pydicom UID validation). `forget_primitive` after changing the request."""

    _primitive: Any = None
    # Where decoded items and their primitives are kept by their bytes (node/request_memo.py);
    # None: pynetdicom's decoding, every time.
    memo: request_memo.RequestItemMemo | None = None

    def to_primitive(self) -> Any:
        if self._primitive is None:
            self._primitive = self._build_primitive()
        return self._primitive

    def _build_primitive(self) -> Any:
        """pynetdicom 3.0.4's A_ASSOCIATE_RQ.to_primitive, with the items' primitives from
        the memo."""
        memo = self.memo
        if memo is None:
            return super().to_primitive()
        primitive = A_ASSOCIATE()
        primitive.calling_ae_title = self.calling_ae_title
        primitive.called_ae_title = self.called_ae_title
        primitive.application_context_name = self.application_context_name
        for item in self.variable_items:
            if isinstance(item, PresentationContextItemRQ):
                primitive.presentation_context_definition_list.append(memo.context_primitive(item))
            elif isinstance(item, UserInformationItem):
                primitive.user_information = memo.user_information_primitive(item)
        return primitive

    def _wrap_generate_items(self, bytestream: bytes) -> list[Any]:
        """pynetdicom 3.0.4's PDU._wrap_generate_items, the items from the memo."""
        memo = self.memo
        if memo is None:
            return super()._wrap_generate_items(bytestream)
        return [memo.decode_item(item_type, item_bytes) for item_type, item_bytes in self._generate_items(bytestream)]

    def forget_primitive(self) -> None:
        self._primitive = None


class AcceptorDUL(DULServiceProvider):
    """The DICOM Upper Layer of one accepted association (see the module docstring)."""

    def __init__(self, assoc: "AcceptorAssociation") -> None:
        """pynetdicom 3.0.4's DULServiceProvider.__init__ with the node's queues made once
        (calling it made three queues, each a lock and three conditions, to be replaced
        here: part of the per-association cost of a C-ECHO round, bench/README.md)."""
        self._assoc = assoc
        self.socket: AssociationSocket | None = None
        self._waker: _Waker | None = None
        self.event_queue = _WakingQueue(self._wake)
        self.to_provider_queue = _ProviderQueue(self._wake, self, PROVIDER_QUEUE_PDUS_MAX)
        self.to_user_queue = _WakingQueue(assoc.wake)
        self._recv_pdu = _LightQueue()
        self._idle_timer = Timer(60)  # Timeouts are set after the DUL is made, as pynetdicom does.
        self.artim_timer = Timer(30)
        self.state_machine = StateMachine(self)
        self._run_loop_delay = 0.001
        threading.Thread.__init__(self, target=make_target(self.run_reactor))
        self.daemon = False
        self._kill_thread = False
        self.store_responses_direct = 0  # C-STORE-RSPs delivered by _deliver_store_response.
        self.pdata_direct = 0  # Other P-DATA-TF PDUs delivered by _deliver_pdata.
        self.direct_actions = 0  # A-ASSOCIATE-ACs and A-RELEASE-RPs sent by the association's thread (_act_direct).
        # Set: this thread, started, waits on it before its loop while the association's
        # thread reads the A-ASSOCIATE-RQ and answers it (AcceptorAssociation.run_reactor).
        self.gate: threading.Event | None = None
        # Held by whoever writes to the socket: this thread for each state-machine action and
        # each batch it sends, a sender's thread for a batch it writes itself (send_encoded).
        # Whatever is queued or being sent was put there first, so "nothing queued" seen
        # under it means a sender's batch goes out in its turn.
        self._send_lock = threading.RLock()
        self.encoded_sent_direct = 0  # Batches written by their sender's thread (send_encoded).
        self.encoded_pdus_direct = 0  # ... and the PDUs in them.
        # Set when the state machine reaches Sta1 (idle: the association is over) and when
        # this thread ends: AcceptorAssociation.kill waits on it (see there).
        self._idle = threading.Event()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None and threading.current_thread() is not self:
            waker.wake()

    # -------------------------------------------------------------- the reactor loop
    def run_reactor(self) -> None:
        if self._waker is None:  # (Made before the thread started when it has a gate.)
            self._waker = _Waker()
        try:
            gate = self.gate
            if gate is not None:
                gate.wait()  # See AcceptorAssociation.run_reactor.
            self._run_reactor_loop()
        finally:
            # No message comes after this: a thread waiting for a response (or about to)
            # gets none at once (_MessageQueue), whatever took AA-2/3/4's mark, or if the
            # thread ended without them (_abort_hard, kill_dul).
            cast(AcceptorDIMSE, self.assoc.dimse).msg_queue.close()
            waker, self._waker = self._waker, None
            waker.close()
            self._idle.set()
            cast("AcceptorAssociation", self.assoc).wake()

    def _run_reactor_loop(self) -> None:
        """pynetdicom 3.0.4's DULServiceProvider.run_reactor, waiting instead of polling,
        and ending the association (one log line, A-ABORT) where it let exceptions out."""
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_for_work()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._send_encoded() or self._send_accept():
                    sleep = False
                    continue
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as error:
                self._abort_hard("dicom.dul.failed", error)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            try:
                with self._send_lock:
                    self.state_machine.do_action(event)
            except Exception as error:
                self._abort_hard("dicom.dul.failed", error, fsm_event=event)
                return
            if self.state_machine.current_state == "Sta1":
                self._idle.set()
            sleep = False

    def send_encoded(self, batch: pdata.EncodedPData) -> None:
        """Send encoded P-DATA-TF PDUs behind what is queued already: written at once by the
        calling thread when nothing is queued (_send_direct), else queued for this thread
        (waits for room)."""
        if threading.current_thread() is not self and self._send_direct(batch):
            return
        self.to_provider_queue.put(batch)  # type: ignore[arg-type]  # Taken by _send_encoded only.

    def _plain_socket(self) -> socket.socket | None:
        """The association's socket when it is plain TCP and this DUL thread runs: what a
        direct write from another thread needs (a TLS socket may be read by this thread at
        the same time)."""
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None or isinstance(sock, ssl.SSLSocket) or not self.is_alive():
            return None
        return sock

    def _send_direct(self, batch: pdata.EncodedPData) -> bool:
        """Write `batch` on the calling thread (the association's, or a C-MOVE's sub-operation
        sender) when this thread is not sending or running the state machine, nothing is
        queued and the association is established (Sta6): what _send_encoded would do, without
        handing the batch to this thread -- a queue put, a wake-up through the pipe and a turn
        of this loop per message, on the path between each retrieved instance's response and
        the next instance (bench/README.md). False: nothing done, the caller queues it. Not on
        a TLS socket (this thread may be reading from it at the same time)."""
        sock = self._plain_socket()
        if sock is None or not self._send_lock.acquire(blocking=False):
            return False
        try:
            if self.to_provider_queue.qsize() or self.state_machine.current_state != "Sta6":
                return False
            self.encoded_sent_direct += 1
            self.encoded_pdus_direct += batch.pdus
            try:
                _send_buffers(sock, batch.buffers)
            except TimeoutError:
                log_event(logging.WARNING, "dicom.pdu.send_timeout", self.assoc, pending_bytes=batch.size,
                          timeout_s=f"{sock.gettimeout()}")
                self.event_queue.put("Evt17")
            except OSError:
                self.event_queue.put("Evt17")
            return True
        finally:
            self._send_lock.release()

    def send_pdu(self, primitive: Any) -> None:
        """pynetdicom's send_pdu (queue the primitive for this thread), except for an
        A-ASSOCIATE accept in Sta3 and an A-RELEASE response in Sta8, which the calling
        thread (the association's) sends itself when this thread is not sending or
        running the state machine and nothing is queued (_act_direct). Queued, the
        A-ASSOCIATE-AC and the A-RELEASE-RP each waited for a wake-up through the pipe
        and a turn of this loop, and for the GIL while the association thread ran the
        EVT_ACCEPTED/EVT_ESTABLISHED (log line, audit record) or EVT_RELEASED handlers
        that come after the send: two thread hand-overs of the three a raw association
        + C-ECHO + release had (bench/README.md, "Association turn-around")."""
        assoc = cast("AcceptorAssociation", self.assoc)
        if threading.current_thread() is not self and self._act_direct(primitive):
            assoc.start_dul(wait=False)  # After an A-ASSOCIATE-AC read and sent on the association's thread.
            return
        assoc.start_dul(wait=True)  # This thread takes it off the queue.
        super().send_pdu(primitive)

    def receive_request_here(self) -> Any:
        """On the association's thread, while this DUL thread waits on its gate: AE-5 for the
        connection (Sta1 -> Sta2), then read the first PDU (_read_pdu_data, its deadline
        and checks) and, when it is an A-ASSOCIATE-RQ, AE-6 (-> Sta3): the A-ASSOCIATE
        indication primitive, returned. What pynetdicom's DUL thread does before handing
        the request over (the hand-over cost a wake-up and a thread switch, and starting
        this thread first one more). None, with whatever the read left queued for this
        thread (a close, an abort, a timeout, another PDU), when it is anything else."""
        gate = self.gate
        if gate is None or gate.is_set() or self.state_machine.current_state != "Sta1" \
                or list(self.event_queue.queue) != ["Evt5"]:
            return None
        with self._send_lock:
            self.state_machine.do_action(self.event_queue.get(False))
        self._read_pdu_data()
        if self.state_machine.current_state != "Sta2" or list(self.event_queue.queue) != ["Evt6"]:
            return None
        with self._send_lock:
            self.state_machine.do_action(self.event_queue.get(False))
        self._idle_timer.restart()  # As _is_transport_event's caller does for a received PDU.
        return super().receive_pdu(wait=False)

    def _act_direct(self, primitive: Any) -> bool:
        """AE-7 (accept, Sta3 + Evt7 -> Sta6) or AR-4 (release response, Sta8 + Evt14 ->
        Sta13) done on the calling thread, under the send lock; False: nothing done.
        As _send_direct, not on a TLS socket (this thread may be reading from it)."""
        if isinstance(primitive, A_ASSOCIATE) and primitive.result == 0x00:
            state, event, action, next_state = "Sta3", "Evt7", "AE-7", "Sta6"
        elif isinstance(primitive, A_RELEASE) and primitive.result is not None:
            state, event, action, next_state = "Sta8", "Evt14", "AR-4", "Sta13"
        else:
            return False
        sock = self._plain_socket()
        if sock is None or not self._send_lock.acquire(blocking=False):
            return False
        try:
            if self.state_machine.current_state != state or self.to_provider_queue.qsize() \
                    or self.event_queue.qsize():
                return False
            evt.trigger(self.assoc, evt.EVT_ACSE_SENT, {"primitive": primitive})
            encoded = None
            if action == "AE-7" and not self.assoc.get_handlers(evt.EVT_PDU_SENT):
                memo: request_memo.RequestItemMemo | None = getattr(self.assoc.ae, "request_memo", None)
                encoded = memo.accept_pdu(primitive) if memo is not None else None
            if encoded is not None:
                cast(AssociationSocket, self.socket).send(encoded)  # Evt17 on failure, as pynetdicom's _send.
            elif action == "AE-7":
                self._send(A_ASSOCIATE_AC(primitive))
            else:
                self._send(A_RELEASE_RP(primitive))
                self.artim_timer.start()
            evt.trigger(self.assoc, evt.EVT_FSM_TRANSITION, {"action": action, "current_state": state,
                                                              "fsm_event": event, "next_state": next_state})
            self.state_machine.transition(next_state)
            self.direct_actions += 1
        finally:
            self._send_lock.release()
        if next_state == "Sta13":
            self._wake()  # This thread closes the connection in Sta13 (pynetdicom's _is_transport_event).
        return True

    def _send_encoded(self) -> bool:
        """Write the P-DATA-TF PDUs of an EncodedPData batch at the head of the outgoing
        queue (node/pdata.py); False if the head is anything else. pynetdicom's state
        machine answers a P-DATA request in Sta6 by sending its PDU and staying in Sta6
        (DT-1); that is done here for the whole batch, without the per-PDU primitive,
        event and PDU objects. In any other state the association no longer carries data
        and the batch is dropped (as the peer will never get the message whole, the
        sender's wait for a response ends with the association)."""
        queued = self.to_provider_queue.queue
        if not queued or not isinstance(queued[0], pdata.EncodedPData):
            return False  # Looked at without the lock: only this thread takes items off.
        with self._send_lock:
            return self._send_encoded_head()

    def _send_encoded_head(self) -> bool:
        try:
            head = self.to_provider_queue.queue[0]
        except IndexError:
            return False
        if not isinstance(head, pdata.EncodedPData):
            return False
        self.to_provider_queue.get(False)
        if self.state_machine.current_state != "Sta6":
            return True
        wrapper = self.socket
        if wrapper is None or wrapper.socket is None:
            self.event_queue.put("Evt17")
            return True
        try:
            _send_buffers(wrapper.socket, head.buffers)
        except TimeoutError:
            log_event(logging.WARNING, "dicom.pdu.send_timeout", self.assoc, pending_bytes=head.size,
                      timeout_s=f"{wrapper.socket.gettimeout()}")
            self.event_queue.put("Evt17")
        except OSError:
            self.event_queue.put("Evt17")
        return True

    def _send_accept(self) -> bool:
        """pynetdicom's AE-7 for the A-ASSOCIATE (accept) primitive at the head of the
        outgoing queue, its A-ASSOCIATE-AC's bytes from the AE's request memo (node/
        request_memo.py; pynetdicom builds the PDU items and encodes them, validating
        every UID again: for getscu's ~120 contexts a fifth of the node's CPU per
        association): sent, EVT_FSM_TRANSITION triggered, Sta3 -> Sta6. Only in Sta3 with
        no event queued and nothing bound to EVT_PDU_SENT (not triggered here); False:
        nothing done, pynetdicom's way."""
        queued = self.to_provider_queue.queue
        if not queued or not isinstance(queued[0], A_ASSOCIATE):
            return False  # Looked at without the lock: only this thread takes items off.
        with self._send_lock:
            return self._send_accept_head()

    def _send_accept_head(self) -> bool:
        try:
            head = self.to_provider_queue.queue[0]
        except IndexError:
            return False
        if not isinstance(head, A_ASSOCIATE) or head.result != 0x00 or self.state_machine.current_state != "Sta3" \
                or self.event_queue.qsize() or self.assoc.get_handlers(evt.EVT_PDU_SENT):
            return False
        memo: request_memo.RequestItemMemo | None = getattr(self.assoc.ae, "request_memo", None)
        encoded = memo.accept_pdu(head) if memo is not None else None
        if encoded is None:
            return False
        self.to_provider_queue.get(False)
        cast(AssociationSocket, self.socket).send(encoded)  # Evt17 on failure, as pynetdicom's _send.
        evt.trigger(self.assoc, evt.EVT_FSM_TRANSITION, {"action": "AE-7", "current_state": "Sta3",
                                                          "fsm_event": "Evt7", "next_state": "Sta6"})
        self.state_machine.transition("Sta6")
        return True

    def _wait_for_work(self) -> None:
        timeout = IDLE_WAKE_S
        if _timer_running(self.artim_timer):
            timeout = min(timeout, max(0.0, self.artim_timer.remaining))
        waker = cast(_Waker, self._waker)
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None and wrapper._is_connected else None
        if sock is not None and isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        descriptors = [waker.fileno()]
        if sock is not None and sock.fileno() >= 0:
            descriptors.append(sock.fileno())
        _wait_readable(descriptors, timeout)
        waker.drain()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            waker = self._waker
            if waker is not None:
                waker.wake()
            if threading.current_thread() is not self and self.ident is not None:
                self.join()  # pynetdicom polls every 1 ms; the thread ends at its next loop.
            return True
        return False

    def wait_stoppable(self, timeout_s: float) -> None:
        """Wait until the state machine is idle (Sta1, where stop_dul stops this thread)
        or this thread has ended, at most `timeout_s`. Clears the flag first: the caller
        checks stop_dul after each wait, so no reaching of Sta1 is missed."""
        if self._idle.wait(timeout_s):
            self._idle.clear()

    def kill_dul(self) -> None:
        self._kill_thread = True
        self.open_gate()
        self._wake()

    def open_gate(self) -> None:
        gate = self.gate
        if gate is not None:
            gate.set()

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        """As pynetdicom's, but a blocking wait ends as soon as this DUL has stopped
        (pynetdicom's waits the whole ACSE timeout for a request that will never come)."""
        if not wait:
            return super().receive_pdu(wait=False)
        assoc = cast("AcceptorAssociation", self.assoc)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stopped = self.ident is not None and not self.is_alive()
            primitive = super().receive_pdu(wait=False)
            if primitive is not None:
                return primitive
            if stopped:
                return None
            wait_s = IDLE_WAKE_S if deadline is None else min(IDLE_WAKE_S, deadline - time.monotonic())
            if wait_s <= 0:
                return None
            assoc._work.wait(wait_s)  # Set by a put on to_user_queue and by this DUL's end.
            assoc._work.clear()

    # -------------------------------------------------------------- reading PDUs
    def _read_pdu_data(self) -> None:
        """Read one PDU against a deadline, with the size and type checks; see the module."""
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None:
            self.event_queue.put("Evt17")
            return
        if self.state_machine.current_state == "Sta13":
            self._discard_input(sock)  # Waiting for the close: nothing read here matters.
            return
        established = bool(self.assoc.is_established)
        timeout_s = (self.assoc.network_timeout if established else self.assoc.acse_timeout) or 60.0
        if _timer_running(self.artim_timer):
            timeout_s = min(timeout_s, max(0.0, self.artim_timer.remaining))
        deadline = time.monotonic() + timeout_s
        header = self._receive(sock, 6, deadline)
        if header is None:
            self._timed_out(0, 6, timeout_s)
            return
        if len(header) < 6:
            self.event_queue.put("Evt17")  # The peer closed the connection.
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            self.abort_peer("dicom.pdu.unknown_type", ABORT_UNRECOGNIZED_PDU, pdu_type=f"0x{pdu_type:02X}")
            return
        limit = self._length_max(pdu_type)
        if limit and length > limit:
            self.abort_peer("dicom.pdu.too_large", ABORT_INVALID_PARAMETER_VALUE, pdu_type=f"0x{pdu_type:02X}",
                            length_bytes=length, max_bytes=limit)
            return
        data = bytearray(6 + length)
        data[:6] = header
        received = self._receive_into(sock, memoryview(data)[6:], deadline)
        if received is None:
            self._timed_out(6, 6 + length, timeout_s)
            return
        if received < length:
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04 and (self._deliver_store_response(data) or self._deliver_pdata(data)):
            return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as error:
            self.abort_peer("dicom.pdu.undecodable", ABORT_INVALID_PARAMETER_VALUE, pdu_type=f"0x{pdu_type:02X}",
                            error=type(error).__name__)
            return
        if isinstance(pdu, A_ASSOCIATE_RQ):
            rejection = association_guard.check_request(pdu)
            if rejection is not None:
                if isinstance(pdu, _AssociateRQ):
                    pdu.forget_primitive()  # make_negotiable changes the request.
                if not association_guard.make_negotiable(pdu):
                    self.abort_peer("dicom.pdu.undecodable", ABORT_INVALID_PARAMETER_VALUE, pdu_type="0x01",
                                    error="A_ASSOCIATE_RQ")
                    return
                cast("AcceptorAssociation", self.assoc).rejection = rejection
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _deliver_store_response(self, data: bytearray) -> bool:
        """A P-DATA-TF PDU that is one whole plain C-STORE-RSP in one PDV item (the
        responses to the node's C-GET/C-MOVE sub-operations) goes to DIMSE at once: what
        pynetdicom's DT-2 does for it in Sta6, without the PDU and primitive objects, the
        event queue and the state machine. Only in Sta6 with nothing queued ahead of it
        (order is kept) and while nothing is bound to EVT_DATA_RECV or EVT_PDU_RECV
        (they are not triggered for it). False: the PDU takes pynetdicom's way."""
        if self.state_machine.current_state != "Sta6" or self.event_queue.qsize() or self._recv_pdu.qsize():
            return False
        if len(data) < 12 or 10 + struct.unpack_from(">L", data, 6)[0] != len(data):
            return False  # Not exactly one PDV item.
        if self.assoc.get_handlers(evt.EVT_DATA_RECV) or self.assoc.get_handlers(evt.EVT_PDU_RECV):
            return False
        dimse = cast("AcceptorDIMSE", self.assoc.dimse)
        if not dimse.deliver_store_response(data[10], memoryview(data)[11:]):
            return False
        self.store_responses_direct += 1
        return True

    def _deliver_pdata(self, data: bytearray) -> bool:
        """A P-DATA-TF PDU in Sta6 goes to DIMSE at once, as a P-DATA primitive with its PDV
        items: what pynetdicom's DT-2 does for it (DIMSE's receive_primitive on this thread,
        staying in Sta6), without the PDU and item objects, the event and PDU queues (two
        notifications each way) and the state machine's dispatch -- per PDU, two for each
        small C-STORE (command, data set): ~3% of a node's GIL time on ingest
        (bench/README.md, "stop 33, helper P"). Only with nothing queued ahead of it (order
        is kept) and nothing bound to EVT_DATA_RECV, EVT_PDU_RECV or EVT_FSM_TRANSITION (not
        triggered for it). False, nothing done: the PDU takes pynetdicom's way (which also
        decides what to make of items whose lengths do not add up)."""
        if self.state_machine.current_state != "Sta6" or self.event_queue.qsize() or self._recv_pdu.qsize():
            return False
        assoc = self.assoc
        if assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_PDU_RECV) \
                or assoc.get_handlers(evt.EVT_FSM_TRANSITION):
            return False
        view = memoryview(data)
        primitive = P_DATA()
        primitive.presentation_data_value_list = []  # Filled as P_DATA_TF.to_primitive fills it.
        items = primitive.presentation_data_value_list
        position, end = 6, len(data)
        while position < end:
            if end - position < 6:
                return False
            item_length = _PDV_LENGTH.unpack_from(data, position)[0]
            if item_length < 2 or position + 4 + item_length > end:
                return False  # Not a context id and a control header at least, or past the PDU.
            items.append((data[position + 4], bytes(view[position + 5:position + 4 + item_length])))
            position += 4 + item_length
        if not items:
            return False
        assoc.dimse.receive_primitive(primitive)
        self.pdata_direct += 1
        return True

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """pynetdicom 3.0.4's DULServiceProvider._decode_pdu, an A-ASSOCIATE-RQ decoded as
        an _AssociateRQ (its request primitive built once, not twice)."""
        if bytestream[0:1] != b"\x01":
            return super()._decode_pdu(bytestream)
        data = bytes(bytestream)
        evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": data})
        pdu = _AssociateRQ()
        pdu.memo = getattr(self.assoc.ae, "request_memo", None)
        pdu.decode(data)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt6"

    def _length_max(self, pdu_type: int) -> int:
        if pdu_type == 0x04:
            local = self.assoc.requestor if self.assoc.is_requestor else self.assoc.acceptor
            return int(local.maximum_length or 0)  # What we advertised; 0 = no limit.
        return CONTROL_PDU_BYTES_MAX

    def _receive(self, sock: socket.socket, count: int, deadline: float) -> bytearray | None:
        """`count` bytes, fewer if the peer closed, None if the deadline passed first."""
        buffer = bytearray(count)
        received = self._receive_into(sock, memoryview(buffer), deadline)
        return None if received is None else buffer[:received]

    def _receive_into(self, sock: socket.socket, view: memoryview, deadline: float) -> int | None:
        """Fill `view`; the bytes received (fewer if the peer closed), None on the deadline."""
        count = len(view)
        received = 0
        while received < count:
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                descriptor = sock.fileno()
                if descriptor < 0:
                    return received
                if not _wait_readable([descriptor], remaining):
                    return None
            try:
                got = sock.recv_into(view[received:], count - received)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                continue
            except OSError:
                return received
            if got == 0:
                return received
            received += got
        if _QUICKACK is not None:
            # Peers that leave Nagle on (dcmtk, pynetdicom) send a C-STORE as a command PDU
            # and a small last data PDU that Nagle holds until the first is ACKed; Linux
            # delays that ACK up to 40 ms unless QUICKACK is re-armed after each read.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass
        return received

    def _discard_input(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.event_queue.put("Evt17")

    def _timed_out(self, received: int, expected: int, timeout_s: float) -> None:
        state = "established" if self.assoc.is_established else "negotiation"
        self.abort_peer("dicom.pdu.timeout", ABORT_REASON_NOT_SPECIFIED, state=state, received_bytes=received,
                        expected_bytes=expected, timeout_s=f"{timeout_s:g}")

    # -------------------------------------------------------------- ending it
    def abort_peer(self, event_name: str, reason: int, **fields: Any) -> None:
        """The peer broke the protocol: log one line, send an A-ABORT (source: service
        provider) and close the connection; the state machine sees the close (Evt17) and
        the association ends as if the peer had dropped it."""
        log_event(logging.WARNING, event_name, self.assoc, **fields)
        wrapper = self.socket
        if wrapper is None or wrapper.socket is None:
            return
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = reason
        with self._send_lock:
            try:
                wrapper.socket.sendall(abort.encode())
            except OSError:
                pass
        wrapper.close()  # Puts Evt17.

    def _abort_hard(self, event_name: str, error: BaseException, **fields: Any) -> None:
        """pynetdicom's own way out of a broken reactor (A-ABORT, stop both threads), with
        one log line instead of a traceback."""
        log_event(logging.WARNING, event_name, self.assoc, error=type(error).__name__, **fields)
        wrapper = self.socket
        if wrapper is not None and wrapper.socket is not None:
            abort = A_ABORT_RQ()
            abort.source = 0x02
            abort.reason_diagnostic = ABORT_REASON_NOT_SPECIFIED
            with self._send_lock:
                try:
                    wrapper.socket.sendall(abort.encode())
                except OSError:
                    pass
            wrapper._shutdown_socket()
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


# ----------------------------------------------------------------------------- socket
def _socket_ready(wrapper: AssociationSocket) -> bool:
    """pynetdicom's AssociationSocket.ready, with poll instead of select (descriptors >= 1024)."""
    sock = wrapper.socket
    if sock is None or wrapper._is_connected is False:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    descriptor = sock.fileno()
    if descriptor < 0:
        wrapper.event_queue.put("Evt17")
        return False
    poller = select.poll()
    poller.register(descriptor, select.POLLIN | select.POLLPRI)
    try:
        return bool(poller.poll(0))
    except (OSError, ValueError):
        wrapper.event_queue.put("Evt17")
        return False


# At most this many buffers per sendmsg (Linux's IOV_MAX is 1024).
_SENDMSG_BUFFERS_MAX = 512


def _send_buffers(sock: socket.socket, buffers: tuple[bytes | memoryview, ...]) -> None:
    """Write every buffer, in order, with as few system calls as the socket allows: sendmsg
    gathers them without joining (a TLS socket has no sendmsg: one join, one sendall).
    Raises TimeoutError when the socket's timeout passes with bytes unsent, OSError when
    the connection fails."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join(buffers))
        return
    sent = 0
    if len(buffers) <= _SENDMSG_BUFFERS_MAX:
        # Most batches go out whole in one call: byte views are made only for a rest.
        sent = sock.sendmsg(buffers)
        if sent == sum(buffer.nbytes if isinstance(buffer, memoryview) else len(buffer) for buffer in buffers):
            return
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    first = 0
    while True:
        while first < len(views) and sent >= len(views[first]):  # Past what went (and empty views).
            sent -= len(views[first])
            first += 1
        if first >= len(views):
            return
        if sent:
            views[first] = views[first][sent:]
        sent = sock.sendmsg(views[first:first + _SENDMSG_BUFFERS_MAX])


class AcceptorSocket(AssociationSocket):
    """An accepted connection whose sends time out after `network_timeout_s`: a peer that
    stops reading (a C-GET requestor that never takes its instances) would otherwise
    block the DUL thread in `send` for ever and hold the association slot. Reads are not
    affected (AcceptorDUL waits in `select` with its own deadlines first)."""

    def __init__(self, assoc: Any, client_socket: socket.socket) -> None:
        super().__init__(assoc, client_socket=client_socket)
        timeout = assoc.network_timeout
        client_socket.settimeout(float(timeout) if timeout else None)

    @property
    def ready(self) -> bool:
        return _socket_ready(self)

    def send(self, bytestream: bytes) -> None:
        sock = self.socket
        if sock is None:
            self.event_queue.put("Evt17")
            return
        try:
            sock.sendall(bytestream)
        except TimeoutError:
            log_event(logging.WARNING, "dicom.pdu.send_timeout", self.assoc, pending_bytes=len(bytestream),
                      timeout_s=f"{sock.gettimeout():g}")
            self.event_queue.put("Evt17")
            return
        except Exception:
            self.event_queue.put("Evt17")
            return
        evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})


# ----------------------------------------------------------------------------- DIMSE
@dataclass(frozen=True)
class SpoolSettings:
    """Where received data sets go (node/spool.py): set on the NodeAE by the front end."""

    threshold_bytes: int
    size_max_bytes: int
    budget: spool.InflightBudget
    directory: Path


def _ends_data_set(primitive: Any) -> bool:
    """A P-DATA whose last fragment is the last of a message's data set."""
    pdvs = getattr(primitive, "presentation_data_value_list", None)
    if not pdvs:
        return False
    data = pdvs[-1][1]
    return len(data) > 0 and data[0] & 0x03 == 0x02


class AcceptorDIMSE(DIMSEServiceProvider):
    """Wakes the association reactor on every message; a message that cannot be decoded
    aborts the association (pynetdicom 3.0.4 lets the exception kill the DUL thread).
    With SpoolSettings on the AE, each message's data set is received into a
    spool.SpoolBuffer (a BytesIO that moves a big C-STORE data set to a file as it
    arrives) instead of pynetdicom's BytesIO."""

    def __init__(self, assoc: "AcceptorAssociation") -> None:
        """pynetdicom 3.0.4's DIMSEServiceProvider.__init__ with the node's queue made
        once (calling it made a queue.Queue to be replaced here)."""
        self._assoc = assoc
        self.cancel_req = {}
        self.message = None
        self.msg_queue: _MessageQueue = _MessageQueue(assoc.wake_for_message)  # Closed by the DUL's end.
        self._spool: SpoolSettings | None = getattr(assoc.ae, "spool", None)
        # A Pending C-MOVE-RSP held back until the next sub-operation's request is out
        # (see _send_pending_retrieve_response): (PDU, message id responded, status, hook).
        # Pending responses held back (see _send_pending_retrieve_response and
        # _send_pending_find_response): (PDUs, message id responded, status, hook) each.
        self._deferred: list[tuple[pdata.EncodedPData, int, int, StoreResponseHook | None]] = []
        self._deferred_lock = threading.Lock()
        # The C-MOVE whose first Pending response went out (never held back).
        self._move_pending_sent_for: int | None = None
        # The C-FIND whose Pending responses send_find_row encodes, and their encoder.
        self._find_responses: tuple[tuple[int, int, str, int], pdata.FindResponses] | None = None
        # The C-STORE-RQ message being received whose command set _start_store_request read
        # (not decoded into message.command_set), and its fields.
        self._store_command: tuple[DIMSEMessage, pdata.StoreRequest] | None = None

    def _new_message(self) -> DIMSEMessage:
        message = DIMSEMessage()
        settings = self._spool
        if settings is not None:
            message.data_set = spool.SpoolBuffer(
                threshold_bytes=settings.threshold_bytes, size_max_bytes=settings.size_max_bytes,
                budget=settings.budget, directory=settings.directory, prefix=lambda: self._part10_prefix(message))
        return message

    def _part10_prefix(self, message: DIMSEMessage) -> bytes | None:
        """The Part-10 preamble and file meta of a C-STORE request's data set (as the
        C-STORE handler writes them for a data set kept in memory); None otherwise."""
        if not isinstance(message, C_STORE_RQ) or message.context_id is None:
            return None
        context = self.assoc._accepted_cx.get(message.context_id)
        if context is None:
            return None
        started = self._store_command
        if started is not None and started[0] is message:
            sop_class_uid, sop_instance_uid = started[1].sop_class_uid, started[1].sop_instance_uid
        else:
            command = message.command_set
            sop_class_uid = str(command.AffectedSOPClassUID or "")
            sop_instance_uid = str(command.AffectedSOPInstanceUID or "")
        return codec.part10_prefix(sop_class_uid, sop_instance_uid, str(context.transfer_syntax[0]),
                                   self.assoc.requestor.ae_title)

    def discard_partial(self) -> None:
        """The association ended in the middle of a message: drop its spooled bytes now."""
        message = self.message
        buffer = getattr(message, "data_set", None) if message is not None else None
        if isinstance(buffer, spool.SpoolBuffer):
            buffer.close()

    def send_msg(self, primitive: Any, context_id: int) -> None:
        pending_find = isinstance(primitive, C_FIND) and primitive.Status in _PENDING_STATUSES
        # A C-FIND's final response goes in one write with the Pending responses held before
        # it (_send_final_find_response), or after them the usual way.
        final_find = isinstance(primitive, C_FIND) and not pending_find \
            and primitive.MessageIDBeingRespondedTo is not None
        if not pending_find and not final_find:  # One is held behind those held already (_send_pending_find_response).
            self.flush_deferred()  # Held-back Pending responses go before anything sent after them.
        assoc = cast("AcceptorAssociation", self.assoc)
        if assoc.retrieve_refused and isinstance(primitive, (C_GET, C_MOVE)) and primitive.Status is not None \
                and primitive.Status not in (0xFF00, 0xFF01):
            # pynetdicom needs one announced sub-operation to send a final status of our
            # own, and then counts it as failed; no sub-operation was ever attempted.
            primitive.NumberOfFailedSuboperations = 0
            primitive.NumberOfWarningSuboperations = 0
            primitive.NumberOfCompletedSuboperations = 0
            assoc.retrieve_refused = False
        move = assoc.move_destination
        if move is not None and isinstance(primitive, C_MOVE) and primitive.Status is not None \
                and primitive.Status not in (0xFF00, 0xFF01):
            assoc.move_destination = None
            if primitive.Status == STATUS_MOVE_DESTINATION_UNKNOWN:
                # pynetdicom answers "destination unknown" when the sub-association fails;
                # the destination is known (configured) but did not take the association:
                # every sub-operation failed, none could be attempted.
                ae_title, address, instances = move
                log_event(logging.WARNING, "dicom.move.destination_unreachable", assoc,
                          move_destination=ae_title, destination_address=address, instances=instances)
                primitive.Status = STATUS_MOVE_UNABLE_TO_PERFORM
                primitive.NumberOfFailedSuboperations = instances
                primitive.NumberOfWarningSuboperations = 0
                primitive.NumberOfCompletedSuboperations = 0
                # pynetdicom 3.0.4 initialises ErrorComment to None without a declared type.
                primitive.ErrorComment = f"move destination {ae_title} did not accept an association"[:64]  # type: ignore[assignment]
        if isinstance(primitive, C_MOVE) and primitive.Status not in _PENDING_STATUSES:
            self._move_pending_sent_for = None  # The C-MOVE ends with this response.
        if isinstance(primitive, C_FIND) and primitive.Status not in _PENDING_STATUSES:
            self._find_responses = None  # The C-FIND ends with this response.
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None \
                and self._send_store_response(primitive, context_id):
            return
        if isinstance(primitive, (C_GET, C_MOVE)) and primitive.Status in _PENDING_STATUSES \
                and self._send_pending_retrieve_response(primitive, context_id):
            return
        if pending_find:
            if self._send_pending_find_response(primitive, context_id):
                return
            self.flush_deferred()  # This one goes pynetdicom's way, after those held.
        if isinstance(primitive, C_ECHO) and primitive.MessageIDBeingRespondedTo is not None \
                and self._send_echo_response(primitive, context_id):
            return
        if final_find:
            if self._send_final_find_response(primitive, context_id):
                return
            self.flush_deferred()  # This one goes pynetdicom's way, after those held.
        payload = raw_send.stored_payload(primitive)
        if payload is None:
            super().send_msg(primitive, context_id)
            return
        self.send_store_request(raw_send.StoreRequest(
            int(primitive.MessageID), int(primitive.Priority), str(primitive.AffectedSOPClassUID),
            str(primitive.AffectedSOPInstanceUID), primitive.MoveOriginatorApplicationEntityTitle,
            primitive.MoveOriginatorMessageID), context_id, payload)

    def send_store_request(self, request: raw_send.StoreRequest, context_id: int, payload: Any) -> None:
        """A C-STORE of stored bytes (C-GET/C-MOVE sub-operations; node/raw_send.py, which
        gives the request's fields, checked, without a pynetdicom primitive): the command
        set and the data set as whole encoded PDUs (node/pdata.py), written in batches.
        EVT_DIMSE_SENT is not triggered for this request: the node's only handler
        (node/metrics.py) counts responses, and building the pydicom message for it was
        most of the command's cost."""
        try:
            self._send_stored(request, context_id, payload)
        except CorruptBlob as error:
            # A blob file streamed as it is sent (node/blob_files.py) failed its checksum
            # part way: the peer must not take what was sent for the instance. Abort.
            log_event(logging.ERROR, "dicom.retrieve.corrupt_aborted", self.assoc, error=type(error).__name__)
            self.assoc.abort()
            raise

    def _send_store_response(self, primitive: C_STORE, context_id: int) -> bool:
        """Send a plain C-STORE-RSP (no Error Comment or Offending Element) as one encoded
        PDU (node/pdata.py) instead of through pynetdicom's message, event and state
        machine (about a tenth of a node's GIL time on ingest). False: not sent, the
        caller sends it the usual way (see _send_encoded_response)."""
        message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
        if primitive.ErrorComment is not None or primitive.OffendingElement is not None or status is None \
                or message_id is None:
            return False
        return self._send_encoded_response(context_id, int(message_id), int(status), lambda: pdata.store_response_pdu(
            context_id, self.maximum_pdu_size, message_id_responded=int(message_id), status=int(status),
            sop_class_uid=primitive.AffectedSOPClassUID, sop_instance_uid=primitive.AffectedSOPInstanceUID))

    def _send_pending_retrieve_response(self, primitive: C_GET | C_MOVE, context_id: int) -> bool:
        """Send the Pending C-GET-RSP/C-MOVE-RSP that pynetdicom's retrieve service classes
        send after every sub-operation (counts, no Identifier) as one encoded PDU: through
        pynetdicom's message, event and state machine it took ~0.5 ms of the association
        thread per retrieved instance, between the sub-operation's response and the next
        C-STORE request (bench/README.md). False: not sent, the caller sends it the usual way."""
        message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
        if primitive.ErrorComment is not None or primitive.OffendingElement is not None or status is None \
                or message_id is None or primitive.Identifier is not None:
            return False
        field = pdata.C_GET_RSP_FIELD if isinstance(primitive, C_GET) else pdata.C_MOVE_RSP_FIELD
        # A C-MOVE's Pending responses after its first are held back until the next
        # sub-operation's C-STORE request has gone out to the destination (flush_deferred,
        # called by node/raw_send.py's sender; by any later send here; before a wait on a
        # read, node/dicom.py): written while the destination stores the instance, not on
        # the way from its previous response to that request (the write, and the requestor's
        # wake-up on a 2-core machine). Only on this association's own thread (pynetdicom's
        # retrieve loop). The first goes out at once (the requestor's time to the first).
        defer = isinstance(primitive, C_MOVE) and threading.current_thread() is self.assoc \
            and self._move_pending_sent_for == int(message_id)
        if isinstance(primitive, C_MOVE):
            self._move_pending_sent_for = int(message_id)
        return self._send_encoded_response(context_id, int(message_id), int(status), lambda: pdata.retrieve_response_pdu(
            context_id, self.maximum_pdu_size, command_field=field, message_id_responded=int(message_id),
            status=int(status), sop_class_uid=primitive.AffectedSOPClassUID,
            remaining=primitive.NumberOfRemainingSuboperations, completed=primitive.NumberOfCompletedSuboperations,
            failed=primitive.NumberOfFailedSuboperations, warning=primitive.NumberOfWarningSuboperations),
            defer=1 if defer else 0)

    def _send_echo_response(self, primitive: C_ECHO, context_id: int) -> bool:
        """Send a plain C-ECHO-RSP as one encoded PDU: through pynetdicom's message, its
        pydicom encoding and state machine it was about a third of a node's CPU per
        association + C-ECHO + release. False: not sent, the caller sends it the usual way."""
        message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
        if primitive.ErrorComment is not None or status is None or message_id is None:
            return False
        return self._send_encoded_response(context_id, int(message_id), int(status), lambda: pdata.echo_response_pdu(
            context_id, self.maximum_pdu_size, message_id_responded=int(message_id), status=int(status),
            sop_class_uid=primitive.AffectedSOPClassUID))

    def _send_final_find_response(self, primitive: C_FIND, context_id: int) -> bool:
        """Send a C-FIND's final response (no Identifier, no Error Comment or Offending
        Element: Success, or a plain failure or cancel status) as one encoded PDU, in one
        write with the Pending responses held back before it. Through pynetdicom's message, its
        command set's pydicom encoding and its state machine it was about half of a node's
        CPU on a one-row C-FIND. False: not sent, the caller sends it the usual way."""
        message_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
        if primitive.ErrorComment is not None or primitive.OffendingElement is not None or status is None \
                or message_id is None or primitive.Identifier is not None:
            return False
        return self._send_encoded_response(context_id, int(message_id), int(status), lambda: pdata.find_final_response_pdu(
            context_id, self.maximum_pdu_size, message_id_responded=int(message_id), status=int(status),
            sop_class_uid=primitive.AffectedSOPClassUID))

    def _send_pending_find_response(self, primitive: C_FIND, context_id: int) -> bool:
        """Send a Pending C-FIND-RSP and its Identifier (already encoded by pynetdicom's
        C-FIND service class) as encoded PDUs: through pynetdicom's message, its command
        set's pydicom encoding and its state machine, that was ~40% of a node's GIL time on
        a 200-row C-FIND. False: not sent, the caller sends it the usual way."""
        message_id, status, identifier = primitive.MessageIDBeingRespondedTo, primitive.Status, primitive.Identifier
        if primitive.ErrorComment is not None or primitive.OffendingElement is not None or status is None \
                or message_id is None or not isinstance(identifier, BytesIO):
            return False
        # A C-FIND's Pending responses are held back, FIND_ROWS_PER_WRITE at most, and
        # written together in one send: when that many are held, before anything else sent
        # here (with the final response), and before the node's find waits for more rows
        # (node/dicom.py stop_or_wait). A ~200-row answer was ~200 writes, each a wake-up of
        # the requestor; an answer of a few rows in hand (an exact key on a single node)
        # is one write with its final response (the first row is held too: alone, it cost
        # a pynetdicom requestor one more read, after up to 1 ms of its DUL thread's
        # sleep). Only on this association's own thread (pynetdicom's find loop).
        defer = threading.current_thread() is self.assoc
        return self._send_encoded_response(context_id, int(message_id), int(status), lambda: pdata.find_response_pdus(
            context_id, self.maximum_pdu_size, message_id_responded=int(message_id), status=int(status),
            sop_class_uid=primitive.AffectedSOPClassUID, identifier=identifier.getvalue()),
            defer=FIND_ROWS_PER_WRITE if defer else 0)

    def send_find_row(self, context_id: int, message_id: int, sop_class_uid: str, identifier: bytes) -> bool:
        """A Pending C-FIND response (0xFF00) with its already encoded Identifier, sent by
        the node's C-FIND handler itself (node/dicom.py) instead of yielded to pynetdicom,
        which encoded each identifier with pydicom's writer and ran its per-row loop (with
        the encoding ~a third of the association thread's GIL time on a ~200-row answer).
        The command set, the same for every row of the C-FIND, is encoded once
        (pdata.FindResponses). Held back and written together as
        _send_pending_find_response does. Only on this association's own thread; False:
        nothing sent (the caller yields the row)."""
        if threading.current_thread() is not self.assoc:
            return False
        key = (context_id, message_id, sop_class_uid, self.maximum_pdu_size)
        if self._find_responses is None or self._find_responses[0] != key:
            self._find_responses = (key, pdata.FindResponses(
                context_id, self.maximum_pdu_size, message_id_responded=message_id, status=0xFF00,
                sop_class_uid=sop_class_uid))
        responses = self._find_responses[1]
        return self._send_encoded_response(context_id, message_id, 0xFF00, lambda: responses.encode(identifier),
                                           defer=FIND_ROWS_PER_WRITE)

    def _send_encoded_response(self, context_id: int, message_id: int, status: int,
                               encode: Callable[[], "bytes | pdata.EncodedPData | None"], defer: int = 0) -> bool:
        """Queue a response that `encode` made as one PDU, behind what is queued already
        (with `defer` N > 0: held back until flush_deferred, or, with the responses held
        before it, sent at once as the Nth held; N == 1: those held before it are sent
        first). EVT_DIMSE_SENT is not triggered for it, so this is done only when the one
        handler bound to that event is the AE's StoreResponseHook, which is told directly
        (when it goes out); False (nothing sent) otherwise, or when the PDU would not fit
        the peer's maximum."""
        hook: StoreResponseHook | None = getattr(self.assoc.ae, "store_response_hook", None)
        handlers = cast("list[tuple[Callable[[Any], None], Any]]", self.assoc.get_handlers(evt.EVT_DIMSE_SENT))
        if handlers and (hook is None or any(handler != hook.handler for handler, _ in handlers)):
            return False
        pdu = encode()
        if pdu is None:
            return False
        batch = pdu if isinstance(pdu, pdata.EncodedPData) else pdata.EncodedPData((pdu,), len(pdu), 1)
        told = hook if hook is not None and handlers else None
        entry = (batch, message_id, status, told)
        if defer == 1:
            with self._deferred_lock:
                earlier, self._deferred = self._deferred, [entry]
            self._send_encoded_now(earlier)
        elif defer > 1:
            with self._deferred_lock:
                self._deferred.append(entry)
                full = len(self._deferred) >= defer
            if full:
                self.flush_deferred()
        else:
            with self._deferred_lock:
                earlier, self._deferred = self._deferred, []
            self._send_encoded_now(earlier + [entry])
        return True

    def _send_encoded_now(self, entries: list[tuple[pdata.EncodedPData, int, int, StoreResponseHook | None]]) -> None:
        """Write these responses' PDUs together (one batch, one send when the DUL is free)."""
        if not entries:
            return
        for _batch, message_id, status, hook in entries:
            if hook is not None:
                hook.direct(self.assoc, message_id, status)
        if len(entries) == 1:
            batch = entries[0][0]
        else:
            batch = pdata.EncodedPData(tuple(buffer for entry in entries for buffer in entry[0].buffers),
                                       sum(entry[0].size for entry in entries), sum(entry[0].pdus for entry in entries))
        cast(AcceptorDUL, self.dul).send_encoded(batch)

    def flush_deferred(self) -> None:
        """Send the Pending responses held back, if any (see _send_pending_retrieve_response
        and _send_pending_find_response)."""
        if not self._deferred:
            return
        with self._deferred_lock:
            deferred, self._deferred = self._deferred, []
        self._send_encoded_now(deferred)

    def _store_response(self, primitive: Any) -> tuple[int, C_STORE] | None:
        """A P-DATA that is a whole plain C-STORE-RSP (one command fragment, marked last;
        node/pdata.py parse_store_response), as pynetdicom would queue it: the responses
        to the node's C-GET/C-MOVE sub-operations, decoded with struct instead of pydicom
        (~a fifth of a node's GIL time on retrieve). EVT_DIMSE_RECV is not triggered for
        it, so this is done only while every handler bound to that event is the AE's
        StoreResponseHook's `received` (which ignores responses). None: pynetdicom's way."""
        pdvs = getattr(primitive, "presentation_data_value_list", None)
        if not pdvs or len(pdvs) != 1:
            return None
        context_id, data = pdvs[0]
        return self._plain_store_response(int(context_id), data)

    def deliver_store_response(self, context_id: int, data: bytes | memoryview) -> bool:
        """The DUL's direct delivery of a P-DATA-TF PDU's one PDV (`data`: its message
        control header, then the fragment; AcceptorDUL._deliver_store_response): queued
        as pynetdicom's DT-2 and receive_primitive would queue it, when it is a whole plain
        C-STORE-RSP and no message is half received. False: nothing done."""
        if self.message is not None:
            return False
        response = self._plain_store_response(context_id, data)
        if response is None:
            return False
        self.msg_queue.put(response)
        return True

    def _plain_store_response(self, context_id: int, data: bytes | memoryview) -> tuple[int, C_STORE] | None:
        if len(data) < 2 or data[0] != 0x03:  # A command fragment, the last one.
            return None
        handlers = cast("list[tuple[Callable[[Any], None], Any]]", self.assoc.get_handlers(evt.EVT_DIMSE_RECV))
        if handlers:
            hook: StoreResponseHook | None = getattr(self.assoc.ae, "store_response_hook", None)
            if hook is None or any(handler != hook.received for handler, _ in handlers):
                return None
        fields = pdata.parse_store_response(memoryview(data)[1:])
        if fields is None:
            return None
        response = C_STORE()
        try:
            response.MessageIDBeingRespondedTo = fields.message_id_responded
            response.Status = fields.status
            response.AffectedSOPClassUID = fields.sop_class_uid
            response.AffectedSOPInstanceUID = fields.sop_instance_uid
        except (TypeError, ValueError):
            return None  # pynetdicom's decoder decides what to make of it.
        return context_id, response

    def _send_stored(self, request: raw_send.StoreRequest, context_id: int, payload: Any) -> None:
        max_pdu_length = self.maximum_pdu_size
        dul = cast(AcceptorDUL, self.dul)
        command_pdu = pdata.store_command_pdu(
            context_id, max_pdu_length, message_id=request.message_id, priority=request.priority,
            sop_class_uid=request.sop_class_uid, sop_instance_uid=request.sop_instance_uid,
            move_originator_aet=request.move_originator_aet,
            move_originator_message_id=request.move_originator_message_id)
        if command_pdu is not None:
            for batch in pdata.with_command(command_pdu, pdata.encode_data_set(payload, context_id, max_pdu_length)):
                dul.send_encoded(batch)
            return
        # A peer whose maximum PDU is smaller than the command: pynetdicom cuts the command.
        message = C_STORE_RQ()
        message.primitive_to_message(request.primitive(payload))  # CommandDataSetType: a data set follows.
        message.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        message.data_set = None
        for command_primitive in message.encode_msg(context_id, max_pdu_length):
            self.dul.send_pdu(command_primitive)
        for batch in pdata.encode_data_set(payload, context_id, max_pdu_length):
            dul.send_encoded(batch)

    def _echo_request(self, primitive: Any) -> tuple[int, C_ECHO] | None:
        """A P-DATA that is a whole C-ECHO-RQ (one command fragment, marked last;
        node/pdata.py parse_echo_request), as pynetdicom would queue it, decoded with
        struct: pynetdicom decodes the command set into a pydicom Dataset and builds the
        primitive from its elements, about a sixth of the node's CPU per association +
        C-ECHO + release (bench/README.md). EVT_DIMSE_RECV is not triggered for it, so this
        is done only while nothing is bound to that event, or only the AE's
        StoreResponseHook's `received` with its direct form `request_received`, which is
        told instead. None: pynetdicom's way."""
        pdvs = getattr(primitive, "presentation_data_value_list", None)
        if not pdvs or len(pdvs) != 1:
            return None
        context_id, data = pdvs[0]
        if len(data) < 2 or data[0] != 0x03:  # A command fragment, the last one.
            return None
        handlers = cast("list[tuple[Callable[[Any], None], Any]]", self.assoc.get_handlers(evt.EVT_DIMSE_RECV))
        hook: StoreResponseHook | None = getattr(self.assoc.ae, "store_response_hook", None)
        if handlers and (hook is None or hook.request_received is None
                         or any(handler != hook.received for handler, _ in handlers)):
            return None
        fields = pdata.parse_echo_request(memoryview(data)[1:])
        if fields is None:
            return None
        request = C_ECHO()
        try:
            request.MessageID = fields.message_id
            request.AffectedSOPClassUID = fields.sop_class_uid
        except (TypeError, ValueError):
            return None  # pynetdicom's decoder decides what to make of it.
        request._context_id = int(context_id)
        if handlers and hook is not None and hook.request_received is not None:
            hook.request_received(self.assoc, pdata.C_ECHO_RQ_FIELD, fields.message_id)
        return int(context_id), request

    def _complete_store_request(self, primitive: Any) -> None:
        """The P-DATA that ends a C-STORE-RQ's data set: pynetdicom 3.0.4's receive_primitive
        for it, with the request primitive built from the command set's bytes (node/pdata.py
        parse_store_request) instead of by message_to_primitive, which reads every element of
        the decoded command set through pydicom and the primitive's setters (~0.5 ms per
        request here, a sixth of a DICOM worker's CPU per 512x512 CT). EVT_DIMSE_RECV as in
        _echo_request: told to the StoreResponseHook's `request_received` when that is all
        that is bound, else triggered with pynetdicom's primitive."""
        message = cast(C_STORE_RQ, self.message)
        if not message.decode_msg(primitive, self.assoc):
            return  # Not the end after all (pynetdicom decides by the same control byte).
        context_id = cast(int, message.context_id)
        request: Any = self._store_request(message)
        started, self._store_command = self._store_command, None
        if request is None:
            if started is not None and started[0] is message:  # Read by _start_store_request: decode it now.
                message.command_set = decode(message.encoded_command_set, True, True)
            evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
            try:
                request = message.message_to_primitive()
            except Exception as error:  # As pynetdicom: the association ends (Evt19).
                log.error("dicom.dimse.invalid_message error=%s", type(error).__name__)
                self.dul.event_queue.put("Evt19")
                return
        self.msg_queue.put((context_id, request))
        message.encoded_command_set = BytesIO()  # As pynetdicom: nothing kept for the next one.
        message.data_set = BytesIO()
        message._data_set_file = None
        message._data_set_path = None
        self.message = None

    def _request_hook_only(self) -> bool:
        """Nothing is bound to EVT_DIMSE_RECV but the AE's StoreResponseHook's `received`
        with its direct form `request_received` (told instead of the event)."""
        handlers = cast("list[tuple[Callable[[Any], None], Any]]", self.assoc.get_handlers(evt.EVT_DIMSE_RECV))
        if not handlers:
            return True
        hook: StoreResponseHook | None = getattr(self.assoc.ae, "store_response_hook", None)
        return hook is not None and hook.request_received is not None \
            and all(handler == hook.received for handler, _ in handlers)

    def _start_store_request(self, primitive: Any) -> bool:
        """A P-DATA that is a whole C-STORE-RQ command set (one command fragment, marked last;
        node/pdata.py parse_store_request): the message started as pynetdicom's decode_msg
        starts it (C_STORE_RQ, its context, the encoded command set kept), without decoding
        the command set into a pydicom Dataset to read its Command Field and Data Set Type
        (~5% of a node's GIL time per one-instance study, bench/README.md "stop 33, helper
        P"); the request primitive is made from the fields read here (_store_request).
        Only when _store_request would make it so (_request_hook_only) and pynetdicom does
        not write data sets to its own files. False: nothing done, pynetdicom's way."""
        pdvs = getattr(primitive, "presentation_data_value_list", None)
        if not pdvs or len(pdvs) != 1 or _pynetdicom_config.STORE_RECV_CHUNKED_DATASET:
            return False
        context_id, data = pdvs[0]
        if len(data) < 2 or data[0] != 0x03 or not self._request_hook_only():
            return False
        fields = pdata.parse_store_request(memoryview(data)[1:])
        if fields is None:
            return False
        message = self._new_message()
        message.__class__ = C_STORE_RQ  # As decode_msg does once it knows the command.
        message.context_id = int(context_id)
        message.encoded_command_set.write(data[1:])
        self._store_command = (message, fields)
        self.message = message
        return True

    def _store_request(self, message: C_STORE_RQ) -> C_STORE | None:
        if not self._request_hook_only():
            return None
        hook: StoreResponseHook | None = getattr(self.assoc.ae, "store_response_hook", None)
        started = self._store_command
        if started is not None and started[0] is message:
            fields: pdata.StoreRequest | None = started[1]
        else:
            fields = pdata.parse_store_request(message.encoded_command_set.getvalue())
        if fields is None:
            return None
        request = C_STORE()
        try:
            request.MessageID = fields.message_id
            request.AffectedSOPClassUID = fields.sop_class_uid
            request.AffectedSOPInstanceUID = fields.sop_instance_uid
            request.Priority = fields.priority
            if fields.move_originator_aet is not None:
                request.MoveOriginatorApplicationEntityTitle = fields.move_originator_aet
                request.MoveOriginatorMessageID = fields.move_originator_message_id
        except (TypeError, ValueError):
            return None  # pynetdicom's decoder decides what to make of it.
        request.DataSet = message.data_set
        request._context_id = message.context_id
        request._dataset_path = message._data_set_path
        request._dataset_file = message._data_set_file
        if hook is not None and hook.request_received is not None and self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            hook.request_received(self.assoc, pdata.C_STORE_RQ_FIELD, fields.message_id)
        return request

    def _continue_store_request(self, primitive: Any) -> bool:
        """Data-set fragments, none the last, of a C-STORE-RQ that _start_store_request
        started: written to its data set (a spool.SpoolBuffer) as decode_msg writes them,
        without its loop and without copying each fragment once more (a 512x512 CT slice
        comes in ~32 such PDUs from a 16 KB peer). False: nothing done, decode_msg's way."""
        started = self._store_command
        if started is None or started[0] is not self.message:
            return False
        pdvs = getattr(primitive, "presentation_data_value_list", None)
        if not pdvs or any(len(data) < 1 or data[0] & 0x03 for _context_id, data in pdvs):
            return False
        data_set = started[0].data_set
        if data_set is None:
            return False
        for _context_id, data in pdvs:
            data_set.write(memoryview(data)[1:])
        return True

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None:
            response = self._store_response(primitive) or self._echo_request(primitive)
            if response is not None:
                self.msg_queue.put(response)
                return
            try:
                if self._start_store_request(primitive):
                    return
            except Exception as error:
                self.message = None
                cast(AcceptorDUL, self.dul).abort_peer("dicom.dimse.undecodable", ABORT_REASON_NOT_SPECIFIED,
                                                       error=type(error).__name__)
                return
            self.message = self._new_message()
        try:
            if isinstance(self.message, C_STORE_RQ) and _ends_data_set(primitive):
                self._complete_store_request(primitive)
            elif not self._continue_store_request(primitive):
                super().receive_primitive(primitive)
        except Exception as error:
            self.message = None
            cast(AcceptorDUL, self.dul).abort_peer("dicom.dimse.undecodable", ABORT_REASON_NOT_SPECIFIED,
                                                   error=type(error).__name__)


# ----------------------------------------------------------------------------- ACSE
class AcceptorACSE(ACSE):
    """pynetdicom's ACSE whose acceptor negotiation takes the presentation-context result
    from the AE's request memo (node/request_memo.py) when it has one: the same proposed
    contexts and roles against the server's one supported-context table give the same
    result (for dcmtk's getscu ~120 contexts, a fifth of the node's CPU per association)."""

    def _negotiate_as_acceptor(self) -> None:
        """pynetdicom 3.0.4's ACSE._negotiate_as_acceptor, the presentation contexts
        negotiated through the memo, without its "Accepting/Rejecting Association" INFO
        lines (the node logs its own events); unchanged otherwise."""
        assoc_rq = cast(A_ASSOCIATE, self.requestor.primitive)
        self.requestor.ae_title = assoc_rq.calling_ae_title
        reject_assoc_rsd: tuple[int, ...] = tuple()
        authorised_aet = [s.strip() for s in self.assoc.ae.require_calling_aet]
        if self.assoc.ae.require_calling_aet and assoc_rq.calling_ae_title not in authorised_aet:
            reject_assoc_rsd = (0x01, 0x01, 0x03)
        if self.assoc.ae.require_called_aet and assoc_rq.called_ae_title != self.acceptor.ae_title.strip():
            reject_assoc_rsd = (0x01, 0x01, 0x07)
        if self.requestor.user_identity:
            is_valid, id_response = self._check_user_identity()
            if not is_valid:
                log.info("User identity failed verification")
                reject_assoc_rsd = (0x02, 0x02, 0x01)
            if id_response:
                self.acceptor.add_negotiation_item(id_response)
        for item in self._check_sop_class_extended():
            self.acceptor.add_negotiation_item(item)
        self.acceptor._common_ext = self._check_sop_class_common_extended()
        if self.requestor.asynchronous_operations != (1, 1):
            async_rsp = self._check_async_ops()
            if async_rsp:
                self.acceptor.add_negotiation_item(async_rsp)
        active_acceptors = [tt for tt in self.assoc.ae.active_associations if tt.is_acceptor]
        if len(active_acceptors) > self.assoc.ae.maximum_associations:
            reject_assoc_rsd = (0x02, 0x03, 0x02)
        if reject_assoc_rsd:
            self.send_reject(*reject_assoc_rsd)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return

        rq_roles = {uid: (item.scu_role, item.scp_role) for uid, item in self.requestor.role_selection.items()}
        memo: request_memo.RequestItemMemo | None = getattr(self.assoc.ae, "request_memo", None)
        if _pynetdicom_config.UNRESTRICTED_STORAGE_SERVICE:
            result, ac_roles = negotiate_unrestricted(assoc_rq.presentation_context_definition_list,
                                                      self.acceptor.supported_contexts, rq_roles)
        elif memo is not None:
            result, ac_roles = memo.negotiate(assoc_rq.presentation_context_definition_list,
                                              self.acceptor.supported_contexts, rq_roles)
        else:
            result, ac_roles = negotiate_as_acceptor(assoc_rq.presentation_context_definition_list,
                                                     self.acceptor.supported_contexts, rq_roles)
        self.assoc._accepted_cx = {cast(int, cx.context_id): cx for cx in result if cx.result == 0x00}
        self.assoc._rejected_cx = [cx for cx in result if cx.result != 0x00]
        for role_item in ac_roles:
            self.acceptor.add_negotiation_item(role_item)
        self.send_accept()
        evt.trigger(self.assoc, evt.EVT_ACCEPTED, {})
        self.assoc.is_established = True
        evt.trigger(self.assoc, evt.EVT_ESTABLISHED, {})


# ----------------------------------------------------------------------------- association
# pynetdicom's default handler of every intervention event, as Association._bind_defaults
# binds them ((handler, None) each); its standard logging handlers are left out (see
# _unbind_standard_logging).
_DEFAULT_HANDLERS: dict[Any, Any] = {event: (evt.get_default_handler(event), None)
                                     for event in evt._INTERVENTION_EVENTS}


def _default_handlers() -> dict[Any, Any]:
    """A new association's handler table: pynetdicom's defaults, no standard logging."""
    return dict(_DEFAULT_HANDLERS)


class NodeServiceUser(ServiceUser):
    """pynetdicom 3.0.4's ServiceUser whose User Information items (Maximum Length,
    Implementation Class UID, Implementation Version Name) are copies of ones its AE made
    and validated once for those values (`NodeAE.user_info_items`), instead of made and
    validated (a regular expression per UID, one per AE title) for every association: the
    two ServiceUsers and the acceptor's three settings were ~45% of making an
    AcceptorAssociation (137 us in a loop; bench/README.md "stop 33, helper N"). Left as
    ServiceUser.__init__ leaves it otherwise; every later setting takes pynetdicom's
    validated setters as before."""

    def __init__(self, assoc: Association, mode: str, items: list[Any]) -> None:
        self.assoc = assoc
        self._mode = mode
        self._ae_title = ""
        self.primitive = None
        self.address_info = None
        self._contexts = []
        self._user_info = [copy(item) for item in items]
        self._ext_neg = {}
        self.reset_negotiation_items()
        self._common_ext = {}


def _service_user(assoc: Association, mode: str, maximum_length: int = DEFAULT_MAX_LENGTH,
                  version_name: bool = False) -> ServiceUser:
    """A ServiceUser as pynetdicom makes it, with `maximum_length` (and, with
    `version_name`, the AE's Implementation Version Name) set: a NodeServiceUser when the
    AE keeps the items (a NodeAE), else pynetdicom's own, set through its setters."""
    ae = assoc.ae
    items = getattr(ae, "user_info_items", None)
    if items is not None:
        return NodeServiceUser(assoc, mode, items(maximum_length, version_name))
    user = ServiceUser(assoc, mode)
    user.maximum_length = maximum_length
    if version_name:
        user.implementation_version_name = ae.implementation_version_name
    return user


class AcceptorAssociation(Association):
    """An accepted association whose reactor waits for work instead of polling."""

    def __init__(self, ae: Any, mode: str) -> None:
        """pynetdicom 3.0.4's Association.__init__ with the node's ACSE, DUL and DIMSE
        made once (calling it made pynetdicom's three, to be replaced here) and the default
        handlers from a table made once (_default_handlers): pynetdicom binds every
        intervention event's default and its four standard logging handlers one `bind`
        at a time, which the node then unbound (_unbind_standard_logging). Together about
        a third of the CPU of accepting an association (bench/README.md)."""
        self._ae = ae
        self.mode = mode
        self._server: Any = None
        self.requestor = _service_user(self, MODE_REQUESTOR)
        # Our side, when we accept: the AE's maximum PDU length and implementation
        # version, as pynetdicom's RequestHandler sets them after making the association.
        self.acceptor = _service_user(self, MODE_ACCEPTOR, ae.maximum_pdu_size, version_name=True) \
            if mode == MODE_ACCEPTOR else _service_user(self, MODE_ACCEPTOR)
        self.is_established = False
        self.is_rejected = False
        self.is_aborted = False
        self.is_released = False
        self._sent_abort = False
        self._sent_release = False
        self._accepted_cx = {}
        self._rejected_cx = []
        self._work = threading.Event()
        self.acse = AcceptorACSE(self)
        self.dul = AcceptorDUL(self)
        self.dimse = AcceptorDIMSE(self)
        # After the DUL is made: its timers hold two of them.
        self.acse_timeout = ae.acse_timeout
        self.connection_timeout = ae.connection_timeout
        self.dimse_timeout = ae.dimse_timeout
        self.network_timeout = ae.network_timeout
        self.network_timeout_response = "A-ABORT"
        self._handlers = _default_handlers()
        self._kill = False
        self._started_dul = False
        self._dul_ready = threading.Event()
        self._reactor_checkpoint = _Checkpoint(self._paused_by_sender)
        self._reactor_checkpoint.set()
        self._is_paused = False
        self._timer_resolution = _pynetdicom_config.WINDOWS_TIMER_RESOLUTION
        threading.Thread.__init__(self, target=make_target(self.run_reactor))
        self.daemon = True
        self.rejection: association_guard.Rejection | None = None
        self.retrieve_refused = False  # See refuse_retrieve().
        self.move_destination: tuple[str, str, int] | None = None  # See expect_move_destination().
        # See responses_held(): while set, the reactor leaves the DIMSE queue alone.
        self._responses_lock = threading.Lock()
        self._responses_held = False
        self._scu_contexts: dict[str, list[tuple[str, int]]] | None = None

    def wake(self) -> None:
        self._work.set()

    def flush_deferred_responses(self) -> None:
        """Send a Pending C-MOVE response held back on this association (AcceptorDIMSE
        flush_deferred): node/raw_send.py calls it, on this thread, once the next
        sub-operation's request is out; node/dicom.py before waiting on a read."""
        cast(AcceptorDIMSE, self.dimse).flush_deferred()

    def wake_for_message(self) -> None:
        """A message was put on the DIMSE queue: wake the reactor, unless a sender holds
        responses (responses_held), when the reactor would only find that it must leave
        the queue alone -- a C-MOVE sub-association's reactor woke, took the GIL and went
        back to sleep once per sub-operation, on the path between the C-STORE-RSP and the
        sender's next request. The hold's end wakes it if a message is left then."""
        if not self._responses_held:
            self._work.set()

    def scu_contexts(self) -> dict[str, list[tuple[str, int]]]:
        """The accepted contexts we may send C-STOREs in, by SOP class (node/raw_send.py
        scu_context_table), made once: they do not change after negotiation."""
        table = self._scu_contexts
        if table is None:
            table = self._scu_contexts = raw_send.scu_context_table(self.accepted_contexts)
        return table

    @contextlib.contextmanager
    def responses_held(self) -> Iterator[None]:
        """For a thread other than the reactor's that sends a request and waits for its
        response (node/raw_send.py: C-MOVE sub-operations): the reactor takes nothing off
        the DIMSE queue meanwhile, so the response stays for the sender. pynetdicom's way
        is to pause the reactor (clear its checkpoint, then poll `_is_paused` every 0.1 ms
        until it has woken and stopped): ~0.25 ms per sub-operation here. This is a flag
        that the reactor reads under a lock with its queue check (_run_reactor); the
        reactor keeps watching for release, abort and the idle timeout."""
        with self._responses_lock:
            self._responses_held = True
        try:
            yield
        finally:
            with self._responses_lock:
                self._responses_held = False
            if self.dimse.msg_queue.qsize():
                self._work.set()  # A message that came meanwhile (not woken for) is served now.

    def _paused_by_sender(self) -> None:
        """A thread cleared the reactor's checkpoint (pynetdicom's send_*() pause the
        reactor so that the response they wait for stays for them). They then poll
        `_is_paused`, which can still be True from the reactor's previous pause although
        the checkpoint's last set() has already released it: the reactor would run on and
        could take the response off the queue ("Received unexpected C-STORE service
        message", then the sender's DIMSE timeout; seen in tests with pynetdicom's own
        requestor, whose reactor has the same race). Passing the lock here waits out a
        look at the queue already under way; later looks see the cleared checkpoint."""
        with self._responses_lock:
            pass
        self._work.set()

    def _next_request(self) -> tuple[int | None, Any]:
        """The reactor's look at the DIMSE queue: nothing while a sender holds responses
        or has paused the reactor (its checkpoint cleared: see _paused_by_sender)."""
        with self._responses_lock:
            if self._responses_held or not self._reactor_checkpoint.is_set():
                return None, None
            pending = self.dimse.msg_queue.queue
            if pending and pending[0] == (None, None):
                # pynetdicom's end-of-association mark (AA-2/3/4 put it to wake a thread
                # waiting for a response): left for the sender, who may be on its way to
                # wait (past its is_established check, not yet paused us). Taken here, its
                # C-STORE waited out the whole DIMSE timeout on a connection already gone
                # (test_kill_worker_mid_store_loses_nothing_acknowledged: 60 s, 1 run in 6).
                return None, None
            return self.dimse.get_msg(block=False)

    def kill(self) -> None:
        """pynetdicom 3.0.4's Association.kill, waiting for the DUL to become idle (Sta1)
        instead of sleeping 10 ms between looks. The requestor's thread calls this right
        after its A-RELEASE confirmation, which the DUL thread hands over a moment before it
        closes the connection and reaches Sta1: pynetdicom's loop then slept 10 ms most
        times (C-MOVE sub-associations: +10 ms before the final C-MOVE-RSP), and an
        acceptor's thread slept in 10 ms steps until the peer closed (holding its
        max_associations slot)."""
        self._work.set()
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        dul = cast(AcceptorDUL, self.dul)
        while dul.is_alive() and not dul.stop_dul():
            dul.wait_stoppable(_KILL_WAIT_S)
        cast(AcceptorDIMSE, self.dimse).discard_partial()

    def send_c_store(self, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        """C-GET sub-operations: a StoredDataset goes out as its stored bytes (node/raw_send.py)."""
        return raw_send.send_c_store_or_stored(self, super().send_c_store, dataset, *args, **kwargs)

    def start_dul(self, *, wait: bool) -> None:
        """Let the DUL thread run (open its gate, see run_reactor), on this association's
        own thread; elsewhere, or once done, nothing. `wait`: until it runs its loop, as
        pynetdicom waits for a DUL it starts; not after the A-ASSOCIATE-AC went out
        directly, when it would put a thread switch before the handlers of EVT_ACCEPTED
        and EVT_ESTABLISHED, which the peer's first request waits for)."""
        dul = cast(AcceptorDUL, self.dul)
        gate = dul.gate
        if gate is not None and not gate.is_set() and threading.current_thread() is self:
            gate.set()
        if wait and threading.current_thread() is self:
            self._dul_ready.wait()

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's Association.run_reactor for an acceptor, with the
        A-ASSOCIATE-RQ read and the A-ASSOCIATE-AC sent by this thread
        (AcceptorDUL.receive_request_here, AcceptorDUL.send_pdu) and the DUL thread started
        when the first PDU goes out (start_dul: after the A-ASSOCIATE-AC, before the
        EVT_ACCEPTED and EVT_ESTABLISHED handlers), instead of starting the DUL thread,
        waiting until it runs, and waiting again for it to hand the request over: the
        accept path crossed threads three times. pynetdicom's way for a requestor, or when
        the first PDU is not a plain A-ASSOCIATE-RQ."""
        dul = cast(AcceptorDUL, self.dul)
        if not self.is_acceptor or self._started_dul:
            super().run_reactor()
            return
        dul.gate = threading.Event()
        dul._waker = _Waker()  # Before any work can be queued for it: no wake-up lost.
        dul.start()  # Waits on its gate, off the path of the answer.
        self._started_dul = True
        primitive = dul.receive_request_here()
        if primitive is None:
            self.start_dul(wait=True)
            super().run_reactor()
            return
        self.requestor.primitive = cast(A_ASSOCIATE, primitive)
        evt.trigger(self, evt.EVT_REQUESTED, {})
        if not self.is_aborted and not self.is_rejected:
            self.acse.negotiate_association()
        self.start_dul(wait=False)  # If nothing was sent (an EVT_REQUESTED handler's doing), the DUL thread ends it.
        if self.is_established:
            self._run_reactor()  # (pynetdicom's set_timer_resolution around it is for Windows only.)
        sock = cast(AssociationSocket, dul.socket)
        if self._server and sock.socket:
            self._server.shutdown_request(sock.socket)

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's Association._run_reactor, waiting on an Event instead of
        sleeping 1 ms per loop, logging the idle timeout as an event line, and leaving
        the DIMSE queue alone while a sender holds responses (responses_held)."""
        self._is_paused = False
        first = True
        while not self._kill:
            if not first:
                timeout = IDLE_WAKE_S
                idle_timer = self.dul._idle_timer
                if _timer_running(idle_timer):
                    timeout = min(timeout, max(0.0, idle_timer.remaining))
                self._work.wait(timeout)
            first = False
            self._work.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self._next_request()
            if msg:
                self._serve_request(msg, cast(int, context_id))
                # Serving it was activity: pynetdicom's idle timer is restarted only by
                # received PDUs, so a C-MOVE or C-FIND that streamed answers for longer
                # than network_timeout_s, with the peer rightly silent, was found idle and
                # aborted the moment it ended (tests/integration/test_move_idle.py).
                self.dul._idle_timer.restart()

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log_event(logging.WARNING, "dicom.association.idle_timeout", self,
                          network_timeout_s=f"{self.network_timeout:g}")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def refuse_retrieve(assoc: Any) -> None:
    """A C-GET/C-MOVE handler refuses the request before any sub-operation (it yields 1,
    then its failure status): the final response reports 0 sub-operations, not 1 failed."""
    if isinstance(assoc, AcceptorAssociation):
        assoc.retrieve_refused = True


def expect_move_destination(assoc: Any, ae_title: str, address: str, instances: int) -> None:
    """A C-MOVE handler is about to yield a configured destination: if pynetdicom then cannot
    associate with it, the final response is 0xA702 with `instances` failed sub-operations
    and an ErrorComment, not 0xA801 "Move Destination unknown" (issue 11)."""
    if isinstance(assoc, AcceptorAssociation):
        assoc.move_destination = (ae_title, address, instances)


# ----------------------------------------------------------------------------- server
class PeerAddress(AddressInformation):
    """pynetdicom's AddressInformation for an address the kernel gave (a connection's peer
    address from accept: numeric already): taken as inet_ntop writes it, which is what
    getaddrinfo gives back for a numeric address, without the getaddrinfo call (two per
    association with the listening address, each a GIL release on the way to the
    A-ASSOCIATE-AC; ~35 us of CPU each here). Anything not a plain numeric IPv4/IPv6
    address (a name, a scoped IPv6 address) is resolved by pynetdicom's setter."""

    @property
    def address(self) -> str:
        return self._addr

    @address.setter
    def address(self, value: str) -> None:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                self._addr = socket.inet_ntop(family, socket.inet_pton(family, value))
                return
            except (OSError, ValueError, TypeError):
                continue
        AddressInformation.address.__set__(self, value)  # type: ignore[attr-defined]


class AcceptorRequestHandler(RequestHandler):
    """Creates an AcceptorAssociation for each connection (pynetdicom 3.0.4's
    RequestHandler._create_association with the class changed, and the server's one
    supported-context table shared instead of deep-copied per association)."""

    def _create_association(self) -> Association:
        assoc = AcceptorAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"
        sock = AcceptorSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        # (Maximum length and implementation UID and version: set by AcceptorAssociation.)
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = copy(cast(AcceptorServer, self.server).local_info)
        # One table for every association (pynetdicom deep-copies ~130 contexts of ~40
        # transfer syntaxes per association, ~40 ms here): negotiation only reads it and
        # builds new result contexts (presentation.negotiate_as_acceptor).
        assoc.acceptor.supported_contexts = cast(AcceptorServer, self.server).shared_contexts
        assoc.requestor.address_info = PeerAddress.from_tuple(self.client_address)
        # The server's handlers, as pynetdicom binds them one `bind` (and AE lock) at a
        # time: an intervention event's replaces the default, a notification event's list
        # is copied (the association starts with none of its own).
        handlers = assoc._handlers
        for event, bound in list(self.server._handlers.items()):
            if event.is_intervention:
                if bound:
                    handlers[event] = bound
            elif isinstance(event, evt.NotificationEvent) and bound:
                handlers[event] = [(handler[0], handler[1]) for handler in cast("list[evt._HandlerBase]", bound)]
        return assoc


def _unbind_standard_logging(owner: Any) -> None:
    """Drop the EVT_DIMSE_RECV, EVT_DIMSE_SENT, EVT_PDU_RECV and EVT_PDU_SENT handlers
    pynetdicom binds by default (its "standard" debug-log handlers, which build their log
    lines whatever the log level; called before the node binds its own, node/metrics.py):
    for a received C-STORE the DIMSE receive handler calls `data_set.getvalue()` just to
    print "Present", which for a data set spooled to a file (node/spool.py) read the whole
    instance back into memory (a 200 MB spike per store); the send handler formats every
    response, and being bound it kept C-STORE responses on pynetdicom's slow path
    (AcceptorDIMSE._send_store_response); the PDU receive handler describes every
    A-ASSOCIATE-RQ, looking up each proposed context's role in a role table it rebuilds
    for each (quadratic: dcmtk's getscu proposes ~120 contexts with roles, and that was
    the largest single cost of accepting its association). The node logs its own
    one-line events instead. Only those four are unbound: a handler of the node's own
    given to start_server for one of these events stays (it was dropped too)."""
    for event, standard in ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                            (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
                            (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
                            (evt.EVT_PDU_SENT, standard_pdu_sent_handler)):
        for handler in list(owner.get_handlers(event)):
            function = handler[0] if isinstance(handler, tuple) else handler
            if function is standard:
                owner.unbind(event, function)


class AcceptorServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with AcceptorAssociations and the request checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = AcceptorRequestHandler
        super().__init__(*args, **kwargs)
        _unbind_standard_logging(self)
        # Copied once, here, so that a later change to the AE's contexts cannot reach the
        # table that open associations negotiate against; never changed afterwards.
        self.shared_contexts: list[Any] = deepcopy(list(self.contexts))
        self.bind(evt.EVT_REQUESTED, association_guard.on_requested)
        # The listening address as RequestHandler.local gives it, resolved once: each
        # association gets a copy (AcceptorRequestHandler._create_association).
        self.local_info = AddressInformation.from_tuple(self.server_address)
        self.bind(evt.EVT_REJECTED, association_guard.on_rejected)

    def process_request(self, request: Any, client_address: Any) -> None:
        """socketserver's ThreadingMixIn starts a thread per connection, whose handler
        (AcceptorRequestHandler) only makes the association and starts the association's
        own thread, then ends: here that is done on the server's thread, one thread start
        and hand-over fewer per association (the association's reactor and DUL threads
        do the rest, as before). Nothing in it waits on the peer: a TLS handshake is done
        by get_request, on this thread already."""
        self.process_request_thread(request, client_address)

    def service_actions(self) -> None:
        """socketserver's hook, called after every request and every poll of serve_forever.
        pynetdicom's AssociationServer runs a full gc.collect() in it every 60th call: in a
        node (~100k objects) a 15-40 ms pause of every thread, GIL held, every 60
        associations under load (19% of the node's GIL samples in a loop of association +
        C-ECHO). Python's own collector frees the cycles an ended association leaves
        (tests/unit/test_acceptor.py); nothing to do here."""


# ----------------------------------------------------------------------------- requestor side
class RequestorSocket(AssociationSocket):
    """The socket of an association we request (C-MOVE sub-associations). Its reads go
    through AcceptorDUL (deadlines, size checks, TCP_QUICKACK re-armed after each read:
    dcmtk's storescp leaves Nagle on and writes a C-STORE response in two pieces; without
    an immediate ACK from us the second waits ~40 ms -- 300 instances took 15 s instead of
    2.6 s to storescp on this machine); `recv` (pynetdicom's own reads) does the same."""

    @property
    def ready(self) -> bool:
        return _socket_ready(self)

    def recv(self, nr_bytes: int) -> bytearray:
        data = super().recv(nr_bytes)
        sock = self.socket
        if _QUICKACK is not None and sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass
        return data


class RequestorAssociation(AcceptorAssociation):
    """An association we request (the sub-associations of C-MOVE), with the same waiting
    reactors, PDU checks and one-line protocol errors as an accepted one (pynetdicom's
    requestor polls: its DUL thread every 1 ms -- the node shortened that to 0.2 ms, ~20%
    of a core for as long as a C-MOVE waited on its destination). A StoredDataset given
    to send_c_store goes out as its stored bytes (node/raw_send.py)."""

    def release(self) -> None:
        """pynetdicom's release, after sending the Pending C-MOVE response the calling
        thread's association holds back (the last sub-operation's: its C-MOVE releases
        this sub-association before its final response)."""
        raw_send.flush_deferred_responses()
        super().release()


@dataclass(frozen=True)
class StoreResponseHook:
    """An EVT_DIMSE_SENT handler and its direct form: a response that AcceptorDIMSE sends
    without a pynetdicom message (a C-STORE-RSP, C-ECHO-RSP, a Pending C-GET-RSP/C-MOVE-RSP/C-FIND-RSP) calls
    `direct(assoc, message_id_responded, status)` instead of the event. Sent so only
    while `handler` is the only EVT_DIMSE_SENT handler bound; anything else bound gets
    every message as pynetdicom sends it. Likewise for received C-STORE responses and
    `received` (EVT_DIMSE_RECV)."""

    handler: Callable[[Any], None]
    direct: Callable[[Any, int, int], None]
    # The EVT_DIMSE_RECV handler bound beside it, which does nothing for a C-STORE-RSP: a
    # received plain C-STORE-RSP is decoded by AcceptorDIMSE._store_response while it is
    # the only one bound (None: only while none is).
    received: Callable[[Any], None] | None = None
    # The direct form of `received` for a request the acceptor decodes itself (a C-ECHO-RQ,
    # AcceptorDIMSE._echo_request): `request_received(assoc, command_field, message_id)`.
    # None: such requests take pynetdicom's way while `received` is bound.
    request_received: Callable[[Any, int, int], None] | None = None


class NodeAE(AE):
    """pynetdicom's AE whose requested associations are RequestorAssociations on a
    RequestorSocket: pynetdicom 3.0.4's AE.associate and AE._create_socket with the classes
    changed (pynetdicom's C-MOVE service class requests its sub-association through
    `assoc.ae.associate`, so C-MOVE gets them too). The argument type checks of
    AE.associate are left out: its callers here are the node's own code and pynetdicom's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_pynetdicom_version()
        super().__init__(*args, **kwargs)
        self.spool: SpoolSettings | None = None  # Where accepted associations receive data sets.
        self.store_response_hook: StoreResponseHook | None = None  # See AcceptorDIMSE._send_store_response.
        # Decoded A-ASSOCIATE-RQ items by their bytes, for every association this AE accepts.
        self.request_memo = request_memo.RequestItemMemo()
        # User Information items by (maximum length, with the version name): NodeServiceUser.
        self._user_info_items: dict[tuple[int, str, str | None], list[Any]] = {}
        self._user_info_lock = threading.Lock()
        self._bind_addresses: dict[tuple[Any, ...], AddressInformation] = {}  # See _bind_address.

    def user_info_items(self, maximum_length: int, version_name: bool) -> list[Any]:
        """The User Information items pynetdicom's ServiceUser holds after its __init__ and
        the settings of `maximum_length` (and the implementation version name), made by
        pynetdicom's validated setters once per value; callers copy them (NodeServiceUser)."""
        version = self.implementation_version_name if version_name else None
        key = (maximum_length, str(self.implementation_class_uid), version)
        items = self._user_info_items.get(key)
        if items is None:
            # ServiceUser.__init__ reads only its association's AE (its implementation UID).
            user = ServiceUser(cast(Association, SimpleNamespace(ae=self)), MODE_ACCEPTOR)
            user.maximum_length = maximum_length
            if version_name:
                user.implementation_version_name = self.implementation_version_name
            items = list(user._user_info)
            with self._user_info_lock:
                self._user_info_items[key] = items
        return items

    def associate(
        self,
        addr: Any,
        port: int,
        contexts: Any = None,
        ae_title: str = "ANY-SCP",
        max_pdu: int = DEFAULT_MAX_LENGTH,
        ext_neg: Any = None,
        bind_address: Any = None,
        tls_args: Any = None,
        evt_handlers: Any = None,
    ) -> Association:
        remote_address = PeerAddress.from_addr_port(addr, port)  # A numeric address without getaddrinfo.
        if bind_address is None:
            bind_address = ("::0", 0) if remote_address.address_family == socket.AF_INET6 else ("", 0)
        local_address = self._bind_address(tuple(bind_address))

        assoc = RequestorAssociation(self, MODE_REQUESTOR)
        # Our side: maximum length, implementation UID and version, as pynetdicom sets them.
        assoc.requestor = _service_user(assoc, MODE_REQUESTOR, max_pdu, version_name=True)
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"RequestorThread@{timestamp}"
        assoc.set_socket(self._create_socket(assoc, local_address, tls_args))
        assoc.acceptor.ae_title = ae_title
        assoc.acceptor.address_info = remote_address
        assoc.requestor.address_info = local_address
        assoc.requestor.ae_title = self.ae_title
        for item in ext_neg or []:
            assoc.requestor.add_negotiation_item(item)
        contexts = contexts or self.requested_contexts
        self._validate_requested_contexts(contexts)
        if not contexts:
            raise RuntimeError("At least one requested presentation context is required before associating with a peer")
        contexts = deepcopy(contexts)
        for index, context in enumerate(contexts):
            context.context_id = 2 * index + 1
        assoc.requestor.requested_contexts = contexts
        for handler in evt_handlers or []:
            assoc.bind(*handler)
        assoc.request()
        if assoc.is_established:
            assoc.start()
        return assoc

    def _bind_address(self, bind_address: tuple[Any, ...]) -> AddressInformation:
        """AddressInformation.from_tuple(bind_address), resolved once per value (the
        default ("", 0) is a getaddrinfo call for "any address"): a copy each time."""
        found = self._bind_addresses.get(bind_address)
        if found is None:
            found = self._bind_addresses[bind_address] = AddressInformation.from_tuple(
                cast("tuple[str, int]", bind_address))
        return copy(found)

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> AssociationSocket:
        sock = RequestorSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


# How often a DICOM listener's accept loop (socketserver's serve_forever) looks whether it
# was asked to stop. socketserver's default, 0.5 s, made every node stop wait 0.25 s on
# average for it (0.30-0.34 s for the front end's stop, measured); a poll is one select
# call of a few microseconds, 20 a second is nothing on an idle node.
ACCEPT_POLL_S = 0.05


def start_server(ae: Any, address: tuple[str, int], evt_handlers: list[Any]) -> AcceptorServer:
    """AE.start_server(block=False) with the AcceptorServer (pynetdicom's make_server takes
    the class; its start_server does not)."""
    check_pynetdicom_version()
    server = cast(AcceptorServer, ae.make_server(address, evt_handlers=evt_handlers, server_class=AcceptorServer))
    timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
    thread = threading.Thread(target=make_target(functools.partial(server.serve_forever, poll_interval=ACCEPT_POLL_S)),
                              name=f"AcceptorServer@{timestamp}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)
    return server


