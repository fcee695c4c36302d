"""One DIMSE worker process (`dicom_workers` > 0): the DICOM front end on its own core.

The worker runs the same DicomFrontEnd as the single-process node (association handling,
PDU and header reading, bad-input answers, zstd compression) on the connections the node
accepts on its DICOM port and hands to it (the worker with the fewest open ones: node/
workers.py ConnectionHandOff; the sockets come over a HANDOFF connection of the channel,
SCM_RIGHTS). Each Archive call goes to the node over the local channel
(node/archive_channel.py); a C-STORE is answered only when the node has answered it, so
Success still means durable on W replicas.

The worker dies with the node: PR_SET_PDEATHSIG(SIGKILL) and, should that miss (the
parent is a thread that exited, or not Linux), the end of the control connection it holds
to the node. SIGTERM stops accepting, lets open associations finish, and exits.

Security as in the node process: the access table (the config's), the DICOM audit trail
(each message goes to the node over the channel, which writes it to the node's audit log
and syslog receiver), and, with `dicom_tls_port`, a DICOM TLS listener on that port with
SO_REUSEPORT (TLS connections are spread by the kernel, not handed over). SIGHUP (the node forwards its own: node/workers.py) reads the tls_dir
certificate again for new TLS connections.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import signal
import socket
import threading
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.utils import make_target

from pacsnode.node import acceptor, association_guard, tls, write_trace
from pacsnode.node.archive_channel import (
    ENDED,
    ENDED_WITH_SLOT,
    SLOT_GIVEN,
    ChannelArchive,
    Kind,
    SlotClient,
    recv_frame,
    send_frame,
)
from pacsnode.node.blob_files import WORKER_POOL_PREFIX, BlobFiles
from pacsnode.node.metrics import DimseForwarder, Metrics
from pacsnode.node.store import blobs_directory, store_directory
from pacsnode.node.audit import AuditLog
from pacsnode.node.config import NodeConfig
from pacsnode.node.dicom import DicomFrontEnd

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0


class HandoffServer(acceptor.AcceptorServer):
    """The acceptor's server, its connections handed over by the node instead of accepted:
    it binds and listens on nothing (the node holds the DICOM port); socketserver's loop
    waits on the hand-off connection (`fileno`) and `get_request` takes one socket from it.
    Each handed connection that ends is reported back with one byte (`connection_ended`),
    which steers the node's choice of worker."""

    handoff: socket.socket  # Set by the worker before serve_forever runs.
    # A worker exits when the node closes its hand-off connection (the node is gone); the
    # node process's own front end (a socket pair, node/workers.py) never does.
    exit_when_closed = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._ended_lock = threading.Lock()  # Association threads report their ends.
        # Each handed connection not yet reported ended -> whether it came with a slot. Its
        # end is reported once: pynetdicom can end one twice over, by EVT_CONN_CLOSE and
        # again by shutdown_request (a connection closed before its A-ASSOCIATE-RQ: AA-5's
        # event, then the reactor's shutdown of the socket AA-5 left set), and each extra
        # ENDED_WITH_SLOT gave back a slot another association of this worker held
        # (max_associations let one more in: tests/unit/test_handoff_server.py).
        self._handed: dict[socket.socket, bool] = {}
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        pass  # No bind: the port is the node's (server_address stays as given: logs, .port).

    def server_activate(self) -> None:
        pass  # No listen.

    def fileno(self) -> int:
        return self.handoff.fileno()

    def get_request(self) -> tuple[socket.socket, Any]:
        message, fds, _flags, _address = socket.recv_fds(self.handoff, 1, 1)
        if not message:
            if not self.exit_when_closed:
                raise OSError("the hand-off pair is closed")
            log.warning("dicom.worker.node_gone pid=%d", os.getpid())
            os._exit(0)  # The node closed the channel (as _watch_control).
        if not fds:
            raise OSError("a hand-off message without its socket")
        conn = socket.socket(fileno=fds[0])
        for extra in fds[1:]:
            os.close(extra)
        with self._ended_lock:
            # Whether the node took a max_associations slot for it: read by on_open
            # (EVT_CONN_OPEN, which socketserver's handler triggers on this thread, next).
            self._handed[conn] = message == SLOT_GIVEN
        try:
            return conn, conn.getpeername()
        except OSError:
            self._report_end(conn)  # Gone already (reset while it was handed over).
            conn.close()
            raise

    def on_open(self, event: Any) -> None:
        request = event.assoc.dul.socket.socket
        with self._ended_lock:
            event.assoc.handoff_slot = self._handed.get(request, False)
        event.assoc.handoff_request = request

    def shutdown_request(self, request: Any) -> None:
        # socketserver calls this for a request refused or failed before its association
        # ran; pynetdicom's reactor for one that ended with its socket still open.
        super().shutdown_request(request)
        self._report_end(request)

    def connection_ended(self, event: Any) -> None:
        """EVT_CONN_CLOSE of a handed connection: its end, and its slot, back to the node."""
        self._report_end(getattr(event.assoc, "handoff_request", None))

    def handed_open(self) -> int:
        """How many handed connections have not been reported ended."""
        with self._ended_lock:
            return len(self._handed)

    def _report_end(self, request: Any) -> None:
        """One byte back to the node for a handed connection's end, the first time only."""
        try:
            with self._ended_lock:
                slot = self._handed.pop(request, None)
                if slot is None:
                    return  # Reported already (or not one of ours).
                self.handoff.send(ENDED_WITH_SLOT if slot else ENDED)
        except OSError:
            pass  # The node is gone: the worker exits (_watch_control).


