"""A C-FIND client on a plain blocking socket, to tell the node's time from the client's.

pynetdicom as the SCU spends ~1.9 ms of its own CPU on a one-row C-FIND and its DUL thread
sleeps up to 1 ms between reads when idle (`_run_loop_delay`), so its latencies are partly
the client's. This client encodes each query once, before the clock starts, writes it in one
`sendall` and reads the answer with blocking `recv` calls: it waits only for the node, and
costs little CPU (`time.process_time` of the loop is reported alongside).

    .venv/bin/python bench/find_raw.py --port PORT [--aec PACSNODE] --patient-id ID ...

Used by bench/find_ab.py (`--client raw`) through `find_latency`, which has the shape of
bench/scu.py's. One association (Study Root FIND, Implicit VR Little Endian), queries one
after the other; an answer's end is its first response whose status is not Pending.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import struct
import sys
import time
from pathlib import Path
from typing import Sequence

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scu  # noqa: E402

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.3811.0.1"  # Any UID; this one is pydicom's root.
CONTEXT_ID = 1
MAX_PDU = 65536


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def associate_rq(calling: str, called: str) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Study Root FIND in Implicit VR LE."""
    context = _item(0x20, bytes([CONTEXT_ID, 0, 0, 0]) + _item(0x30, _uid(STUDY_ROOT_FIND))
                    + _item(0x40, _uid(IMPLICIT_VR_LE)))
    user = _item(0x50, _item(0x51, struct.pack(">I", MAX_PDU)) + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID)))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode("ascii") + calling.ljust(16).encode("ascii")
            + bytes(32) + _item(0x10, _uid(APPLICATION_CONTEXT)) + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _implicit(dataset: Dataset) -> bytes:
    encoded = encode(dataset, True, True, False)
    if encoded is None:
        raise ValueError("could not encode the data set")
    return encoded


def _pdv_pdu(control: int, data: bytes) -> bytes:
    return struct.pack(">BBIIBB", 0x04, 0, len(data) + 6, len(data) + 2, CONTEXT_ID, control) + data


def find_request(message_id: int, identifier: Dataset) -> bytes:
    """A C-FIND-RQ's command PDU and identifier PDU, ready to write."""
    command = Dataset()
    command.AffectedSOPClassUID = STUDY_ROOT_FIND
    command.CommandField = 0x0020
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0001
    body = _implicit(command)
    command.CommandGroupLength = len(body)
    return _pdv_pdu(0x03, _implicit(command)) + _pdv_pdu(0x02, _implicit(identifier))


class RawFindClient:
    def __init__(self, aec: str, port: int, host: str = scu.HOST, aet: str = scu.BENCH_AET) -> None:
        self._socket = socket.create_connection((host, port), timeout=60)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = scu.PduReader(self._socket)
        self._socket.sendall(associate_rq(aet, aec))
        pdu_type, body = self._reader.pdu()
        if pdu_type != 0x02:
            raise ConnectionError(f"association not accepted (PDU type {pdu_type:#04x})")
        self._message_id = 0

    def find(self, identifier: bytes | Dataset) -> tuple[int, int]:
        """(final status, Pending responses) of one C-FIND."""
        self._message_id += 1
        request = find_request(self._message_id, identifier) if isinstance(identifier, Dataset) else identifier
        self._socket.sendall(request)
        return self.read_answer()

    def read_answer(self) -> tuple[int, int]:
        pending = 0
        command = bytearray()
        while True:
            pdu_type, body = self._reader.pdu()
            if pdu_type != 0x04:
                raise ConnectionError(f"unexpected PDU type {pdu_type:#04x}")
            offset = 0
            while offset < len(body):
                item_length = struct.unpack_from(">I", body, offset)[0]
                control = body[offset + 5]
                value = body[offset + 6:offset + 4 + item_length]
                offset += 4 + item_length
                if not control & 0x01:
                    continue  # An identifier fragment: not read.
                command += value
                if not control & 0x02:
                    continue
                status = _status_of(bytes(command))
                command.clear()
                if status in (0xFF00, 0xFF01):
                    pending += 1
                else:
                    return status, pending

    def release(self) -> None:
        try:
            self._socket.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
            self._reader.pdu()
        finally:
            self._socket.close()


