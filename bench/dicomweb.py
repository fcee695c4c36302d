"""DICOMweb: pacsnode vs Orthanc 1.10.1 + its DICOMweb plugin (Debian `orthanc-dicomweb`), in one run.

Run by hand, never in CI (results go in bench/README.md, "DICOMweb"):

    .venv/bin/python bench/dicomweb.py                 # STOW, WADO, /metadata, QIDO at 10k studies
    .venv/bin/python bench/dicomweb.py --studies 100000 --only qido   # QIDO at 100k (slow: ingest by storescu)
    .venv/bin/python bench/dicomweb.py --repeats 5 --only wado,metadata

Each system is a separate process on 127.0.0.1 started fresh (bench/servers.py) and stopped
with its temp dir deleted. Measurements alternate between the systems, the order turned
each round (A B, B A, ...), and the table shows medians and quartiles: the machine is
shared and noisy. Neither server is pinned to a core (`taskset` would be unfair: both use
several threads, and curl needs a core too); the bench runs under `nice` like the servers.

- stow: `--stow-instances` 64 x 64 instances (~9 KB) POSTed as multipart/related in
  batches of 20, 2 client threads, into an empty server; instances/s. Checked by QIDO.
- wado: one study of 80 CT 512 x 512 instances (~42 MB), GET /studies/{uid} with
  `multipart/related; type="application/dicom"; transfer-syntax=*`, body read by curl; MB/s
  from curl's own `time_total` (connect to last byte; `wall_s` adds its process start).
  Before the timed rounds both servers are left to go idle (after an ingest RocksDB
  flushes and compacts for a while) and each answers one untimed retrieve. `--repeats`
  rounds; the summary gives each system's median and quartiles, the ratio of medians,
  and the median and quartiles of the per-round ratios. Checked: every stored byte came
  back (the sum of part sizes equals the files').
- wado-restart: `wado` again after both servers were stopped and started on their data:
  pacsnode then reads the blobs from RocksDB's blob files (just after ingest they are still
  in its memtable), Orthanc its files; what a study stored earlier costs to retrieve.
- `--zstd`: wado, wado-restart and wado-small also read pacsnode with `curl --compressed` (`pacsnode_zstd`:
  its Content-Encoding: zstd answer, each stored frame sent as stored); `bytes` is then what
  crossed the wire, MB/s the study's decoded MB. Orthanc's answer to `Accept-Encoding: zstd`
  is recorded (its DICOMweb plugin has no zstd).
- wado-small: the same, for one study of `--small-instances` 64 x 64 CT instances (~9 KB
  each): what a retrieve costs per instance rather than per byte.
- metadata: GET /studies/{uid}/series/{uid}/metadata of that study's 80-instance series:
  the first request after ingest, then the median of the next ones.
- fresh (`--fresh-rounds`): the first series /metadata again, on fresh servers each round
  (start both, store the 80 CT by storescu x2, ask), which system is asked first
  alternating between rounds: one first request per server says little on a shared machine.
- server CPU is recorded beside each stow, wado and metadata measurement, with the load
  average: on a shared machine it moves far less than wall time. For wado and metadata it
  is the sum over the server's threads of /proc/PID/task/TID/schedstat (ns); for stow the
  process's user + system ticks (10 ms), which count threads that ended.
- qido: `--studies` one-instance studies loaded with storescu x4, then STUDY-level QIDO
  kinds (PatientID exact, PatientName prefix, StudyDate one month, StudyInstanceUID,
  AccessionNumber), `--queries` of each interleaved; p50 and p95 latency of each kind.
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
from typing import Any, Callable

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import servers  # noqa: E402
import workloads  # noqa: E402
from run import prepare_dataset  # noqa: E402
from servers import HOST, Server  # noqa: E402

from pacsnode.sim import datagen  # noqa: E402

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
MB = 1_000_000
LOAD_ROUND = 20_000  # Files per storescu round when loading the QIDO set.


def start_orthanc_dicomweb(parent: Path) -> Server:
    """Orthanc as bench/servers.py starts it, plus the DICOMweb plugin at /dicom-web/ (its defaults)."""
    return servers.start_orthanc(parent, destinations={}, extra_config={
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}})


def start_pacsnode(parent: Path) -> Server:
    server = servers.start_pacsnode(parent, destinations={})
    command = server.command
    server.http_port = int(command[command.index("--http-port") + 1])
    return server


def wado_set(data_dir: Path, pixel_fill: str) -> tuple[Path, list[dict[str, Any]]]:
    """The `wado` set: 80 CT 512 x 512 of one series (42 MB), 12 bits of noise or the
    phantom that compresses (`pixel_fill`), generated once under `data_dir`."""
    spec = datagen.StudySetSpec(patients=1, series_per_study=1, instances_per_series=80, rows=512, cols=512,
                                modalities=("CT",), seed=202, pixel_fill=pixel_fill)
    return prepare_dataset(f"dw-wado{'-phantom' if pixel_fill == 'phantom' else ''}", spec, data_dir)


def ready_for_wado(systems: list[Server], study: str, total: int, *, restart_first: bool = False) -> None:
    """After the `wado` set was stored: restart every server on its data when asked, wait
    until all are idle, then 3 untimed retrieves of the study from each (the HTTP stack's
    and the files' first touch); SystemExit when one fails."""
    if restart_first:
        for server in systems:
            restart(server)
    wait_idle(systems, timeout_s=30)
    for server in systems:
        for _ in range(3):
            if not wado_study(server, study, total)["ok"]:
                raise SystemExit("a retrieve failed")


def restart(server: Server) -> None:
    """Stop a server and start it again on the same data, ports and command."""
    servers._signal_group(server.process, signal.SIGTERM)
    server.process.wait(timeout=60)
    env = (servers.dcmtk_env(True) if server.name == "orthanc" else
           {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"})
    server.process = servers._spawn(server.command, server.log_path, env, server.work_dir)
    servers.wait_port(server, timeout_s=90)


def cpu_seconds(server: Server) -> float:
    """User + system CPU of the server process and its live children (from /proc, in clock
    ticks of 10 ms), threads that ended included: for STOW's seconds-long batches. Short
    requests use `thread_cpu_ns`. On a shared machine CPU moves far less than wall time."""
    tick = os.sysconf("SC_CLK_TCK")

    def own(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    return sum(own(pid) for pid in _server_pids(server))


def _server_pids(server: Server) -> list[int]:
    pids = [server.process.pid]
    try:
        for task in Path(f"/proc/{server.process.pid}/task").iterdir():
            pids += [int(child) for child in (task / "children").read_text().split()]
    except OSError:
        pass
    return pids


def thread_cpu_ns(server: Server) -> dict[int, int]:
    """CPU time in ns of every live thread of the server and its children, by thread id
    (/proc/PID/task/TID/schedstat): per thread, so that a thread started or ended between
    two readings does not move the others, and in ns where /proc/PID/stat counts 10 ms
    ticks (a 42 MB retrieve costs 2-5 ticks; the tick alone made its CPU 20 or 30 ms)."""
    times: dict[int, int] = {}
    for pid in _server_pids(server):
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                times[int(task.name)] = int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return times


def cpu_ms_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU spent between two `thread_cpu_ns` readings: the threads alive at both by
    difference, threads started since in full (a thread that ended between them is lost)."""
    return sum(value - before.get(tid, 0) for tid, value in after.items()) / 1e6


def wait_idle(servers_: list[Server], *, quiet_ms: float = 2.0, window_s: float = 0.2, timeout_s: float = 10.0
              ) -> bool:
    """Wait until no server spends more than `quiet_ms` of CPU in a `window_s` window
    (after an ingest: RocksDB's flushes and compactions, Orthanc's own jobs); False if
    `timeout_s` passed first. A measurement started while one of them still works gives
    that one a busy core and the other a loaded machine."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = [thread_cpu_ns(server) for server in servers_]
        time.sleep(window_s)
        if all(cpu_ms_between(first, thread_cpu_ns(server)) <= quiet_ms for first, server in zip(before, servers_)):
            return True
    return False


def load_average() -> float:
    return os.getloadavg()[0]


def root_url(server: Server) -> str:
    return f"http://{HOST}:{server.http_port}/dicom-web"


def multipart(files: list[bytes], boundary: str = "pacsnode-bench-boundary") -> tuple[bytes, str]:
    body = bytearray()
    for data in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(server: Server, manifest: list[dict[str, Any]], *, batch: int = 20, threads: int = 2) -> dict[str, Any]:
    files = [Path(entry["path"]).read_bytes() for entry in manifest]
    batches = [files[index:index + batch] for index in range(0, len(files), batch)]
    bodies = [multipart(chunk) for chunk in batches]
    failures = []

    def post(client: httpx.Client, body: bytes, content_type: str) -> None:
        reply = client.post(root_url(server) + "/studies", content=body, headers={"Content-Type": content_type,
                                                                                  "Accept": "application/dicom+json"})
        if reply.status_code != 200:
            failures.append(reply.status_code)

    clients = [httpx.Client(timeout=300) for _ in range(threads)]
    cpu_before = cpu_seconds(server)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda item: post(clients[item[0] % threads], *item[1]), enumerate(bodies)))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(server) - cpu_before
    for client in clients:
        client.close()
    studies = {entry["study_uid"] for entry in manifest}
    found = httpx.get(root_url(server) + "/studies?limit=100000", timeout=120).json()
    held = len({item["0020000D"]["Value"][0] for item in found} & studies)
    return {"instances": len(files), "elapsed_s": elapsed, "instances_per_s": len(files) / elapsed,
            "server_cpu_s_per_1000": cpu * 1000 / len(files), "load": load_average(),
            "failed_batches": len(failures), "ok": not failures and held == len(studies)}


def wado_study(server: Server, study: str, expected_bytes: int, *, compressed: bool = False) -> dict[str, Any]:
    """curl (C) reads the body: a Python client's multipart/chunked parsing would be the bottleneck
    (httpx measured 230 MB/s where curl read 900 MB/s from the same Orthanc). `elapsed_s` is
    curl's own time from its start of the connection to the last byte (`time_total`), what
    the ratios use; `wall_s` adds curl's process start and exit (~5 ms, the same for both).
    `compressed`: curl --compressed (Accept-Encoding: deflate, gzip, br, zstd; curl decodes
    the body): `bytes` are then the bytes on the wire (curl's size_download), `mb_per_s` the
    study's decoded megabytes (`expected_bytes`) per second, and `ok` needs a
    `Content-Encoding: zstd` answer, or a plain one of the whole study (pacsnode answers plain
    when the stored frames did not compress; the decoded body's equality is
    tests/unit/test_dicomweb_zstd.py's)."""
    cpu_before = thread_cpu_ns(server)
    started = time.perf_counter()
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-D", "-", "-w", "\n%{http_code} %{size_download} %{time_total}",
                          *(["--compressed"] if compressed else []),
                          "-H", f"Accept: {ACCEPT_DICOM}", f"{root_url(server)}/studies/{study}"],
                         capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - started
    cpu = cpu_ms_between(cpu_before, thread_cpu_ns(server))
    headers, _, written = out.stdout.rpartition("\n")
    status_text, received_text, total_text = written.split()
    status, received, elapsed = int(status_text), int(received_text), float(total_text)
    encoding = next((line.split(":", 1)[1].strip() for line in headers.splitlines()
                     if line.lower().startswith("content-encoding:")), "")
    # Encoded, or (a study whose stored frames did not compress, DicomWeb._zstd_saves) plain.
    ok = status == 200 and ((encoding == "zstd" or (encoding == "" and received >= expected_bytes)) if compressed
                            else received >= expected_bytes)
    return {"elapsed_s": elapsed, "wall_s": wall, "bytes": received,
            "mb_per_s": (expected_bytes if compressed else received) / MB / elapsed, "content_encoding": encoding,
            "server_cpu_ms": cpu, "load": load_average(), "ok": ok}


def orthanc_zstd_answer(server: Server, study: str) -> dict[str, Any]:
    """What Orthanc's DICOMweb plugin answers to `Accept-Encoding: zstd` (it has no zstd)."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-D", "-", "-H", "Accept-Encoding: zstd",
                          "-H", f"Accept: {ACCEPT_DICOM}", f"{root_url(server)}/studies/{study}"],
                         capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    return {"status_line": lines[0] if lines else "",
            "headers": {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip()
                        for line in lines[1:] if ":" in line and line.split(":", 1)[0].lower() in
                        ("content-encoding", "content-length", "transfer-encoding", "vary", "content-type")}}


def series_metadata(server: Server, study: str, series: str, count: int) -> dict[str, Any]:
    """One GET on a new connection. The client is made before the clock starts: making an
    httpx.Client loads the CA bundle (38-85 ms measured, load 6), which the timed requests
    before 2026-12-06 20:00 included, for both systems alike."""
    with httpx.Client(timeout=300) as client:
        cpu_before = thread_cpu_ns(server)
        started = time.perf_counter()
        reply = client.get(f"{root_url(server)}/studies/{study}/series/{series}/metadata",
                           headers={"Accept": "application/dicom+json"})
        elapsed = time.perf_counter() - started
        cpu = cpu_ms_between(cpu_before, thread_cpu_ns(server))
    ok = reply.status_code == 200 and len(reply.json()) == count
    return {"elapsed_ms": elapsed * 1000, "server_cpu_ms": cpu, "load": load_average(), "ok": ok}


def fresh_rounds(temp: Path, files: Path, manifest: list[dict[str, Any]], rounds: int
                 ) -> list[dict[str, Any]]:
    """The first series /metadata after ingest on fresh servers, `rounds` times; the
    system asked first alternates. Each round: {name: series_metadata(...)}, plus the
    second request of each as "next"."""
    study, series = manifest[0]["study_uid"], manifest[0]["series_uid"]
    results = []
    for round_index in range(rounds):
        systems = {"pacsnode": start_pacsnode(temp), "orthanc": start_orthanc_dicomweb(temp)}
        try:
            for server in systems.values():
                workloads.store_dcmtk(server, manifest, files, 2, test="dw-fresh", verify=False, log_dir=temp)
            order = list(systems) if round_index % 2 == 0 else list(reversed(systems))
            row: dict[str, Any] = {"first": order[0]}
            for name in order:
                row[name] = series_metadata(systems[name], study, series, len(manifest))
            for name in order:
                row[name]["next"] = series_metadata(systems[name], study, series, len(manifest))
            results.append(row)
        finally:
            for server in systems.values():
                server.stop()
    return results


def qido_queries(manifest: list[dict[str, Any]], count: int) -> list[tuple[str, str]]:
    """(kind, query string) pairs, interleaved."""
    step = max(1, len(manifest) // count)
    picks = manifest[::step][:count]
    queries = []
    for entry in picks:
        name = entry["patient_name"].split("^")[0][:3]
        month = entry["study_date"][:6]
        queries.append(("patient-id", f"PatientID={entry['patient_id']}"))
        queries.append(("name-prefix", f"PatientName={name}*"))
        queries.append(("date-month", f"StudyDate={month}01-{month}28"))
        queries.append(("study-uid", f"StudyInstanceUID={entry['study_uid']}"))
        queries.append(("accession", f"AccessionNumber={entry['accession_number']}"))
    return queries


FIELDS = "&includefield=PatientName&includefield=PatientID&includefield=StudyDate&includefield=ModalitiesInStudy"


def qido(server: Server, queries: list[tuple[str, str]]) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {}
    bad = 0
    with httpx.Client(timeout=120) as client:
        for kind, query in queries:
            started = time.perf_counter()
            reply = client.get(f"{root_url(server)}/studies?{query}{FIELDS}", headers={"Accept": "application/dicom+json"})
            latencies.setdefault(kind, []).append((time.perf_counter() - started) * 1000)
            if reply.status_code != 200 or not reply.json():
                bad += 1
    return {"p50_ms": {kind: statistics.median(values) for kind, values in latencies.items()},
            "p95_ms": {kind: percentile(values, 95) for kind, values in latencies.items()}, "bad": bad}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def with_compressed(systems: dict[str, Server], zstd: bool) -> dict[str, Server]:
    """The systems to measure, with pacsnode once more (`pacsnode_zstd`, the same server read
    by curl --compressed) when `zstd`."""
    return {**systems, "pacsnode_zstd": systems["pacsnode"]} if zstd else systems


def alternate(measure: Callable[[Server], dict[str, Any]], systems: dict[str, Server], repeats: int
              ) -> dict[str, list[dict[str, Any]]]:
    """`repeats` rounds of one measurement of each system, the order turned every round
    (A B, B A, A B, ...): whichever goes second finds the page cache, the CPU's clock and
    the other sessions' load as the first left them."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    names = list(systems)
    for round_index in range(repeats):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            results[name].append(measure(systems[name]) if name != "pacsnode_zstd" else
                                 measure(_Compressed(systems[name])))  # type: ignore[arg-type]
    return results


class _Compressed:
    """A server to be read by curl --compressed (`alternate` for `pacsnode_zstd`)."""

    def __init__(self, server: Server) -> None:
        self.server = server


def wado_measure(study: str, total: int) -> Callable[[Any], dict[str, Any]]:
    """wado_study of a system `alternate` hands over (a `_Compressed` one with --compressed)."""
    def measure(system: Any) -> dict[str, Any]:
        if isinstance(system, _Compressed):
            return wado_study(system.server, study, total, compressed=True)
        return wado_study(system, study, total)
    return measure


def settled(systems: dict[str, Server], measure: Callable[[Server], dict[str, Any]]) -> dict[str, Any]:
    """Before timed rounds: wait until both servers are idle (an ingest leaves RocksDB's
    flushes and compactions, and Orthanc's jobs, running for a while), then one untimed
    `measure` of each (the first request's connections, threads and caches)."""
    started = time.monotonic()
    idle = wait_idle(list(systems.values()))
    waited = time.monotonic() - started
    first = {name: measure(server) for name, server in systems.items()}
    return {"idle_before": idle, "waited_idle_s": round(waited, 2), "untimed_first": first, "load": load_average()}


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range of a list of numbers (rounded)."""
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3), "p25": round(percentile(ordered, 25), 3),
            "p75": round(percentile(ordered, 75), 3), "min": round(ordered[0], 3), "max": round(ordered[-1], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="stow,wado,wado-restart,wado-small,metadata,fresh,qido")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stow-instances", type=int, default=1000)
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=50, help="queries of each kind")
    parser.add_argument("--small-instances", type=int, default=500, help="instances of the 'wado-small' study")
    parser.add_argument("--fresh-rounds", type=int, default=6, help="rounds of fresh servers for 'fresh'")
    parser.add_argument("--pixel-fill", choices=("noise12", "phantom"), default="noise12",
                        help="the 80 CT of 'wado', 'wado-restart', 'metadata' and 'fresh': 12 bits of noise "
                             "(incompressible, as every run before 2026-12-07 15:40) or a CT-like phantom "
                             "that compresses ~2x as real CT does (sim/datagen.py)")
    parser.add_argument("--zstd", action="store_true",
                        help="'wado', 'wado-restart' and 'wado-small' also read pacsnode with curl --compressed (its "
                             "Content-Encoding: zstd answer: stored frames as stored), as `pacsnode_zstd`; "
                             "and record what Orthanc answers to Accept-Encoding: zstd")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    data_dir = args.work / "data"
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    args.work.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="dicomweb-", dir=args.work))
    systems: dict[str, Server] = {}
    try:
        if "stow" in only:
            spec = datagen.StudySetSpec(patients=args.stow_instances // 20, series_per_study=2,
                                        instances_per_series=10, rows=64, cols=64, seed=201)
            _root, manifest = prepare_dataset("dw-stow", spec, data_dir)
            runs: dict[str, list[dict[str, Any]]] = {"pacsnode": [], "orthanc": []}
            for _ in range(max(1, args.repeats // 2)):
                for name in ("pacsnode", "orthanc"):
                    with (start_pacsnode if name == "pacsnode" else start_orthanc_dicomweb)(temp) as server:
                        runs[name].append(stow(server, manifest))
            report["results"]["stow"] = runs
        if only & {"wado", "wado-restart", "metadata"}:
            _root, manifest = wado_set(data_dir, args.pixel_fill)
            study, series = manifest[0]["study_uid"], manifest[0]["series_uid"]
            total = sum(entry["size"] for entry in manifest)
            systems = {"pacsnode": start_pacsnode(temp), "orthanc": start_orthanc_dicomweb(temp)}
            for server in systems.values():
                workloads.store_dcmtk(server, manifest, Path(_root) / "files", 2, test="dw-load",
                                      verify=False, log_dir=temp)
            if "metadata" in only:
                report["results"]["metadata_first"] = {
                    name: series_metadata(server, study, series, len(manifest)) for name, server in systems.items()}
                report["results"]["metadata"] = alternate(
                    lambda server: series_metadata(server, study, series, len(manifest)), systems, args.repeats)
            measured = with_compressed(systems, args.zstd)
            if args.zstd:
                report["results"]["orthanc_zstd_answer"] = orthanc_zstd_answer(systems["orthanc"], study)
            if "wado" in only:
                report["results"]["wado_settle"] = settled(systems, lambda server: wado_study(server, study, total))
                report["results"]["wado"] = alternate(wado_measure(study, total), measured, args.repeats)
            if "wado-restart" in only:
                for server in systems.values():
                    restart(server)
                # A first retrieve: the HTTP stack's and the files' first touch.
                report["results"]["wado_restart_settle"] = settled(systems,
                                                                   lambda server: wado_study(server, study, total))
                report["results"]["wado_restart"] = alternate(wado_measure(study, total), measured, args.repeats)
            for server in systems.values():
                server.stop()
            systems = {}
        if "wado-small" in only:
            spec = datagen.StudySetSpec(patients=1, series_per_study=1, instances_per_series=args.small_instances,
                                        rows=64, cols=64, modalities=("CT",), seed=204)
            _root, manifest = prepare_dataset(f"dw-small{args.small_instances}", spec, data_dir)
            study = manifest[0]["study_uid"]
            total = sum(entry["size"] for entry in manifest)
            systems = {"pacsnode": start_pacsnode(temp), "orthanc": start_orthanc_dicomweb(temp)}
            for server in systems.values():
                workloads.store_dcmtk(server, manifest, Path(_root) / "files", 2, test="dw-small-load",
                                      verify=False, log_dir=temp)
            report["results"]["wado_small_settle"] = settled(systems, lambda server: wado_study(server, study, total))
            report["results"]["wado_small"] = alternate(wado_measure(study, total), with_compressed(systems, args.zstd),
                                                        args.repeats)
            for server in systems.values():
                server.stop()
            systems = {}
        if "fresh" in only:
            _root, manifest = wado_set(data_dir, args.pixel_fill)
            report["results"]["metadata_fresh"] = fresh_rounds(temp, Path(_root) / "files", manifest,
                                                               args.fresh_rounds)
        if "qido" in only:
            spec = datagen.StudySetSpec(patients=args.studies // 4, studies_per_patient=4, rows=16, cols=16,
                                        latin1_fraction=0.1, seed=203)
            _root, manifest = prepare_dataset(f"dw-qido{args.studies}", spec, data_dir)
            systems = {"pacsnode": start_pacsnode(temp), "orthanc": start_orthanc_dicomweb(temp)}
            loads = {}
            for name, server in systems.items():
                # storescu takes its files as arguments: rounds of LOAD_ROUND files keep each
                # command line under the system's limit.
                elapsed = 0.0
                for start in range(0, len(manifest), LOAD_ROUND):
                    row = workloads.store_dcmtk(server, manifest[start:start + LOAD_ROUND], Path(_root) / "files", 4,
                                                test="dw-qido-load", verify=False, log_dir=temp)
                    elapsed += row.elapsed_s
                loads[name] = {"elapsed_s": elapsed, "instances_per_s": len(manifest) / elapsed}
            queries = qido_queries(manifest, args.queries)
            qido_runs = alternate(lambda server: qido(server, queries), systems, max(1, args.repeats // 2))
            report["results"][f"qido{args.studies}"] = {"load": loads, "runs": qido_runs}
    finally:
        for server in systems.values():
            server.stop()
        shutil.rmtree(temp, ignore_errors=True)
    summary = summarize(report["results"])
    report["summary"] = summary
    print(json.dumps(summary, indent=2))
    out = args.out or (HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-dicomweb.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"# wrote {out}", file=sys.stderr)
    return 0


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}

    def median_of(runs: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(run[key] for run in runs), 2)

    if "stow" in results:
        summary["stow_instances_per_s"] = {name: median_of(runs, "instances_per_s")
                                           for name, runs in results["stow"].items()}
        summary["stow_server_cpu_s_per_1000"] = {name: median_of(runs, "server_cpu_s_per_1000")
                                                 for name, runs in results["stow"].items()}
        summary["stow_ok"] = all(run["ok"] for runs in results["stow"].values() for run in runs)
    for key in ("wado", "wado_restart", "wado_small"):
        if key in results:
            runs = results[key]
            summary[f"{key}_study_mb_per_s"] = {name: median_of(values, "mb_per_s") for name, values in runs.items()}
            summary[f"{key}_ms"] = {name: spread([run["elapsed_s"] * 1000 for run in values])
                                    for name, values in runs.items()}
            summary[f"{key}_server_cpu_ms"] = {name: spread([run["server_cpu_ms"] for run in values])
                                               for name, values in runs.items()}
            summary[f"{key}_wire_bytes"] = {name: median_of(values, "bytes") for name, values in runs.items()}
            # Pairs are the two measurements of one round, taken one after the other.
            ratios = [o["elapsed_s"] / p["elapsed_s"] for p, o in zip(runs["pacsnode"], runs["orthanc"])]
            summary[f"{key}_ratio_of_medians"] = round(
                summary[f"{key}_ms"]["orthanc"]["median"] / summary[f"{key}_ms"]["pacsnode"]["median"], 2)
            summary[f"{key}_pair_ratios"] = spread(ratios)
            summary[f"{key}_pairs_at_or_above_1"] = f"{sum(ratio >= 1.0 for ratio in ratios)}/{len(ratios)}"
            summary[f"{key}_load"] = [round(min(run["load"] for v in runs.values() for run in v), 1),
                                      round(max(run["load"] for v in runs.values() for run in v), 1)]
            summary[f"{key}_ok"] = all(run["ok"] for values in runs.values() for run in values)
    if "orthanc_zstd_answer" in results:
        summary["orthanc_zstd_answer"] = results["orthanc_zstd_answer"]
    if "metadata_first" in results:
        summary["metadata_first_ms"] = {name: round(run["elapsed_ms"], 1)
                                        for name, run in results["metadata_first"].items()}
        summary["metadata_first_server_cpu_ms"] = {name: round(run["server_cpu_ms"], 1)
                                                   for name, run in results["metadata_first"].items()}
        summary["metadata_next_ms"] = {name: median_of(runs, "elapsed_ms") for name, runs in results["metadata"].items()}
    if "metadata_fresh" in results:
        rounds = results["metadata_fresh"]
        summary["metadata_fresh_first_ms"] = {name: [round(row[name]["elapsed_ms"], 1) for row in rounds]
                                              for name in ("pacsnode", "orthanc")}
        summary["metadata_fresh_first_server_cpu_ms"] = {
            name: [round(row[name]["server_cpu_ms"]) for row in rounds] for name in ("pacsnode", "orthanc")}
        ratios = [row["orthanc"]["elapsed_ms"] / row["pacsnode"]["elapsed_ms"] for row in rounds]
        summary["metadata_fresh_ratio_median"] = round(statistics.median(ratios), 2)
        summary["metadata_fresh_ratios"] = [round(ratio, 2) for ratio in ratios]
        summary["metadata_fresh_load"] = [round(row["pacsnode"]["load"], 1) for row in rounds]
        summary["metadata_fresh_ok"] = all(row[name]["ok"] and row[name]["next"]["ok"]
                                           for row in rounds for name in ("pacsnode", "orthanc"))
    for key, value in results.items():
        if key.startswith("qido"):
            summary[f"{key}_p50_ms"] = {
                name: {kind: round(statistics.median(run["p50_ms"][kind] for run in runs), 2)
                       for kind in runs[0]["p50_ms"]}
                for name, runs in value["runs"].items()}
            summary[f"{key}_p95_ms"] = {
                name: {kind: round(statistics.median(run["p95_ms"][kind] for run in runs), 2)
                       for kind in runs[0]["p95_ms"]}
                for name, runs in value["runs"].items()}
            summary[f"{key}_load_instances_per_s"] = {name: round(load["instances_per_s"], 1)
                                                      for name, load in value["load"].items()}
            summary[f"{key}_bad"] = sum(run["bad"] for runs in value["runs"].values() for run in runs)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
