"""WADO-RS A/B of two pacsnode trees: server CPU per 42 MB study retrieve, in turn.

    .venv/bin/python bench/wado_ab.py --base-python /path/to/base/.venv/bin/python [--rounds 40] [--restart]
        [--compressed] [--pixel-fill noise12|phantom]

Two single nodes on 127.0.0.1, one run by `--base-python` (a venv of the tree to compare
against, e.g. a clone of main) and one by `--new-python` (default: this tree's venv); each
stores the same 80 CT 512 x 512 (bench/dicomweb.py's `wado` set, 42 MB) by storescu, the
order of the two starts chosen at random (`--pixel-fill phantom`: the CT-like phantom that
compresses 2x, instead of 12 bits of noise). With `--restart` both are restarted on their
data first. Then `--rounds` rounds of one curl retrieve of the study from each (the order turned
each round), with the server's CPU around each and curl's time_total (the sum over its threads of
/proc/PID/task/TID/schedstat: bench/dicomweb.py's `thread_cpu_ns`); with `--compressed`,
curl --compressed (Accept-Encoding: zstd among others). Prints the medians and
the median of the per-round ratios new/base, with the load average. No Orthanc: on a shared
machine a run of 40 rounds says a CPU ratio only to within about +-5 % (an A/A run, the
same tree twice, gave 0.954 and 1.017), so run it several times and pool.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dicomweb as dw  # noqa: E402
import servers  # noqa: E402
import wado_variants  # noqa: E402
import workloads  # noqa: E402


def start(python: str, temp: Path) -> servers.Server:
    return wado_variants.start(python, {}, temp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-python", required=True)
    parser.add_argument("--new-python", default=str(HERE.parent / ".venv" / "bin" / "python"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--restart", action="store_true", help="restart both on their data before measuring")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--compressed", action="store_true", help="curl --compressed (asks for zstd)")
    parser.add_argument("--pixel-fill", choices=("noise12", "phantom"), default="noise12")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="wado-ab-", dir=args.work))
    root, manifest = dw.wado_set(args.work / "data", args.pixel_fill)
    study = manifest[0]["study_uid"]
    total = sum(entry["size"] for entry in manifest)
    pythons = {"base": args.base_python, "new": args.new_python}
    systems: dict[str, servers.Server] = {}
    try:
        first = random.choice([("base", "new"), ("new", "base")])
        for name in first:
            systems[name] = start(pythons[name], temp)
            workloads.store_dcmtk(systems[name], manifest, Path(root) / "files", 2, test="wado-ab", verify=False,
                                  log_dir=temp)
        dw.ready_for_wado(list(systems.values()), study, total, restart_first=args.restart)
        cpu: dict[str, list[float]] = {name: [] for name in systems}
        encodings: dict[str, set[str]] = {name: set() for name in systems}
        wall: dict[str, list[float]] = {name: [] for name in systems}
        loads = []
        for index in range(args.rounds):
            for name in (first if index % 2 == 0 else first[::-1]):
                measured = dw.wado_study(systems[name], study, total, compressed=args.compressed)
                if not measured["ok"]:
                    raise SystemExit(f"a retrieve failed: {measured}")
                cpu[name].append(measured["server_cpu_ms"])
                encodings[name].add(measured["content_encoding"])
                wall[name].append(measured["elapsed_s"] * 1000)
            loads.append(dw.load_average())
        print(json.dumps({
            "started_first": first[0], "rounds": args.rounds, "restart": args.restart,
            "compressed": args.compressed, "pixel_fill": args.pixel_fill,
            "content_encoding": {name: sorted(values) for name, values in encodings.items()},
            "server_cpu_ms_median": {name: round(statistics.median(values), 2) for name, values in cpu.items()},
            "cpu_new_over_base": round(statistics.median(new / base for base, new in zip(cpu["base"], cpu["new"])), 3),
            "wall_ms_median": {name: round(statistics.median(values), 2) for name, values in wall.items()},
            "wall_new_over_base": round(statistics.median(new / base for base, new in zip(wall["base"], wall["new"])),
                                        3),
            "load": [round(min(loads), 1), round(max(loads), 1)]}))
    finally:
        for server in systems.values():
            server.stop()
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
