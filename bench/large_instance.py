"""Peak memory of one node storing and retrieving one big instance (issue 11).

Run by hand, from the repository root (the node is the `pacsnode` of the interpreter
that runs this script, so the same script measures another tree's code):

    .venv/bin/python bench/large_instance.py                       # 200 MB, this tree
    /work/main/.venv/bin/python bench/large_instance.py --size-mb 200   # main's code

Starts one node, stores one multi-frame instance with dcmtk's storescu, then retrieves it
with getscu (both separate processes), and reads the node's VmRSS and VmHWM from /proc
(VmHWM is reset through /proc/PID/clear_refs before each step). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--pixel-fill", default="noise12", choices=("noise12", "random", "zeros"))
    parser.add_argument("--node-arg", action="append", default=[])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacsnode-large-"))
    node = NodeProcess(work / "data", extra_args=args.node_arg)
    try:
        entry = datagen.write_large_instance(work / "in", size_bytes=args.size_mb * 1_000_000, seed=7,
                                             pixel_fill=args.pixel_fill)
        path = Path(str(entry["path"]))
        node.start()
        pid = node.process.pid  # type: ignore[union-attr]
        time.sleep(2)
        result: dict[str, object] = {"instance_mb": round(path.stat().st_size / 1e6, 1),
                                     "pixel_fill": args.pixel_fill, "idle_rss_mib": status_mib(pid, "VmRSS")}
        reset_peak(pid)
        started = time.monotonic()
        store = subprocess.run(["storescu", "-aec", "PACSNODE", "127.0.0.1", str(node.dicom_port), str(path)],
                               capture_output=True, text=True)
        result["store_s"] = round(time.monotonic() - started, 2)
        result["store_ok"] = store.returncode == 0
        result["store_peak_mib"] = status_mib(pid, "VmHWM")
        time.sleep(2)
        result["after_store_rss_mib"] = status_mib(pid, "VmRSS")
        reset_peak(pid)
        out = work / "out"
        out.mkdir()
        started = time.monotonic()
        get = subprocess.run(["getscu", "-S", "-aec", "PACSNODE", "-k", "QueryRetrieveLevel=STUDY",
                              "-k", f"StudyInstanceUID={entry['study_uid']}", "-od", str(out),
                              "127.0.0.1", str(node.dicom_port)], capture_output=True, text=True)
        result["get_s"] = round(time.monotonic() - started, 2)
        received = list(out.iterdir())
        result["get_ok"] = get.returncode == 0 and len(received) == 1
        result["get_peak_mib"] = status_mib(pid, "VmHWM")
        time.sleep(2)
        result["after_get_rss_mib"] = status_mib(pid, "VmRSS")
        print(json.dumps(result))
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
