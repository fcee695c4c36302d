"""Time to the first retrieved instance, stage by stage, from a plain socket (issue 10).

    .venv/bin/python bench/first_instance.py [--rounds 40] [--pacsnode PYTHON ...] [--no-orthanc]

Starts Orthanc and one pacsnode per `--pacsnode PYTHON` (the Python of a tree's venv, e.g.
/old/tree/.venv/bin/python; default this tree's), a dcmtk storescp as the C-MOVE
destination, loads each with bench/run.py's `retrieve` study (80 CT 512 x 512, 42 MB) and
then, round by round, each server in turn (order rotating), makes one C-GET and one C-MOVE
of the study from a plain socket with TCP_NODELAY. The PDUs are those pynetdicom sends
(captured once per server, as bench/scu.py echo_pdus does), so the client's own threads and
polls are not in the figures: what is timed is the server.

Stages (client-side perf_counter, p50 over the rounds):
  connect    TCP connect
  associate  A-ASSOCIATE-RQ written -> A-ASSOCIATE-AC read
  request    C-GET-RQ / C-MOVE-RQ written -> first byte of the answer
             (C-GET: the first C-STORE-RQ's first P-DATA; C-MOVE: the first Pending C-MOVE-RSP)
  instance   C-GET only: first byte of the first C-STORE-RQ -> its last data fragment
  first      connect start -> C-GET's first instance complete / C-MOVE's first Pending
  all        connect start -> final response (every C-STORE-RQ of a C-GET answered at once)
and the server's CPU (/proc, user + system, children included) per C-GET and per C-MOVE.

`--abort-after-first`: each association is aborted (A-ABORT) once the first instance is
complete (C-GET) or the first Pending response came (C-MOVE), so that the CPU column and a
profiler attached to the node (`py-spy record --gil --threads -p PID`) see the path to the
first instance (accept, request, locate, first read and send) and the abort, not the other
79 sub-operations; `all` is then not measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_role, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run  # noqa: E402
import scu  # noqa: E402
import servers  # noqa: E402
import workloads  # noqa: E402

GET_STAGES = ("connect", "associate", "request", "instance", "first", "all")
MOVE_STAGES = ("connect", "associate", "request", "first", "all")


def process_cpu_s(pid: int) -> float:
    """User + system CPU of a process and its waited-for children (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def start_pacsnode(parent: Path, python: str, name: str, destinations: dict[str, tuple[str, int]]) -> servers.Server:
    """bench/servers.py start_pacsnode, with the tree's own Python (an A/B of trees)."""
    work_dir = servers._make_work_dir(parent, name)
    port = servers.free_port()
    command = [python, "-m", "pacsnode.cli.main", "start", "--data-dir", str(work_dir / "data"), "--dicom-port",
               str(port), "--host", servers.HOST, "--ae-title", servers.PACSNODE_AET, "--peer-port",
               str(servers.free_port()), "--http-port", str(servers.free_port())]
    for aet, (host, destination_port) in destinations.items():
        command += ["--destination", f"{aet}={host}:{destination_port}"]
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    process = servers._spawn(command, work_dir / "pacsnode.log", env, work_dir)
    server = servers.Server(name, servers.PACSNODE_AET, port, process, work_dir, work_dir / "pacsnode.log", command)
    servers.wait_port(server, timeout_s=90)
    return server


def captured_pdus(server: servers.Server, study_uid: str, sop_classes: list[str], move_to: str | None) -> list[bytes]:
    """The A-ASSOCIATE-RQ and the C-GET-RQ / C-MOVE-RQ P-DATA-TF(s) pynetdicom sends this
    server (bench/scu.py's get_study / move_study contexts)."""
    sent: list[bytes] = []
    ae = scu._new_ae()
    roles = []
    if move_to is None:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class in sop_classes:
            ae.add_requested_context(sop_class)
            roles.append(build_role(sop_class, scp_role=True))
    else:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    handlers = [(evt.EVT_DATA_SENT, lambda event: sent.append(bytes(event.data))),
                (evt.EVT_C_STORE, lambda event: 0x0000)]
    assoc = scu._associate(ae, server.aet, server.port, handlers=handlers, ext_neg=roles or None)
    try:
        if move_to is None:
            responses = assoc.send_c_get(scu._retrieve_query(study_uid), StudyRootQueryRetrieveInformationModelGet)
        else:
            responses = assoc.send_c_move(scu._retrieve_query(study_uid), move_to,
                                          StudyRootQueryRetrieveInformationModelMove)
        for _status, _identifier in responses:
            pass
    finally:
        if assoc.is_established:
            assoc.release()
    # The A-ASSOCIATE-RQ, then the request's command and identifier P-DATA-TFs.
    request = [pdu for pdu in sent[1:] if pdu[0] == 0x04]
    return [sent[0], *request[:2]]


def pdvs(body: bytes) -> list[tuple[int, int, bytes]]:
    """(context id, message control header, fragment) of each PDV of a P-DATA-TF body."""
    items, offset = [], 0
    while offset < len(body):
        length = int.from_bytes(body[offset:offset + 4], "big")
        items.append((body[offset + 4], body[offset + 5], body[offset + 6:offset + 4 + length]))
        offset += 4 + length
    return items


def store_response(context_id: int, command: Dataset) -> bytes:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = command.MessageID
    primitive.AffectedSOPClassUID = command.AffectedSOPClassUID
    primitive.AffectedSOPInstanceUID = command.AffectedSOPInstanceUID
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return b"".join(pdu.encode() for pdu in (p for p in _pdus(message, context_id)))


def _pdus(message: Any, context_id: int) -> Any:
    from pynetdicom.pdu import P_DATA_TF
    for primitive in message.encode_msg(context_id, 16382):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        yield pdu


A_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def retrieve_round(port: int, pdus: list[bytes], *, get: bool, times: dict[str, list[float]],
                   abort_after_first: bool = False) -> int:
    """One association: the request, every answer read (C-STOREs answered), released.
    Returns the C-STORE-RQs received (C-GET) or the final response's completed
    sub-operations (C-MOVE); with `abort_after_first`, -1 once the first instance is in
    (the association aborted)."""
    clock = time.perf_counter
    started = clock()
    counted = 0
    with socket.create_connection((servers.HOST, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = scu.PduReader(sock)
        mark = clock()
        times["connect"].append(mark - started)
        sock.sendall(pdus[0])
        if reader.pdu()[0] != 0x02:
            raise RuntimeError("association not accepted")
        now = clock()
        times["associate"].append(now - mark)
        sock.sendall(b"".join(pdus[1:]))
        mark = clock()
        reader.first_byte()
        now = clock()
        times["request"].append(now - mark)
        answer_start, command, first_done = now, bytearray(), False
        while True:
            pdu_type, body = reader.pdu()
            if pdu_type != 0x04:
                raise RuntimeError(f"unexpected PDU {pdu_type:#x}")
            for context_id, header, fragment in pdvs(body):
                if header & 1:
                    command += fragment
                    if not header & 2:
                        continue
                    decoded = decode(BytesIO(bytes(command)), True, True)
                    command = bytearray()
                    field = int(decoded.CommandField)
                    if field == 0x0001:  # C-STORE-RQ: its data set follows.
                        pending_store = (context_id, decoded)
                        counted += 1
                    elif int(decoded.Status) in (0xFF00, 0xFF01):
                        if not get and not first_done:
                            first_done = True
                            times["first"].append(clock() - started)
                            if abort_after_first:
                                sock.sendall(A_ABORT)
                                return -1
                    else:
                        times["all"].append(clock() - started)
                        if not get:
                            counted = int(decoded.get("NumberOfCompletedSuboperations", 0) or 0)
                        sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
                        reader.pdu()
                        return counted
                elif header & 2:  # Last fragment of a C-STORE's data set.
                    if not first_done:
                        first_done = True
                        now = clock()
                        times["instance"].append(now - answer_start)
                        times["first"].append(now - started)
                        if abort_after_first:
                            sock.sendall(A_ABORT)
                            return -1
                    sock.sendall(store_response(*pending_store))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--pacsnode", action="append", default=[], help="Python of a tree's venv (repeatable)")
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument("--only", choices=("get", "move"), default=None)
    parser.add_argument("--abort-after-first", action="store_true",
                        help="abort each association at its first instance (CPU and profile of that path)")
    args = parser.parse_args()
    pythons = args.pacsnode or [str(BENCH_DIR.parent / ".venv" / "bin" / "python")]
    work = BENCH_DIR / "work"
    root, manifest = run.prepare_dataset("retrieve", run.dataset_specs(run.FULL)["retrieve"], work / "data")
    study_uid, expected = manifest[0]["study_uid"], len(manifest)
    sop_classes = sorted({entry["sop_class_uid"] for entry in manifest})
    parent = Path(tempfile.mkdtemp(prefix="first-instance-", dir=work))
    started: dict[str, servers.Server] = {}
    times: dict[tuple[str, str], dict[str, list[float]]] = {}
    cpu: dict[tuple[str, str], float] = {}
    loads: list[float] = []
    kinds = [args.only] if args.only else ["get", "move"]
    destination = servers.start_storescp(parent)
    try:
        destinations = {servers.STORESCP_AET: (servers.HOST, destination.port)}
        for index, python in enumerate(pythons):
            started[f"pacsnode{index}"] = start_pacsnode(parent, python, f"pacsnode{index}", destinations)
        if not args.no_orthanc:
            started["orthanc"] = servers.start_orthanc(parent, destinations=destinations)
        pdus: dict[tuple[str, str], list[bytes]] = {}
        for name, server in started.items():
            load = workloads.store_dcmtk(server, manifest, root / "files", 1, test="load", nodelay=True,
                                         log_dir=parent)
            if not load.ok:
                raise SystemExit(f"{name}: loading the study failed: {load.notes}")
            pdus[(name, "get")] = captured_pdus(server, study_uid, sop_classes, None)
            pdus[(name, "move")] = captured_pdus(server, study_uid, sop_classes, servers.STORESCP_AET)
        names = list(started)
        print("rounds start; server PIDs: " + ", ".join(f"{name}={server.process.pid}" for name, server in started.items()),
              flush=True)
        for round_index in range(args.rounds):
            loads.append(os.getloadavg()[0])
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                server = started[name]
                for kind in kinds:
                    stages = times.setdefault((name, kind), {stage: [] for stage in GET_STAGES})
                    before = process_cpu_s(server.process.pid)
                    count = retrieve_round(server.port, pdus[(name, kind)], get=kind == "get", times=stages,
                                           abort_after_first=args.abort_after_first)
                    if args.abort_after_first:
                        time.sleep(0.05)  # The server's teardown of the aborted association, in its CPU.
                    cpu[(name, kind)] = cpu.get((name, kind), 0.0) + process_cpu_s(server.process.pid) - before
                    if count != (-1 if args.abort_after_first else expected):
                        raise SystemExit(f"{name}: C-{kind.upper()} gave {count} of {expected} instances")
    finally:
        for server in started.values():
            server.stop()
        destination.stop()
        shutil.rmtree(parent, ignore_errors=True)
    print(f"rounds {args.rounds}; load average (1 min) {min(loads):.2f}-{max(loads):.2f}; servers: "
          + ", ".join(f"{name}={' '.join(started[name].command[:1])}" for name in names))
    for kind in kinds:
        stages = GET_STAGES if kind == "get" else MOVE_STAGES
        print(f"\nC-{kind.upper()}, p50 ms (server CPU ms per retrieve, /proc)")
        print("| server | " + " | ".join(stages) + " | CPU |")
        print("|---" * (len(stages) + 2) + "|")
        for name in names:
            values = times[(name, kind)]
            cells = [f"{statistics.median(values[stage]) * 1000:.2f}" if values[stage] else "-" for stage in stages]
            print(f"| {name} | " + " | ".join(cells) + f" | {cpu[(name, kind)] / args.rounds * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
