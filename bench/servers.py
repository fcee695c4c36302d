"""Start and stop the systems under test as separate processes on 127.0.0.1.

Each `start_*` returns a `Server`; `Server.stop()` ends the process group it started
(SIGTERM, then SIGKILL) and deletes its work directory. Use them in `with` blocks, so
that a failed benchmark still stops every process and removes every temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pacsnode.sim.process import free_port

HOST = "127.0.0.1"
BENCH_AET = "BENCH"          # The calling AE title of every SCU in the benchmark.
STORESCP_AET = "STORESCP"    # The C-MOVE destination (dcmtk storescp).
ORTHANC_AET = "ORTHANC"
PACSNODE_AET = "PACSNODE"
ORTHANC_BINARY = "/usr/sbin/Orthanc"

# dcmtk (and so Orthanc's DICOM server, which is built on dcmtk) disables Nagle's
# algorithm only when this environment variable is set to a non-zero number.
DCMTK_NODELAY_ENV = {"TCP_NODELAY": "1"}


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    if nodelay:
        env.update(DCMTK_NODELAY_ENV)
    return env


class ServerFailed(RuntimeError):
    pass


@dataclass
class Server:
    name: str                 # "storescp" | "orthanc" | "pacsnode" | "pacsnode-workers"
    aet: str
    port: int
    process: subprocess.Popen[bytes]
    work_dir: Path
    log_path: Path
    command: list[str]
    http_port: int | None = None
    storage_dir: Path | None = None   # storescp: where received files land.
    env_note: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    host: str = HOST
    keep_work_dir: bool = False
    final_log_tail: str = ""

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, line_count: int = 30) -> str:
        if self.final_log_tail:
            return "\n".join(self.final_log_tail.splitlines()[-line_count:])
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-line_count:])

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Stop the process group this object started; returns the exit code."""
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(timeout=10)
        else:
            # The leader is gone; children (storescp --fork) may still be in the group.
            _signal_group(self.process, signal.SIGKILL)
        self.final_log_tail = self.log_tail(200)
        if not self.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.process.returncode

    def disk_usage_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.work_dir):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
        return total

    # -- Orthanc REST (loopback only) -------------------------------------------------
    def orthanc_get(self, uri: str) -> object:
        if self.http_port is None:
            raise ServerFailed(f"{self.name} has no HTTP port")
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{uri}", timeout=30) as reply:
            return json.loads(reply.read())


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # The group we created with start_new_session=True.
    except (ProcessLookupError, PermissionError):
        pass


def _spawn(command: list[str], log_path: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), cwd=cwd, start_new_session=True)
    finally:
        log.close()


def wait_port(server: Server, timeout_s: float = 60.0) -> None:
    """Wait until the server's DICOM port accepts a connection and a C-ECHO succeeds."""
    from scu import echo  # Local import: scu imports pynetdicom (slow), servers need not.

    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if not server.alive():
            tail = server.log_tail()
            server.stop()
            raise ServerFailed(f"{server.name} exited with {server.process.returncode} while starting:\n{tail}")
        try:
            with socket.create_connection((HOST, server.port), timeout=1):
                pass
            status = echo(server.aet, server.port)
            if status == 0:
                return
            last_error = f"C-ECHO status {status:#06x}"
        except OSError as error:
            last_error = str(error)
        time.sleep(0.1)
    tail = server.log_tail()
    server.stop()
    raise ServerFailed(f"{server.name} did not answer on port {server.port} within {timeout_s} s "
                       f"({last_error}):\n{tail}")


def start_storescp(parent: Path, *, nodelay: bool = True, aet: str = STORESCP_AET) -> Server:
    """dcmtk storescp: receives into its own dir, one forked process per association."""
    work_dir = _make_work_dir(parent, "storescp")
    storage = work_dir / "received"
    storage.mkdir()
    port = free_port()
    command = ["storescp", "--fork", "-aet", aet, "--output-directory", str(storage), str(port)]
    process = _spawn(command, work_dir / "storescp.log", dcmtk_env(nodelay), work_dir)
    server = Server("storescp", aet, port, process, work_dir, work_dir / "storescp.log", command,
                    storage_dir=storage, env_note="TCP_NODELAY=1" if nodelay else "")
    wait_port(server)
    return server


