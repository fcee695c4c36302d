"""Association turn-around of one node, stage by stage: bench/run.py's raw-PDU echo row
(pynetdicom's A-ASSOCIATE-RQ, the C-ECHO's P-DATA-TF and A-RELEASE-RQ from a plain socket
with TCP_NODELAY, each sent when the previous answer is in), with the client-side time of
each stage and the node's CPU per association from /proc (the node process and its
children: the DICOM workers with `--dicom-workers`).

    .venv/bin/python bench/assoc_turnaround.py                         # 600 rounds, one process
    .venv/bin/python bench/assoc_turnaround.py --rounds 1000 --node-args="--dicom-workers 2"
    .venv/bin/python bench/assoc_turnaround.py --pacsnode /old/tree/.venv/bin/pacsnode --pacsnode .venv/bin/pacsnode

With several --pacsnode (A/B of trees), one node of each runs at once and the rounds go to
them in turn, `--block` rounds at a time, so that each sees the same machine load.

Stages: `associate` A-ASSOCIATE-RQ written -> A-ASSOCIATE-AC read; `echo` P-DATA-TF
written -> the C-ECHO-RSP read; `release` A-RELEASE-RQ written -> A-RELEASE-RP read;
`close` -> the node's end of the connection (EOF); `connect` the TCP connect. The round is
all of them. Prints p50/p90 of each and the node CPU per association, with the load.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pacsnode.sim.process import NodeProcess, pacsnode_command, wait_until

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import scu  # noqa: E402
from workers import _children, _cpu_s  # noqa: E402

STAGES = ("connect", "associate", "echo", "release", "close", "round")


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def one_round(port: int, pdus: list[bytes], times: dict[str, list[float]]) -> bool:
    clock = time.perf_counter
    started = clock()
    with socket.create_connection((scu.HOST, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mark = clock()
        times["connect"].append(mark - started)
        answers = []
        for stage, pdu in zip(("associate", "echo", "release"), pdus):
            sock.sendall(pdu)
            answers.append(scu._read_pdu(sock))
            now = clock()
            times[stage].append(now - mark)
            mark = now
        eof = sock.recv(1) == b""
        now = clock()
        times["close"].append(now - mark)
        times["round"].append(now - started)
    return tuple(answers) == scu.RAW_ECHO_ANSWERS and eof


class _Node(NodeProcess):
    def __init__(self, command: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command = command

    @property
    def args(self) -> list[str]:
        return [self.command, *super().args[len(pacsnode_command()):]]


def _report(name: str, times: dict[str, list[float]], rounds: int, cpu: float | None, failures: int,
            load: str) -> None:
    parts = [f"{stage} {1000 * _percentile(times[stage], 0.5):.3f}/{1000 * _percentile(times[stage], 0.9):.3f}"
             for stage in STAGES]
    print(f"{name}: p50/p90 ms " + ", ".join(parts)
          + (f"; node CPU {1000 * cpu / rounds:.2f} ms per association" if cpu is not None else "")
          + f"; failures {failures}; load {load}", flush=True)


def compare(commands: list[str], args: argparse.Namespace, scratch: Path) -> None:
    extra = shlex.split(args.node_args)
    nodes = [_Node(command, scratch / f"node{index}", node_id=f"bench-{index}", extra_args=extra).start()
             for index, command in enumerate(commands)]
    try:
        pdus = scu.echo_pdus("PACSNODE", nodes[0].dicom_port)
        times = [{stage: [] for stage in STAGES} for _ in nodes]
        cpu = [0.0 for _ in nodes]
        failures = [0 for _ in nodes]
        for node in nodes:
            for _ in range(args.warm_up):
                one_round(node.dicom_port, pdus, {stage: [] for stage in STAGES})
        load0 = os.getloadavg()[0]
        done = 0
        while done < args.rounds:
            block = min(args.block, args.rounds - done)
            for index, node in enumerate(nodes):
                assert node.process is not None
                pids = [node.process.pid, *_children(node.process.pid)]
                cpu0 = _cpu_s(pids)
                for _ in range(block):
                    failures[index] += not one_round(node.dicom_port, pdus, times[index])
                time.sleep(0.05)
                cpu[index] += _cpu_s(pids) - cpu0
            done += block
        load = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
        for index, command in enumerate(commands):
            _report(f"{command} {args.node_args}".strip(), times[index], args.rounds, cpu[index], failures[index],
                    load)
    finally:
        for node in nodes:
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--warm-up", type=int, default=50)
    parser.add_argument("--node-args", default="", help="extra `pacsnode start` arguments (one string)")
    parser.add_argument("--port", type=int, default=0, help="a running node's DICOM port instead of a new node")
    parser.add_argument("--pid", type=int, default=0, help="that node's PID, for its CPU")
    parser.add_argument("--pacsnode", action="append", default=[],
                        help="a `pacsnode` executable (another tree's); several: their nodes in turn")
    parser.add_argument("--block", type=int, default=100, help="rounds to one node before the next (--pacsnode)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pacsnode-bench-assoc-"))
    node = None
    try:
        if args.pacsnode:
            compare(args.pacsnode, args, scratch)
            return
        if args.port:
            port, pid = args.port, args.pid
        else:
            extra = shlex.split(args.node_args)
            node = NodeProcess(scratch / "node", node_id="bench-a", extra_args=extra).start()
            assert node.process is not None
            if "--dicom-workers" in extra:
                workers = int(extra[extra.index("--dicom-workers") + 1])
                wait_until(lambda: node.log_text().count("dicom.worker.started") >= workers, 60)
            port, pid = node.dicom_port, node.process.pid
        pdus = scu.echo_pdus("PACSNODE", port)
        warm: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for _ in range(args.warm_up):
            one_round(port, pdus, warm)
        pids = [pid, *_children(pid)] if pid else []
        times: dict[str, list[float]] = {stage: [] for stage in STAGES}
        failures = 0
        load0 = os.getloadavg()[0]
        cpu0 = _cpu_s(pids)
        for _ in range(args.rounds):
            failures += not one_round(port, pdus, times)
        # The node's last close comes before its threads are done with the association.
        time.sleep(0.2)
        cpu = _cpu_s(pids) - cpu0
        _report(args.node_args or "one process", times, args.rounds, cpu if pids else None, failures,
                f"{load0:.1f}-{os.getloadavg()[0]:.1f}")
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
