"""WADO-RS /frames and Pixel Data /bulk of a big multi-frame instance, A/B of two trees.

    .venv/bin/python bench/frames_ab.py --base-python /path/to/base/.venv/bin/python [--rounds 6]

Two single nodes on 127.0.0.1, one run by `--base-python` (a venv of the tree to compare
against) and one by `--new-python` (default: this tree's venv); each stores the same
440-frame 512 x 512 16-bit native instance (230 MB; tests/integration/
test_dicomweb_big_frames.py's) by storescu. Then `--rounds` rounds, the order of the two
turned each round, of: /frames/1, /frames/440, /frames/1,220,440, /bulk/7FE00010
(streamed to /dev/null by httpx), /frames/1/rendered (PNG) and /thumbnail (JPEG), with
per request the server's CPU (the sum over its threads of /proc/PID/task/TID/schedstat:
bench/dicomweb.py's `thread_cpu_ns`), the wall time, and the growth of its peak RSS
(VmHWM after clear_refs 5, against VmRSS before). Prints the medians per tree and
request, the median of per-round CPU ratios new/base, and the load average. A shared machine: read CPU, not wall time.

With `--correct`, the study is corrected on each node after the store (`pacsnode modify
--set PatientName=... --set StudyID=...`, applied on read: node/correct.py), so that the
requests are those of a corrected study's instance.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import dicomweb as dw  # noqa: E402
import servers  # noqa: E402

from tests.integration import clients  # noqa: E402
from tests.integration.test_dicomweb_big_frames import _write_instance  # noqa: E402

REQUESTS = {
    "frames/1": ("/frames/1", None),
    "frames/440": ("/frames/440", None),
    "frames/1,220,440": ("/frames/1,220,440", None),
    "bulk": ("/bulk/7FE00010", "application/octet-stream"),
    "frames/1/rendered": ("/frames/1/rendered", "image/png"),
    "thumbnail": ("/thumbnail", "image/jpeg"),
}


def start(python: str, temp: Path) -> servers.Server:
    original = servers.pacsnode_command
    servers.pacsnode_command = lambda: [python, "-m", "pacsnode.cli.main"]
    try:
        return dw.start_pacsnode(temp)
    finally:
        servers.pacsnode_command = original


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(server: servers.Server, url: str, accept: str | None) -> dict[str, float]:
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    rss_kib = _status_kib(pid, "VmRSS")
    before = dw.thread_cpu_ns(server)
    started = time.perf_counter()
    received = 0
    with httpx.stream("GET", url, headers={"Accept": accept} if accept else {}, timeout=300) as reply:
        for chunk in reply.iter_raw():
            received += len(chunk)
        if reply.status_code != 200:
            raise SystemExit(f"{url}: {reply.status_code}")
    wall = time.perf_counter() - started
    return {"server_cpu_ms": dw.cpu_ms_between(before, dw.thread_cpu_ns(server)), "wall_ms": wall * 1000,
            "peak_growth_mb": (_status_kib(pid, "VmHWM") - rss_kib) / 1024, "bytes": received}


def correct(python: str, server: servers.Server, study_uid: str) -> None:
    """`pacsnode modify` of the study through the node's peer port (its own tree's CLI)."""
    peer_port = server.command[server.command.index("--peer-port") + 1]
    done = subprocess.run([python, "-m", "pacsnode.cli.main", "modify", "--node", f"{server.host}:{peer_port}",
                           "--study", study_uid, "--set", "PatientName=Corrected^Name", "--set", "StudyID=CORR1"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-python", required=True)
    parser.add_argument("--new-python", default=str(HERE.parent / ".venv" / "bin" / "python"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--correct", action="store_true", help="correct the study on each node after the store")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="frames-ab-", dir=args.work))
    path = temp / "big.dcm"
    dataset, _offset = _write_instance(path)
    pythons = {"base": args.base_python, "new": args.new_python}
    systems: dict[str, servers.Server] = {}
    try:
        first = random.choice([("base", "new"), ("new", "base")])
        for name in first:
            (temp / name).mkdir()
            systems[name] = start(pythons[name], temp / name)
            result, acked = clients.storescu(systems[name].port, [str(path)])
            if len(acked) != 1:
                raise SystemExit(result.stdout + result.stderr)
            if args.correct:
                correct(pythons[name], systems[name], str(dataset.StudyInstanceUID))
        dw.wait_idle(list(systems.values()), timeout_s=60)
        base_path = (f"/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
                     f"/instances/{dataset.SOPInstanceUID}")
        results: dict[str, dict[str, list[dict[str, float]]]] = {
            name: {request: [] for request in REQUESTS} for name in systems}
        loads = []
        for index in range(args.rounds):
            for request, (suffix, accept) in REQUESTS.items():
                for name in (first if index % 2 == 0 else first[::-1]):
                    url = dw.root_url(systems[name]) + base_path + suffix
                    results[name][request].append(measure(systems[name], url, accept))
            loads.append(dw.load_average())
        summary: dict[str, object] = {"started_first": first[0], "rounds": args.rounds, "corrected": args.correct,
                                      "load": [round(min(loads), 1), round(max(loads), 1)]}
        for request in REQUESTS:
            summary[request] = {
                name: {key: round(statistics.median(r[key] for r in results[name][request]), 1)
                       for key in ("server_cpu_ms", "wall_ms", "peak_growth_mb")}
                for name in systems}
            summary[request]["cpu_new_over_base"] = round(statistics.median(  # type: ignore[index]
                new["server_cpu_ms"] / base["server_cpu_ms"]
                for base, new in zip(results["base"][request], results["new"][request])), 3)
        print(json.dumps(summary, indent=1))
    finally:
        for server in systems.values():
            server.stop()
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
