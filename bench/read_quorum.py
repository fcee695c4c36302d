"""What read_quorum and scatter_read_quorum cost (by hand, not CI): C-FIND and C-GET on 5 real nodes, R=1 vs R=2.

    .venv/bin/python bench/read_quorum.py [--quorums 1,2] [--studies 12] [--per-study 20]
                                          [--repeats 30] [--fault pause|kill] [--fault-s 24]
                                          [--after-s 16] [--rounds 1]

For each R: five `pacsnode start` processes on loopback (NodeProcess, as bench/cluster.py;
N=3 W=2, `--read-quorum R --scatter-read-quorum R`, every other setting at its default:
strict writes, membership profile lan), a study set stored through the first node with
storescu, then one target study read through a node that does not own it (the usual
case of a viewer's node) in three phases:

- quiet: as soon as every node sees the 5 members alive (with strict writes, the
  default, no fault window applies: read_fault_window_ms is for sloppy writes only);
- fault: one owner of the study (the first the entry node asks) is paused with SIGSTOP
  (or killed with --fault kill) for --fault-s seconds, reads going on all the while;
- after: the owner is back (SIGCONT / restarted).

Operations, one association each (as a viewer opens them): C-FIND STUDY level by
StudyInstanceUID (routed to the study's owners: read_quorum of them), C-FIND STUDY level
by PatientID (no study key: a scatter, scatter_read_quorum owners per token range; complete
when every study of the patient is there with its count), and C-GET of the study. For each: latency p50/p95, answers that were Success and complete, flagged
(0xC001 / 0xB000: a shortfall said, never Success), stale (Success but incomplete: must
be 0), and peer requests per request: the entry node's remote queries + remote fetches
(+ read-repair copies), from its /metrics (pacsnode_replication_query_peers,
_fetch_peers, _read_repairs) before and after each block. The phases' operations are
interleaved (find-study, find-patient, get, again) so each samples the whole phase.

Prints a markdown table and writes bench/results/read-quorum-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from integration import clients  # noqa: E402
from integration.clients import identifier  # noqa: E402
from integration.test_cluster import local_sop_uids  # noqa: E402

from pacsnode.ring.placement import Member, Ring  # noqa: E402
from pacsnode.sim import datagen  # noqa: E402
from pacsnode.sim.process import NodeProcess, wait_until  # noqa: E402

NAMES = ("q1", "q2", "q3", "q4", "q5")
N = 3
PEER_COUNTERS = ("pacsnode_replication_query_peers_total", "pacsnode_replication_fetch_peers_total",
                 "pacsnode_replication_read_repairs_total")
OPS = ("find-study", "find-patient", "get")


def metric_values(node: NodeProcess) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(pacsnode_[a-z_]+)\s+([0-9.eE+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def peer_requests(node: NodeProcess) -> float:
    values = metric_values(node)
    return sum(values.get(name, 0.0) for name in PEER_COUNTERS)


@dataclass
class Sample:
    op: str
    ms: float
    outcome: str  # ok | flagged | stale | failed
    status: int
    peers: float


@dataclass
class Phase:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def row(self, op: str) -> dict[str, Any]:
        mine = [s for s in self.samples if s.op == op]
        ms = sorted(s.ms for s in mine)
        return {
            "n": len(mine),
            "p50_ms": statistics.median(ms) if ms else None,
            "p95_ms": ms[min(len(ms) - 1, int(0.95 * len(ms)))] if ms else None,
            "ok": sum(1 for s in mine if s.outcome == "ok"),
            "flagged": sum(1 for s in mine if s.outcome == "flagged"),
            "stale": sum(1 for s in mine if s.outcome == "stale"),
            "failed": sum(1 for s in mine if s.outcome == "failed"),
            "peers_per_request": statistics.mean(s.peers for s in mine) if mine else None,
        }


@dataclass
class Target:
    study_uid: str
    patient_id: str
    sop_uids: set[str]
    contexts: list[tuple[str, str]]
    patient_studies: dict[str, int]  # Every study of the patient: its instance count.


def one_op(op: str, entry: NodeProcess, target: Target) -> tuple[str, int]:
    """(outcome, final status) of one operation through `entry`."""
    if op == "get":
        got = clients.get(entry.dicom_port, identifier("STUDY", StudyInstanceUID=target.study_uid), target.contexts)
        if got.final_status == 0x0000:
            return ("ok" if set(got.received) >= target.sop_uids else "stale"), got.final_status
        return ("flagged" if got.final_status in (0xB000, 0xA702) else "failed"), got.final_status
    if op == "find-study":
        keys = identifier("STUDY", StudyInstanceUID=target.study_uid, NumberOfStudyRelatedInstances="")
    else:
        keys = identifier("STUDY", PatientID=target.patient_id, StudyInstanceUID="", NumberOfStudyRelatedInstances="")
    found, status = clients.find(entry.dicom_port, keys)
    if status == 0x0000:
        counts = {str(d.StudyInstanceUID): int(d.get("NumberOfStudyRelatedInstances", 0) or 0) for d in found}
        wanted = target.patient_studies if op == "find-patient" else {target.study_uid: len(target.sop_uids)}
        complete = all(counts.get(uid, 0) >= count for uid, count in wanted.items())
        return ("ok" if complete else "stale"), status
    return ("flagged" if status == 0xC001 else "failed"), status


def run_phase(name: str, entry: NodeProcess, target: Target, *, repeats: int | None = None,
              until: Callable[[], bool] | None = None) -> Phase:
    """Interleave the operations `repeats` times, or until `until()`."""
    phase = Phase(name)
    turn = 0
    while (repeats is not None and turn < repeats) or (until is not None and not until()):
        turn += 1
        for op in OPS:
            before = peer_requests(entry)
            t0 = time.perf_counter()
            try:
                outcome, status = one_op(op, entry, target)
            except (AssertionError, OSError, RuntimeError) as error:  # Association refused or broken.
                print(f"  {name} {op}: {type(error).__name__}: {error}", flush=True)
                outcome, status = "failed", -1
            ms = (time.perf_counter() - t0) * 1000
            phase.samples.append(Sample(op, ms, outcome, status, peer_requests(entry) - before))
    return phase


def start_cluster(root: Path, read_quorum: int) -> list[NodeProcess]:
    nodes: list[NodeProcess] = []
    try:
        for name in NAMES:
            seeds = [nodes[0].peer_address] if nodes else []
            node = NodeProcess(root / name, node_id=name, seeds=seeds,
                               extra_args=["--log-level", "WARNING",
                                           "--replication-factor", str(N), "--write-quorum", "2",
                                           "--read-quorum", str(read_quorum),
                                           "--scatter-read-quorum", str(read_quorum),
                                           "--token-salt", "0"])  # The ring expected owners come from.
            node.start(timeout_s=120)  # A loaded machine starts a node slowly.
            nodes.append(node)
        if not wait_until(lambda: all(_alive_members(n) == len(NAMES) for n in nodes), 120, 0.5):
            raise RuntimeError("the cluster did not form within 120 s")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _alive_members(node: NodeProcess) -> int:
    text = httpx.get(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).text
    match = re.search(r'^pacsnode_ring_members\{state="alive"\}\s+([0-9.]+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


def owners_in_order(study_uid: str, holders: set[str]) -> list[str]:
    """The study's owners in ring order (the order a non-owner asks them, one site)."""
    ring = Ring("pacsnode", [Member(node_id=name, host=socket.gethostname()) for name in NAMES])
    owners = list(ring.owners_of_study(study_uid, N))
    if set(owners) != holders:
        print(f"  note: ring order {owners} differs from the holders {sorted(holders)}; using the holders",
              flush=True)
        return sorted(holders)
    return owners


