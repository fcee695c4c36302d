"""C-STORE ingest of one-instance studies into two pacsnode trees, in turn: the node's CPU per
instance (from /proc) and the rate, storescu x4 into one process (the default configuration).

    .venv/bin/python bench/ingest_ab.py --python /work/old/.venv/bin/python \\
        --python .venv/bin/python [--files 2000] [--rounds 4] [--procs 4]

Each `--python` is a tree's venv Python (its node runs `python -m pacsnode.cli.main start`
from that tree). Both nodes are up at once; each round sends --files files (16x16 CT,
one-instance studies: bench/ingest_scale.py's set of 20 000; or with --set ct512 bench/run.py's
2 000 CT 512x512 slices; distinct files every round and every node) by --procs storescu processes to each node in turn, so that both see the same
machine load. Per round and node it prints inst/s, the node process's CPU (utime + stime of
/proc/PID/stat, children not counted: dicom_workers 0) per instance, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import servers  # noqa: E402
import workloads  # noqa: E402
from run import FULL, dataset_specs, prepare_dataset  # noqa: E402

from pacsnode.sim import datagen  # noqa: E402
from pacsnode.sim.process import free_port  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def start_node(parent: Path, python: str, name: str, extra_args: list[str]) -> servers.Server:
    work_dir = parent / name
    work_dir.mkdir(parents=True)
    port = free_port()
    command = [python, "-m", "pacsnode.cli.main", "start", "--data-dir", str(work_dir / "data"),
               "--dicom-port", str(port), "--host", servers.HOST, "--ae-title", servers.PACSNODE_AET,
               "--peer-port", str(free_port()), "--http-port", str(free_port()), *extra_args]
    env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}
    process = servers._spawn(command, work_dir / "pacsnode.log", env, work_dir)
    server = servers.Server(name, servers.PACSNODE_AET, port, process, work_dir, work_dir / "pacsnode.log", command)
    servers.wait_port(server, timeout_s=90)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", required=True, help="a tree's venv python (repeat)")
    parser.add_argument("--files", type=int, default=2000, help="files per round and node")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--set", choices=("qido20000", "ct512"), default="qido20000",
                        help="one-instance 16x16 studies (bench/ingest_scale.py's), or bench/run.py's CT 512x512 set")
    parser.add_argument("--node-arg", action="append", default=[], help="extra argument of `pacsnode start`")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.set == "ct512":  # bench/run.py's CT set at its full scale: 2 000 CT 512x512 slices, 20 studies.
        root, manifest = prepare_dataset("ct512", dataset_specs(FULL)["ct512"], HERE / "work" / "data")
    else:
        spec = datagen.StudySetSpec(patients=20_000 // 4, studies_per_patient=4, rows=16, cols=16,
                                    latin1_fraction=0.1, seed=203)
        root, manifest = prepare_dataset("dw-qido20000", spec, HERE / "work" / "data")
    needed = args.files * args.rounds * len(args.python)
    if needed > len(manifest):
        raise SystemExit(f"{needed} files needed, the set has {len(manifest)}")
    temp = Path(tempfile.mkdtemp(prefix="ingest-ab-"))
    nodes: list[servers.Server] = []
    rows: list[dict[str, Any]] = []
    try:
        nodes = [start_node(temp, python, f"node{index}", args.node_arg) for index, python in enumerate(args.python)]
        time.sleep(2)
        position = 0
        for round_index in range(args.rounds):
            order = list(range(len(nodes)))
            if round_index % 2:
                order.reverse()  # A B, B A, ...: neither always goes first.
            for index in order:
                node = nodes[index]
                part = manifest[position:position + args.files]
                position += args.files
                before = cpu_s(node.process.pid)
                row = workloads.store_dcmtk(node, part, root / "files", args.procs, test="ab", verify=False,
                                            log_dir=temp)
                used = cpu_s(node.process.pid) - before
                if not row.ok:
                    raise RuntimeError(f"{node.name}: {row.notes}")
                result = {"round": round_index, "tree": args.python[index], "instances": len(part),
                          "instances_per_s": len(part) / row.elapsed_s, "cpu_ms_per_instance": 1000 * used / len(part),
                          "load": os.getloadavg()[0]}
                rows.append(result)
                print(f"round {round_index} {args.python[index]}: {result['instances_per_s']:.0f} inst/s, "
                      f"{result['cpu_ms_per_instance']:.3f} ms CPU/inst (load {result['load']:.1f})", flush=True)
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(temp, ignore_errors=True)
    for python in args.python:
        mine = [row for row in rows if row["tree"] == python]
        print(f"{python}: median {statistics.median(r['instances_per_s'] for r in mine):.0f} inst/s, "
              f"{statistics.median(r['cpu_ms_per_instance'] for r in mine):.3f} ms CPU/inst")
    out = args.out or HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-ingest-ab.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"# wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