def _reuse_port(listener: socket.socket | None) -> None:
    if listener is None:  # socketserver binds the socket it made in __init__.
        raise OSError("the acceptor server has no socket")
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


class ReusePortTlsServer(tls.TlsAssociationServer):
    """The DICOM TLS server (handshake off the accept loop), sharing its port between workers."""

    def server_bind(self) -> None:
        _reuse_port(self.socket)
        super().server_bind()


class WorkerSecurity:
    """What the front end needs of the node's security in a worker: the tls_dir files (DICOM
    TLS, C-MOVE to TLS destinations) and an audit trail that forwards to the node."""

    def __init__(self, config: NodeConfig, archive: ChannelArchive, audited: bool) -> None:
        self.files = tls.node_files(config.tls_dir, config.node_id)
        self.audit = AuditLog(None, config.node_id)
        if audited:
            self.audit.forward = archive.audit


class WorkerFrontEnd(DicomFrontEnd):
    """The node's front end with listeners that share the ports: in a worker, and, with
    `in_worker=False`, the node process's own front end beside its workers
    (dicom_local_associations > 0: `serve_handed`), which serves no DICOM TLS (the
    workers do) and lives as long as the node."""

    def __init__(self, *args: Any, handoff: socket.socket | None = None, in_worker: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handoff = handoff
        self._in_worker = in_worker

    def serve_handed(self, handoff: socket.socket, port: int) -> None:
        """The node process: serve the connections the node's accept loop hands over to it
        on `handoff` (its end of a socket pair), on the DICOM port `port` (the workers')."""
        self._handoff = handoff
        self._config = dataclasses.replace(self._config, dicom_port=port)
        self.start()
        _share_association_slots(self, None)

    def start(self) -> None:
        if self._handoff is None:
            raise RuntimeError("a handed front end starts with its hand-off connection")
        handlers: list[Any] = self.guard.wrap(self.handlers())
        acceptor.check_pynetdicom_version()
        address = (self._config.host, self._config.dicom_port)
        server = cast(HandoffServer, self.ae.make_server(address, evt_handlers=handlers, server_class=HandoffServer))
        server.handoff = self._handoff
        server.exit_when_closed = self._in_worker
        server.bind(evt.EVT_CONN_OPEN, server.on_open)
        server.bind(evt.EVT_CONN_CLOSE, server.connection_ended)
        threading.Thread(target=make_target(functools.partial(server.serve_forever,
                                                              poll_interval=acceptor.ACCEPT_POLL_S)),
                         name="WorkerAcceptorServer",
                         daemon=True).start()
        self.ae._servers.append(server)
        self._server = server
        files = self._security.files if self._security is not None else None
        if self._in_worker and self._config.dicom_tls_port and files is not None:
            self._tls_server = tls.start_dicom_tls_server(
                self.ae, (self._config.host, self._config.dicom_tls_port),
                tls.dicom_server_context(files, self._config.dicom_tls_client_cert), handlers,
                on_refused=self.guard.tls_refused, server_class=ReusePortTlsServer)

    def reload_tls(self) -> None:
        """New TLS connections get the tls_dir's current certificate (open ones keep theirs)."""
        files = self._security.files if self._security is not None else None
        if self._tls_server is None or files is None:
            return
        try:
            self._tls_server.ssl_context = tls.dicom_server_context(files, self._config.dicom_tls_client_cert)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError.
            log.error("dicom.worker.tls_reload_failed pid=%d error=%s", os.getpid(), type(error).__name__)
            return
        log.info("dicom.worker.tls_reloaded pid=%d", os.getpid())


def _share_association_slots(front_end: WorkerFrontEnd, slots: SlotClient | None) -> None:
    """max_associations across the workers: a handed connection comes with one of the
    node's slots or without (none left: rejected busy, as pynetdicom rejects at its own
    limit), given back with its end (HandoffServer); a DICOM TLS request this worker would
    accept takes one over the channel first and gives it back when its connection closes.
    The node process's own front end (`slots` None) serves handed connections only."""
    def take(event: Any) -> None:
        assoc = event.assoc
        if getattr(assoc, "rejection", None) is not None or not assoc.is_acceptor:
            return  # Rejected already (association_guard), or our own C-MOVE sub-association.
        handed = getattr(assoc, "handoff_slot", None)
        if handed is True:
            return  # The node took it when it handed the connection over.
        if handed is None and slots is not None and slots.acquire():
            assoc.slot_held = True
            return
        assoc.rejection = association_guard.Rejection(association_guard.RejectReason.BUSY,
                                                      association_guard.RESULT_TRANSIENT,
                                                      association_guard.SOURCE_PROVIDER_PRESENTATION, 0x02)
        association_guard.on_requested(event)  # Logged and rejected as the guard's own.

    def give_back(event: Any) -> None:
        assoc = event.assoc
        if getattr(assoc, "slot_held", False) and slots is not None:
            assoc.slot_held = False
            slots.release()

    front_end._server.bind(evt.EVT_REQUESTED, take)
    if front_end._tls_server is not None:
        front_end._tls_server.bind(evt.EVT_REQUESTED, take)
        front_end._tls_server.bind(evt.EVT_CONN_CLOSE, give_back)


def _count_dimse(front_end: WorkerFrontEnd, archive: ChannelArchive) -> None:
    """Count and time this worker's DIMSE requests as the node counts its own
    (node/http_views.py bind_dimse_metrics), forwarded to the node's /metrics."""
    forwarder = DimseForwarder(archive.metrics, lambda: front_end.guard.refused)
    meter = Metrics(dimse_sink=forwarder.add)
    server = front_end._server
    for event, handler in meter.dimse_handlers():
        server.bind(event, handler)
    ae = front_end.ae
    if isinstance(ae, acceptor.NodeAE):  # Always here: DicomFrontEnd builds a NodeAE.
        ae.store_response_hook = acceptor.StoreResponseHook(meter.on_sent, meter.response_sent, meter.on_received,
                                                            meter.request_received)
    forwarder.start()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # Not Linux: the control connection's end still stops the worker.


def _watch_control(sock: socket.socket) -> None:
    """The node closed the channel (stopped, or killed): exit now, whatever is open."""
    try:
        while sock.recv(1):
            pass
    except OSError:
        pass
    log.warning("dicom.worker.node_gone pid=%d", os.getpid())
    os._exit(0)


def main(config: NodeConfig, channel_path: str, index: int, parent_pid: int, audited: bool = False) -> None:
    """Entry point of a worker (multiprocessing 'spawn' target)."""
    _die_with_parent()
    if os.getppid() != parent_pid:
        os._exit(0)  # The node died before the death signal was armed.
    from pacsnode.node.server import configure_logging

    configure_logging(config.log_level)
    from pacsnode.node.memory import retain_freed_memory

    retain_freed_memory(config.malloc_trim_threshold_bytes)  # PDUs and compression buffers reused.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # The node decides; a terminal ^C reaches it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # Until the TLS listener can reload (below).
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(channel_path)
    # The node store's blobs directory: big blobs are written there by this process and
    # named to the node (node/archive_channel.py), spooled instances compressed into it.
    blob_files = BlobFiles(blobs_directory(store_directory(config.data_dir)))
    # Empty files made ahead (one directory fsync per batch): a STORE's blob goes into one
    # under its final name, one fsync, which the node records as it is (node/blob_files.py
    # write_pooled) instead of renaming a temp file and fsyncing its directory.
    blob_files.start_pool(prefix=f"{WORKER_POOL_PREFIX}{os.getpid()}_")
    archive = ChannelArchive(channel_path, blob_files, config.blob_file_bytes_min)
    security = WorkerSecurity(config, archive, audited=audited)
    handoff = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # The DICOM connections the node hands over.
    handoff.connect(channel_path)
    send_frame(handoff, Kind.HANDOFF, {"worker": index, "pid": os.getpid()})
    front_end = WorkerFrontEnd(config, archive, security=security,
                               blob_files=blob_files, handoff=handoff)
    front_end.start()
    _count_dimse(front_end, archive)
    _share_association_slots(front_end, SlotClient(channel_path))
    signal.signal(signal.SIGHUP, lambda _s, _f: front_end.reload_tls())
    send_frame(control, Kind.HELLO, {"worker": index, "pid": os.getpid()})
    kind, _, _ = recv_frame(control)
    if kind != Kind.WELCOME:
        os._exit(1)
    threading.Thread(target=_watch_control, args=(control,), name="pacsnode-worker-control", daemon=True).start()
    log.info("dicom.worker.started worker=%d pid=%d port=%d", index, os.getpid(), front_end.port)
    stop.wait()
    log.info("dicom.worker.stopping worker=%d pid=%d", index, os.getpid())
    front_end.stop(grace_s=STOP_GRACE_S)
    log.info("dicom.worker.stopped worker=%d pid=%d", index, os.getpid())
    write_trace.flush()  # PACSNODE_WRITE_TRACE's marks (os._exit runs no atexit).
    os._exit(0)
