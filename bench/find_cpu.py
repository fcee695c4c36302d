"""The node's CPU per C-FIND, by query kind, at a given archive size (pacsnode alone).
By hand, not CI:

    .venv/bin/python bench/find_cpu.py [--studies 20000] [--queries 600] [--rounds 2]

Starts a node from this tree, stores --studies one-instance studies (16x16 CT, the set
bench/dicomweb.py's QIDO run and bench/ingest_scale.py use; storescu x4), then runs
--queries STUDY-level C-FINDs of each kind (StudyInstanceUID, AccessionNumber, PatientID:
exact keys) over one pynetdicom association and reports the p50 latency and the node
process's CPU per query (user + system from /proc, so other load on the machine changes
it little). To compare two builds, run it from each tree in turn, several times. Prints
one line per kind and round; nothing is written to bench/results/.
"""

from __future__ import annotations

import argparse
import os
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=600, help="C-FINDs of each kind per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    spec = datagen.StudySetSpec(patients=max(1, args.studies // 4), studies_per_patient=4, rows=16, cols=16,
                                latin1_fraction=0.1, seed=203)
    root, manifest = prepare_dataset(f"dw-qido{args.studies}", spec, HERE / "work" / "data")
    work = Path(tempfile.mkdtemp(prefix="find-cpu-", dir=HERE / "work"))
    server = servers.start_pacsnode(work, destinations={})
    try:
        row = workloads.store_dcmtk(server, manifest, root / "files", 4, test="find-cpu", verify=False, log_dir=work)
        print(f"stored {len(manifest)} studies at {len(manifest) / row.elapsed_s:.0f} inst/s", flush=True)
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
                matches = sum(result.matches) / max(1, len(result.matches))
                print(f"round {round_number} {kind}: p50 {p50:.2f} ms, node CPU {used_ms:.2f} ms a query, "
                      f"{matches:.1f} matches, {result.failures} failed, load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
