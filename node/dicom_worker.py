"""One DIMSE worker process (`dicom_workers` > 0): the DICOM front end on its own core.

The worker runs the same DicomFrontEnd as the single-process node (association handling,
PDU and header reading, bad-input answers, zstd compression), listening on the node's
DICOM port with SO_REUSEPORT beside the other workers; the kernel spreads new
connections over them. Each Archive call goes to the node over the local channel
(node/archive_channel.py); a C-STORE is answered only when the node has answered it, so
Success still means durable on W replicas.

The worker dies with the node: PR_SET_PDEATHSIG(SIGKILL) and, should that miss (the
parent is a thread that exited, or not Linux), the end of the control connection it holds
to the node. SIGTERM stops accepting, lets open associations finish, and exits.

Security as in the node process: the access table (the config's), the DICOM audit trail
(each message goes to the node over the channel, which writes it to the node's audit log
and syslog receiver), and, with `dicom_tls_port`, a DICOM TLS listener on that port with
SO_REUSEPORT too. SIGHUP (the node forwards its own: node/workers.py) reads the tls_dir
certificate again for new TLS connections.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
from typing import Any

from pynetdicom import evt
from pynetdicom.utils import make_target

from pacsnode.node import acceptor, association_guard, tls
from pacsnode.node.archive_channel import ChannelArchive, Kind, SlotClient, recv_frame, send_frame
from pacsnode.node.blob_files import BlobFiles
from pacsnode.node.metrics import DimseForwarder, Metrics
from pacsnode.node.store import blobs_directory, store_directory
from pacsnode.node.audit import AuditLog
from pacsnode.node.config import NodeConfig
from pacsnode.node.dicom import DicomFrontEnd

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 10.0


class ReusePortServer(acceptor.AcceptorServer):
    """The acceptor's server bound with SO_REUSEPORT, so that K workers share one port."""

    def server_bind(self) -> None:
        # socketserver's server_bind hook; pynetdicom's own sets SO_REUSEADDR and binds.
        _reuse_port(self.socket)
        super().server_bind()


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
    """The node's front end with listeners that share the ports."""

    def start(self) -> None:
        handlers: list[Any] = self.guard.wrap(self.handlers())
        acceptor.check_pynetdicom_version()
        address = (self._config.host, self._config.dicom_port)
        server = self.ae.make_server(address, evt_handlers=handlers, server_class=ReusePortServer)
        threading.Thread(target=make_target(server.serve_forever), name="WorkerAcceptorServer",
                         daemon=True).start()
        self.ae._servers.append(server)
        self._server = server
        files = self._security.files if self._security is not None else None
        if self._config.dicom_tls_port and files is not None:
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


def _share_association_slots(front_end: WorkerFrontEnd, slots: SlotClient) -> None:
    """max_associations across the workers: a request this worker would accept takes one
    of the node's slots first (rejected busy, as pynetdicom rejects at its own limit, when
    none is left) and gives it back when its connection closes."""
    def take(event: Any) -> None:
        assoc = event.assoc
        if getattr(assoc, "rejection", None) is not None or not assoc.is_acceptor:
            return  # Rejected already (association_guard), or our own C-MOVE sub-association.
        if slots.acquire():
            assoc.slot_held = True
            return
        assoc.rejection = association_guard.Rejection(association_guard.RejectReason.BUSY,
                                                      association_guard.RESULT_TRANSIENT,
                                                      association_guard.SOURCE_PROVIDER_PRESENTATION, 0x02)
        association_guard.on_requested(event)  # Logged and rejected as the guard's own.

    def give_back(event: Any) -> None:
        assoc = event.assoc
        if getattr(assoc, "slot_held", False):
            assoc.slot_held = False
            slots.release()

    server = front_end._server
    server.bind(evt.EVT_REQUESTED, take)
    server.bind(evt.EVT_CONN_CLOSE, give_back)


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
    archive = ChannelArchive(channel_path, blob_files, config.blob_file_bytes_min)
    security = WorkerSecurity(config, archive, audited=audited)
    front_end = WorkerFrontEnd(config, archive, security=security, blob_files=blob_files)  # type: ignore[arg-type]
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
    os._exit(0)
