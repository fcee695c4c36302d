"""WADO-RS study retrieve, plain (no Accept-Encoding): pacsnode trees side by side and Orthanc
in the same rounds.

    .venv/bin/python bench/wado_variants.py --variant base=/path/to/base/.venv/bin/python \
        --variant new=.venv/bin/python [--orthanc] [--rounds 20] [--restart] [--pixel-fill phantom]

Each `--variant NAME=PYTHON` is a single node started by that interpreter (a venv of a tree:
its editable install decides the code); NAME=PYTHON,KEY=VALUE,... adds environment variables
of that node (an experiment switch), and NAME=PYTHON,--flag=VALUE a `pacsnode start` flag. Every node (and Orthanc with `--orthanc`, its DICOMweb
plugin as bench/dicomweb.py starts it) stores the same 80 CT 512 x 512 by storescu (the
`wado` set of bench/dicomweb.py, 42 MB; `--pixel-fill phantom`: CT-like pixels that zstd
halves, so that the node decompresses for real). With `--restart` all are restarted on their
data first. Then `--rounds` rounds of one curl retrieve of the study (no Accept-Encoding, as
dicomweb-client and OHIF ask) from each, the order rotated every round, with the server's
CPU around each (per thread from /proc: bench/dicomweb.py `thread_cpu_ns`) and curl's
time_total. Prints medians, each variant's median per-round ratios against the first
variant (CPU, wall) and against Orthanc (Orthanc's wall / the node's: > 1 is faster than
Orthanc), with the load average. JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dicomweb as dw  # noqa: E402
import servers  # noqa: E402
import workloads  # noqa: E402


def start(python: str, env: dict[str, str], temp: Path) -> servers.Server:
    """A node run by `python`; keys of `env` that start with "--" are `pacsnode start` flags
    (with their values), the others environment variables of the node."""
    flags = [item for key, value in env.items() if key.startswith("--") for item in (key, value)]
    env = {key: value for key, value in env.items() if not key.startswith("--")}
    original = servers.pacsnode_command
    saved = {key: os.environ.get(key) for key in env}
    servers.pacsnode_command = lambda: [python, "-m", "pacsnode.cli.main"]
    os.environ.update(env)
    try:
        server = servers.start_pacsnode(temp, destinations={}, extra_args=flags)
        command = server.command
        server.http_port = int(command[command.index("--http-port") + 1])
        return server
    finally:
        servers.pacsnode_command = original
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def parse_variant(text: str) -> tuple[str, str, dict[str, str]]:
    name, _, rest = text.partition("=")
    python, *pairs = rest.split(",")
    # Absolute (the node runs in its own folder), not resolved: a venv's python is a link.
    return name, os.path.abspath(python), dict(pair.split("=", 1) for pair in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", required=True, help="NAME=PYTHON[,KEY=VALUE...]")
    parser.add_argument("--orthanc", action="store_true")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--restart", action="store_true")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--pixel-fill", choices=("noise12", "phantom"), default="phantom")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="wado-variants-", dir=args.work))
    root, manifest = dw.wado_set(args.work / "data", args.pixel_fill)
    study = manifest[0]["study_uid"]
    total = sum(entry["size"] for entry in manifest)
    variants = [parse_variant(text) for text in args.variant]
    systems: dict[str, servers.Server] = {}
    try:
        for name, python, env in variants:
            systems[name] = start(python, env, temp)
        if args.orthanc:
            systems["orthanc"] = dw.start_orthanc_dicomweb(temp)
        for server in systems.values():
            workloads.store_dcmtk(server, manifest, Path(root) / "files", 2, test="wado-variants", verify=False,
                                  log_dir=temp)
        dw.ready_for_wado(list(systems.values()), study, total, restart_first=args.restart)
        names = list(systems)
        cpu: dict[str, list[float]] = {name: [] for name in names}
        wall: dict[str, list[float]] = {name: [] for name in names}
        loads = []
        for index in range(args.rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                measured = dw.wado_study(systems[name], study, total)
                if not measured["ok"]:
                    raise SystemExit(f"a retrieve failed: {measured}")
                cpu[name].append(measured["server_cpu_ms"])
                wall[name].append(measured["elapsed_s"] * 1000)
            loads.append(dw.load_average())
        first = variants[0][0]
        summary = {
            "rounds": args.rounds, "restart": args.restart, "pixel_fill": args.pixel_fill,
            "variants": {name: {"python": python, "env": env} for name, python, env in variants},
            "server_cpu_ms_median": {name: round(statistics.median(values), 2) for name, values in cpu.items()},
            "wall_ms_median": {name: round(statistics.median(values), 2) for name, values in wall.items()},
            "cpu_over_first": {name: round(statistics.median(a / b for a, b in zip(cpu[name], cpu[first])), 3)
                               for name in names if name not in (first, "orthanc")},
            "wall_over_first": {name: round(statistics.median(a / b for a, b in zip(wall[name], wall[first])), 3)
                                for name in names if name not in (first, "orthanc")},
            "load": [round(min(loads), 1), round(max(loads), 1)]}
        if args.orthanc:
            summary["orthanc_wall_over_node"] = {
                name: round(statistics.median(o / n for o, n in zip(wall["orthanc"], wall[name])), 3)
                for name in names if name != "orthanc"}
            summary["orthanc_wall_over_node_of_medians"] = {
                name: round(statistics.median(wall["orthanc"]) / statistics.median(wall[name]), 3)
                for name in names if name != "orthanc"}
            summary["pairs_at_or_above_1"] = {
                name: f"{sum(o >= n for o, n in zip(wall['orthanc'], wall[name]))}/{args.rounds}"
                for name in names if name != "orthanc"}
        print(json.dumps(summary))
    finally:
        for server in systems.values():
            server.stop()
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
