"""WADO-RS /frames of an instance that lives on a peer: one frame through the entry node,
before (the peer protocol's FetchInstance: the whole instance crosses, the entry node
decompresses and cuts it) and after (Data.FetchFrames: the owner cuts the frame).

    .venv/bin/python bench/frames_peer.py [--frames 50] [--rows 2048] [--rounds 5] [--old-rev REV]

Two 2-node clusters on 127.0.0.1 (N=1, a study owned by the second node, stored through
the first by storescu), up at once: "old" runs the tree of `--old-rev` (default: the commit
before FetchFrames, unpacked by git archive and put first on PYTHONPATH, as
tests/integration/test_frames_from_peer.py runs an older node), "new" this tree. The
instance: `--frames` frames of rows x rows 16-bit native (2048 x 2048 x 50: 400 MiB), 12
bits of noise over a ramp (tests/integration/test_dicomweb_big_frames.py's kind). Then
`--rounds` rounds, the order of old and new turned each round, of GET /frames/1 and
/frames/N through the entry node: wall time, CPU of both node processes (the sum over
their threads of /proc/PID/task/TID/schedstat) and the bytes that crossed between them:
new, the owner's pacsnode.peer.frames_sent_bytes + fetch_sent_bytes (Admin Metrics);
old, the compressed payload one FetchInstance of the instance sends (counted once by
fetching it here; the old tree has no counter). Prints medians and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pacsnode.proto import PROTOCOL_VERSION  # noqa: E402
from pacsnode.sim import datagen  # noqa: E402
from pacsnode.proto import pacsnode_pb2 as pb  # noqa: E402
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc  # noqa: E402
from pacsnode.ring.placement import Member, Ring  # noqa: E402
from pacsnode.sim.process import NodeProcess, start_all, wait_until  # noqa: E402

from tests.integration import clients  # noqa: E402
from tests.integration.test_cluster import FAST, _member_count  # noqa: E402
from tests.integration.test_frames_from_peer import OlderNode  # noqa: E402

ONE_COPY = ["--replication-factor", "1", "--write-quorum", "1"]
REPO = HERE.parent


def write_instance(path: Path, study: str, frames: int, rows: int) -> Dataset:
    ds = datagen.write_ramp_multiframe(path, study_uid=study, frames=frames, rows=rows, cols=rows, seed=3402,
                                       patient_id="BENCHPEER")
    del ds.PixelData
    return ds


def old_tree(rev: str | None, target: Path) -> Path:
    if rev is None:
        introduced = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%H", "-S", "rpc FetchFrames",
                                     "--", "proto/pacsnode.proto"], check=True, capture_output=True,
                                    text=True).stdout.strip()
        rev = f"{introduced}^" if introduced else "HEAD"
    package = target / "pacsnode"
    package.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive, check=True)
    (package / "__init__.py").write_text("")
    return target


def thread_cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def metrics(node: NodeProcess) -> dict[str, float]:
    envelope = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="bench")
    with grpc.insecure_channel(node.peer_address) as channel:
        reply = pb_grpc.AdminStub(channel).Metrics(pb.MetricsRequest(envelope=envelope, name_prefix="pacsnode."),
                                                  timeout=10)
    return dict(reply.values)


def fetch_instance_bytes(node: NodeProcess, study: str, sop: str) -> int:
    envelope = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="bench")
    total = 0
    with grpc.insecure_channel(node.peer_address, options=[("grpc.max_receive_message_length", 8 << 20)]) as channel:
        for chunk in pb_grpc.DataStub(channel).FetchInstance(pb.FetchRequest(
                envelope=envelope, study_instance_uid=study, sop_instance_uid=sop), timeout=300):
            total += len(chunk.data)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old-rev", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    temp = Path(tempfile.mkdtemp(prefix="frames-peer-"))
    clusters: dict[str, list[NodeProcess]] = {}
    try:
        tree = old_tree(args.old_rev, temp / "old-tree")
        for kind in ("old", "new"):
            names = (f"{kind}1", f"{kind}2")
            cls = OlderNode if kind == "old" else NodeProcess
            extra = {"tree": tree} if kind == "old" else {}
            first = cls(temp / names[0], node_id=names[0], extra_args=FAST + ONE_COPY, **extra)  # type: ignore[arg-type]
            second = cls(temp / names[1], node_id=names[1], seeds=[first.peer_address],
                         extra_args=FAST + ONE_COPY, **extra)  # type: ignore[arg-type]
            clusters[kind] = [first, second]
        start_all([node for nodes in clusters.values() for node in nodes])
        for nodes in clusters.values():
            addresses = [n.peer_address for n in nodes]
            assert wait_until(lambda: all(_member_count(a) == 2 for a in addresses), 30), "membership"
        studies: dict[str, Dataset] = {}
        for kind, nodes in clusters.items():
            ring = Ring("pacsnode", [Member(node_id=n.node_id, host=socket.gethostname()) for n in nodes])
            while True:
                study = generate_uid()
                if list(ring.owners_of_study(study, 1)) == [nodes[1].node_id]:
                    break
            path = temp / f"{kind}.dcm"
            studies[kind] = write_instance(path, study, args.frames, args.rows)
            started = time.monotonic()
            result, acked = clients.storescu(nodes[0].dicom_port, [str(path)], timeout_s=900)
            assert len(acked) == 1, result.stdout + result.stderr
            print(f"{kind}: stored {path.stat().st_size / 2**20:.0f} MiB in {time.monotonic() - started:.1f} s",
                  flush=True)
            path.unlink()
        old_bytes = fetch_instance_bytes(clusters["old"][1], studies["old"].StudyInstanceUID,
                                         studies["old"].SOPInstanceUID)
        asks = ["1", str(args.frames)]
        rows: list[dict[str, object]] = []
        for round_index in range(args.rounds):
            order = ["old", "new"] if round_index % 2 == 0 else ["new", "old"]
            for ask in asks:
                for kind in order:
                    entry, owner = clusters[kind]
                    ds = studies[kind]
                    url = (f"http://127.0.0.1:{entry.http_port}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
                           f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/{ask}")
                    pids = [entry.process.pid, owner.process.pid]  # type: ignore[union-attr]
                    before_metrics = metrics(owner) if kind == "new" else {}
                    cpu_before = thread_cpu_ns(pids)
                    started = time.perf_counter()
                    reply = httpx.get(url, timeout=600)
                    wall = time.perf_counter() - started
                    cpu = (thread_cpu_ns(pids) - cpu_before) / 1e9
                    assert reply.status_code == 200, (kind, reply.status_code, reply.text[:200])
                    if kind == "new":
                        after_metrics = metrics(owner)
                        moved = sum(after_metrics[name] - before_metrics[name] for name in
                                    ("pacsnode.peer.frames_sent_bytes", "pacsnode.peer.fetch_sent_bytes"))
                    else:
                        moved = old_bytes
                    row = {"round": round_index, "tree": kind, "ask": ask, "wall_s": wall, "cpu_s": cpu,
                           "moved_bytes": moved, "body_bytes": len(reply.content), "load": os.getloadavg()[0]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        print("\nmedians (load 1-min average at the end: %.2f)" % os.getloadavg()[0])
        for ask in asks:
            for kind in ("old", "new"):
                picked = [r for r in rows if r["tree"] == kind and r["ask"] == ask]
                print(f"/frames/{ask:>4} {kind}: wall {statistics.median(float(r['wall_s']) for r in picked):7.3f} s"
                      f"  cpu {statistics.median(float(r['cpu_s']) for r in picked):7.3f} s"
                      f"  moved {statistics.median(float(r['moved_bytes']) for r in picked) / 2**20:8.2f} MiB")
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1))
    finally:
        for nodes in clusters.values():
            for node in nodes:
                node.stop(timeout_s=30)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
