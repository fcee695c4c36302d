"""Two builds' C-FIND cost side by side, on copies of one kept store. By hand, not CI:

    .venv/bin/python bench/find_ab.py --store DIR --tree A=/path/to/old --tree B=. \
        [--studies 20000] [--queries 200] [--rounds 5] [--kinds study-uid,accession,patient-id] \
        [--client pynetdicom|raw|findscu]

DIR is a kept store that bench/find_cpu.py --store DIR made (DIR/data, --studies of the same
set). Each tree gets its own copy of it (DIR-<name>, made once) and a node of its own
(`<tree>/.venv/bin/python -m pacsnode.cli.main start`), both running for the whole run; then
for each round and kind the trees are queried in turn (--queries STUDY-level C-FINDs over one
pynetdicom association each; with --client raw over bench/find_raw.py's blocking socket,
which waits only for the node; with --client findscu, dcmtk's findscu, one run per kind, whose
"p50" is then the median of the runs' mean time per query), so both see the same machine load (the machine is shared).
Prints, per tree and kind, the median over rounds of the node process's CPU per query
(user + system from /proc), the p50/p99 latency over every query, and the client's CPU per
query (this process's `time.process_time`: the SCU's threads, its request encoding included;
with findscu, the findscu runs' CPU, their process and association set-up included). Nothing is written to
bench/results/.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import find_raw  # noqa: E402
import scu  # noqa: E402
import servers  # noqa: E402
from find_cpu import process_cpu_s  # noqa: E402
from run import prepare_dataset  # noqa: E402

from pacsnode.sim import datagen  # noqa: E402

KEYS = {"study-uid": ("StudyInstanceUID", "study_uid"), "accession": ("AccessionNumber", "accession_number"),
        "patient-id": ("PatientID", "patient_id")}


def client_cpu_s() -> float:
    """CPU seconds of this process (the pynetdicom or raw SCU's threads) and of its ended
    children (findscu runs: their set-up and one-query runs included)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def start(tree: Path, store: Path) -> servers.Server:
    port = servers.free_port()
    command = [str(tree / ".venv" / "bin" / "python"), "-m", "pacsnode.cli.main", "start", "--data-dir",
               str(store / "data"), "--dicom-port", str(port), "--host", servers.HOST, "--ae-title",
               servers.PACSNODE_AET, "--peer-port", str(servers.free_port()), "--http-port", str(servers.free_port())]
    env = {key: value for key, value in os.environ.items() if key not in ("TCP_NODELAY", "PYTHONPATH")}
    log_path = store / "pacsnode.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=store, start_new_session=True)
    server = servers.Server("pacsnode", servers.PACSNODE_AET, port, process, store, log_path, command)
    server.keep_work_dir = True
    servers.wait_port(server, timeout_s=120)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree with a .venv")
    parser.add_argument("--studies", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", default="study-uid,accession,patient-id")
    parser.add_argument("--client", choices=("pynetdicom", "raw", "findscu"), default="pynetdicom",
                        help="the SCU: bench/scu.py's (pynetdicom), bench/find_raw.py's (a blocking socket), "
                             "or dcmtk's findscu (one run per kind and round: a mean per query, not a p50)")
    args = parser.parse_args(argv)
    spec = datagen.StudySetSpec(patients=max(1, args.studies // 4), studies_per_patient=4, rows=16, cols=16,
                                latin1_fraction=0.1, seed=203)
    _root, manifest = prepare_dataset(f"dw-qido{args.studies}", spec, HERE / "work" / "data")
    trees = dict(item.split("=", 1) for item in args.tree)
    nodes: dict[str, servers.Server] = {}
    try:
        for name, path in trees.items():
            copy = args.store.with_name(f"{args.store.name}-{name}")
            if not (copy / "data").is_dir():
                shutil.copytree(args.store / "data", copy / "data")
            nodes[name] = start(Path(path).resolve(), copy)
        rng = random.Random(5)
        if args.client == "findscu":
            def find_latency(aec: str, port: int, queries: list[tuple[str, Any]]) -> dict[str, scu.FindResult]:
                return find_raw.findscu_latency(aec, port, queries, args.store.with_name(f"{args.store.name}-queries"))
        else:
            find_latency = scu.find_latency if args.client == "pynetdicom" else find_raw.find_latency
        kinds = args.kinds.split(",")
        cpu: dict[tuple[str, str], list[float]] = {}
        latency: dict[tuple[str, str], list[float]] = {}
        client_cpu: dict[tuple[str, str], list[float]] = {}
        loads: list[float] = []
        for round_number in range(args.rounds):
            for kind in kinds:
                keyword, field = KEYS[kind]
                queries = [(kind, scu.study_query(**{keyword: rng.choice(manifest)[field]}))
                           for _ in range(args.queries)]
                order = list(nodes.items())
                if round_number % 2:
                    order.reverse()
                for name, server in order:
                    before = process_cpu_s(server.process.pid)
                    client_before = client_cpu_s()
                    result = find_latency(server.aet, server.port, queries)[kind]
                    cpu.setdefault((name, kind), []).append(
                        (process_cpu_s(server.process.pid) - before) * 1000 / len(queries))
                    client_cpu.setdefault((name, kind), []).append(
                        (client_cpu_s() - client_before) * 1000 / len(queries))
                    latency.setdefault((name, kind), []).extend(result.latencies_ms)
                    if result.failures:
                        print(f"{name} {kind}: {result.failures} failed {result.statuses}", flush=True)
                loads.append(os.getloadavg()[0])
        print(f"client {args.client}, load {min(loads):.1f}-{max(loads):.1f}")
        for kind in kinds:
            for name in nodes:
                lat = sorted(latency[(name, kind)])
                print(f"{kind:10} {name:6} node CPU {statistics.median(cpu[(name, kind)]):.2f} ms a query "
                      f"(rounds {', '.join(f'{c:.2f}' for c in cpu[(name, kind)])}), "
                      f"p50 {lat[len(lat) // 2]:.2f} ms, p99 {lat[min(len(lat) - 1, len(lat) * 99 // 100)]:.2f} ms, "
                      f"client CPU {statistics.median(client_cpu[(name, kind)]):.2f} ms a query")
    finally:
        for server in nodes.values():
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