def orthanc_config(work_dir: Path, *, dicom_port: int, http_port: int,
                   destinations: Mapping[str, tuple[str, int]]) -> dict[str, object]:
    """Orthanc 1.10 configuration: loopback only, default SQLite index, no plugins."""
    return {
        "Name": "pacsnode-bench",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "index"),
        "StorageCompression": False,
        "Plugins": [],
        "ConcurrentJobs": 2,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,      # REST answers loopback clients only.
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {aet: [aet, host, port] for aet, (host, port) in destinations.items()},
        "UnknownSopClassAccepted": True,
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],  # Every transfer syntax.
        "DicomScuPreferredTransferSyntax": "1.2.840.10008.1.2.1",
        "DicomThreadsCount": 4,
        "DicomScpTimeout": 30,
        "DicomScuTimeout": 30,
        # HTTP only (CivetWeb). Orthanc's DICOM sockets come from dcmtk, which reads the
        # TCP_NODELAY environment variable instead; start_orthanc sets that.
        "TcpNoDelay": True,
        "KeepAlive": True,
        "SaveJobs": False,
        "LogExportedResources": False,
        "OverwriteInstances": False,
        "StorageAccessOnFind": "Always",   # Orthanc's default.
        "SynchronousCMove": True,
        "MetricsEnabled": False,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "StableAge": 3600,                 # No stable-study jobs while the benchmark runs.
    }


def start_orthanc(parent: Path, *, destinations: Mapping[str, tuple[str, int]],
                  nodelay: bool = True, extra_config: Mapping[str, object] | None = None) -> Server:
    """Orthanc with `orthanc_config`, updated with `extra_config` (e.g. plugins)."""
    work_dir = _make_work_dir(parent, "orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = orthanc_config(work_dir, dicom_port=dicom_port, http_port=http_port, destinations=destinations)
    config.update(extra_config or {})
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    command = [ORTHANC_BINARY, str(config_path)]
    env = dcmtk_env(nodelay)
    process = _spawn(command, work_dir / "orthanc.log", env, work_dir)
    server = Server("orthanc", ORTHANC_AET, dicom_port, process, work_dir, work_dir / "orthanc.log", command,
                    http_port=http_port, env_note="TCP_NODELAY=1" if nodelay else "as shipped (Nagle on)",
                    extra={"config": config})
    wait_port(server)
    return server


def pacsnode_command() -> list[str]:
    """The venv's Python running pacsnode's console entry point (pacsnode.cli.main:main)."""
    venv_python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    return [python, "-m", "pacsnode.cli.main"]


def start_pacsnode(parent: Path, *, destinations: Mapping[str, tuple[str, int]],
                   extra_args: list[str] | None = None, start_timeout_s: float = 90.0,
                   name: str = "pacsnode") -> Server:
    work_dir = _make_work_dir(parent, name)
    data_dir = work_dir / "data"
    port = free_port()
    peer_port = free_port()
    # A free peer (gRPC) port too: the default 7001 may belong to a developer's node.
    # `python -m pacsnode.cli.main start` is the same entry point as `.venv/bin/pacsnode start`;
    # the module form keeps the benchmark's node out of `pkill -f "pacsnode start"`, which a
    # developer's test loop on this machine was seen to run (it killed the node mid-benchmark).
    command = [*pacsnode_command(), "start", "--data-dir", str(data_dir), "--dicom-port", str(port),
               "--host", HOST, "--ae-title", PACSNODE_AET, "--peer-port", str(peer_port),
               "--http-port", str(free_port())]  # Not the default 8042, which Orthanc may hold.
    for aet, (host, destination_port) in destinations.items():
        command += ["--destination", f"{aet}={host}:{destination_port}"]
    command += extra_args or []
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    process = _spawn(command, work_dir / "pacsnode.log", env, work_dir)
    server = Server(name, PACSNODE_AET, port, process, work_dir, work_dir / "pacsnode.log", command)
    wait_port(server, timeout_s=start_timeout_s)
    return server


def _make_work_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        candidate = parent / f"{name}-{os.getpid()}-{attempt}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ServerFailed(f"no free work dir name under {parent}")
