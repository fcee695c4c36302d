"""STOW-RS A/B of two pacsnode trees, in turn: server CPU per 1 000 instances and instances/s
for small instances, and the node's peak resident memory for big parts sent by several clients.

    .venv/bin/python bench/stow_ab.py --base-python /path/to/base/.venv/bin/python [--rounds 4]
        [--new-args "--stow-bytes-max 8388608"]

Each round starts a fresh single node of each tree (`--base-python`, `--new-python`: venvs
whose editable install decides the code; `--new-args`: extra `pacsnode start` flags of the
new node only), the order turned each round, and on each:
- `small`: bench/dicomweb.py's STOW set (1 000 x 9 KB in batches of 20, 2 clients): server
  CPU per 1 000 instances (/proc) and instances/s;
- `big`: `--big-clients` clients at once, each one request of `--big-parts` CT of
  `--big-size` x `--big-size` (512: ~525 KB each; 2048: ~8.4 MB): the node's VmHWM (peak resident set, /proc/PID/status) before and after,
  and every answer's status.
Prints JSON lines, with the load average.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dicomweb as dw  # noqa: E402
import servers  # noqa: E402
from run import prepare_dataset  # noqa: E402

from pacsnode.sim import datagen  # noqa: E402


def start(python: str, extra: list[str], temp: Path) -> servers.Server:
    original = servers.pacsnode_command
    servers.pacsnode_command = lambda: [python, "-m", "pacsnode.cli.main"]
    try:
        server = servers.start_pacsnode(temp, destinations={}, extra_args=extra)
    finally:
        servers.pacsnode_command = original
    command = server.command
    server.http_port = int(command[command.index("--http-port") + 1])
    return server


def peak_rss_kb(server: servers.Server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def big(server: servers.Server, bodies: list[bytes]) -> dict[str, Any]:
    before = peak_rss_kb(server)
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=pacsnode-bench-boundary',
               "Accept": "application/dicom+json"}

    def post(body: bytes) -> int:
        return httpx.post(dw.root_url(server) + "/studies", content=body, headers=headers, timeout=300).status_code

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        statuses = list(pool.map(post, bodies))
    return {"peak_rss_mb_before": round(before / 1024, 1), "peak_rss_mb_after": round(peak_rss_kb(server) / 1024, 1),
            "statuses": statuses, "load": dw.load_average()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-python", required=True)
    parser.add_argument("--new-python", default=str(HERE.parent / ".venv" / "bin" / "python"))
    parser.add_argument("--new-args", default="", help="extra `pacsnode start` flags of the new node")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--big-clients", type=int, default=4)
    parser.add_argument("--big-parts", type=int, default=24)
    parser.add_argument("--big-size", type=int, default=512, help="rows = columns of the big parts' CT")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="stow-ab-", dir=args.work))
    small_spec = datagen.StudySetSpec(patients=50, series_per_study=2, instances_per_series=10, rows=64, cols=64,
                                      seed=201)
    _root, small_manifest = prepare_dataset("dw-stow", small_spec, args.work / "data")
    big_bodies = []
    for client in range(args.big_clients):
        spec = datagen.StudySetSpec(patients=1, series_per_study=1, instances_per_series=args.big_parts,
                                    rows=args.big_size, cols=args.big_size, modalities=("CT",), seed=300 + client)
        _big_root, manifest = prepare_dataset(f"stow-big{args.big_size}-{client}", spec, args.work / "data")
        big_bodies.append(dw.multipart([Path(entry["path"]).read_bytes() for entry in manifest])[0])
    pythons = {"base": (args.base_python, []), "new": (args.new_python, args.new_args.split())}
    results: dict[str, dict[str, list[Any]]] = {name: {"small": [], "big": []} for name in pythons}
    try:
        for index in range(args.rounds):
            for name in (("base", "new") if index % 2 == 0 else ("new", "base")):
                python, extra = pythons[name]
                server = start(python, extra, temp)
                try:
                    results[name]["small"].append(dw.stow(server, small_manifest))
                    results[name]["big"].append(big(server, big_bodies))
                finally:
                    server.stop()
        summary = {
            name: {"small_server_cpu_s_per_1000": round(statistics.median(
                       run["server_cpu_s_per_1000"] for run in rows["small"]), 3),
                   "small_instances_per_s": round(statistics.median(run["instances_per_s"] for run in rows["small"]), 1),
                   "small_ok": all(run["ok"] for run in rows["small"]),
                   "big_peak_rss_mb": [run["peak_rss_mb_after"] for run in rows["big"]],
                   "big_peak_rss_mb_before": [run["peak_rss_mb_before"] for run in rows["big"]],
                   "big_statuses": sorted({status for run in rows["big"] for status in run["statuses"]})}
            for name, rows in results.items()}
        summary["args"] = {"new_args": args.new_args, "rounds": args.rounds, "big_clients": args.big_clients,
                           "big_parts": args.big_parts, "big_size": args.big_size}
        summary["load"] = [round(min(run["load"] for rows in results.values() for kind in rows.values()
                                     for run in kind), 1),
                           round(max(run["load"] for rows in results.values() for kind in rows.values()
                                     for run in kind), 1)]
        print(json.dumps(summary))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
