"""One node with `--dicom-workers K` for each K given, in turn: storescu ingest and getscu
retrieve, with the node's CPU per instance (node process alone, and summed over the node
and its worker processes, from /proc). The rows against Orthanc are bench/run.py's
`pacsnode-workers`; this is the quick A/B between worker counts (docs/workers.md).

    .venv/bin/python bench/workers.py 0 2 0 2                     # K = 0, 2, 0, 2 in turn
    .venv/bin/python bench/workers.py 0 2 --senders 1 --count 300
    .venv/bin/python bench/workers.py 0 0/65536 0 0/65536         # K/B: blob_file_bytes_min = B too
    .venv/bin/python bench/workers.py 2+0 2+1 2+0 2+1            # K+L: dicom_local_associations = L
    .venv/bin/python bench/workers.py orthanc 2 orthanc 2 --get-repeats 0   # Orthanc's CPU too
    .venv/bin/python bench/workers.py 2 other:2 2 other:2 --other-python /work/old/.venv/bin/python
    .venv/bin/python bench/workers.py 0 2 0 2 --startup 5        # what a worker costs a node's start

`--startup N`: no ingest; N starts of a node with each K: the time from the process start
to the first answered association + C-ECHO on its DICOM port (a raw-PDU round, as
bench/assoc_turnaround.py), the memory of the node and its workers (PSS and RSS from
/proc, summed), and the time of a clean stop (SIGTERM to exit).

Each store line has the node's and each worker's CPU per instance, the server's CPU use in
cores, the senders' CPU per instance (storescu, reaped children's rusage) and how busy the
whole machine was (/proc/stat: other work on it shows here). `--trace`: the node and its
workers record node/write_trace.py marks, and each run prints where an instance's time
went (the marks of every process merged by SOP Instance UID). A spec repeated gives a
median line at the end.

Data (`--set ct512`, the default, or `--set small`): the CT 512x512 set bench/run.py generates (bench/work/data/ct512-*/files; run
`bench/run.py --tests ingest --only pacsnode` once to make it), else 400 copies of
pydicom's CT_small.dcm. The getscu part retrieves the first study of what was stored,
`--get-repeats` times (0: no retrieve).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pacsnode.sim.process import NodeProcess, wait_until

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import servers  # noqa: E402


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _cpu_s(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) seconds of every CPU of the machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), sum(fields[:8]) / os.sysconf("SC_CLK_TCK")


def _clients_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # Reaped children: the senders.
    return usage.ru_utime + usage.ru_stime


def _files(count: int, scratch: Path, data_set: str = "ct512") -> list[Path]:
    generated = sorted((BENCH / "work" / "data").glob(f"{data_set}-*/files"))
    if generated:
        return sorted(p for p in generated[0].rglob("*.dcm"))[:count]
    data = scratch / "ct-small"
    data.mkdir(parents=True, exist_ok=True)
    source = dcmread(get_testdata_file("CT_small.dcm"))
    for index in range(count):
        source.SOPInstanceUID = generate_uid()
        source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
        if index % 20 == 0:
            source.StudyInstanceUID = generate_uid()
        source.save_as(data / f"{index:04d}.dcm", enforce_file_format=True)
    return sorted(data.glob("*.dcm"))


def _study_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)


def _orthanc(files: list[Path], senders: int, scratch: Path, env: dict[str, str]) -> None:
    """The same storescu run against a fresh Orthanc (bench/servers.py), its CPU from /proc."""
    server = servers.start_orthanc(scratch, destinations={})
    try:
        pid = server.process.pid
        pids = [pid, *_children(pid)]
        cpu0, started = _cpu_s(pids), time.monotonic()
        shares = [files[index::senders] for index in range(senders)]
        processes = [subprocess.Popen(["storescu", "-aec", server.aet, "127.0.0.1", str(server.port),
                                       *map(str, share)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=env) for share in shares]
        codes = [process.wait() for process in processes]
        elapsed = time.monotonic() - started
        print(f"orthanc storescu x{senders}: {len(files) / elapsed:.0f} inst/s, CPU per instance "
              f"{1000 * (_cpu_s(pids) - cpu0) / len(files):.2f} ms; exit codes {sorted(set(codes))}; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(server.work_dir, ignore_errors=True)


TRACE_SEGMENTS = (("rx", "archive", "C-STORE handler: header read, hash, compression, GIL waits"),
                  ("archive", "put.start", "blob file (workers), channel to the node, node thread"),
                  ("put.start", "put.end", "store: blob file (one process), RocksDB group commit, WAL fsync"),
                  ("put.end", "stored", "back to the association thread (through the channel)"),
                  ("rx", "stored", "whole handler (rx -> stored)"))


def trace_summary(prefix: Path, one_sender: bool = False) -> str:
    """p50/p90 ms of each segment of the instances' write path, the marks of the node and
    its workers merged by SOP Instance UID (node/write_trace.py; CLOCK_MONOTONIC is one
    clock for every process)."""
    import json  # noqa: PLC0415

    marks: dict[str, dict[str, int]] = {}
    for path in prefix.parent.glob(prefix.name + ".*"):
        for line in path.read_text().splitlines():
            ns, event, uid = json.loads(line)
            marks.setdefault(uid, {}).setdefault(event, ns)
    lines = []
    for first, second, label in TRACE_SEGMENTS:
        values = sorted((m[second] - m[first]) / 1e6 for m in marks.values() if first in m and second in m)
        if values:
            lines.append(f"  {first} -> {second} ({label}): p50 {statistics.median(values):.2f} "
                         f"p90 {values[int(0.9 * (len(values) - 1))]:.2f} ms, n={len(values)}")
    if one_sender:  # One association: each instance's answer is followed by the next's request.
        ordered = sorted((m for m in marks.values() if "rx" in m and "stored" in m), key=lambda m: m["rx"])
        values = sorted((b["rx"] - a["stored"]) / 1e6 for a, b in zip(ordered, ordered[1:]))
        if values:
            lines.append(f"  stored -> next rx (C-STORE-RSP out, the sender's next request in, "
                         f"PDUs read): p50 {statistics.median(values):.2f} "
                         f"p90 {values[int(0.9 * (len(values) - 1))]:.2f} ms, n={len(values)}")
    return "\n".join(lines)


class TreeNodeProcess(NodeProcess):
    """A node of another tree (`--other-python`, its venv's Python): an A/B of two trees."""

    def __init__(self, python: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.python = python

    @property
    def args(self) -> list[str]:
        ours = super().args
        return [self.python, "-m", "pacsnode.cli.main", *ours[ours.index("start"):]]


def _memory_kb(pids: list[int]) -> tuple[int, int]:
    """(PSS, RSS) summed over `pids`, kB."""
    pss = rss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
        except OSError:
            continue
    return pss, rss


def startup(specs: list[str], repeats: int, scratch: Path) -> None:
    """For each K in turn, `repeats` starts: seconds to the first answered raw-PDU echo
    round, PSS/RSS of the node and its workers once up, seconds to stop."""
    import scu  # noqa: PLC0415  (bench/scu.py: pydicom, pynetdicom)

    for spec in specs:
        workers = int(spec)
        ready_s, stop_s, memory = [], [], []
        for attempt in range(repeats):
            data_dir = scratch / f"start-w{workers}-{attempt}"
            node = NodeProcess(data_dir, node_id="bench-s", extra_args=["--dicom-workers", str(workers)])
            pdus: list[bytes] | None = None
            started = time.monotonic()
            node.start(timeout_s=120)
            assert node.process is not None
            while time.monotonic() - started < 120:
                try:
                    if pdus is None:
                        pdus = scu.echo_pdus("PACSNODE", node.dicom_port)
                    if scu.raw_echo(node.dicom_port, pdus):
                        break
                except OSError:
                    pass
                time.sleep(0.01)
            ready_s.append(time.monotonic() - started)
            time.sleep(1.0)  # Settled: imports done, first-connection costs paid.
            pid = node.process.pid
            memory.append(_memory_kb([pid, *_children(pid)]))
            stopping = time.monotonic()
            code = node.stop()
            stop_s.append(time.monotonic() - stopping)
            if code != 0:
                print(f"workers={workers}: exit code {code}", flush=True)
            shutil.rmtree(data_dir, ignore_errors=True)
        print(f"workers={workers} x{repeats}: ready {' '.join(f'{value:.2f}' for value in ready_s)} s; "
              f"PSS {' '.join(f'{pss / 1024:.0f}' for pss, _ in memory)} MB; "
              f"RSS {' '.join(f'{rss / 1024:.0f}' for _, rss in memory)} MB; "
              f"stop {' '.join(f'{value:.2f}' for value in stop_s)} s; load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workers", nargs="+", help="dicom_workers values, run in turn; K+L also sets "
                        "dicom_local_associations = L, K/B blob_file_bytes_min = B (a TOML file given with --config)")
    parser.add_argument("--count", type=int, default=1000, help="instances stored per run")
    parser.add_argument("--senders", type=int, default=4, help="storescu processes (one association each)")
    parser.add_argument("--get-repeats", type=int, default=5)
    parser.add_argument("--set", default="ct512", choices=("ct512", "small"),
                        help="bench/run.py's generated set to send (bench/work/data/<set>-*/files)")
    parser.add_argument("--other-python", default="", help="another tree's venv Python: specs written "
                        "other:K run that tree's node (an A/B of two trees, in turn)")
    parser.add_argument("--trace", action="store_true", help="PACSNODE_WRITE_TRACE in the node and its "
                        "workers: where each stored instance's time went (node/write_trace.py)")
    parser.add_argument("--startup", type=int, default=0, help="only time N starts and stops for each K (no ingest)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pacsnode-bench-workers-"))
    env = {**os.environ, "TCP_NODELAY": "1"}
    try:
        if args.startup:
            startup(args.workers, args.startup, scratch)
            return
        files = _files(args.count, scratch, args.set)
        study = _study_of(files[0])
        results: dict[str, list[tuple[float, float]]] = {}
        print(f"# {len(files)} files ({files[0].stat().st_size} bytes the first); load {os.getloadavg()[0]:.1f}",
              flush=True)
        for spec in args.workers:
            if spec == "orthanc":
                _orthanc(files, args.senders, scratch, env)
                continue
            other = spec.startswith("other:")
            if other and not args.other_python:
                raise SystemExit("an other: spec needs --other-python")
            workers_text, _, blob_min = spec.removeprefix("other:").partition("/")
            workers_text, _, local = workers_text.partition("+")
            workers = int(workers_text)
            data_dir = scratch / f"node-w{workers}"
            extra = ["--dicom-workers", str(workers)]
            settings = ([f"blob_file_bytes_min = {int(blob_min)}"] if blob_min else []) \
                + ([f"dicom_local_associations = {int(local)}"] if local else [])
            if settings:
                config = scratch / "node.toml"
                config.write_text("\n".join(settings) + "\n")
                extra += ["--config", str(config)]
            trace = scratch / f"trace-{len(results)}-{sum(map(len, results.values()))}-{spec.replace('/', '_').replace(':', '_')}" / "t"
            if args.trace:
                trace.parent.mkdir(parents=True, exist_ok=True)
                os.environ["PACSNODE_WRITE_TRACE"] = str(trace)
            node = (TreeNodeProcess(args.other_python, data_dir, node_id="bench-w", extra_args=extra) if other
                    else NodeProcess(data_dir, node_id="bench-w", extra_args=extra)).start()
            os.environ.pop("PACSNODE_WRITE_TRACE", None)
            assert node.process is not None
            if workers:
                wait_until(lambda: node.log_text().count("dicom.worker.started") >= workers, 60)
            # The harness's port probe is a connection too: with dicom_local_associations the
            # node serves it, and until it has seen it end, a sender would go to a worker.
            time.sleep(1.0)
            pid = node.process.pid
            pids = [pid, *_children(pid)]
            node0, all0, started = _cpu_s([pid]), _cpu_s(pids), time.monotonic()
            children0 = [_cpu_s([child]) for child in pids[1:]]
            busy0, clients0 = _machine_busy(), _clients_cpu_s()
            shares = [files[index::args.senders] for index in range(args.senders)]
            senders = [subprocess.Popen(["storescu", "-aec", "PACSNODE", "127.0.0.1", str(node.dicom_port),
                                         *map(str, share)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=env) for share in shares]
            codes = [sender.wait() for sender in senders]
            elapsed = elapsed_store = time.monotonic() - started
            node1, all1 = _cpu_s([pid]), _cpu_s(pids)
            cpu_store = all1 - all0
            each = [1000 * (_cpu_s([child]) - child0) / len(files) for child, child0 in zip(pids[1:], children0)]
            busy1, clients1 = _machine_busy(), _clients_cpu_s()
            cores = os.cpu_count() or 1
            line = (f"workers={spec} storescu x{args.senders}: {len(files) / elapsed:.0f} inst/s, CPU per instance "
                    f"{1000 * (all1 - all0) / len(files):.2f} ms all processes, {1000 * (node1 - node0) / len(files):.2f} "
                    f"ms node process (children: {' '.join(f'{ms:.2f}' for ms in each if ms > 0.005) or '-'}); "
                    f"exit codes {sorted(set(codes))}; server {(all1 - all0) / elapsed:.2f} cores, senders "
                    f"{1000 * (clients1 - clients0) / len(files):.2f} ms/inst, machine busy "
                    f"{(busy1[0] - busy0[0]) / (busy1[1] - busy0[1]):.0%} of {cores} cores")
            if args.get_repeats:
                out = scratch / "out"
                node0, all0, started, got = _cpu_s([pid]), _cpu_s(pids), time.monotonic(), 0
                for _ in range(args.get_repeats):
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    subprocess.run(["getscu", "-aec", "PACSNODE", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                                    "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(node.dicom_port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
                    got += len(list(out.iterdir()))
                elapsed = time.monotonic() - started
                node1, all1 = _cpu_s([pid]), _cpu_s(pids)
                line += (f" | getscu x{args.get_repeats}: {got / elapsed:.0f} inst/s, CPU per instance "
                         f"{1000 * (all1 - all0) / max(got, 1):.2f} ms all, {1000 * (node1 - node0) / max(got, 1):.2f} ms node")
            print(line + f"; load {os.getloadavg()[0]:.1f}", flush=True)
            results.setdefault(spec, []).append((len(files) / elapsed_store, 1000 * cpu_store / len(files)))
            node.stop()
            if args.trace:
                print(trace_summary(trace, args.senders == 1), flush=True)
            shutil.rmtree(data_dir, ignore_errors=True)
        for spec, rows in results.items():
            if len(rows) > 1:
                print(f"median of {len(rows)}: workers={spec} {statistics.median(r for r, _ in rows):.0f} inst/s, "
                      f"{statistics.median(c for _, c in rows):.2f} ms CPU per instance all processes "
                      f"(each: {' '.join(f'{c:.2f}' for _, c in rows)})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
