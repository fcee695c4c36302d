"""Benchmark pacsnode against Orthanc and dcmtk's storescp, in one run, on the same data.

Run by hand (never in CI), from the repository root:

    .venv/bin/python bench/run.py                  # full run, every system
    .venv/bin/python bench/run.py --quick          # small smoke run
    .venv/bin/python bench/run.py --only orthanc,storescp --tests ingest
    .venv/bin/python bench/run.py --only orthanc,pacsnode --tests echo   # association set-up + C-ECHO

Every server is a separate process on 127.0.0.1 with free ports and its own temp dir;
each ingest test starts a fresh, empty server. Results: bench/results/<stamp>.json (rows
plus machine facts and exact commands) and a markdown table on stdout (also written to
bench/results/<stamp>.md). Generated data is cached under bench/work/data/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import scu  # noqa: E402
import servers  # noqa: E402
import workloads  # noqa: E402
from servers import STORESCP_AET, Server  # noqa: E402
from workloads import Row  # noqa: E402

from pacsnode.sim import datagen  # noqa: E402

SYSTEMS = ("storescp", "orthanc", "pacsnode", "pacsnode-workers")
# pacsnode-workers: the same node with its DICOM front end in this many worker processes
# (docs/workers.md); one per core on this 2-core machine kind.
WORKERS = max(2, os.cpu_count() or 2)
TESTS = ("ingest", "find", "retrieve", "echo")


@dataclass(frozen=True)
class Scale:
    ct_instances_per_series: int       # ct512: 10 patients x 2 studies x 1 series x this.
    small_instances_per_series: int    # small: 20 patients x 1 study x 4 series x this.
    find_patients: int                 # find: this x 4 studies x 1 instance (64 x 64).
    retrieve_instances_per_series: int  # retrieve: 1 study x 2 series x this (512 x 512).
    queries_per_kind: int              # pynetdicom C-FIND queries per kind.
    findscu_per_kind: int              # findscu processes per kind.
    retrieve_repeats: int


FULL = Scale(ct_instances_per_series=100, small_instances_per_series=25, find_patients=2500,
             retrieve_instances_per_series=40, queries_per_kind=200, findscu_per_kind=20, retrieve_repeats=3)
QUICK = Scale(ct_instances_per_series=10, small_instances_per_series=5, find_patients=250,
              retrieve_instances_per_series=10, queries_per_kind=20, findscu_per_kind=5, retrieve_repeats=1)


def dataset_specs(scale: Scale) -> dict[str, datagen.StudySetSpec]:
    return {
        "ct512": datagen.StudySetSpec(patients=10, studies_per_patient=2, series_per_study=1,
                                      instances_per_series=scale.ct_instances_per_series, rows=512, cols=512,
                                      modalities=("CT",), seed=101),
        "small": datagen.StudySetSpec(patients=20, studies_per_patient=1, series_per_study=4,
                                      instances_per_series=scale.small_instances_per_series, rows=64, cols=64,
                                      seed=102),
        "find": datagen.StudySetSpec(patients=scale.find_patients, studies_per_patient=4, rows=64, cols=64,
                                     latin1_fraction=0.1, seed=103),
        "retrieve": datagen.StudySetSpec(patients=1, studies_per_patient=1, series_per_study=2,
                                         instances_per_series=scale.retrieve_instances_per_series, rows=512,
                                         cols=512, modalities=("CT",), seed=104),
    }


def prepare_dataset(name: str, spec: datagen.StudySetSpec, data_dir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Generate once per spec (deterministic), then reuse the files from bench/work/data/."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    root = data_dir / f"{name}-{digest}"
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        manifest = datagen.read_manifest(manifest_path)
        if len(manifest) == spec.instance_count and all(os.path.exists(e["path"]) for e in manifest[:20]):
            return root, [dict(entry) for entry in manifest]
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    manifest = datagen.write_study_set(spec, root / "files")
    datagen.write_manifest(manifest, manifest_path)
    print(f"# generated {name}: {len(manifest)} files, {sum(e['size'] for e in manifest) / 1e6:.0f} MB "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return root, [dict(entry) for entry in manifest]


# ---------------------------------------------------------------------------------------
# Query sets


def find_queries(manifest: Sequence[dict[str, Any]], count: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """`count` queries of each kind, interleaved, drawn from the archive's own content."""
    rng = random.Random(seed)
    ascii_names = sorted({e["patient_name"].split("^")[0] for e in manifest if e["patient_name"].isascii()})
    years = sorted({e["study_date"][:4] for e in manifest})
    kinds: dict[str, list[dict[str, str]]] = {
        "patient-id": [{"PatientID": rng.choice(manifest)["patient_id"]} for _ in range(count)],
        "name-prefix": [{"PatientName": rng.choice(ascii_names)[:3] + "*"} for _ in range(count)],
        "date-range": [],
        "study-uid": [{"StudyInstanceUID": rng.choice(manifest)["study_uid"]} for _ in range(count)],
    }
    for _ in range(count):
        year, month = rng.choice(years), rng.randrange(1, 13)
        kinds["date-range"].append({"StudyDate": f"{year}{month:02d}01-{year}{month:02d}28"})
    queries: list[tuple[str, dict[str, str]]] = []
    for index in range(count):
        for kind, matches in kinds.items():
            queries.append((kind, matches[index]))
    return queries