def _status_of(command: bytes) -> int:
    """Status (0000,0900) of an implicit VR little endian command set."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        if group == 0 and element == 0x0900:
            return int(struct.unpack_from("<H", command, offset + 8)[0])
        offset += 8 + length
    raise ValueError("response without a Status")


def find_latency(aec: str, port: int, queries: Sequence[tuple[str, Dataset]]) -> dict[str, scu.FindResult]:
    """bench/scu.py's find_latency over this client: per-query latency, one association.
    Each request is encoded before its clock starts."""
    client = RawFindClient(aec, port)
    results: dict[str, scu.FindResult] = {}
    try:
        for number, (kind, query) in enumerate(queries, start=1):
            result = results.setdefault(kind, scu.FindResult())
            request = find_request(number, query)
            started = time.perf_counter()
            client._socket.sendall(request)
            final, matched = client.read_answer()
            elapsed_ms = (time.perf_counter() - started) * 1000
            result.statuses[f"{final:#06x}"] = result.statuses.get(f"{final:#06x}", 0) + 1
            if final != 0:
                result.failures += 1
                continue
            result.latencies_ms.append(elapsed_ms)
            result.matches.append(matched)
    finally:
        client.release()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aec", default="PACSNODE")
    parser.add_argument("--patient-id", action="append", default=[])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    queries = [("patient-id", scu.study_query(PatientID=value)) for value in args.patient_id] * args.repeat
    started = time.process_time()
    result = find_latency(args.aec, args.port, queries)
    used_ms = (time.process_time() - started) * 1000 / max(1, len(queries))
    for kind, found in result.items():
        latencies = sorted(found.latencies_ms)
        print(f"{kind}: {len(latencies)} answers, p50 {latencies[len(latencies) // 2]:.2f} ms, "
              f"matches {sum(found.matches)}, failures {found.failures}, client CPU {used_ms:.3f} ms a query")
    return 0



def findscu_latency(aec: str, port: int, queries: Sequence[tuple[str, Dataset]],
                    workdir: Path) -> dict[str, scu.FindResult]:
    """dcmtk's findscu as the client: every query of a kind as a query file, all sent over
    one association by one findscu run. findscu reports no per-query time, so each kind's
    FindResult holds one latency: the run's wall time less a one-query run's (association
    set-up, process start), over the other queries: a mean, not a p50."""
    from pydicom.dataset import FileMetaDataset

    workdir.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list[Path]] = {}
    for number, (kind, query) in enumerate(queries):
        query = query.copy()
        query.file_meta = FileMetaDataset()
        query.file_meta.MediaStorageSOPClassUID = STUDY_ROOT_FIND
        query.file_meta.MediaStorageSOPInstanceUID = f"2.25.{number + 1}"
        query.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        path = workdir / f"query-{number:05d}.dcm"
        query.save_as(path, enforce_file_format=True)
        by_kind.setdefault(kind, []).append(path)
    results: dict[str, scu.FindResult] = {}
    for kind, paths in by_kind.items():
        result = results.setdefault(kind, scu.FindResult())

        def run(files: list[Path]) -> float:
            command = ["findscu", "-S", "-aet", scu.BENCH_AET, "-aec", aec, scu.HOST, str(port), *map(str, files)]
            started = time.perf_counter()
            done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            elapsed_s = time.perf_counter() - started
            if done.returncode != 0:
                result.failures += 1
            return elapsed_s

        one = min(run(paths[:1]) for _ in range(3))
        whole = run(paths)
        if len(paths) > 1:
            result.latencies_ms.append(max(0.0, whole - one) * 1000 / (len(paths) - 1))
        result.statuses["findscu"] = len(paths)
    return results


if __name__ == "__main__":
    sys.exit(main())
