"""The node's CPU per C-FIND, by query kind, at a given archive size (pacsnode alone).
By hand, not CI:

    .venv/bin/python bench/find_cpu.py [--studies 20000] [--queries 600] [--rounds 2] [--store DIR]

Starts a node from this tree, stores --studies one-instance studies (16x16 CT, the set
bench/dicomweb.py's QIDO run and bench/ingest_scale.py use; storescu x4), then runs
--queries STUDY-level C-FINDs of each kind (StudyInstanceUID, AccessionNumber, PatientID:
exact keys) over one pynetdicom association and reports the p50 latency and the node
process's CPU per query (user + system from /proc, so other load on the machine changes
it little). To compare two builds, run it from each tree in turn, several times. Prints
one line per kind and round; nothing is written to bench/results/.

With --store DIR the node's data directory is DIR/data and is kept: the first run ingests
into it, later runs (from this tree or another's) start a node on it and only query, so
that two builds are compared on the same store without an ingest each (A/B in turn).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scu  # noqa: E402
import servers  # noqa: E402
import workloads  # noqa: E402
from run import prepare_dataset  # noqa: E402

from pacsnode.sim import datagen  # noqa: E402


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_kept(store: Path) -> servers.Server:
    """A node of this tree on the kept data directory store/data (servers.start_pacsnode's
    command, with that directory instead of a fresh one)."""
    store.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    command = [*servers.pacsnode_command(), "start", "--data-dir", str(store / "data"), "--dicom-port", str(port),
               "--host", servers.HOST, "--ae-title", servers.PACSNODE_AET, "--peer-port", str(servers.free_port()),
               "--http-port", str(servers.free_port())]
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    log_path = store / "pacsnode.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=store, start_new_session=True)
    server = servers.Server("pacsnode", servers.PACSNODE_AET, port, process, store, log_path, command)
    server.keep_work_dir = True  # Server.stop would remove it.
    servers.wait_port(server, timeout_s=120)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=600, help="C-FINDs of each kind per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--store", type=Path, default=None,
                        help="kept data directory parent: ingest once, reuse after (see above)")
    args = parser.parse_args(argv)
    spec = datagen.StudySetSpec(patients=max(1, args.studies // 4), studies_per_patient=4, rows=16, cols=16,
                                latin1_fraction=0.1, seed=203)
    root, manifest = prepare_dataset(f"dw-qido{args.studies}", spec, HERE / "work" / "data")
    kept = args.store is not None and (args.store / "data").is_dir()
    if args.store is not None:
        work = args.store
        server = start_kept(args.store)
    else:
        work = Path(tempfile.mkdtemp(prefix="find-cpu-", dir=HERE / "work"))
        server = servers.start_pacsnode(work, destinations={})
    try:
        if not kept:
            elapsed_s = 0.0
            for start in range(0, len(manifest), 10_000):  # Rounds: storescu's argument list has a limit.
                row = workloads.store_dcmtk(server, manifest[start:start + 10_000], root / "files", 4,
                                            test="find-cpu", verify=False, log_dir=work)
                if not row.ok:
                    raise RuntimeError(f"ingest failed: {row.notes}")
                elapsed_s += row.elapsed_s
            print(f"stored {len(manifest)} studies at {len(manifest) / elapsed_s:.0f} inst/s", flush=True)
        time.sleep(2)
        rng = random.Random(5)
        kinds = {
            "study-uid": lambda: scu.study_query(StudyInstanceUID=rng.choice(manifest)["study_uid"]),
            "accession": lambda: scu.study_query(AccessionNumber=rng.choice(manifest)["accession_number"]),
            "patient-id": lambda: scu.study_query(PatientID=rng.choice(manifest)["patient_id"]),
        }
        for round_number in range(1, args.rounds + 1):
            for kind, make in kinds.items():
                queries = [(kind, make()) for _ in range(args.queries)]
                before = process_cpu_s(server.process.pid)
                result = scu.find_latency(server.aet, server.port, queries)[kind]
                used_ms = (process_cpu_s(server.process.pid) - before) * 1000 / len(queries)
                latencies = sorted(result.latencies_ms)
                p50 = latencies[len(latencies) // 2] if latencies else float("nan")
                p99 = latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)] if latencies else float("nan")
                matches = sum(result.matches) / max(1, len(result.matches))
                print(f"round {round_number} {kind}: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
                      f"node CPU {used_ms:.2f} ms a query, "
                      f"{matches:.1f} matches, {result.failures} failed, load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        server.stop()
        if args.store is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