# ---------------------------------------------------------------------------------------
# Orchestration


class BusyMonitor:
    """Samples, once a second, whether other test runs or nodes are on the machine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="busy-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()

    def seen(self) -> list[str]:
        """Other processes seen since the last reset()."""
        with self._lock:
            return list(self._seen)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            found = foreign_processes()
            with self._lock:
                self._seen.update(dict.fromkeys(found))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = QUICK if args.quick else FULL
        self.nodelay = not args.dcmtk_nagle
        self.work_dir = Path(args.work_dir).resolve()
        self.run_dir = self.work_dir / f"run-{os.getpid()}"
        self.log_dir = (BENCH_DIR / "results" / "raw" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        self.rows: list[Row] = []
        self.errors: list[str] = []
        self.server_logs: dict[str, str] = {}
        self.monitor = BusyMonitor()
        self.server_commands: dict[str, str] = {}

    def start(self, system: str, destinations: dict[str, tuple[str, int]] | None = None) -> Server:
        destinations = destinations or {}
        if system == "storescp":
            return servers.start_storescp(self.run_dir, nodelay=self.nodelay)
        if system == "orthanc":
            return servers.start_orthanc(self.run_dir, destinations=destinations, nodelay=self.nodelay)
        if system in ("pacsnode", "pacsnode-workers"):
            workers = [f"--dicom-workers={WORKERS}"] if system == "pacsnode-workers" else []
            return servers.start_pacsnode(self.run_dir, destinations=destinations, name=system,
                                          extra_args=[*workers, *self.args.pacsnode_arg])
        raise ValueError(system)

    def wait_quiet(self) -> None:
        """Before a measurement: flush dirty pages left by the previous test (1 GB of
        unsynced files from storescp or Orthanc would otherwise be written back during the
        next one), then wait (bounded) until no other test run or node is on the machine."""
        os.sync()
        try:
            self._wait_quiet()
        finally:
            self.monitor.reset()

    def _wait_quiet(self) -> None:
        if self.args.quiet_wait_s <= 0:
            return
        deadline = time.monotonic() + self.args.quiet_wait_s
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            if foreign_processes():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 5:
                return
            time.sleep(1)

    @contextlib.contextmanager
    def running(self, system: str, label: str,
                destinations: dict[str, tuple[str, int]] | None = None) -> Iterator[Server]:
        self.wait_quiet()
        server = self.start(system, destinations)
        self.server_commands.setdefault(system, " ".join(server.command))
        try:
            yield server
        finally:
            alive = server.alive()
            code = server.stop()
            log = server.log_tail(200)
            (self.log_dir / f"{system}-{label}.log").write_text(log)
            if not alive:
                hint = (" It logged a SIGTERM that the benchmark did not send (another process signalled it)."
                        if "signal=SIGTERM" in log else "")
                self.errors.append(f"{system} ({label}) had exited by itself with code {code}.{hint} "
                                   f"Log tail:\n{log}")

    def guarded(self, what: str, action: Callable[[], None]) -> None:
        """Run one test; an error is recorded (with the server's log) and the run goes on."""
        try:
            action()
        except Exception as error:
            message = f"{what}: {error!r}\n{traceback.format_exc(limit=4)}"
            print(f"# ERROR {message}", file=sys.stderr)
            self.errors.append(message)

    def add(self, rows: Row | Sequence[Row]) -> None:
        foreign = sorted(set(self.monitor.seen()) | set(foreign_processes()))
        self.monitor.reset()
        for row in [rows] if isinstance(rows, Row) else rows:
            if foreign:
                # Another test run or node competed for the 2 cores while this was measured.
                row.details["other_processes"] = foreign
                row.notes = (row.notes + f" (busy machine: {len(foreign)} other processes)").strip()
            self.rows.append(row)
            rate = f"{row.instances_per_s:.1f}/s {row.mb_per_s:.1f} MB/s" if row.instances_per_s else ""
            latency = f"p50 {row.p50_ms:.1f} ms p99 {row.p99_ms:.1f} ms" if row.p50_ms is not None else ""
            print(f"# {row.system:8} {row.test:18} {row.client:10} x{row.procs} {rate} {latency} "
                  f"{'' if row.ok else 'NOT OK '}{row.notes}", file=sys.stderr, flush=True)

    # -- tests ----------------------------------------------------------------------------
    def ingest(self, system: str, datasets: dict[str, tuple[Path, list[dict[str, Any]]]]) -> None:
        for name in ("ct512", "small"):
            root, manifest = datasets[name]
            for client, procs in (("storescu", 1), ("storescu", 4), ("pynetdicom", 1), ("pynetdicom", 4)):
                label = f"store-{name}-{client}-x{procs}"

                def one(name: str = name, root: Path = root, manifest: list[dict[str, Any]] = manifest,
                        client: str = client, procs: int = procs, label: str = label) -> None:
                    with self.running(system, label) as server:
                        if client == "storescu":
                            row = workloads.store_dcmtk(server, manifest, root / "files", procs,
                                                        test=f"store-{name}", nodelay=self.nodelay,
                                                        log_dir=self.log_dir)
                        else:
                            row = workloads.store_pynetdicom(server, manifest, procs, test=f"store-{name}",
                                                             log_dir=self.log_dir)
                        row.details["disk_bytes_after"] = server.disk_usage_bytes()
                        self.add(row)

                self.guarded(f"{system} {label}", one)
        # Nagle as shipped: dcmtk's storescu (and Orthanc/storescp, which are dcmtk too)
        # without the TCP_NODELAY environment variable, on the first 200 small instances.
        root, manifest = datasets["small"]
        subset = manifest[:200]

        def shipped() -> None:
            saved, self.nodelay = self.nodelay, False
            try:
                with self.running(system, "store-small200-nagle") as server:
                    self.add(workloads.store_dcmtk(server, subset, root / "files", 1, test="store-small200-nagle",
                                                   nodelay=False, log_dir=self.log_dir))
            finally:
                self.nodelay = saved

        self.guarded(f"{system} store-small200-nagle", shipped)

    def echo(self, system: str) -> None:
        """Association set-up + C-ECHO + release, one after another: pynetdicom in this
        process (wall time of each round) and dcmtk's echoscu (one process per round)."""
        rounds = 50 if self.args.quick else 300
        with self.running(system, "echo") as server:
            for _ in range(5):  # Warm-up: imports, first-connection costs.
                scu.echo(server.aet, server.port)
            self.wait_quiet()
            latencies: list[float] = []
            failures = kill_waits = 0
            for _ in range(rounds):
                started = time.perf_counter()
                timing = scu.echo_timed(server.aet, server.port)
                latencies.append((time.perf_counter() - started) * 1000)
                failures += timing.status != 0
                kill_waits += timing.release_ms >= scu.CLIENT_KILL_WAIT_MS
            notes = [f"failures={failures}"] if failures else []
            notes.append(f"client_kill_waits={kill_waits}")  # See scu.CLIENT_KILL_WAIT_MS.
            self.add(Row(system=system, test="echo-setup-release", client="pynetdicom", instances=rounds,
                         elapsed_s=sum(latencies) / 1000, p50_ms=workloads.percentile(latencies, 50),
                         p99_ms=workloads.percentile(latencies, 99), ok=failures == 0, notes=" ".join(notes),
                         command="python: associate, C-ECHO, release, back to back (bench/scu.py echo_timed)"))
            pdus = scu.echo_pdus(server.aet, server.port)
            latencies, failures = [], 0
            for _ in range(rounds):
                started = time.perf_counter()
                failures += not scu.raw_echo(server.port, pdus)
                latencies.append((time.perf_counter() - started) * 1000)
            self.add(Row(system=system, test="echo-setup-release", client="raw PDUs", instances=rounds,
                         elapsed_s=sum(latencies) / 1000, p50_ms=workloads.percentile(latencies, 50),
                         p99_ms=workloads.percentile(latencies, 99), ok=failures == 0,
                         notes=f"failures={failures}" if failures else "",
                         command="python: pynetdicom's association + C-ECHO + release PDUs from a plain socket, "
                                 "each sent when the previous answer is in (bench/scu.py raw_echo)"))
            command = ["echoscu", "-aet", scu.BENCH_AET, "-aec", server.aet, servers.HOST, str(server.port)]
            env = servers.dcmtk_env(self.nodelay)
            latencies, failures = [], 0
            for _ in range(max(rounds // 3, 10)):
                started = time.perf_counter()
                completed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                latencies.append((time.perf_counter() - started) * 1000)
                failures += completed.returncode != 0
            self.add(Row(system=system, test="echo-setup-release", client="echoscu", instances=len(latencies),
                         elapsed_s=sum(latencies) / 1000, p50_ms=workloads.percentile(latencies, 50),
                         p99_ms=workloads.percentile(latencies, 99), ok=failures == 0,
                         notes=f"failures={failures}" if failures else "",
                         command=("TCP_NODELAY=1 " if self.nodelay else "") + " ".join(command)
                         + " (one process per round, process start included)"))

    def query_and_retrieve(self, system: str, datasets: dict[str, tuple[Path, list[dict[str, Any]]]],
                           tests: set[str]) -> None:
        with contextlib.ExitStack() as stack:
            destination = stack.enter_context(servers.start_storescp(self.run_dir, nodelay=self.nodelay))
            destinations = {STORESCP_AET: (servers.HOST, destination.port)}
            server = stack.enter_context(self.running(system, "query-retrieve", destinations))
            if "find" in tests:
                root, manifest = datasets["find"]
                load = workloads.store_dcmtk(server, manifest, root / "files", 4, test="load-find-set",
                                             nodelay=self.nodelay, log_dir=self.log_dir)
                self.add(load)
                self.wait_quiet()
                queries = find_queries(manifest, self.scale.queries_per_kind, seed=7)
                pynetdicom_queries = [(kind, scu.study_query(**match)) for kind, match in queries]
                self.guarded(f"{system} find pynetdicom",
                             lambda: self.add(workloads.find_pynetdicom(server, pynetdicom_queries)))
                dcmtk_queries = find_queries(manifest, self.scale.findscu_per_kind, seed=8)
                self.wait_quiet()
                self.guarded(f"{system} find findscu",
                             lambda: self.add(workloads.find_dcmtk(server, dcmtk_queries, nodelay=self.nodelay)))
            if "retrieve" in tests:
                root, manifest = datasets["retrieve"]
                self.wait_quiet()
                self.add(workloads.store_dcmtk(server, manifest, root / "files", 1, test="load-retrieve-study",
                                               nodelay=self.nodelay, log_dir=self.log_dir))
                self.wait_quiet()
                study_uid = manifest[0]["study_uid"]
                expected = len(manifest)
                study_bytes = sum(entry["size"] for entry in manifest)
                sop_classes = sorted({entry["sop_class_uid"] for entry in manifest})
                repeats = self.scale.retrieve_repeats
                scratch = self.run_dir / "scratch"
                scratch.mkdir(parents=True, exist_ok=True)
                self.guarded(f"{system} getscu", lambda: self.add(workloads.get_dcmtk(
                    server, study_uid, expected, study_bytes, repeats, nodelay=self.nodelay, scratch=scratch)))
                self.wait_quiet()
                self.guarded(f"{system} pynetdicom get", lambda: self.add(workloads.get_pynetdicom(
                    server, study_uid, sop_classes, expected, study_bytes, repeats)))
                self.wait_quiet()
                self.guarded(f"{system} movescu", lambda: self.add(workloads.move_dcmtk(
                    server, destination, study_uid, expected, study_bytes, repeats, nodelay=self.nodelay)))
                self.wait_quiet()
                self.guarded(f"{system} pynetdicom move", lambda: self.add(workloads.move_pynetdicom(
                    server, destination, study_uid, expected, study_bytes, repeats)))

    def run(self) -> int:
        systems = [name.strip() for name in self.args.only.split(",") if name.strip()]
        tests = {name.strip() for name in self.args.tests.split(",") if name.strip()}
        unknown = [name for name in systems if name not in SYSTEMS] + [name for name in tests if name not in TESTS]
        if unknown:
            raise SystemExit(f"unknown systems or tests: {unknown}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        self.monitor.start()
        self.load_start = load_average()
        self.foreign_start = foreign_processes()
        if self.foreign_start:
            print("# WARNING other DICOM/test processes are running; numbers will be disturbed:\n#   "
                  + "\n#   ".join(self.foreign_start), file=sys.stderr)
        try:
            specs = dataset_specs(self.scale)
            needed = set()
            if "ingest" in tests:
                needed |= {"ct512", "small"}
            if "find" in tests:
                needed.add("find")
            if "retrieve" in tests:
                needed.add("retrieve")
            datasets = {name: prepare_dataset(name, specs[name], self.work_dir / "data")
                        for name in sorted(needed)}
            for system in systems:
                print(f"# === {system}", file=sys.stderr, flush=True)
                if "ingest" in tests:
                    self.ingest(system, datasets)
                if system != "storescp" and "echo" in tests:
                    self.guarded(f"{system} echo", functools.partial(self.echo, system))
                if system != "storescp" and tests & {"find", "retrieve"}:
                    self.guarded(f"{system} query/retrieve",
                                 functools.partial(self.query_and_retrieve, system, datasets, tests))
        finally:
            self.monitor.stop()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        report = self.report(systems, tests, specs, time.time() - started)
        print(report)
        return 1 if self.errors else 0

    # -- output ---------------------------------------------------------------------------
    def report(self, systems: list[str], tests: set[str], specs: dict[str, datagen.StudySetSpec],
               elapsed_s: float) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        mode = "quick" if self.args.quick else "full"
        facts = machine_facts()
        facts["loadavg_start"] = self.load_start
        facts["loadavg_end"] = load_average()
        foreign_end = foreign_processes()
        if self.foreign_start or foreign_end:
            facts["other_processes"] = f"{len(self.foreign_start)} at start, {len(foreign_end)} at end (see JSON)"
        table = markdown_table(self.rows)
        ratios = ratio_table(self.rows)
        text = "\n".join([
            f"## Run {stamp} ({mode}; systems {', '.join(systems)}; tests {', '.join(sorted(tests))}; "
            f"{elapsed_s / 60:.1f} min)",
            "",
            "Machine: " + "; ".join(f"{key} {value}" for key, value in facts.items()),
            "",
            table,
            "",
            ratios,
            "",
        ] + ([f"Errors ({len(self.errors)}):", "", "```", *[error.strip() for error in self.errors], "```"]
             if self.errors else []))
        results_dir = BENCH_DIR / "results"
        results_dir.mkdir(exist_ok=True)
        payload = {
            "stamp": stamp, "mode": mode, "systems": systems, "tests": sorted(tests), "elapsed_s": elapsed_s,
            "machine": facts, "argv": sys.argv, "dcmtk_tcp_nodelay_env": self.nodelay,
            "datasets": {name: repr(spec) for name, spec in specs.items()},
            "rows": [row.as_dict() for row in self.rows], "errors": self.errors,
            "other_processes_at_start": self.foreign_start,
            "server_commands": self.server_commands,
        }
        (results_dir / f"{stamp}-{mode}.json").write_text(json.dumps(payload, indent=1, default=str))
        (results_dir / f"{stamp}-{mode}.md").write_text(text)
        return text


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| system | test | client | procs | instances | instances/s | MB/s | p50 ms | p99 ms | ok | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.system} | {row.test} | {row.client} | {row.procs} | {row.instances} | "
                     f"{_fmt(row.instances_per_s)} | {_fmt(row.mb_per_s)} | {_fmt(row.p50_ms)} | "
                     f"{_fmt(row.p99_ms)} | {'yes' if row.ok else 'NO'} | {row.notes} |")
    return "\n".join(lines)


def ratio_table(rows: Sequence[Row]) -> str:
    """pacsnode / Orthanc (and pacsnode-workers / Orthanc) for each test both ran: > 1 is
    better for rates, < 1 for latency."""
    by_key: dict[tuple[str, str, int], dict[str, Row]] = {}
    for row in rows:
        by_key.setdefault((row.test, row.client, row.procs), {})[row.system] = row
    lines = ["| test | client | procs | pacsnode/Orthanc instances/s | pacsnode/Orthanc p50 | "
             "pacsnode/Orthanc p99 | pacsnode-workers/Orthanc instances/s | pacsnode-workers/Orthanc p50 | "
             "pacsnode/storescp instances/s |", "|---|---|---|---|---|---|---|---|---|"]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else ""

    for (test, client, procs), systems in by_key.items():
        pacsnode, workers = systems.get("pacsnode"), systems.get("pacsnode-workers")
        orthanc, storescp = systems.get("orthanc"), systems.get("storescp")
        if (pacsnode is None and workers is None) or (orthanc is None and storescp is None):
            continue
        lines.append(
            f"| {test} | {client} | {procs} | "
            f"{ratio(pacsnode.instances_per_s, orthanc.instances_per_s) if pacsnode and orthanc else ''} | "
            f"{ratio(pacsnode.p50_ms, orthanc.p50_ms) if pacsnode and orthanc else ''} | "
            f"{ratio(pacsnode.p99_ms, orthanc.p99_ms) if pacsnode and orthanc else ''} | "
            f"{ratio(workers.instances_per_s, orthanc.instances_per_s) if workers and orthanc else ''} | "
            f"{ratio(workers.p50_ms, orthanc.p50_ms) if workers and orthanc else ''} | "
            f"{ratio(pacsnode.instances_per_s, storescp.instances_per_s) if pacsnode and storescp else ''} |")
    return "\n".join(lines) if len(lines) > 2 else "(no pacsnode rows to compare)"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def foreign_processes(exclude_tree: int | None = None) -> list[str]:
    """Processes this run did not start that compete for the 2 cores (tests, nodes, PACS)."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        commands[int(entry.name)] = command
    own_root = exclude_tree if exclude_tree is not None else os.getpid()

    def ours(pid: int) -> bool:
        for _ in range(64):
            if pid == own_root:
                return True
            if pid not in parents or pid <= 1:
                return False
            pid = parents[pid]
        return False

    ancestors = set()
    pid = os.getpid()
    while pid in parents and pid > 1 and pid not in ancestors:
        ancestors.add(pid)
        pid = parents[pid]
    words = ("pytest", "pacsnode", "Orthanc", "storescp", "storescu")
    return [f"{pid} {command[:120]}" for pid, command in sorted(commands.items())
            if any(word in command for word in words) and not ours(pid) and pid not in ancestors]


def machine_facts() -> dict[str, str]:
    def run(command: list[str]) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = "?"
    with contextlib.suppress(OSError, ValueError):
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory_gb = f"{memory_kb / 1024 / 1024:.0f} GB"
    import pydicom
    import pynetdicom
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "orthanc": run([servers.ORTHANC_BINARY, "--version"]).splitlines()[0] if True else "?",
        "dcmtk": run(["dpkg-query", "-W", "-f", "${Version}", "dcmtk"]),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "pacsnode_commit": run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated: storescp,orthanc,pacsnode,pacsnode-workers")
    parser.add_argument("--tests", default=",".join(TESTS), help="comma-separated: ingest,find,retrieve")
    parser.add_argument("--quick", action="store_true", help="small data sets and few repetitions")
    parser.add_argument("--work-dir", default=str(BENCH_DIR / "work"),
                        help="generated data cache and server temp dirs (default bench/work)")
    parser.add_argument("--dcmtk-nagle", action="store_true",
                        help="do not set TCP_NODELAY=1 for dcmtk tools and Orthanc (their shipped behaviour)")
    parser.add_argument("--quiet-wait-s", type=float, default=120.0,
                        help="before each measurement, wait up to this long for other test runs or nodes "
                             "on the machine to finish (0: do not wait); rows measured while busy are marked")
    parser.add_argument("--pacsnode-arg", action="append", default=[],
                        help="extra argument for `pacsnode start` (repeatable)")
    args = parser.parse_args(argv)
    return Bench(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
