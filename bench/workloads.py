"""The measurements. Each function drives one server with real clients and returns a Row."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import scu
from servers import BENCH_AET, HOST, STORESCP_AET, Server, dcmtk_env

PYTHON = sys.executable
SCU_SCRIPT = str(Path(__file__).resolve().parent / "scu.py")
MB = 1_000_000  # Throughput is in MB/s with 1 MB = 10^6 bytes.


@dataclass
class Row:
    system: str
    test: str
    client: str
    procs: int = 1
    instances: int = 0
    bytes: int = 0
    elapsed_s: float = 0.0
    instances_per_s: float | None = None
    mb_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    ok: bool = True
    notes: str = ""
    command: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Round-robin split, so every part gets the same mix of studies and sizes."""
    return [list(items[index::parts]) for index in range(parts)]


def _count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def stored_count(server: Server, manifest: Sequence[dict[str, Any]]) -> int:
    """How many of the manifest's instances the server now holds, asked the server's way."""
    if server.name == "storescp":
        assert server.storage_dir is not None
        return _count_files(server.storage_dir)
    if server.name == "orthanc":
        statistics = server.orthanc_get("/statistics")
        assert isinstance(statistics, dict)
        return int(statistics["CountInstances"])
    counted = scu.count_instances_by_study(server.aet, server.port, {entry["study_uid"] for entry in manifest})
    if counted is not None:
        return counted
    series = sorted({(entry["study_uid"], entry["series_uid"]) for entry in manifest})
    return scu.count_instances(server.aet, server.port, series)


def _count_before(server: Server) -> int:
    """Orthanc and storescp count everything they hold; pacsnode's count is per manifest."""
    if server.name in ("orthanc", "storescp"):
        return stored_count(server, [])
    return 0


def _rate(row: Row) -> Row:
    if row.elapsed_s > 0:
        row.instances_per_s = row.instances / row.elapsed_s
        row.mb_per_s = row.bytes / MB / row.elapsed_s
    return row


# ---------------------------------------------------------------------------------------
# C-STORE


def store_dcmtk(server: Server, manifest: Sequence[dict[str, Any]], data_root: Path, procs: int, *,
                test: str, nodelay: bool = True, verify: bool = True, log_dir: Path) -> Row:
    """`procs` storescu processes in parallel, each with its share of the files."""
    relative = [os.path.relpath(entry["path"], data_root) for entry in manifest]
    shares = _split(relative, procs)
    env = dcmtk_env(nodelay)
    before = _count_before(server) if verify else 0
    base = ["storescu", "-aet", BENCH_AET, "-aec", server.aet, HOST, str(server.port)]
    logs = [open(log_dir / f"{server.name}-{test}-storescu-{index}.log", "wb") for index in range(procs)]
    started = time.perf_counter()
    try:
        processes = [subprocess.Popen(base + share, cwd=data_root, env=env, stdout=log, stderr=subprocess.STDOUT)
                     for share, log in zip(shares, logs)]
        codes = [process.wait() for process in processes]
    finally:
        for log in logs:
            log.close()
    elapsed_s = time.perf_counter() - started
    row = Row(system=server.name, test=test, client="storescu", procs=procs, instances=len(manifest),
              bytes=sum(entry["size"] for entry in manifest), elapsed_s=elapsed_s,
              command=("TCP_NODELAY=1 " if nodelay else "") + " ".join(base) + " FILES...",
              details={"exit_codes": codes})
    if any(codes):
        row.ok = False
        row.notes = f"storescu exit codes {codes}"
    if verify:
        _verify(server, manifest, row, before)
    return _rate(row)


