"""The node's pool of DIMSE worker processes (`dicom_workers` = K > 0).

The node serves the archive channel (node/archive_channel.py) on a Unix socket in a
private directory, starts K worker processes (node/dicom_worker.py), restarts a worker
that dies, and stops them on shutdown: SIGTERM, a grace period for open associations,
then SIGKILL.

The node listens on the DICOM port itself and hands each accepted connection to the
worker with the fewest open connections (ConnectionHandOff: the socket passed over the
channel with SCM_RIGHTS). The kernel's SO_REUSEPORT spread, used before, picks a worker by
a hash of the connection's addresses: four storescu senders landed 2:2 on two workers in
5 runs of 12 (3:1 in 4, 4:0 in 3), and then one worker, one GIL, did most or all of the
work while the other core idled (docs/workers.md, Measurements).

Security: each worker applies the access table, serves DICOM TLS on `dicom_tls_port`
(SO_REUSEPORT: TLS connections are still spread by the kernel) and sends its DICOM audit messages over the channel, which the node
appends to its own audit trail (and syslog receiver). `reload_certificates` forwards the
node's certificate reload (SIGHUP, or its poll) to the workers as SIGHUP.

`max_associations` is shared: the node holds the slots (AssociationSlots) and takes one
for each connection it hands over (ConnectionHandOff); a worker takes one over the channel
for each DICOM TLS association it accepts. The workers' DIMSE requests reach the node's /metrics
(count_dimse), and so do the associations they refuse by the access table (`refused`).

Files: a worker names its spool files and blob temp files with its PID
(node/spool.py process_prefix); when a worker dies the pool removes the ones it left
before starting its replacement, and at start it clears the spool directory (what a
node killed mid-transfer left), as the one-process front end does.
"""

from __future__ import annotations

import array
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from multiprocessing.connection import wait
from typing import Any, Callable

from pacsnode.node import dicom_worker, spool
from pacsnode.node.archive_channel import ENDED_WITH_SLOT, NO_SLOT, SLOT_GIVEN, AssociationSlots, ChannelServer
from pacsnode.node.blob_files import BlobFiles
from pacsnode.node.audit import AuditLog
from pacsnode.node.config import NodeConfig

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
RESTART_DELAY_S = 0.5
HANDOFF_WAIT_S = 5.0  # A connection accepted while no worker is up (a restart) waits this long for one.
LISTEN_BACKLOG = 128


