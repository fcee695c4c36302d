"""Cluster benchmark (by hand, not CI): a 3-node cluster on loopback vs a single node, in one run.

    .venv/bin/python bench/cluster.py [--instances 400] [--rows 256]

For each setup (single node; 3 nodes N=3 W=2; 3 nodes N=2 W=1): storescu ingest through
one node (instances/s, MB/s, CPU-seconds per stored instance summed over every node
process), C-FIND STUDY latency p50/p99 over one pynetdicom association at every setup,
and for the clusters C-GET of one study from a node without a copy vs from an owner.
Prints a markdown table with ratios against the single node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from integration import clients  # noqa: E402
from integration.clients import identifier  # noqa: E402
from integration.test_cluster import expected_owners, local_sop_uids  # noqa: E402

from pacsnode.sim import datagen  # noqa: E402
from pacsnode.sim.process import NodeProcess, wait_until  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(root: Path, names: tuple[str, ...], extra: list[str]) -> list[NodeProcess]:
    nodes: list[NodeProcess] = []
    for name in names:
        seeds = [nodes[0].peer_address] if nodes else []
        node = NodeProcess(root / name, node_id=name, seeds=seeds,
                           extra_args=["--profile", "local", "--log-level", "WARNING", *extra])
        nodes.append(node.start())
    time.sleep(3)
    return nodes


def run_setup(label: str, names: tuple[str, ...], extra: list[str], data: Path,
              manifest: list[datagen.ManifestEntry], work: Path) -> dict[str, object]:
    root = work / label.replace(" ", "_").replace("=", "")
    root.mkdir(parents=True, exist_ok=True)
    nodes = start(root, names, extra)
    try:
        cpu_before = sum(cpu_seconds(n.process.pid) for n in nodes if n.process)
        started = time.monotonic()
        result, acked = clients.storescu(nodes[0].dicom_port, [data], extra=["+sd", "+r"])
        elapsed = time.monotonic() - started
        # Let background copies (N > W) land before counting CPU.
        time.sleep(2)
        cpu = sum(cpu_seconds(n.process.pid) for n in nodes if n.process) - cpu_before
        size = sum(e["size"] for e in manifest)
        row: dict[str, object] = {
            "setup": label, "stored": len(acked), "instances_per_s": len(acked) / elapsed,
            "mb_per_s": size / elapsed / 1e6, "cpu_s_per_instance": cpu / max(1, len(acked)),
        }
        latencies = []
        for _ in range(50):
            t0 = time.perf_counter()
            found, status = clients.find(nodes[-1].dicom_port, identifier(
                "STUDY", PatientID=manifest[0]["patient_id"], StudyInstanceUID=""))
            latencies.append((time.perf_counter() - t0) * 1000)
        latencies.sort()
        row["find_p50_ms"] = statistics.median(latencies)
        row["find_p99_ms"] = latencies[int(0.99 * (len(latencies) - 1))]
        study_uid = manifest[0]["study_uid"]
        entries = [e for e in manifest if e["study_uid"] == study_uid]
        contexts = [(e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries]
        study_bytes = sum(e["size"] for e in entries)
        holders = [n for n in nodes if local_sop_uids(n.peer_address, study_uid)]
        others = [n for n in nodes if n not in holders]
        for kind, pool in (("owner", holders), ("non_owner", others)):
            if not pool:
                continue
            t0 = time.perf_counter()
            got = clients.get(pool[0].dicom_port, identifier("STUDY", StudyInstanceUID=study_uid), contexts)
            row[f"get_{kind}_mb_per_s"] = study_bytes / (time.perf_counter() - t0) / 1e6
            row[f"get_{kind}_ok"] = len(got.received) == len(entries)
        return row
    finally:
        for node in nodes:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacsnode-cluster-bench-"))
    try:
        per_study = 20
        spec = datagen.StudySetSpec(patients=max(1, args.instances // per_study), series_per_study=2,
                                    instances_per_series=per_study // 2, rows=args.rows, cols=args.rows, seed=77)
        manifest = datagen.write_study_set(spec, work / "data")
        rows = [
            run_setup("single node", ("s1",), [], work / "data", manifest, work),
            run_setup("3 nodes N=3 W=2", ("a1", "a2", "a3"), ["--replication-factor", "3", "--write-quorum", "2"],
                      work / "data", manifest, work),
            run_setup("3 nodes N=2 W=1", ("b1", "b2", "b3"), ["--replication-factor", "2", "--write-quorum", "1"],
                      work / "data", manifest, work),
        ]
        base = rows[0]
        print(f"\n{len(manifest)} instances, {args.rows}x{args.rows} 16-bit, storescu x1 through the first node; "
              "C-FIND at the last node; 2 cores shared by clients and every node\n")
        print("| setup | inst/s | MB/s | vs single | CPU-s/inst (all nodes) | C-FIND p50 ms | p99 ms | "
              "C-GET owner MB/s | C-GET non-owner MB/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['setup']} | {row['instances_per_s']:.1f} | {row['mb_per_s']:.1f} | "
                  f"{row['instances_per_s'] / base['instances_per_s']:.2f} | {row['cpu_s_per_instance']:.4f} | "
                  f"{row['find_p50_ms']:.1f} | {row['find_p99_ms']:.1f} | "
                  f"{row.get('get_owner_mb_per_s', 0):.1f} | {row.get('get_non_owner_mb_per_s', 0):.1f} |")
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(rows, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