def store_pynetdicom(server: Server, manifest: Sequence[dict[str, Any]], procs: int, *, test: str,
                     verify: bool = True, log_dir: Path) -> Row:
    """`procs` worker processes (bench/scu.py store), started first and released together."""
    contexts = sorted({f"{entry['sop_class_uid']}:{entry['transfer_syntax_uid']}" for entry in manifest})
    shares = _split([entry["path"] for entry in manifest], procs)
    list_dir = Path(tempfile.mkdtemp(prefix="bench-lists-", dir=log_dir))
    before = _count_before(server) if verify else 0
    workers: list[subprocess.Popen[str]] = []
    try:
        for index, share in enumerate(shares):
            list_path = list_dir / f"share-{index}.txt"
            list_path.write_text("\n".join(share) + "\n")
            command = [PYTHON, SCU_SCRIPT, "store", "--port", str(server.port), "--aec", server.aet,
                       "--list", str(list_path)]
            for context in contexts:
                command += ["--context", context]
            stderr = open(log_dir / f"{server.name}-{test}-pynetdicom-{index}.log", "w")
            workers.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, text=True))
            stderr.close()
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"store worker did not start: {line!r}")
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        reports = []
        for worker in workers:
            output, _ = worker.communicate(timeout=3600)
            lines = [line for line in output.splitlines() if line.startswith("{")]
            if worker.returncode != 0 or not lines:
                raise RuntimeError(f"store worker failed with {worker.returncode}; see logs in {log_dir}")
            reports.append(json.loads(lines[-1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        shutil.rmtree(list_dir, ignore_errors=True)
    elapsed_s = max(report["end"] for report in reports) - min(report["start"] for report in reports)
    totals = {key: sum(report[key] for report in reports)
              for key in ("ok", "warnings", "failed", "timeouts", "reassociations", "recovered_responses")}
    row = Row(system=server.name, test=test, client="pynetdicom", procs=procs, instances=len(manifest),
              bytes=sum(entry["size"] for entry in manifest), elapsed_s=elapsed_s,
              command=f"{procs} x python bench/scu.py store (TCP_NODELAY on connection open)",
              details={"worker_totals": totals,
                       "worker_elapsed_s": [round(report["end"] - report["start"], 3) for report in reports]})
    if totals["failed"] or totals["timeouts"]:
        row.ok = totals["failed"] == 0
        row.notes = (f"failed={totals['failed']} timeouts={totals['timeouts']} "
                     f"reassociations={totals['reassociations']}")
    if verify:
        _verify(server, manifest, row, before)
    return _rate(row)


def _verify(server: Server, manifest: Sequence[dict[str, Any]], row: Row, before: int) -> None:
    try:
        held = stored_count(server, manifest) - before
    except Exception as error:  # Report, do not hide: the table says the count is unknown.
        row.details["stored_count_error"] = repr(error)
        row.notes = (row.notes + f" count check failed: {error!r}").strip()
        return
    row.details["stored_count"] = held
    if held != len(manifest):
        row.ok = False
        row.notes = (row.notes + f" server holds {held} of {len(manifest)}").strip()


# ---------------------------------------------------------------------------------------
# C-FIND


def find_pynetdicom(server: Server, queries: Sequence[tuple[str, Any]]) -> list[Row]:
    results = scu.find_latency(server.aet, server.port, queries)
    rows = []
    for kind, result in results.items():
        rows.append(Row(
            system=server.name, test=f"find-{kind}", client="pynetdicom", instances=len(result.latencies_ms),
            elapsed_s=sum(result.latencies_ms) / 1000,
            p50_ms=percentile(result.latencies_ms, 50), p99_ms=percentile(result.latencies_ms, 99),
            ok=result.failures == 0,
            notes=(f"failures={result.failures} " if result.failures else "")
            + f"mean matches={sum(result.matches) / max(len(result.matches), 1):.1f}",
            command="python: one association, queries back to back (bench/scu.py find_latency)",
            details={"statuses": result.statuses, "matches_min": min(result.matches, default=0),
                     "matches_max": max(result.matches, default=0)},
        ))
    return rows


def findscu_args(server: Server, match: dict[str, str]) -> list[str]:
    command = ["findscu", "-S", "-aet", BENCH_AET, "-aec", server.aet, "-k", "QueryRetrieveLevel=STUDY"]
    for keyword in scu.STUDY_RETURN_KEYS:
        if keyword in match:
            command += ["-k", f"{keyword}={match[keyword]}"]
        else:
            command += ["-k", keyword]
    return command + [HOST, str(server.port)]


def find_dcmtk(server: Server, queries: Sequence[tuple[str, dict[str, str]]], *, nodelay: bool = True) -> list[Row]:
    """Wall time of one findscu process per query (process start + association + query)."""
    env = dcmtk_env(nodelay)
    per_kind: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    example: dict[str, str] = {}
    for kind, match in queries:
        command = findscu_args(server, match)
        example.setdefault(kind, ("TCP_NODELAY=1 " if nodelay else "") + " ".join(command))
        started = time.perf_counter()
        completed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if completed.returncode != 0:
            failures[kind] = failures.get(kind, 0) + 1
            continue
        per_kind.setdefault(kind, []).append(elapsed_ms)
    rows = []
    for kind in dict.fromkeys(kind for kind, _ in queries):
        latencies = per_kind.get(kind, [])
        rows.append(Row(system=server.name, test=f"find-{kind}", client="findscu", instances=len(latencies),
                        elapsed_s=sum(latencies) / 1000, p50_ms=percentile(latencies, 50),
                        p99_ms=percentile(latencies, 99), ok=not failures.get(kind),
                        notes=f"failures={failures[kind]}" if failures.get(kind) else "",
                        command=example.get(kind, "")))
    return rows


# ---------------------------------------------------------------------------------------
# C-GET and C-MOVE


def _median(values: Sequence[float]) -> float:
    return percentile(values, 50) or 0.0


def get_dcmtk(server: Server, study_uid: str, expected: int, study_bytes: int, repeats: int, *,
              nodelay: bool, scratch: Path) -> Row:
    times: list[float] = []
    counts: list[int] = []
    outputs: list[tuple[int, str]] = []
    command: list[str] = []
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="getscu-", dir=scratch))
        try:
            command = ["getscu", "-S", "-aet", BENCH_AET, "-aec", server.aet, "-k", "QueryRetrieveLevel=STUDY",
                       "-k", f"StudyInstanceUID={study_uid}", "-od", str(out), HOST, str(server.port)]
            started = time.perf_counter()
            completed = subprocess.run(command, env=dcmtk_env(nodelay), capture_output=True, text=True)
            times.append(time.perf_counter() - started)
            counts.append(_count_files(out))
            outputs.append((completed.returncode, (completed.stdout + completed.stderr)[-2000:]))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    row = _retrieve_row(server, "get-study", "getscu", times, counts, expected, study_bytes,
                        ("TCP_NODELAY=1 " if nodelay else "") + " ".join(command).replace(str(scratch), "$TMP"))
    if not row.ok:
        row.details["getscu_output"] = outputs
    return row


def move_dcmtk(server: Server, destination: Server, study_uid: str, expected: int, study_bytes: int,
               repeats: int, *, nodelay: bool) -> Row:
    assert destination.storage_dir is not None
    times: list[float] = []
    counts: list[int] = []
    outputs: list[tuple[int, str]] = []
    command: list[str] = []
    for _ in range(repeats):
        _empty_dir(destination.storage_dir)
        command = ["movescu", "-S", "-aet", BENCH_AET, "-aec", server.aet, "-aem", STORESCP_AET,
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", HOST, str(server.port)]
        started = time.perf_counter()
        completed = subprocess.run(command, env=dcmtk_env(nodelay), capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        counts.append(_count_files(destination.storage_dir))
        outputs.append((completed.returncode, (completed.stdout + completed.stderr)[-2000:]))
    row = _retrieve_row(server, "move-study", "movescu", times, counts, expected, study_bytes,
                        ("TCP_NODELAY=1 " if nodelay else "") + " ".join(command))
    if not row.ok:
        row.details["movescu_output"] = outputs
    return row


def get_pynetdicom(server: Server, study_uid: str, sop_classes: Sequence[str], expected: int,
                   study_bytes: int, repeats: int) -> Row:
    times: list[float] = []
    counts: list[int] = []
    statuses: list[int] = []
    firsts: list[float | None] = []
    for _ in range(repeats):
        result = scu.get_study(server.aet, server.port, study_uid, sop_classes)
        times.append(result.elapsed_s)
        counts.append(result.received)
        statuses.append(result.final_status)
        firsts.append(result.first_instance_s)
    row = _retrieve_row(server, "get-study", "pynetdicom", times, counts, expected, study_bytes,
                        "python: send_c_get, STUDY level, received data counted not written (bench/scu.py)")
    _first_instance(row, firsts, "first C-STORE received")
    row.details["final_statuses"] = [f"{status:#06x}" for status in statuses]
    if not row.ok:
        row.notes += f" final statuses {row.details['final_statuses']}"
    return row


def move_pynetdicom(server: Server, destination: Server, study_uid: str, expected: int, study_bytes: int,
                    repeats: int) -> Row:
    assert destination.storage_dir is not None
    times: list[float] = []
    counts: list[int] = []
    statuses: list[int] = []
    firsts: list[float | None] = []
    for _ in range(repeats):
        _empty_dir(destination.storage_dir)
        result = scu.move_study(server.aet, server.port, study_uid, STORESCP_AET)
        times.append(result.elapsed_s)
        counts.append(_count_files(destination.storage_dir))
        statuses.append(result.final_status)
        firsts.append(result.first_instance_s)
    row = _retrieve_row(server, "move-study", "pynetdicom", times, counts, expected, study_bytes,
                        "python: send_c_move to STORESCP (dcmtk storescp), STUDY level (bench/scu.py)")
    _first_instance(row, firsts, "first Pending response")
    row.details["final_statuses"] = [f"{status:#06x}" for status in statuses]
    if not row.ok:
        row.notes += f" final statuses {row.details['final_statuses']}"
    return row


def _first_instance(row: Row, firsts: Sequence[float | None], what: str) -> None:
    """The row's p50/p99 columns: time to the first instance (median / slowest of the
    repeats, association included), in ms."""
    measured = [value * 1000 for value in firsts if value is not None]
    row.details["first_instance_ms"] = [round(value, 2) for value in measured]
    if measured:
        row.p50_ms = _median(measured)
        row.p99_ms = max(measured)
        row.notes = (row.notes + f" p50/p99 = time to first instance ({what}), median/max of repeats").strip()


def _retrieve_row(server: Server, test: str, client: str, times: list[float], counts: list[int], expected: int,
                  study_bytes: int, command: str) -> Row:
    elapsed_s = _median(times)
    row = Row(system=server.name, test=test, client=client, instances=expected, bytes=study_bytes,
              elapsed_s=elapsed_s, command=command,
              details={"repeats_s": [round(value, 3) for value in times], "received_counts": counts})
    bad = [count for count in counts if count != expected]
    if bad:
        row.ok = False
        row.notes = f"received {counts} of {expected}"
    return _rate(row)


def _empty_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
