"""Real DICOM clients for the integration tests: dcmtk's tools and pynetdicom as SCU.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsnode.sim.chaos_clients import acked_files, dataset_bytes  # noqa: F401  (shared with the chaos runner)

HOST = "127.0.0.1"

# Send files exactly as they are on disk (pynetdicom otherwise decodes and re-encodes them).
_config.STORE_SEND_CHUNKED_DATASET = True


def have_dcmtk() -> bool:
    """dcmtk's tools are on PATH. In CI (CI=true) their absence is an error, not a skip."""
    present = all(shutil.which(t) for t in ("storescu", "findscu", "getscu", "movescu", "storescp", "echoscu"))
    if not present and os.environ.get("CI") == "true":
        raise RuntimeError("CI=true but dcmtk is not installed: .ci/run must apt-get install dcmtk")
    return present


def file_dataset_bytes(path: Path) -> bytes:
    return dataset_bytes(Path(path).read_bytes())


def run(args: list[str], timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, errors="replace")


# --------------------------------------------------------------------------- dcmtk
def storescu(port: int, paths: Iterable[Path | str], *, extra: Iterable[str] = (), ae_title: str = "PACSNODE",
             timeout_s: float = 300.0) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Send files with storescu -v; returns the result and the files that got Success."""
    result = run(["storescu", "-v", "-aec", ae_title, *extra, HOST, str(port), *map(str, paths)], timeout_s)
    return result, acked_files(result.stdout + result.stderr)


def findscu(port: int, keys: list[str], out_dir: Path, *, model: str = "-S", ae_title: str = "PACSNODE",
            extra: Iterable[str] = ()) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    """findscu with -X: every response identifier written to out_dir and read back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", model, "-aec", ae_title, "-X", "-od", str(out_dir), *extra]
    for key in keys:
        args += ["-k", key]
    result = run(args + [HOST, str(port)])
    responses = [dcmread(path) for path in sorted(out_dir.glob("rsp*.dcm"))]
    return result, responses