class ConnectionHandOff:
    """The node's accept loop of the plain DICOM port: each connection goes to the worker
    that has the fewest handed connections still open (ties in turn), as the socket itself
    over that worker's HANDOFF connection (SCM_RIGHTS), with one byte that says whether a
    max_associations slot (AssociationSlots) was taken for it: the worker asks for none over
    the channel (a round trip per association, before), and rejects the association busy
    when none was left. The worker sends one byte back for each that ended, which gives its
    slot back. A worker whose hand-off connection ends (it died) gets no more and its slots
    are given back; a connection accepted while no worker is registered waits HANDOFF_WAIT_S
    for one, then is closed (as a refused connection, before: nothing listened while no
    worker ran).

    With `serve_local` (dicom_local_associations > 0) the node process's own front end is
    one more receiver, over a socket pair: it takes a connection while it serves fewer than
    its maximum, so one sender is served as in one process (no channel, ~1 ms less CPU per
    instance and no hop between processes) and further concurrent ones go to the workers."""

    def __init__(self, listener: socket.socket, slots: AssociationSlots | None = None,
                 wait_s: float = HANDOFF_WAIT_S) -> None:
        self._listener = listener
        self._slots = slots
        self._wait_s = wait_s
        self._open: dict[socket.socket, int] = {}  # A worker's hand-off connection -> its open connections.
        # The node process's own front end (dicom_local_associations > 0): its hand-off end,
        # and how many connections it serves before the workers get them.
        self._local: socket.socket | None = None
        self._local_max = 0
        self._changed = threading.Condition()
        self._turn = 0
        self._closed = False
        self.handed = 0
        self._thread = threading.Thread(target=self._accept_forever, name="pacsnode-dicom-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def serve_local(self, sock: socket.socket, local_max: int) -> None:
        """Register the node process's own front end (its end of a socket pair) and serve
        it on a thread of its own: it takes the next connection while it has fewer than
        `local_max` open, and every connection while no worker is registered."""
        with self._changed:
            self._local = sock
            self._local_max = local_max
        threading.Thread(target=self.serve_worker, args=(sock, {}), name="pacsnode-dicom-local", daemon=True).start()

    def local_open(self) -> int:
        with self._changed:
            return self._open.get(self._local, 0) if self._local is not None else 0

    def open_counts(self) -> list[int]:
        with self._changed:
            return list(self._open.values())

    def serve_worker(self, sock: socket.socket, _header: dict[str, Any]) -> None:
        """A worker's HANDOFF connection (the channel's thread for it): registered until it ends."""
        with self._changed:
            self._open[sock] = 0
            self._changed.notify_all()
        try:
            while True:
                ended = sock.recv(256)
                if not ended:
                    return
                if self._slots is not None:
                    for _ in range(ended.count(ENDED_WITH_SLOT)):
                        self._slots.release(sock)
                with self._changed:
                    if sock in self._open:
                        self._open[sock] = max(0, self._open[sock] - len(ended))
        except OSError:
            return
        finally:
            with self._changed:
                self._open.pop(sock, None)
            if self._slots is not None:
                self._slots.release_all(sock)  # Its worker died: its associations with it.

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # Wakes accept().
        except OSError:
            pass
        self._listener.close()

    def _choose(self, passed: set[socket.socket]) -> socket.socket | None:
        """The worker for the next connection (its count taken), not one of `passed`; None
        when none is registered within wait_s, or every one was passed."""
        deadline = time.monotonic() + self._wait_s
        with self._changed:
            while not self._open and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)
            local = self._local if self._local in self._open and self._local not in passed else None
            if local is not None and self._open[local] < self._local_max and not self._closed:
                self._open[local] += 1  # One sender costs least served here (no channel, one process).
                return local
            workers = [worker for worker in self._open if worker not in passed and worker is not self._local]
            if not workers and local is not None:
                workers = [local]  # No worker up (a restart): the node serves it rather than wait.
            if self._closed or not workers:
                return None
            self._turn = (self._turn + 1) % len(workers)
            workers = workers[self._turn:] + workers[:self._turn]
            chosen = min(workers, key=self._open.__getitem__)
            self._open[chosen] += 1
            return chosen

    def _undo(self, sock: socket.socket, given: bool, *, forget: bool) -> None:
        with self._changed:
            if forget:
                self._open.pop(sock, None)
            elif sock in self._open:
                self._open[sock] = max(0, self._open[sock] - 1)
        if given and self._slots is not None:
            self._slots.release(sock)

    def _accept_forever(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError as error:
                if self._closed:
                    return
                log.warning("dicom.accept.failed error=%s", type(error).__name__)  # EMFILE and the like.
                time.sleep(0.1)
                continue
            with conn:  # The node's copy: the worker holds its own once sent.
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        passed: set[socket.socket] = set()
        while True:
            chosen = self._choose(passed)
            if chosen is None:
                log.warning("dicom.accept.no_worker passed=%d", len(passed))
                return  # Closed: the peer sees the connection refused (reset).
            given = self._slots.acquire(chosen) if self._slots is not None else True
            try:
                # Never blocks: a worker that stopped taking its connections (its queue full)
                # is passed over for this one instead of stalling the port for all.
                # (socket.send_fds would drop the flags: Python 3.11 does not pass them on.)
                chosen.sendmsg([SLOT_GIVEN if given else NO_SLOT],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))],
                               socket.MSG_DONTWAIT)
                self.handed += 1
                return
            except BlockingIOError:
                self._undo(chosen, given, forget=False)
                passed.add(chosen)
            except OSError:
                self._undo(chosen, given, forget=True)  # Its worker died: the next one takes it.


CHANNEL_DIRECTORY_PREFIX = "pacsnode-ch-"


