"""C-GET and C-MOVE of one study, pacsnode and Orthanc side by side, with server CPU per instance.

    .venv/bin/python bench/retrieve_pair.py [--rounds 8] [--pacsnode-arg=--max-pdu-bytes=0 ...]

Both servers (and one dcmtk storescp as the C-MOVE destination) run at once, each loaded
with bench/run.py's `retrieve` study (80 CT 512 x 512, 42 MB) by storescu. Each round
runs, on one server then the other (the order alternates between rounds, so a load
change on the shared machine hits both alike): getscu, the pynetdicom C-GET of
bench/scu.py, movescu and the pynetdicom C-MOVE, each checked by counting what arrived.
Printed: the median rate of each client (instances/s), the median time to the first
instance of the pynetdicom clients (ms, association included: C-GET its first C-STORE,
C-MOVE its first Pending response), and each server process's CPU (user + system,
/proc) per retrieved instance, C-GETs and C-MOVEs apart (Orthanc is one process;
pacsnode's CPU includes its association set-up, locate, read, decompress and sending).
bench/run.py's `--tests retrieve` is the reference figure; this one is for the rounds
and the CPU when the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run  # noqa: E402
import scu  # noqa: E402
import servers  # noqa: E402
import workloads  # noqa: E402

CLIENTS = ("getscu", "pynetdicom-get", "movescu", "pynetdicom-move")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pacsnode-arg", action="append", default=[], help="extra `pacsnode start` argument")
    args = parser.parse_args()
    work = BENCH_DIR / "work"
    root, manifest = run.prepare_dataset("retrieve", run.dataset_specs(run.FULL)["retrieve"], work / "data")
    study_uid, expected = manifest[0]["study_uid"], len(manifest)
    sop_classes = sorted({entry["sop_class_uid"] for entry in manifest})
    parent = Path(tempfile.mkdtemp(prefix="retrieve-pair-", dir=work))
    rates: dict[tuple[str, str], list[float]] = {}
    firsts: dict[tuple[str, str], list[float]] = {}
    cpu_s: dict[tuple[str, str], float] = {}
    loads: list[float] = []
    started_servers: dict[str, servers.Server] = {}
    destination = servers.start_storescp(parent)
    try:
        destinations = {servers.STORESCP_AET: (servers.HOST, destination.port)}
        started_servers["pacsnode"] = servers.start_pacsnode(parent, destinations=destinations,
                                                             extra_args=args.pacsnode_arg)
        started_servers["orthanc"] = servers.start_orthanc(parent, destinations=destinations)
        for server in started_servers.values():
            load = workloads.store_dcmtk(server, manifest, root / "files", 1, test="load", nodelay=True,
                                         log_dir=parent)
            if not load.ok:
                raise SystemExit(f"{server.name}: loading the study failed: {load.notes}")
        assert destination.storage_dir is not None
        order = list(started_servers)
        for round_index in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for name in order if round_index % 2 == 0 else order[::-1]:
                server = started_servers[name]
                pid = server.process.pid
                before = process_cpu_s(pid)
                out = Path(tempfile.mkdtemp(prefix="getscu-", dir=parent))
                command = ["getscu", "-S", "-aet", "BENCH", "-aec", server.aet, "-k", "QueryRetrieveLevel=STUDY",
                           "-k", f"StudyInstanceUID={study_uid}", "-od", str(out), servers.HOST, str(server.port)]
                clock = time.perf_counter()
                subprocess.run(command, env=servers.dcmtk_env(True), capture_output=True, check=False)
                rates.setdefault((name, "getscu"), []).append(expected / (time.perf_counter() - clock))
                if count_files(out) != expected:
                    raise SystemExit(f"{name}: getscu received {count_files(out)} of {expected}")
                shutil.rmtree(out)
                got = scu.get_study(server.aet, server.port, study_uid, sop_classes)
                if got.received != expected or got.first_instance_s is None:
                    raise SystemExit(f"{name}: pynetdicom C-GET received {got.received} of {expected}")
                rates.setdefault((name, "pynetdicom-get"), []).append(expected / got.elapsed_s)
                firsts.setdefault((name, "pynetdicom-get"), []).append(got.first_instance_s * 1000)
                cpu_s[(name, "get")] = cpu_s.get((name, "get"), 0.0) + process_cpu_s(pid) - before
                before = process_cpu_s(pid)
                for client in ("movescu", "pynetdicom-move"):
                    shutil.rmtree(destination.storage_dir)
                    destination.storage_dir.mkdir()
                    clock = time.perf_counter()
                    if client == "movescu":
                        command = ["movescu", "-S", "-aet", "BENCH", "-aec", server.aet, "-aem", servers.STORESCP_AET,
                                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                                   servers.HOST, str(server.port)]
                        subprocess.run(command, env=servers.dcmtk_env(True), capture_output=True, check=False)
                        elapsed_s = time.perf_counter() - clock
                    else:
                        moved = scu.move_study(server.aet, server.port, study_uid, servers.STORESCP_AET)
                        elapsed_s = moved.elapsed_s
                        if moved.first_instance_s is not None:
                            firsts.setdefault((name, client), []).append(moved.first_instance_s * 1000)
                    if count_files(destination.storage_dir) != expected:
                        raise SystemExit(f"{name}: {client} moved {count_files(destination.storage_dir)} of {expected}")
                    rates.setdefault((name, client), []).append(expected / elapsed_s)
                cpu_s[(name, "move")] = cpu_s.get((name, "move"), 0.0) + process_cpu_s(pid) - before
    finally:
        for server in started_servers.values():
            server.stop()
        destination.stop()
        shutil.rmtree(parent, ignore_errors=True)
    print(f"rounds {args.rounds}; load average (1 min) at the rounds' starts {min(loads):.2f}-{max(loads):.2f}")
    print("| client | pacsnode | Orthanc | ratio |")
    print("|---|---|---|---|")
    for client in CLIENTS:
        ours, theirs = statistics.median(rates[("pacsnode", client)]), statistics.median(rates[("orthanc", client)])
        print(f"| {client} inst/s | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f} |")
    for client in ("pynetdicom-get", "pynetdicom-move"):
        ours, theirs = statistics.median(firsts[("pacsnode", client)]), statistics.median(firsts[("orthanc", client)])
        print(f"| {client} first instance ms | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    for kind in ("get", "move"):
        instances = 2 * expected * args.rounds
        ours, theirs = (cpu_s[(name, kind)] / instances * 1000 for name in ("pacsnode", "orthanc"))
        print(f"| server CPU ms per instance, C-{kind.upper()} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