def getscu(port: int, keys: list[str], out_dir: Path, *, extra: Iterable[str] = (),
           ae_title: str = "PACSNODE") -> subprocess.CompletedProcess[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["getscu", "-S", "+B", "-aec", ae_title, "-od", str(out_dir), *extra]
    for key in keys:
        args += ["-k", key]
    return run(args + [HOST, str(port)])


def movescu(port: int, keys: list[str], destination: str, *, ae_title: str = "PACSNODE") -> subprocess.CompletedProcess[str]:
    args = ["movescu", "-v", "-S", "-aec", ae_title, "-aem", destination]
    for key in keys:
        args += ["-k", key]
    return run(args + [HOST, str(port)])


class StoreScp:
    """dcmtk's storescp in bit-preserving mode: writes each received dataset exactly."""

    def __init__(self, out_dir: Path, port: int, ae_title: str = "STORESCP") -> None:
        self.out_dir = out_dir
        self.port = port
        self.ae_title = ae_title
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "StoreScp":
        from pacsnode.sim.process import port_open, wait_until

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["storescp", "+B", "+xa", "-aet", self.ae_title, "-od", str(self.out_dir), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not wait_until(lambda: port_open(self.port), 10):
            raise RuntimeError("storescp did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------- pynetdicom
def _nodelay(event: Any) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def scu_ae(ae_title: str = "PYSCU") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    return ae


def requestor_ae(ae_title: str = "PYSCU") -> AE:
    """An SCU AE whose associations use the node's own requestor (acceptor.NodeAE): for
    C-STOREs, which with pynetdicom's plain requestor can wait out a 60 s DIMSE timeout
    (send_files says why)."""
    from pacsnode.node import acceptor

    ae = acceptor.NodeAE(ae_title=ae_title)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    return ae


def send_files(port: int, paths: list[Path], ae_title: str = "PACSNODE") -> dict[str, int]:
    """Send files with pynetdicom exactly as they are (their own transfer syntax).
    Returns {path: status}.

    Through the node's own requestor (acceptor.NodeAE, pynetdicom's Association with its
    reactor waiting on events): pynetdicom's plain requestor reactor can take a fast C-STORE
    response off the queue before its sender looks ("Received unexpected C-STORE service
    message", then a 60 s DIMSE timeout), which failed 2 of 12 runs of a 1,000-instance
    send at load 4.5 (tests/unit/test_acceptor.py has the race)."""
    ae = requestor_ae()
    contexts: dict[tuple[str, str], None] = {}
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True)
        contexts[(str(meta.file_meta.MediaStorageSOPClassUID), str(meta.file_meta.TransferSyntaxUID))] = None
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(HOST, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    assert assoc.is_established, "association with the node was not established"
    statuses: dict[str, int] = {}
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            statuses[str(path)] = int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()
    return statuses


def send_raw(port: int, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, payload: bytes,
             ae_title: str = "PACSNODE") -> Dataset:
    """Send arbitrary dataset bytes (possibly malformed) as a C-STORE; return the status dataset."""
    from pacsnode.node import acceptor, raw_send

    ae = acceptor.NodeAE(ae_title="PYSCU")  # Its associations send a StoredDataset's bytes as they are.
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    ae.add_requested_context(sop_class_uid, [transfer_syntax_uid])
    assoc = ae.associate(HOST, port, ae_title=ae_title)
    assert assoc.is_established
    try:
        stored = raw_send.StoredDataset(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            load=lambda: (payload, 0),
        )
        return assoc.send_c_store(stored)
    finally:
        if assoc.is_established:
            assoc.release()


def find(port: int, identifier: Dataset, *, model: Any = StudyRootQueryRetrieveInformationModelFind,
         ae_title: str = "PACSNODE") -> tuple[list[Dataset], int]:
    """C-FIND with pynetdicom; returns (matches, final status)."""
    ae = scu_ae()
    ae.add_requested_context(model)
    assoc = ae.associate(HOST, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    assert assoc.is_established
    matches: list[Dataset] = []
    final = -1
    try:
        for status, found in assoc.send_c_find(identifier, model):
            if not status:
                break
            if status.Status in (0xFF00, 0xFF01):
                matches.append(found)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return matches, final


def patient_root_find(port: int, identifier: Dataset) -> tuple[list[Dataset], int]:
    return find(port, identifier, model=PatientRootQueryRetrieveInformationModelFind)


@dataclass
class GetResult:
    final_status: int = -1
    received: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> dataset bytes
    syntaxes: dict[str, str] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)  # The final response's Failed SOP Instance UID List.


def get(port: int, identifier: Dataset, contexts: list[tuple[str, str]], *, ae_title: str = "PACSNODE",
        answer: Callable[[str], int] = lambda uid: 0x0000) -> GetResult:
    """C-GET with pynetdicom acting as Storage SCP, one presentation context per
    (SOP class, transfer syntax) pair; records the dataset bytes exactly as received and
    answers each sub-operation with `answer(SOP Instance UID)` (default Success)."""
    result = GetResult()
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        with lock:
            uid = str(event.request.AffectedSOPInstanceUID)
            result.received[uid] = event.request.DataSet.getvalue()
            result.syntaxes[uid] = str(event.context.transfer_syntax)
        return answer(uid)

    ae = scu_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = {}
    for sop_class, syntax in list(dict.fromkeys(contexts))[:127]:
        ae.add_requested_context(sop_class, [syntax])
        roles[sop_class] = build_role(sop_class, scp_role=True)
    assoc = ae.associate(HOST, port, ae_title=ae_title, ext_neg=list(roles.values()),
                         evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, _nodelay)])
    assert assoc.is_established
    try:
        for status, _identifier in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            if not status:
                break
            if status.Status != 0xFF00:
                result.final_status = int(status.Status)
                result.completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
                result.failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
                result.warning = int(status.get("NumberOfWarningSuboperations", 0) or 0)
                failed_list = _identifier.get("FailedSOPInstanceUIDList", []) if _identifier else []
                result.failed_uids = [failed_list] if isinstance(failed_list, str) else [str(u) for u in failed_list]
    finally:
        assoc.release()
    return result


def move(port: int, identifier: Dataset, destination: str, ae_title: str = "PACSNODE") -> int:
    ae = scu_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(HOST, port, ae_title=ae_title)
    assert assoc.is_established
    final = -1
    try:
        for status, _identifier in assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove):
            if not status:
                break
            if status.Status != 0xFF00:
                final = int(status.Status)
    finally:
        assoc.release()
    return final


def echo(port: int, ae_title: str = "PACSNODE") -> int:
    ae = scu_ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=ae_title)
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


__all__ = ["build_context"]
