"""Ingest of many one-instance studies into pacsnode and Orthanc, then C-FIND at that size.
By hand, not CI (100 000 studies take most of an hour with both servers):

    .venv/bin/python bench/ingest_scale.py [--studies 100000] [--round 10000] [--queries 20]

Both servers run side by side and the studies go in rounds of --round files with storescu x4
(TCP_NODELAY=1 for both), a pacsnode round then an Orthanc round, so that both see the same
machine load as the archive grows. It reports every round's rate (flat: the last round
within 20% of the first, issue 10), the disk each used at the end (the data directory's
allocated blocks), and C-FIND p50/p99 at the full size for each query kind over one
pynetdicom association (PatientID, AccessionNumber, StudyInstanceUID: exact keys; a patient
name prefix; a one-month StudyDate range), the servers queried in turn. The studies are
16x16 CT images, one instance each (the set bench/dicomweb.py's QIDO run uses), generated
once into bench/work/data/. Writes bench/results/<time>-ingest-scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scu  # noqa: E402
import servers  # noqa: E402
import workloads  # noqa: E402
from run import find_queries, prepare_dataset  # noqa: E402

from pacsnode.sim import datagen  # noqa: E402


def disk_bytes(path: Path) -> int:
    """Bytes allocated to the files under `path` (du's figure, not the files' lengths)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def disk_parts(work_dir: Path) -> dict[str, int]:
    """disk_bytes of each entry of a server's data directory (pacsnode: store/, the audit
    trail's open file and its compressed segments, ...), the biggest first."""
    data = work_dir / "data" if (work_dir / "data").is_dir() else work_dir
    parts: dict[str, int] = {}
    for entry in data.iterdir():
        name = "audit segments" if entry.name.startswith("audit-") else entry.name
        parts[name] = parts.get(name, 0) + (disk_bytes(entry) if entry.is_dir() else entry.lstat().st_blocks * 512)
    return dict(sorted(parts.items(), key=lambda item: -item[1]))


def queries(manifest: list[dict[str, Any]], count: int) -> list[tuple[str, Any]]:
    """find_queries' four kinds plus an AccessionNumber one, as pynetdicom identifiers."""
    chosen = find_queries(manifest, count, seed=11)
    rng = random.Random(12)
    chosen += [("accession", {"AccessionNumber": rng.choice(manifest)["accession_number"]}) for _ in range(count)]
    return [(kind, scu.study_query(**match)) for kind, match in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--round", type=int, default=10_000, help="files per storescu x4 round")
    parser.add_argument("--queries", type=int, default=20, help="queries of each kind")
    parser.add_argument("--only", default="pacsnode,orthanc",
                        help="systems to run (pacsnode alone: its own figures, no ratios)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    spec = datagen.StudySetSpec(patients=args.studies // 4, studies_per_patient=4, rows=16, cols=16,
                                latin1_fraction=0.1, seed=203)
    root, manifest = prepare_dataset(f"dw-qido{args.studies}", spec, HERE / "work" / "data")
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "instances": len(manifest),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": os.getloadavg(),
                              "rounds": {"pacsnode": [], "orthanc": []}}
    temp = Path(tempfile.mkdtemp(prefix="ingest-scale-"))
    systems: dict[str, servers.Server] = {}
    try:
        only = set(args.only.split(","))
        starters = {"pacsnode": lambda: servers.start_pacsnode(temp, destinations={}),
                    "orthanc": lambda: servers.start_orthanc(temp, destinations={})}
        systems = {name: start() for name, start in starters.items() if name in only}
        for start in range(0, len(manifest), args.round):
            part = manifest[start:start + args.round]
            for name, server in systems.items():
                row = workloads.store_dcmtk(server, part, root / "files", 4, test="scale-load", verify=False,
                                            log_dir=temp)
                if not row.ok:
                    raise RuntimeError(f"{name}: {row.notes}")
                report["rounds"][name].append({"first": start, "instances": len(part), "elapsed_s": row.elapsed_s,
                                               "instances_per_s": len(part) / row.elapsed_s,
                                               "load": os.getloadavg()[0]})
                print(f"{name} {start + len(part)}: {len(part) / row.elapsed_s:.0f} inst/s "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        time.sleep(5)  # Let both settle (index flushes) before the queries.
        asked = queries(manifest, args.queries)
        report["find"] = {}
        for name, server in systems.items():
            report["find"][name] = {row.test: {"p50_ms": row.p50_ms, "p99_ms": row.p99_ms, "ok": row.ok,
                                               "notes": row.notes}
                                    for row in workloads.find_pynetdicom(server, asked)}
        report["disk_bytes"] = {name: disk_bytes(server.work_dir) for name, server in systems.items()}
        report["disk_parts"] = {name: disk_parts(server.work_dir) for name, server in systems.items()}
    finally:
        for server in systems.values():
            server.stop()
        shutil.rmtree(temp, ignore_errors=True)
    report["summary"] = summarize(report)
    print(json.dumps(report["summary"], indent=2))
    out = args.out or HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-ingest-scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"# wrote {out}", file=sys.stderr)
    return 0


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, rounds in report["rounds"].items():
        if not rounds:
            continue
        total_s = sum(r["elapsed_s"] for r in rounds)
        summary[name] = {"instances_per_s": sum(r["instances"] for r in rounds) / total_s,
                         "first_round": rounds[0]["instances_per_s"], "last_round": rounds[-1]["instances_per_s"],
                         "last_vs_first": rounds[-1]["instances_per_s"] / rounds[0]["instances_per_s"]}
    if "pacsnode" in summary and "orthanc" in summary:
        summary["ingest_ratio"] = summary["pacsnode"]["instances_per_s"] / summary["orthanc"]["instances_per_s"]
    disk = report.get("disk_bytes", {})
    if report.get("disk_parts"):
        summary["disk_parts_mb"] = {name: {part: round(size / 1e6, 1) for part, size in parts.items()}
                                    for name, parts in report["disk_parts"].items()}
    if disk.get("orthanc"):
        summary["disk_ratio"] = disk["pacsnode"] / disk["orthanc"]
    finds = report.get("find", {})
    if "pacsnode" in finds and "orthanc" in finds:
        summary["find_p50_ratio"] = {kind: finds["pacsnode"][kind]["p50_ms"] / finds["orthanc"][kind]["p50_ms"]
                                     for kind in finds["pacsnode"] if kind in finds["orthanc"]
                                     and finds["orthanc"][kind]["p50_ms"]}
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
