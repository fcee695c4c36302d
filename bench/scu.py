"""pynetdicom SCUs for the benchmark, each with TCP_NODELAY set on connection open.

In process: echo(), echo_timed(), raw_echo(), find_latency(), get_study(), move_study().
As a worker process (one association, for 1 or N parallel senders):

    python bench/scu.py store --port P --aec AET --list FILES.txt --context SOPCLASS:TS ...

The worker prints "ready", waits for one line on stdin, stores every file in the list
over one association, then prints one JSON line with its counts and wall-clock times.
Files are sent from disk without decoding (pynetdicom's STORE_SEND_CHUNKED_DATASET).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_role, evt
from pynetdicom._globals import DEFAULT_MAX_LENGTH, MODE_REQUESTOR
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import AddressInformation

HOST = "127.0.0.1"
BENCH_AET = "BENCH"
DIMSE_TIMEOUT_S = 60.0
STORE_ATTEMPT_MAX = 3

logging.basicConfig(level=logging.DEBUG if os.environ.get("SCU_DEBUG") else logging.WARNING)
logging.getLogger("pynetdicom").setLevel(logging.DEBUG if os.environ.get("SCU_DEBUG") else logging.ERROR)

# pynetdicom 3.0.4 race: send_c_store() clears the reactor checkpoint and waits for
# `_is_paused`, but the reactor sets `_is_paused = True` just before `wait()` and may still
# pass it once, then pop the peer's (fast) response from the DIMSE queue and drop it as
# "Received unexpected C-STORE service message"; the SCU then sits out its DIMSE timeout.
# It shows up with 4 SCU processes on 2 cores. The benchmark's associations (BenchAE makes
# BenchAssociations) put such a response back on the queue for the waiting send_*() call,
# and count how often that happened. Nothing of pynetdicom's is replaced at run time: the
# subclasses override a private method and copy AE.associate, so they run only on the
# pynetdicom version they were written against (TESTED_PYNETDICOM_VERSIONS, checked when an
# AE is made; tests/unit/test_bench_scu.py).
TESTED_PYNETDICOM_VERSIONS = frozenset({"3.0.4"})
RECOVERED_RESPONSES = 0


class UntestedPynetdicom(RuntimeError):
    """The installed pynetdicom is not one bench/scu.py's subclasses were tested with."""


def check_pynetdicom_version(version: str | None = None) -> None:
    installed = version or str(pynetdicom.__version__)
    if installed not in TESTED_PYNETDICOM_VERSIONS:
        raise UntestedPynetdicom(f"pynetdicom {installed} is installed; bench/scu.py's BenchAE and BenchAssociation "
                                 f"were tested with {', '.join(sorted(TESTED_PYNETDICOM_VERSIONS))} only")


class BenchAssociation(Association):
    """pynetdicom's requestor association whose reactor hands a response it took off the
    DIMSE queue back to the waiting send_*() call (see above) instead of dropping it."""

    def _serve_request(self, msg: Any, context_id: int) -> None:
        global RECOVERED_RESPONSES
        if not msg.is_valid_request and getattr(msg, "Status", None) is not None:
            RECOVERED_RESPONSES += 1
            self.dimse.msg_queue.put((context_id, msg))
            return
        super()._serve_request(msg, context_id)


class BenchAE(AE):
    """pynetdicom's AE whose associations are BenchAssociations: pynetdicom 3.0.4's
    AE.associate with the class changed (its argument type checks left out: the callers
    are this module's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_pynetdicom_version()
        super().__init__(*args, **kwargs)

    def associate(self, addr: Any, port: int, contexts: Any = None, ae_title: str = "ANY-SCP",
                  max_pdu: int = DEFAULT_MAX_LENGTH, ext_neg: Any = None, bind_address: Any = None,
                  tls_args: Any = None, evt_handlers: Any = None) -> Association:
        remote_address = AddressInformation.from_addr_port(addr, port)
        if bind_address is None:
            bind_address = ("::0", 0) if remote_address.address_family == socket.AF_INET6 else ("", 0)
        local_address = AddressInformation.from_tuple(bind_address)
        assoc = BenchAssociation(self, MODE_REQUESTOR)
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"RequestorThread@{timestamp}"
        assoc.set_socket(self._create_socket(assoc, local_address, tls_args))
        assoc.acceptor.ae_title = ae_title
        assoc.acceptor.address_info = remote_address
        assoc.requestor.address_info = local_address
        assoc.requestor.ae_title = self.ae_title
        assoc.requestor.maximum_length = max_pdu
        assoc.requestor.implementation_class_uid = self.implementation_class_uid
        assoc.requestor.implementation_version_name = self.implementation_version_name
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


def _set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: neither pynetdicom nor Debian's dcmtk disables Nagle by default."""
    connection: Any = event.assoc.dul.socket
    connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, _set_nodelay)]


