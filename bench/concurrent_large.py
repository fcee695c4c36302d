"""Peak memory of one node while many associations store big instances at once (issue 11).

Run by hand, from the repository root:

    .venv/bin/python bench/concurrent_large.py                          # 8 x 100 MB, defaults
    .venv/bin/python bench/concurrent_large.py --node-arg=--inflight-instance-bytes-max=67108864

Writes `--count` multi-frame instances (distinct UIDs), starts one node, sends each with
its own dcmtk storescu process (one association each, all at once), then retrieves them
all with one getscu; reads the node's VmHWM (reset through /proc/PID/clear_refs before
each step) and VmRSS. Prints one JSON line: the peaks over the idle RSS, and the node's
`inflight_instance_bytes_max` in MiB for comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pacsnode.node.config import NodeConfig
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--node-arg", action="append", default=[])
    args = parser.parse_args()
    inflight = NodeConfig(node_id="bench").inflight_instance_bytes_max
    for argument in args.node_arg:
        if argument.startswith("--inflight-instance-bytes-max="):
            inflight = int(argument.split("=", 1)[1])
    work = Path(tempfile.mkdtemp(prefix="pacsnode-concurrent-"))
    node = NodeProcess(work / "data", extra_args=args.node_arg)
    try:
        entries = [datagen.write_large_instance(work / f"in{index}", size_bytes=args.size_mb * 1_000_000,
                                                seed=100 + index, pixel_fill="noise12")
                   for index in range(args.count)]
        node.start()
        pid = node.process.pid  # type: ignore[union-attr]
        time.sleep(2)
        idle = status_mib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        started = time.monotonic()
        senders = [subprocess.Popen(["storescu", "-aec", "PACSNODE", "127.0.0.1", str(node.dicom_port),
                                     str(entry["path"])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for entry in entries]
        codes = [sender.wait(timeout=900) for sender in senders]
        store_s = round(time.monotonic() - started, 1)
        store_peak = status_mib(pid, "VmHWM")
        time.sleep(2)
        after_store = status_mib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        out = work / "out"
        out.mkdir()
        started = time.monotonic()
        uids = "\\".join(str(entry["study_uid"]) for entry in entries)  # A UID list: one C-GET for all.
        get = subprocess.run(["getscu", "-S", "-aec", "PACSNODE", "-k", "QueryRetrieveLevel=STUDY",
                              "-k", f"StudyInstanceUID={uids}", "-od", str(out),
                              "127.0.0.1", str(node.dicom_port)], capture_output=True, text=True)
        get_s = round(time.monotonic() - started, 1)
        print(json.dumps({
            "instances": args.count, "instance_mb": args.size_mb, "stored_ok": codes.count(0),
            "inflight_instance_bytes_max_mib": round(inflight / 2**20, 1), "idle_rss_mib": idle,
            "store_s": store_s, "store_peak_mib": store_peak, "store_peak_over_idle_mib": round(store_peak - idle, 1),
            "after_store_rss_mib": after_store, "get_ok": get.returncode == 0, "got": len(list(out.iterdir())),
            "get_s": get_s, "get_peak_mib": status_mib(pid, "VmHWM"),
            "get_peak_over_idle_mib": round(status_mib(pid, "VmHWM") - idle, 1)}))
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
