"""DICOM clients for the chaos runner: pynetdicom as SCU and dcmtk's storescu.

The pynetdicom store client requests its associations through the node's own requestor
(node/acceptor.py NodeAE, pynetdicom's Association subclassed), as the tests' clients do
(tests/integration/clients.py requestor_ae): pynetdicom 3.0.4's plain requestor can start
waiting for a C-STORE response on an association whose connection is already gone (its
reactor takes the one end-of-association mark, or an earlier wait took it) and then waits
out its whole DIMSE timeout, 45 s here, whenever a node is killed in the middle of a
store. dcmtk's storescu stays the client written by no one here.

Unlike a test helper, nothing here raises on a refused association or a timeout: every
call returns what happened, because under chaos a failed operation is a result to
record, not an error. Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from pacsnode.node.acceptor import NodeAE

HOST = "127.0.0.1"

# Send files exactly as they are on disk (pynetdicom otherwise decodes and re-encodes them).
_config.STORE_SEND_CHUNKED_DATASET = True

# Client-side patience: long enough for a node that is failing over, short enough that a
# paused node does not stall a client for a minute.
ACSE_TIMEOUT_S = 10
DIMSE_TIMEOUT_S = 45
NETWORK_TIMEOUT_S = 45


def dataset_bytes(part10: bytes) -> bytes:
    """The dataset part of a Part-10 file: what travels on the wire and must be identical."""
    stream = io.BytesIO(part10)
    read_preamble(stream, False)
    _read_file_meta_info(stream)
    return part10[stream.tell():]


def have_storescu() -> bool:
    return shutil.which("storescu") is not None


def acked_files(output: str) -> list[str]:
    """Files `storescu -v` reported Success for ('Sending file: X' ... 'Received Store Response (Success)')."""
    acked: list[str] = []
    current: str | None = None
    for line in output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def _nodelay(event: Any) -> None:
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def _ae(*, node_requestor: bool = False) -> AE:
    """pynetdicom's AE, or with `node_requestor` the node's own (NodeAE: see the module)."""
    ae = NodeAE(ae_title="CHAOSSCU") if node_requestor else AE(ae_title="CHAOSSCU")
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.network_timeout = NETWORK_TIMEOUT_S
    return ae


def _associate(ae: AE, port: int, ae_title: str, *, ext_neg: list[Any] | None = None,
               handlers: list[Any] | None = None) -> tuple[Any, str]:
    """(association, "") or (None, why not). pynetdicom raises on some socket errors
    instead of failing the association: both are an outcome here."""
    try:
        assoc = ae.associate(HOST, port, ae_title=ae_title, ext_neg=ext_neg,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *(handlers or [])])
    except Exception as error:
        return None, f"associate: {error!r}"
    if not assoc.is_established:
        return None, "association not established"
    return assoc, ""


@dataclass
class StoreOutcome:
    """Per file: the C-STORE status (0 = Success), or None when it was never answered."""

    statuses: dict[str, int | None] = field(default_factory=dict)
    error: str = ""


def store_files(port: int, files: list[tuple[str, str, str]], ae_title: str = "PACSNODE") -> StoreOutcome:
    """C-STORE each (path, SOP class UID, transfer syntax UID) on one association, until one
    gets no response (a DIMSE timeout, an abort or the connection gone: pynetdicom's
    empty status; the association is over then, the rest stay None)."""
    outcome = StoreOutcome(statuses={path: None for path, _, _ in files})
    ae = _ae(node_requestor=True)
    for sop_class, syntax in dict.fromkeys((c, s) for _, c, s in files):
        ae.add_requested_context(sop_class, [syntax])
    assoc, outcome.error = _associate(ae, port, ae_title)
    if assoc is None:
        return outcome
    try:
        for path, _, _ in files:
            if not assoc.is_established:
                outcome.error = "association ended"
                break
            status = assoc.send_c_store(path)
            if "Status" not in status:
                outcome.error = "no response"
                break
            outcome.statuses[path] = int(status.Status)
    except Exception as error:
        outcome.error = f"send: {error!r}"
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def storescu(port: int, paths: Iterable[Path | str], ae_title: str = "PACSNODE",
             timeout_s: float = 120.0) -> tuple[int | None, list[str], str]:
    """dcmtk's storescu -v on these files: (exit code or None on timeout, acked files, output tail)."""
    args = ["storescu", "-v", "-aec", ae_title, "-aet", "CHAOSDCMTK", "-to", "10", "-ta", "10", "-td", "45",
            HOST, str(port), *map(str, paths)]
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, errors="replace")
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or "") if isinstance(expired.stdout, str) else ""
        return None, acked_files(output), output[-500:]
    output = result.stdout + result.stderr
    return result.returncode, acked_files(output), output[-500:]