def run_quorum(read_quorum: int, args: argparse.Namespace, data: Path, manifest: list[datagen.ManifestEntry],
               work: Path) -> dict[str, Any]:
    root = work / f"r{read_quorum}"
    root.mkdir(parents=True, exist_ok=True)
    nodes = start_cluster(root, read_quorum)
    try:
        code, acked = clients.storescu(nodes[0].dicom_port, [data], extra=["+sd", "+r"])
        if len(acked) != len(manifest):
            raise RuntimeError(f"storescu stored {len(acked)} of {len(manifest)} (exit {code.returncode})")
        study_uid = manifest[0]["study_uid"]
        entries = [e for e in manifest if e["study_uid"] == study_uid]
        patient_studies: dict[str, int] = {}
        for e in manifest:
            if e["patient_id"] == entries[0]["patient_id"]:
                patient_studies[e["study_uid"]] = patient_studies.get(e["study_uid"], 0) + 1
        target = Target(study_uid, entries[0]["patient_id"], {e["sop_uid"] for e in entries},
                        [(e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries], patient_studies)
        by_name = {n.node_id: n for n in nodes}
        wait_until(lambda: sum(1 for n in nodes if local_sop_uids(n.peer_address, study_uid) == target.sop_uids) >= N,
                   60, 0.5)
        holders = {n.node_id for n in nodes if local_sop_uids(n.peer_address, study_uid) == target.sop_uids}
        owners = owners_in_order(study_uid, holders)
        entry = next(n for n in nodes if n.node_id not in holders)
        victim = by_name[owners[0]]
        print(f"R={read_quorum}: {len(acked)} stored; study of {len(entries)} instances on {owners}; entry "
              f"{entry.node_id}; fault on {victim.node_id}", flush=True)
        load = os.getloadavg()[0]
        quiet = run_phase("quiet", entry, target, repeats=args.repeats)
        print("  quiet done", flush=True)
        if args.fault == "pause":
            victim.pause()
        else:
            victim.kill()
        fault_ends = time.monotonic() + args.fault_s
        fault = run_phase("fault", entry, target, until=lambda: time.monotonic() >= fault_ends)
        if args.fault == "pause":
            victim.resume()
        else:
            victim.start()
        print("  fault done", flush=True)
        after_ends = time.monotonic() + args.after_s
        after = run_phase("after", entry, target, until=lambda: time.monotonic() >= after_ends)
        phases = [quiet, fault, after]
        return {"read_quorum": read_quorum, "entry": entry.node_id, "owners": owners, "victim": victim.node_id,
                "instances": len(entries), "load_1min_before_quiet": load, "load_1min_at_end": os.getloadavg()[0],
                "phases": {p.name: {op: p.row(op) for op in OPS} for p in phases},
                "samples": {p.name: [vars(s) for s in p.samples] for p in phases}}
    finally:
        for node in nodes:
            node.resume()
            node.stop()


PHASE_TEXT = {"quiet": "quiet", "fault": "owner {fault}d", "after": "owner back"}


def table(results: list[dict[str, Any]], fault: str) -> str:
    lines = ["| R (read_quorum = scatter_read_quorum) | phase | operation | n | p50 ms | p95 ms | ok | flagged | stale | peer requests / request |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for phase, rows in result["phases"].items():
            for op, row in rows.items():
                p50 = f"{row['p50_ms']:.0f}" if row["p50_ms"] is not None else "-"
                p95 = f"{row['p95_ms']:.0f}" if row["p95_ms"] is not None else "-"
                peers = f"{row['peers_per_request']:.1f}" if row["peers_per_request"] is not None else "-"
                name = PHASE_TEXT[phase].format(fault=fault)
                lines.append(f"| {result['read_quorum']} | {name} | {op} | "
                             f"{row['n']} | {p50} | {p95} | {row['ok']} | {row['flagged']} | "
                             f"**{row['stale']}** | {peers} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quorums", default="1,2", help="R values (read_quorum and scatter_read_quorum), run in turn")
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--per-study", type=int, default=20, help="instances per study (2 series)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="rounds of the three operations when quiet")
    parser.add_argument("--fault", choices=("pause", "kill"), default="pause")
    parser.add_argument("--fault-s", type=float, default=24.0)
    parser.add_argument("--after-s", type=float, default=16.0)
    parser.add_argument("--rounds", type=int, default=1, help="run every R this many times, in turn")
    args = parser.parse_args()
    os.environ["TCP_NODELAY"] = "1"
    work = Path(tempfile.mkdtemp(prefix="pacsnode-rq-bench-"))
    try:
        # Two studies per patient, so a PatientID C-FIND has two rows to find.
        spec = datagen.StudySetSpec(patients=max(1, args.studies // 2), studies_per_patient=2, series_per_study=2,
                                    instances_per_series=max(1, args.per_study // 2), rows=args.rows,
                                    cols=args.rows, seed=16)
        manifest = datagen.write_study_set(spec, work / "data")
        results = []
        for round_ in range(args.rounds):
            for quorum in (int(q) for q in args.quorums.split(",")):
                results.append(run_quorum(quorum, args, work / "data", manifest, work / f"round{round_}"))
        print(f"\n5 nodes, N=3 W=2, default settings (profile lan); {len(manifest)} instances ({args.rows}x{args.rows}) in "
              f"{len({e['study_uid'] for e in manifest})} studies; one study of {results[0]['instances']} read "
              f"through a node that does not own it; fault: an owner {args.fault}d for {args.fault_s:.0f} s; "
              f"2 cores shared with other work (noisy); 1-min load "
              + ", ".join(f"R={r['read_quorum']}: {r['load_1min_before_quiet']:.1f} at start, {r['load_1min_at_end']:.1f} "
                          f"at end" for r in results) + "\n")
        print(table(results, args.fault))
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = out / f"read-quorum-{stamp}.json"
        path.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        print(f"\n{path.relative_to(ROOT)}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
