"""CPU and latency of one peer copy into a real node: StoreStream message vs StoreWholeInstance
call, in turn, against the same node process (by hand, not CI).

    .venv/bin/python bench/peer_copy_node.py [--copies 400] [--rounds 4] [--rows 256] [--data-dir /dev/shm]

One node process (`pacsnode start`, one-node ring, so it owns every study); this process
sends it copies through GrpcTransport.store, one in flight (as the coordinator does for one
storescu sender), each a new SOP Instance UID with the same 256x256 CT payload (132 KB of
zstd for --rows 256). Each round sends --copies copies by StoreStream (`stream`) and then by
StoreWholeInstance (`call`, `GrpcTransport(store_stream=False)`), so both modes see the same
node, disk and machine load. Per mode: the node's CPU per copy (/proc), this sender's CPU per
copy (process time: it is only the sender), and the p50 of one copy's round trip (durable on
the node). Medians over rounds; the load average is printed with each round.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from pacsnode.node.codec import to_stored  # noqa: E402
from pacsnode.node.grpc_transport import Channels, GrpcTransport  # noqa: E402
from pacsnode.node.ingest import instance_from_part10  # noqa: E402
from pacsnode.node.peer_wire import envelope  # noqa: E402
from pacsnode.node.server import metadata_at_ingest  # noqa: E402
from pacsnode.replication.model import StoredInstance  # noqa: E402
from pacsnode.ring.members import MemberInfo  # noqa: E402
from pacsnode.sim import datagen  # noqa: E402
from pacsnode.sim.process import NodeProcess  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(work: Path, rows: int) -> StoredInstance:
    spec = datagen.StudySetSpec(patients=1, series_per_study=1, instances_per_series=1, rows=rows, cols=rows, seed=3)
    entry = datagen.write_study_set(spec, work / "data")[0]
    part10 = Path(entry["path"]).read_bytes()
    length = int.from_bytes(part10[140:144], "little")  # (0002,0000) group length, explicit VR LE.
    stored = to_stored(instance_from_part10(part10, 144 + length, entry["transfer_syntax_uid"]))
    # With its /metadata entry, as ClusterArchive sends every copy (node/runtime.py).
    return dataclasses.replace(stored, metadata_json=metadata_at_ingest(stored.record, stored.blob))


async def send(node: NodeProcess, stored: StoredInstance, mode: str, first: int, copies: int) -> dict[str, float]:
    host, port = node.peer_address.split(":")
    member = MemberInfo(node_id=node.node_id, peer_host=host, peer_port=int(port))
    channels = Channels()
    transport = GrpcTransport(channels, lambda node_id: member if node_id == node.node_id else None,
                              lambda: envelope("pacsnode", "bench-sender", 1, 0), store_stream=mode == "stream")
    try:
        await transport.store(node.node_id, stored, hint_for="", timeout_ms=10_000)  # Connect, open the stream.
        base_uid = stored.record.sop_instance_uid
        latencies = []
        node_before, own_before = cpu_seconds(node.process.pid), time.process_time()  # type: ignore[union-attr]
        for index in range(first, first + copies):
            copy = dataclasses.replace(stored, record=dataclasses.replace(stored.record,
                                                                           sop_instance_uid=f"{base_uid}.{index}"))
            started = time.perf_counter()
            reply = await transport.store(node.node_id, copy, hint_for="", timeout_ms=10_000)
            latencies.append(time.perf_counter() - started)
            assert reply.outcome == "stored", reply
        node_ms = (cpu_seconds(node.process.pid) - node_before) * 1000 / copies  # type: ignore[union-attr]
        own_ms = (time.process_time() - own_before) * 1000 / copies
        assert (transport.store_stream_copies > 0) == (mode == "stream")
        return {"node_ms": node_ms, "sender_ms": own_ms, "p50_ms": statistics.median(latencies) * 1000}
    finally:
        await channels.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--data-dir", type=Path, default=None, help="the node's data under DIR (e.g. /dev/shm)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacsnode-copy-bench-"))
    data = Path(tempfile.mkdtemp(prefix="pacsnode-copy-bench-", dir=args.data_dir)) if args.data_dir else work
    node = NodeProcess(data / "n1", node_id="n1", extra_args=["--profile", "local", "--log-level", "WARNING"])
    try:
        stored = sample(work, args.rows)
        node.start()
        time.sleep(2)
        results: dict[str, list[dict[str, float]]] = {"stream": [], "call": []}
        print(f"payload {len(stored.blob)} B; node data under {data}")
        print("| round | mode | node CPU ms/copy | sender CPU ms/copy | round trip p50 ms | load (1 min) |")
        print("|---|---|---|---|---|---|")

        async def rounds() -> None:  # One event loop for every round (grpc.aio keeps to the first).
            first = 0
            for round_ in range(args.rounds):
                for mode in ("stream", "call"):
                    result = await send(node, stored, mode, first, args.copies)
                    first += args.copies
                    results[mode].append(result)
                    print(f"| {round_ + 1} | {mode} | {result['node_ms']:.3f} | {result['sender_ms']:.3f} | "
                          f"{result['p50_ms']:.3f} | {os.getloadavg()[0]:.1f} |", flush=True)

        asyncio.run(rounds())
        for mode, runs in results.items():
            print(f"| median | {mode} | {statistics.median(r['node_ms'] for r in runs):.3f} | "
                  f"{statistics.median(r['sender_ms'] for r in runs):.3f} | "
                  f"{statistics.median(r['p50_ms'] for r in runs):.3f} | |")
        return 0
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