def study_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def patient_identifier(patient_id: str) -> Dataset:
    """A STUDY-level C-FIND of a patient's studies by PatientID (no study key: a scatter)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = ""
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def instances_identifier(study_uid: str) -> Dataset:
    """An IMAGE-level C-FIND of one study's instances (relational: no series named)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = ""
    return ds


@dataclass
class FindOutcome:
    final_status: int | None = None
    study_uids: list[str] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)  # At IMAGE level.
    instance_counts: dict[str, int] = field(default_factory=dict)
    error: str = ""


def find_studies(port: int, identifier: Dataset, ae_title: str = "PACSNODE") -> FindOutcome:
    """Study Root C-FIND; the StudyInstanceUIDs matched and their NumberOfStudyRelatedInstances."""
    outcome = FindOutcome()
    ae = _ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc, outcome.error = _associate(ae, port, ae_title)
    if assoc is None:
        return outcome
    try:
        for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                outcome.error = "no response"
                break
            if status.Status in (0xFF00, 0xFF01) and found is not None:
                uid = str(found.get("StudyInstanceUID", ""))
                outcome.study_uids.append(uid)
                if found.get("SOPInstanceUID"):
                    outcome.sop_uids.append(str(found.SOPInstanceUID))
                try:
                    outcome.instance_counts[uid] = int(found.get("NumberOfStudyRelatedInstances", 0) or 0)
                except (TypeError, ValueError):
                    outcome.instance_counts[uid] = -1
            else:
                outcome.final_status = int(status.Status)
    except Exception as error:
        outcome.error = f"find: {error!r}"
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


@dataclass
class GetOutcome:
    final_status: int | None = None
    received: dict[str, bytes] = field(default_factory=dict)  # SOP Instance UID -> dataset bytes
    completed: int = 0
    failed: int = 0
    error: str = ""


class Getter:
    """One association for many study-level C-GETs (the final check asks every node for
    every study), with pynetdicom as the Storage SCP of the sub-operations."""

    def __init__(self, port: int, contexts: list[tuple[str, str]], ae_title: str = "PACSNODE") -> None:
        self._received: dict[str, bytes] = {}
        self._lock = threading.Lock()
        ae = _ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles: list[Any] = []
        for sop_class, syntax in list(dict.fromkeys(contexts))[:127]:
            ae.add_requested_context(sop_class, [syntax])
            roles.append(build_role(sop_class, scp_role=True))
        self._assoc, self.error = _associate(ae, port, ae_title, ext_neg=roles,
                                             handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self._received[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0x0000

    @property
    def ready(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    def get_study(self, study_uid: str) -> GetOutcome:
        outcome = GetOutcome()
        if not self.ready:
            outcome.error = self.error or "association not established"
            return outcome
        assert self._assoc is not None
        with self._lock:
            self._received = {}
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        try:
            for status, _ in self._assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                if not status:
                    outcome.error = "no response"
                    break
                if status.Status != 0xFF00:
                    outcome.final_status = int(status.Status)
                    outcome.completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
                    outcome.failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        except Exception as error:
            outcome.error = f"get: {error!r}"
        with self._lock:
            outcome.received = dict(self._received)
        return outcome

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()

    def __enter__(self) -> "Getter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
