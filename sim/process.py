"""Real pacsnode processes on loopback: start, wait until ready, kill -9, stop, restart.

Used by the integration tests and by the chaos runner. Every process gets free
127.0.0.1 ports and its own data directory; `stop()` and `kill()` always reap it.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence


_EPHEMERAL_RANGE_PATH = Path("/proc/sys/net/ipv4/ip_local_port_range")
_FALLBACK_EPHEMERAL_LOW = 32768
_LOWEST_PORT = 10000
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()
_draw = random.Random(os.getpid() ^ time.monotonic_ns())


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE_PATH.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _share(low: int, high: int) -> tuple[int, int]:
    """This process's slice of [low, high) when it is one of pytest-xdist's workers.

    `make test` runs the suite in two worker processes (pytest-xdist); each hands out
    ports only from its own slice, so a port one worker drew and has not yet bound
    (a node still starting) is never drawn by the other.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        index = int(worker.removeprefix("gw"))
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    except ValueError:
        return low, high
    if not 0 <= index < count or count < 2:
        return low, high
    size = (high - low) // count
    return low + index * size, low + (index + 1) * size


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and that this process never handed out before.

    Drawn below the kernel's ephemeral range, so no outgoing connection's source port
    (picked from that range) can take it before the server binds it; and never twice in
    one process: binding port 0 twice in a row can return the same number, which once
    gave one node the same DICOM and HTTP port in CI. Under pytest-xdist, from this
    worker's own slice of that range (`_share`).
    """
    low, high = _share(_LOWEST_PORT, _ephemeral_low())
    with _handed_out_lock:
        if high - low > 1000:
            for _ in range(200):
                port = _draw.randrange(low, high)
                if port not in _handed_out and _bindable(port):
                    _handed_out.add(port)
                    return port
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; returns the last result."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def pacsnode_command() -> list[str]:
    """The `pacsnode` entry point of this interpreter's environment."""
    candidate = Path(sys.executable).with_name("pacsnode")
    if candidate.exists():
        return [str(candidate)]
    return [sys.executable, "-m", "pacsnode.cli.main"]


class NodeProcess:
    """One `pacsnode start` child process."""

    def __init__(
        self,
        data_dir: Path,
        *,
        node_id: str = "node-1",
        ae_title: str = "PACSNODE",
        dicom_port: int | None = None,
        peer_port: int | None = None,
        http_port: int | None = None,
        seeds: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.node_id = node_id
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.peer_port = peer_port or free_port()
        self.http_port = http_port or free_port()  # Nodes on one machine cannot share the default 8042.
        self.seeds = list(seeds)
        self.extra_args = list(extra_args)
        self.log_path = log_path or self.data_dir.with_name(self.data_dir.name + ".log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def args(self) -> list[str]:
        return pacsnode_command() + [
            "start",
            "--node-id", self.node_id,
            "--data-dir", str(self.data_dir),
            "--ae-title", self.ae_title,
            "--host", "127.0.0.1",
            "--dicom-port", str(self.dicom_port),
            "--peer-port", str(self.peer_port),
            "--http-port", str(self.http_port),
            *[arg for seed in self.seeds for arg in ("--seed", seed)],
            *self.extra_args,
        ]

    @property
    def peer_address(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    def start(self, *, timeout_s: float = 30.0) -> "NodeProcess":
        return self.launch().wait_ready(timeout_s=timeout_s)

    def launch(self) -> "NodeProcess":
        """Start the process and return at once; `wait_ready` waits for its ports."""
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def wait_ready(self, *, timeout_s: float = 30.0) -> "NodeProcess":
        """Wait until the DICOM and peer ports accept connections; kill -9 and raise if the
        process exits first or `timeout_s` passes."""
        if not wait_until(lambda: (port_open(self.dicom_port) and port_open(self.peer_port)) or not self.alive,
                          timeout_s):
            self.kill()
            raise RuntimeError(f"node {self.node_id} did not open port {self.dicom_port}:\n{self.log_text()}")
        if not self.alive:
            raise RuntimeError(f"node {self.node_id} exited at start:\n{self.log_text()}")
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9: no shutdown, no flush; what was synced is all that survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def pause(self) -> None:
        if self.alive:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, *, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait for a clean exit; kill -9 if it does not come."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def restart(self) -> "NodeProcess":
        self.stop()
        return self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_all(nodes: Sequence[NodeProcess], *, timeout_s: float = 30.0) -> list[NodeProcess]:
    """Launch every node at once, then wait until each is ready: on 2 cores a node's start
    (mostly importing its modules) overlaps the others'. A joiner up before its seed asks
    the seed again after the profile's join_retry_interval_ms (local: 1 s). If one does not
    come up, every node of `nodes` is killed and the error raised.

    Only for nodes given a --token-salt (or restarted: the salt is in their data dir): at a
    first start with the default (-1) a node chooses its salt against the ring its seeds
    report then, so nodes started together choose otherwise than one after another
    (test_sites.py checks the choices of nodes started in turn)."""
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready(timeout_s=timeout_s)
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return list(nodes)
