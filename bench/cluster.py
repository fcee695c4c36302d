"""Cluster benchmark (by hand, not CI): a 3-node cluster on loopback vs a single node, in one run.

    .venv/bin/python bench/cluster.py [--instances 400] [--rows 256] [--setups single,n3w2,n2w1]
                                      [--rounds N] [--data-dir DIR] [--trace DIR] [--node-config TOML]
                                      [--profile DIR] [--senders K] [--dicom-workers K]

--node-config TOML starts every node (of every setup) with `--config TOML`, e.g. a file
holding `blob_file_bytes_min = 1048576` to keep the bench's blobs in RocksDB (one fsync per
copy instead of two).

--data-dir DIR puts every node's data directory (store, RocksDB, blob files, spool) under DIR
instead of the run's temporary directory, e.g. `--data-dir /dev/shm` (tmpfs: fsync costs
almost nothing there), to separate what the code allows from what one shared disk allows
(the three nodes of this bench share one disk; a real cluster's do not).

--trace DIR starts every node with PACSNODE_WRITE_TRACE (node/write_trace.py): each marks
when one instance reaches each step of its write path, and bench/write_trace.py prints the
p50/p90 of every segment (entry node and each owner) for each cluster setup and round.

With --profile DIR, py-spy (`pip install py-spy`, a dev tool) records every node process
during the ingest (`py-spy record --format raw --gil`: the thread holding the GIL, 100 Hz) into
DIR/<setup>-<node>.txt, and bench/profile_summary.py prints where the samples went.
PACSNODE_SPY_RATE=N samples N times a second instead; PACSNODE_SPY_NATIVE=1 adds C frames
(`--native`, which stops each process while sampling): gRPC's own calls show up there.

--senders K sends the set with K storescu processes at once (the files dealt out in turn), all
through the first node; --dicom-workers K starts the first node of every setup (the single
node, and each cluster's entry node) with `--dicom-workers K` (node/dicom_worker.py: the
DICOM front end in K worker processes), the other nodes as they are.

For each setup (single node; 3 nodes N=3 W=2; 3 nodes N=2 W=1): storescu ingest through
one node (instances/s, MB/s, CPU-seconds per stored instance summed over every node
process), C-FIND STUDY latency p50/p99 over one pynetdicom association at every setup,
and for the clusters C-GET of one study from a node without a copy vs from an owner.
Prints a markdown table with ratios against the single node.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
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

from pacsnode.node import write_trace  # noqa: E402
from pacsnode.sim import datagen  # noqa: E402
from pacsnode.sim.process import NodeProcess, wait_until  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_profilers(nodes: list[NodeProcess], label: str, out: Path | None) -> list[subprocess.Popen[bytes]]:
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    profilers = []
    for node in nodes:
        assert node.process is not None
        target = out / f"{label.replace(' ', '_').replace('=', '')}-{node.node_id}.txt"
        profilers.append(subprocess.Popen([spy, "record", "--pid", str(node.process.pid),
                                           "--rate", os.environ.get("PACSNODE_SPY_RATE", "100"),
                                           "--format", "raw", "--output", str(target), "--gil",
                                           *(["--native"] if os.environ.get("PACSNODE_SPY_NATIVE") else ["--nonblocking"])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1)  # py-spy attaches.
    return profilers


def stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT.
    for profiler in profilers:
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.kill()
            profiler.wait()


def start(root: Path, names: tuple[str, ...], extra: list[str], trace: Path | None = None,
          entry_extra: list[str] | None = None) -> list[NodeProcess]:
    nodes: list[NodeProcess] = []
    try:
        for name in names:
            seeds = [nodes[0].peer_address] if nodes else []
            own = (entry_extra or []) if not nodes else []
            node = NodeProcess(root / name, node_id=name, seeds=seeds,
                               extra_args=["--profile", "local", "--log-level", "WARNING", *extra, *own])
            if trace is not None:  # node/write_trace.py: the node process reads it when it starts.
                os.environ[write_trace.ENVIRONMENT] = str(trace / f"{root.name}-{name}")
            nodes.append(node.start())
    finally:
        os.environ.pop(write_trace.ENVIRONMENT, None)
    time.sleep(3)
    return nodes


def node_pids(node: NodeProcess) -> list[int]:
    """The node's process and its children (DIMSE worker processes, dicom_workers > 0)."""
    assert node.process is not None
    pids = [node.process.pid]
    for children in Path(f"/proc/{node.process.pid}/task").glob("*/children"):  # Any thread may have started one.
        try:
            pids += [int(pid) for pid in children.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass  # That thread ended.
    return pids


def node_cpu(node: NodeProcess) -> float:
    total = 0.0
    for pid in node_pids(node):
        try:
            total += cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass  # A worker that ended: its CPU is gone with it (counted while it ran, if at all).
    return total


def send(port: int, data: Path, senders: int) -> list[str]:
    """storescu x `senders` through `port`, the files dealt out in turn; the files acknowledged."""
    if senders <= 1:
        _result, acked = clients.storescu(port, [data], extra=["+sd", "+r"])
        return acked
    files = sorted(str(path) for path in data.rglob("*.dcm"))
    shares = [files[i::senders] for i in range(senders)]
    with concurrent.futures.ThreadPoolExecutor(senders) as pool:
        answers = list(pool.map(lambda share: clients.storescu(port, share)[1], shares))
    return [name for acked in answers for name in acked]


def run_setup(label: str, names: tuple[str, ...], extra: list[str], data: Path,
              manifest: list[datagen.ManifestEntry], work: Path, profile: Path | None = None,
              trace: Path | None = None, senders: int = 1, entry_extra: list[str] | None = None) -> dict[str, object]:
    root = work / label.replace(" ", "_").replace("=", "")
    root.mkdir(parents=True, exist_ok=True)
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
    nodes = start(root, names, extra, trace, entry_extra)
    profilers: list[subprocess.Popen[bytes]] = []
    try:
        profilers = start_profilers(nodes, label, profile)
        load_before = os.getloadavg()
        cpu_before = [node_cpu(n) for n in nodes]
        started = time.monotonic()
        acked = send(nodes[0].dicom_port, data, senders)
        elapsed = time.monotonic() - started
        # Let background copies (N > W) land before counting CPU.
        time.sleep(2)
        cpu_each = [node_cpu(n) - before for n, before in zip(nodes, cpu_before)]
        cpu = sum(cpu_each)
        stop_profilers(profilers)
        profilers = []
        size = sum(e["size"] for e in manifest)
        row: dict[str, object] = {
            "setup": label, "stored": len(acked), "instances_per_s": len(acked) / elapsed,
            "mb_per_s": size / elapsed / 1e6, "cpu_s_per_instance": cpu / max(1, len(acked)),
            "entry_cpu_s_per_instance": cpu_each[0] / max(1, len(acked)), "load_before": load_before, "load_after": os.getloadavg(),
            "cpu_s_per_instance_each": [c / max(1, len(acked)) for c in cpu_each],
        }
        if len(cpu_each) > 1:  # What one owner's copy costs it (the other nodes each store one per instance at N=3).
            row["owner_cpu_s_per_copy"] = statistics.median(cpu_each[1:]) / max(1, len(acked))
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
        stop_profilers(profilers)
        for node in nodes:
            node.stop()


SETUPS = {
    "single": ("single node", ("s1",), []),
    "n3w2": ("3 nodes N=3 W=2", ("a1", "a2", "a3"), ["--replication-factor", "3", "--write-quorum", "2"]),
    "n2w1": ("3 nodes N=2 W=1", ("b1", "b2", "b3"), ["--replication-factor", "2", "--write-quorum", "1"]),
}
FIGURES = ("instances_per_s", "mb_per_s", "cpu_s_per_instance", "entry_cpu_s_per_instance", "owner_cpu_s_per_copy",
           "find_p50_ms",
           "find_p99_ms", "get_owner_mb_per_s", "get_non_owner_mb_per_s")


def medians(runs: list[dict[str, object]]) -> dict[str, object]:
    row: dict[str, object] = {"setup": runs[0]["setup"], "runs": len(runs),
                              "stored": min(int(r["stored"]) for r in runs)}  # type: ignore[call-overload]
    for figure in FIGURES:
        values = [float(r[figure]) for r in runs if figure in r]  # type: ignore[arg-type]
        if values:
            row[figure] = statistics.median(values)
    row["load"] = [r["load_before"] for r in runs]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--setups", default="single,n3w2,n2w1", help="comma-separated: " + ",".join(SETUPS))
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every setup this many times, in turn; the table shows medians")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy every node during ingest into DIR")
    parser.add_argument("--trace", type=Path, default=None,
                        help="record write-path timestamps on every node (node/write_trace.py) into DIR and print "
                             "bench/write_trace.py's per-segment p50/p90 for each cluster setup")
    parser.add_argument("--node-config", type=Path, default=None,
                        help="a TOML file every node starts with (--config), the same for every setup")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="put the nodes' data directories under DIR (e.g. /dev/shm: tmpfs) instead of the "
                             "temporary directory that holds the input set")
    parser.add_argument("--senders", type=int, default=1, help="storescu processes at once through the first node")
    parser.add_argument("--dicom-workers", type=int, default=0,
                        help="start the first node of every setup with --dicom-workers K")
    args = parser.parse_args()
    entry_extra = ["--dicom-workers", str(args.dicom_workers)] if args.dicom_workers else []
    os.environ["TCP_NODELAY"] = "1"  # storescu disables Nagle, as in bench/run.py.
    chosen = [SETUPS[name] for name in args.setups.split(",")]
    if args.node_config is not None:
        chosen = [(label, names, ["--config", str(args.node_config.resolve()), *extra]) for label, names, extra in chosen]
    work = Path(tempfile.mkdtemp(prefix="pacsnode-cluster-bench-"))
    nodes_root = Path(tempfile.mkdtemp(prefix="pacsnode-cluster-bench-", dir=args.data_dir)) if args.data_dir else work
    try:
        per_study = 20
        spec = datagen.StudySetSpec(patients=max(1, args.instances // per_study), series_per_study=2,
                                    instances_per_series=per_study // 2, rows=args.rows, cols=args.rows, seed=77)
        manifest = datagen.write_study_set(spec, work / "data")
        runs: dict[str, list[dict[str, object]]] = {label: [] for label, _names, _extra in chosen}
        for round_ in range(args.rounds):
            for label, names, extra in chosen:
                profile = args.profile / f"round{round_}" if args.profile else None
                trace = args.trace / f"round{round_}" if args.trace else None
                runs[label].append(run_setup(label, names, extra, work / "data", manifest,
                                             nodes_root / f"round{round_}", profile, trace, args.senders,
                                             entry_extra))
        rows = [medians(r) for r in runs.values()]
        base = rows[0]
        where = f"node data under {args.data_dir}" if args.data_dir else "node data on the temporary directory's disk"
        print(f"\n{len(manifest)} instances, {args.rows}x{args.rows} 16-bit, storescu x{args.senders} through the first node"
              f"{f' (dicom_workers {args.dicom_workers})' if args.dicom_workers else ''}; {where}; "
              f"C-FIND at the last node; 2 cores shared by clients and every node; medians of {args.rounds} "
              f"round(s); ratios against the first setup ({base['setup']})\n")
        print("| setup | inst/s | MB/s | ingest vs first | CPU-s/inst (all nodes) | CPU vs first | "
              "entry node CPU vs first | other nodes' CPU ms per instance (median) | C-FIND p50 ms | p99 ms | "
              "C-GET owner MB/s | C-GET non-owner MB/s | load avg (1 min) before each run |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            loads = ", ".join(f"{load[0]:.1f}" for load in row["load"])  # type: ignore[union-attr,index]
            owner = f"{float(row['owner_cpu_s_per_copy']) * 1000:.2f}" if "owner_cpu_s_per_copy" in row else "-"  # type: ignore[arg-type]
            print(f"| {row['setup']} | {row['instances_per_s']:.1f} | {row['mb_per_s']:.1f} | "
                  f"{row['instances_per_s'] / base['instances_per_s']:.2f} | {row['cpu_s_per_instance']:.4f} | "
                  f"{row['cpu_s_per_instance'] / base['cpu_s_per_instance']:.2f} | "
                  f"{row['entry_cpu_s_per_instance'] / base['entry_cpu_s_per_instance']:.2f} | "
                  f"{owner} | "
                  f"{row['find_p50_ms']:.1f} | {row['find_p99_ms']:.1f} | "
                  f"{row.get('get_owner_mb_per_s', 0):.1f} | {row.get('get_non_owner_mb_per_s', 0):.1f} | {loads} |")
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime('%Y%m%d-%H%M%S')
        (out / f"cluster-{stamp}.json").write_text(json.dumps({"args": vars(args) | {"profile": str(args.profile), "data_dir": str(args.data_dir), "trace": str(args.trace), "node_config": str(args.node_config)},
                                                               "medians": rows, "runs": runs}, indent=2))
        if args.trace:
            from write_trace import summary  # bench/write_trace.py, beside this file.
            for round_ in range(args.rounds):
                for label, names, _extra in chosen:
                    files = sorted((args.trace / f"round{round_}").glob(label.replace(" ", "_").replace("=", "") + "-*"))
                    if len(names) > 1 and files:
                        print(f"\nWrite path, {label}, round {round_ + 1} (bench/write_trace.py):\n")
                        print(summary(files))
        if args.profile:
            files = sorted(args.profile.glob("round*/*.txt"))
            if files:
                subprocess.run([sys.executable, str(ROOT / "bench" / "profile_summary.py"), *map(str, files)])
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(nodes_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