def _new_ae() -> AE:
    ae = BenchAE(ae_title=BENCH_AET)
    ae.acse_timeout = 30
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.network_timeout = 60
    return ae


def _associate(ae: AE, aec: str, port: int, handlers: list[Any] | None = None,
               ext_neg: list[Any] | None = None) -> Association:
    assoc = ae.associate(HOST, port, ae_title=aec, evt_handlers=NODELAY_HANDLERS + (handlers or []),
                         ext_neg=ext_neg)
    if not assoc.is_established:
        raise ConnectionError(f"association with {aec}@{HOST}:{port} was not established")
    return assoc


def echo(aec: str, port: int) -> int:
    return echo_timed(aec, port).status


@dataclass(frozen=True)
class EchoTiming:
    status: int         # The C-ECHO status; -1 when there was none (no association, no answer).
    release_ms: float   # assoc.release(), A-RELEASE-RQ to the end of the requestor's threads.


# pynetdicom 3.0.4's Association.kill, which ends release(), looks at its DUL thread every
# 10 ms; the requestor's own thread often gets the A-RELEASE confirmation before that DUL
# thread has closed the connection and is idle, and then sleeps 10 ms. Which of the two
# threads wins is up to the scheduler on the client's side, whatever the server: a
# release that long (it takes ~2-3 ms otherwise) is counted as `client_kill_waits`.
CLIENT_KILL_WAIT_MS = 9.0


def echo_timed(aec: str, port: int) -> EchoTiming:
    ae = _new_ae()
    ae.acse_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=aec, evt_handlers=NODELAY_HANDLERS)
    if not assoc.is_established:
        return EchoTiming(-1, 0.0)
    status = -1
    try:
        answer = assoc.send_c_echo()
        status = int(answer.Status) if "Status" in answer else -1
    finally:
        started = time.perf_counter()
        assoc.release()
    return EchoTiming(status, (time.perf_counter() - started) * 1000)


def echo_pdus(aec: str, port: int) -> list[bytes]:
    """The PDUs pynetdicom sends for association + C-ECHO + release (A-ASSOCIATE-RQ,
    P-DATA-TF, A-RELEASE-RQ), as it sent them to this server."""
    sent: list[bytes] = []
    ae = _new_ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=aec,
                         evt_handlers=NODELAY_HANDLERS + [(evt.EVT_DATA_SENT, lambda event: sent.append(bytes(event.data)))])
    if not assoc.is_established:
        raise ConnectionError(f"association with {aec}@{HOST}:{port} was not established")
    assoc.send_c_echo()
    assoc.release()
    return sent


def _read_pdu(sock: socket.socket) -> int:
    """Read one whole PDU; its type (0 if the peer closed first)."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0
        header += chunk
    remaining = int.from_bytes(header[2:6], "big")
    while remaining:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            return 0
        remaining -= len(chunk)
    return header[0]


RAW_ECHO_ANSWERS = (0x02, 0x04, 0x06)  # A-ASSOCIATE-AC, P-DATA-TF (the C-ECHO-RSP), A-RELEASE-RP.


def raw_echo(port: int, pdus: list[bytes]) -> bool:
    """Association + C-ECHO + release with `pdus` (echo_pdus) from a plain socket with
    TCP_NODELAY, each PDU sent as soon as the previous answer is read: the server's own
    turn-around, without a client's threads and polling. True if the answers were
    A-ASSOCIATE-AC, P-DATA-TF, A-RELEASE-RP."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answers = []
        for pdu in pdus:
            sock.sendall(pdu)
            answers.append(_read_pdu(sock))
    return tuple(answers) == RAW_ECHO_ANSWERS


# ---------------------------------------------------------------------------------------
# C-FIND


@dataclass
class FindResult:
    latencies_ms: list[float] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)
    failures: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