def remove_stale_channel_directories(parent: str | None = None) -> int:
    """Remove the channel directories (`pacsnode-ch-<pid>-*` under the temp directory, ours)
    of node processes that are gone: a node killed by SIGKILL cannot remove its own, and
    each start would leave one more. A directory whose PID is alive (this node's, another
    node's, or a reused PID) is kept; one without a PID in its name (made before names
    carried it) too. Returns how many were removed."""
    parent = parent or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(CHANNEL_DIRECTORY_PREFIX):
            continue
        pid_text = name[len(CHANNEL_DIRECTORY_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or _alive(int(pid_text)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    if removed:
        log.info("dicom.workers.stale_channels_removed count=%d", removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's process: alive.
    return True


class WorkerPool:
    def __init__(self, config: NodeConfig, archive: Any, count: int, audit: AuditLog | None = None,
                 blob_files: BlobFiles | None = None) -> None:
        self._count = count
        self._audited = audit is not None and audit.enabled
        remove_stale_channel_directories()
        # 0700: only this user reaches the channel. The PID in the name lets a later start
        # remove it if this process is killed before it can (remove_stale_channel_directories).
        self._directory = tempfile.mkdtemp(prefix=f"{CHANNEL_DIRECTORY_PREFIX}{os.getpid()}-")
        self._channel = ChannelServer(os.path.join(self._directory, "archive.sock"), archive, blob_files)
        self._blob_files = blob_files
        self._channel.on_hello = self._on_hello
        self._handoff: ConnectionHandOff | None = None
        self._refused_by_pid: dict[int, int] = {}
        self._refused_lock = threading.Lock()
        self._channel.on_refused = self._on_refused
        self.slots = AssociationSlots(config.max_associations)
        self._channel.slots = self.slots
        if audit is not None:
            self._channel.on_audit = audit.write_line  # The workers' DICOM audit messages.
        self._hello = threading.Condition()
        self._ready: set[int] = set()
        self._reservation: socket.socket | None = None
        # dicom_local_associations > 0: (the hand-off's end, the node front end's end).
        self._local_pair: tuple[socket.socket, socket.socket] | None = None
        self.port = config.dicom_port
        self._config = config
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, Any] = {}
        self._stopping = threading.Event()
        self._restarts = 0
        self._supervisor = threading.Thread(target=self._supervise, name="pacsnode-workers", daemon=True)

    def count_dimse(self, observe: Callable[[str, int, float], None]) -> None:
        """Where the workers' answered DIMSE requests go (the node's Metrics.observe_dimse)."""
        self._channel.on_metrics = observe

    def _on_refused(self, pid: int, total: int) -> None:
        with self._refused_lock:
            self._refused_by_pid[pid] = max(total, self._refused_by_pid.get(pid, 0))

    @property
    def refused(self) -> int:
        """Associations the workers refused by the access table (every worker that ran, dead
        ones' last report included): the node's pacsnode.security.dicom_refused_count."""
        with self._refused_lock:
            return sum(self._refused_by_pid.values())

    @property
    def restarts(self) -> int:
        return self._restarts

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values() if p.pid is not None]

    def _on_hello(self, _sock: socket.socket, header: dict[str, Any]) -> None:
        with self._hello:
            self._ready.add(int(header.get("pid", 0)))
            self._hello.notify_all()

    def _worker_config(self) -> NodeConfig:
        # Each worker may take all of max_associations itself; together they take no more
        # than that, by the shared slots (AssociationSlots, asked over the channel).
        return dataclasses.replace(self._config, dicom_port=self.port)

    def start(self) -> None:
        # The DICOM port: bound now (port 0 resolves to its number for the workers' config),
        # listening once every worker is up, its connections handed to them.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._config.host, self._config.dicom_port))
        self.port = listener.getsockname()[1]
        self._reservation = listener
        self._handoff = ConnectionHandOff(listener, self.slots)
        self._channel.on_handoff = self._handoff.serve_worker
        if self._config.dicom_local_associations > 0:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._local_pair = (ours, theirs)
            self._handoff.serve_local(ours, self._config.dicom_local_associations)
        removed = spool.clear_directory(self._spool_directory)  # Left by a crash mid-transfer.
        if removed:
            log.info("dicom.spool.cleared files=%d", removed)
        self._channel.start()
        for index in range(self._count):
            self._spawn(index)
        deadline = time.monotonic() + START_TIMEOUT_S
        with self._hello:
            while len(self._ready) < self._count:
                if not self._hello.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"{self._count - len(self._ready)} DICOM workers did not start")
        # Each worker's HANDOFF connection is registered by a channel thread of its own, which
        # may come after its HELLO: listening before that, the first connections could all go
        # to the workers registered so far (four senders to one worker, one GIL).
        expected = self._count + (1 if self._local_pair is not None else 0)
        while len(self._handoff.open_counts()) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError("DICOM workers did not register their hand-off connections")
            time.sleep(0.01)
        listener.listen(LISTEN_BACKLOG)
        self._handoff.start()
        self._supervisor.start()
        log.info("dicom.workers.started count=%d port=%d pids=%s", self._count, self.port,
                 ",".join(map(str, self.pids())))

    @property
    def local_handoff(self) -> socket.socket | None:
        """The node process's front end's end of its hand-off pair (start() made it when
        dicom_local_associations > 0): the connections the node serves itself come there."""
        return self._local_pair[1] if self._local_pair is not None else None

    def local_open(self) -> int:
        """Connections the node process's own front end serves now."""
        return self._handoff.local_open() if self._handoff is not None else 0

    def close_local(self) -> None:
        """Close the local hand-off pair: after the node's front end stopped (its accept
        loop ended; nothing more comes through it once stop() closed the port)."""
        pair, self._local_pair = self._local_pair, None
        for sock in pair or ():
            sock.close()

    def _spawn(self, index: int) -> None:
        process = self._context.Process(target=dicom_worker.main, name=f"pacsnode-dicom-worker-{index}",
                                        args=(self._worker_config(), self._channel.path, index, os.getpid(),
                                              self._audited))
        process.start()
        self._processes[index] = process

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            by_sentinel = {p.sentinel: i for i, p in self._processes.items()}
            for sentinel in wait(list(by_sentinel), timeout=0.5):
                if self._stopping.is_set():
                    return
                index = by_sentinel[sentinel]
                process = self._processes[index]
                process.join()
                log.warning("dicom.worker.exited worker=%d pid=%s exit_code=%s", index, process.pid, process.exitcode)
                self._remove_files_of(process.pid)
                time.sleep(RESTART_DELAY_S)
                if self._stopping.is_set():
                    return
                self._restarts += 1
                self._spawn(index)
                log.info("dicom.worker.restarted worker=%d pid=%s", index, self._processes[index].pid)

    @property
    def _spool_directory(self) -> Path:
        return spool.spool_directory(self._config.data_dir)

    def _remove_files_of(self, pid: int | None) -> None:
        """The spool files and blob temp files a dead worker left (its open transfers died
        with it: nothing there was acknowledged)."""
        if pid is None:
            return
        spooled = spool.clear_directory(self._spool_directory, pid)
        temps = self._blob_files.remove_temps_of(pid) if self._blob_files is not None else 0
        if spooled or temps:
            log.info("dicom.worker.files_removed pid=%d spool_files=%d blob_temp_files=%d", pid, spooled, temps)

    def reload_certificates(self) -> None:
        """Tell every worker to read the tls_dir certificate again (new DICOM TLS connections)."""
        for process in self._processes.values():
            if process.is_alive() and process.pid is not None:
                try:
                    os.kill(process.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass  # Exited meanwhile; its replacement reads the files at start.

    def stop(self, grace_s: float = 10.0) -> None:
        self._stopping.set()
        if self._handoff is not None:
            self._handoff.close()  # No new connections; the workers finish their open ones.
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: stop accepting, finish open associations.
        deadline = time.monotonic() + grace_s + 2.0
        for process in self._processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("dicom.worker.killed_on_shutdown pid=%s", process.pid)
                process.kill()
                process.join(5.0)
        self._channel.close()
        if self._reservation is not None:
            self._reservation.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        log.info("dicom.workers.stopped count=%d restarts=%d", self._count, self._restarts)