STUDY_RETURN_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
    "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "ModalitiesInStudy",
)


def study_query(**match: str) -> Dataset:
    """A STUDY-level identifier with the usual viewer return keys plus `match`."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for keyword in STUDY_RETURN_KEYS:
        setattr(query, keyword, "")
    for keyword, value in match.items():
        setattr(query, keyword, value)
    if any(ord(char) > 127 for value in match.values() for char in value):
        query.SpecificCharacterSet = "ISO_IR 100"
    return query


def find_latency(aec: str, port: int, queries: Sequence[tuple[str, Dataset]]) -> dict[str, FindResult]:
    """Run the queries one after the other over ONE association; per-query latency."""
    ae = _new_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    results: dict[str, FindResult] = {}
    assoc = _associate(ae, aec, port)
    try:
        for kind, query in queries:
            result = results.setdefault(kind, FindResult())
            matched = 0
            final = -1
            started = time.perf_counter()
            for status, _identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if "Status" not in status:
                    final = -1
                    break
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    matched += 1
                else:
                    final = code
            elapsed_ms = (time.perf_counter() - started) * 1000
            result.statuses[f"{final:#06x}" if final >= 0 else "none"] = (
                result.statuses.get(f"{final:#06x}" if final >= 0 else "none", 0) + 1)
            if final != 0:
                result.failures += 1
                if not assoc.is_established:
                    assoc = _associate(ae, aec, port)
                continue
            result.latencies_ms.append(elapsed_ms)
            result.matches.append(matched)
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def count_instances_by_study(aec: str, port: int, study_uids: set[str]) -> int | None:
    """One universal STUDY-level C-FIND; sum NumberOfStudyRelatedInstances over `study_uids`.
    None if the archive does not return that key."""
    ae = _new_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.NumberOfStudyRelatedInstances = ""
    total = 0
    assoc = _associate(ae, aec, port)
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if "Status" not in status or int(status.Status) not in (0xFF00, 0xFF01) or identifier is None:
                continue
            if identifier.get("StudyInstanceUID") in study_uids:
                value = identifier.get("NumberOfStudyRelatedInstances")
                if value in (None, ""):
                    return None
                total += int(value)
    finally:
        if assoc.is_established:
            assoc.release()
    return total


def count_instances(aec: str, port: int, series: Iterable[tuple[str, str]]) -> int:
    """IMAGE-level C-FIND per (study, series): how many instances the archive answers with."""
    ae = _new_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    total = 0
    assoc = _associate(ae, aec, port)
    try:
        for study_uid, series_uid in series:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = series_uid
            query.SOPInstanceUID = ""
            for status, _identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if "Status" in status and int(status.Status) in (0xFF00, 0xFF01):
                    total += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return total


# ---------------------------------------------------------------------------------------
# C-GET and C-MOVE


@dataclass
class RetrieveResult:
    elapsed_s: float
    received: int            # C-GET: instances that arrived on our association.
    received_bytes: int
    completed: int           # From the final response (NumberOfCompletedSuboperations).
    failed: int
    final_status: int
    # Seconds from the start (association included) to the first instance: C-GET, its
    # first C-STORE arriving; C-MOVE, the first Pending response (one sub-operation done).
    first_instance_s: float | None = None


def _retrieve_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def get_study(aec: str, port: int, study_uid: str, sop_classes: Sequence[str]) -> RetrieveResult:
    """C-GET a study; the instances are counted (bytes as received) and not decoded or written."""
    received = 0
    received_bytes = 0

    first_instance_s: float | None = None

    def on_store(event: evt.Event) -> int:
        nonlocal received, received_bytes, first_instance_s
        if first_instance_s is None:
            first_instance_s = time.perf_counter() - started
        received += 1
        request: Any = event.request
        received_bytes += len(request.DataSet.getvalue())
        return 0x0000

    ae = _new_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class)
        roles.append(build_role(sop_class, scp_role=True))
    started = time.perf_counter()
    assoc = _associate(ae, aec, port, handlers=[(evt.EVT_C_STORE, on_store)], ext_neg=roles)
    final_status, completed, failed = -1, 0, 0
    try:
        for status, _identifier in assoc.send_c_get(_retrieve_query(study_uid),
                                                    StudyRootQueryRetrieveInformationModelGet):
            if "Status" not in status:
                break
            code = int(status.Status)
            if code not in (0xFF00, 0xFF01):
                final_status = code
                completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
                failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    finally:
        if assoc.is_established:
            assoc.release()
    elapsed_s = time.perf_counter() - started
    return RetrieveResult(elapsed_s, received, received_bytes, completed, failed, final_status, first_instance_s)


def move_study(aec: str, port: int, study_uid: str, destination_aet: str) -> RetrieveResult:
    ae = _new_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    started = time.perf_counter()
    assoc = _associate(ae, aec, port)
    final_status, completed, failed = -1, 0, 0
    first_instance_s: float | None = None
    try:
        for status, _identifier in assoc.send_c_move(_retrieve_query(study_uid), destination_aet,
                                                     StudyRootQueryRetrieveInformationModelMove):
            if "Status" not in status:
                break
            code = int(status.Status)
            if first_instance_s is None and code in (0xFF00, 0xFF01):
                first_instance_s = time.perf_counter() - started
            if code not in (0xFF00, 0xFF01):
                final_status = code
                completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
                failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    finally:
        if assoc.is_established:
            assoc.release()
    elapsed_s = time.perf_counter() - started
    return RetrieveResult(elapsed_s, 0, 0, completed, failed, final_status, first_instance_s)


# ---------------------------------------------------------------------------------------
# C-STORE worker process


def _store_worker(args: argparse.Namespace) -> int:
    paths = [line for line in Path(args.list).read_text().splitlines() if line]
    _config.STORE_SEND_CHUNKED_DATASET = True  # Send the file's bytes; no pydicom decode.
    ae = _new_ae()
    for pair in args.context:
        sop_class, transfer_syntax = pair.split(":")
        ae.add_requested_context(sop_class, [transfer_syntax])
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()
    ok = failed = warnings = timeouts = reassociations = message_id = 0
    sent_bytes = 0
    statuses: dict[str, int] = {}
    assoc = _associate(ae, args.aec, args.port)
    try:
        for path in paths:
            for attempt in range(1, STORE_ATTEMPT_MAX + 1):
                if not assoc.is_established:
                    assoc = _associate(ae, args.aec, args.port)
                    reassociations += 1
                message_id = message_id % 65535 + 1
                try:
                    status = assoc.send_c_store(path, msg_id=message_id)
                except (RuntimeError, ConnectionError, OSError):
                    status = Dataset()
                if "Status" not in status:  # Timed out, aborted, or the response was lost.
                    timeouts += 1
                    if attempt == STORE_ATTEMPT_MAX:
                        failed += 1
                    continue
                code = int(status.Status)
                statuses[f"{code:#06x}"] = statuses.get(f"{code:#06x}", 0) + 1
                if code == 0:
                    ok += 1
                elif code & 0xF000 == 0xB000:
                    warnings += 1
                else:
                    failed += 1
                sent_bytes += Path(path).stat().st_size
                break
    finally:
        if assoc.is_established:
            assoc.release()
    ended = time.time()
    print(json.dumps({"start": started, "end": ended, "files": len(paths), "ok": ok, "warnings": warnings,
                      "failed": failed, "timeouts": timeouts, "reassociations": reassociations,
                      "recovered_responses": RECOVERED_RESPONSES,
                      "bytes": sent_bytes, "statuses": statuses}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/scu.py")
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store", help="C-STORE a list of files over one association")
    store.add_argument("--port", type=int, required=True)
    store.add_argument("--aec", required=True)
    store.add_argument("--list", required=True, help="text file, one Part-10 path per line")
    store.add_argument("--context", action="append", required=True, help="SOPClassUID:TransferSyntaxUID")
    args = parser.parse_args(argv)
    if args.command == "store":
        return _store_worker(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())


class PduReader:
    """Whole PDUs read off a plain socket (the raw-socket clients of bench/find_raw.py and
    bench/first_instance.py)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def _fill(self, count: int) -> None:
        while len(self._buffer) < count:
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self._buffer += chunk

    def first_byte(self) -> None:
        self._fill(1)

    def pdu(self) -> tuple[int, bytes]:
        self._fill(6)
        length = int.from_bytes(self._buffer[2:6], "big")
        self._fill(6 + length)
        pdu_type, body = self._buffer[0], bytes(self._buffer[6:6 + length])
        del self._buffer[:6 + length]
        return pdu_type, body
