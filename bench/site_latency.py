"""Store latency over real node processes with WAN delay: local vs global write scope.

Issue 15 item 6's first figure, on real processes (the simulator's is bench/site_bytes.py):
3 sites x 2 `pacsnode` processes on loopback, one copy per site (`--site-replicas
siteK=1`), W=2, every peer connection through sim/faultproxy.py with `--wan-ms` +-
`--wan-jitter-ms` one way between sites and `--lan-ms` within a site (the chaos runner's
cluster, sim/chaos.py ChaosCluster, no faults). Once the cluster is healthy (all alive, first
anti-entropy passes done), `--instances` instances (one per study, so the owners vary) are
stored one after the other on one pynetdicom association (TCP_NODELAY) through c1, each
C-STORE timed from request to response; then the run waits until no hint is left (every
copy in its site) and says how long that took. One scope per cluster, the same instances
(same seed) for both.

WAN bytes: the proxy counts every byte of every peer connection; those on links between
sites (both ways: gRPC, HTTP/2 and TCP payload, no TLS here) from the first store until the
cluster is healthy again, less the rate measured over QUIET_S before the stores (membership,
anti-entropy digests), divided by the instances, against the mean zstd size of the Part-10
files (node/codec.py): the issue's goal is 2.0 (one compressed copy per remote site).

    .venv/bin/python bench/site_latency.py [--instances 200] [--wan-ms 40] [--wan-jitter-ms 10] \
        [--lan-ms 0.2] [--scopes local global] [--rows 512 --cols 512]

Loopback on a shared machine: the latencies include the machine's scheduling noise; run it
when the load is low and report the load.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt

from pacsnode.node.codec import compress
from pacsnode.sim import datagen
from pacsnode.sim.chaos import ChaosCluster, ChaosSettings
from pacsnode.sim.process import wait_until


def _nodelay(event: Any) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def store_timed(port: int, entries: list[datagen.ManifestEntry]) -> list[tuple[float, int]]:
    """(latency ms, status) per instance, one association, one C-STORE at a time."""
    ae = AE(ae_title="SITEBENCH")
    ae.dimse_timeout = 60
    for sop_class, syntax in dict.fromkeys((e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE", evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise ConnectionError("association not established")
    results = []
    try:
        for entry in entries:
            started = time.perf_counter()
            status = assoc.send_c_store(entry["path"])
            results.append(((time.perf_counter() - started) * 1000,
                            int(status.Status) if "Status" in status else -1))
    finally:
        assoc.release()
    return results


QUIET_S = 20.0


def wan_bytes(cluster: ChaosCluster) -> int:
    """Bytes the proxy carried, both ways, on links between nodes of different sites."""
    total = 0
    for name, stats in cluster.proxy.stats().items():
        source, target = name.split(">")
        if cluster.sites[source] != cluster.sites[target]:
            total += stats.bytes_forward + stats.bytes_backward
    return total


def measure(scope: str, entries: list[datagen.ManifestEntry], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    settings = ChaosSettings(nodes=6, sites=3, site_copies=1, write_quorum=2, write_quorum_scope=scope,
                             wan_delay_ms=args.wan_ms, wan_jitter_ms=args.wan_jitter_ms, lan_delay_ms=args.lan_ms,
                             seed=args.seed, work_dir=root)
    root.mkdir(parents=True, exist_ok=True)
    cluster = ChaosCluster(root, settings)
    try:
        cluster.start_all()
        if not wait_until(lambda: cluster.health()[0], 120, 0.5):
            raise RuntimeError(f"not healthy before the stores: {cluster.health()[1]}")
        # Peer bytes between sites without stores (membership, anti-entropy digests) over
        # QUIET_S, as a rate to subtract from the bytes of the stores and their copies.
        quiet_bytes, quiet_at = wan_bytes(cluster), time.monotonic()
        time.sleep(QUIET_S)
        quiet_rate = (wan_bytes(cluster) - quiet_bytes) / (time.monotonic() - quiet_at)
        load_before = os.getloadavg()[0]
        start_bytes, started_at = wan_bytes(cluster), time.monotonic()
        results = store_timed(cluster.nodes["c1"].dicom_port, entries)
        stored_at = time.monotonic()
        healthy = wait_until(lambda: cluster.health()[0], 120, 0.25)
        copies_s = time.monotonic() - stored_at if healthy else None
        store_wan = wan_bytes(cluster) - start_bytes - quiet_rate * (time.monotonic() - started_at)
        latencies = [ms for ms, status in results if status == 0]
        # The compressed copy as the node keeps it (zstd of the Part-10 file, node/codec.py).
        mean_compressed = statistics.fmean(len(compress(Path(e["path"]).read_bytes())) for e in entries)
        per_instance = store_wan / len(entries)
        return {"scope": scope, "stored": len(latencies), "failed": len(results) - len(latencies),
                "wan_bytes_per_instance": round(per_instance), "mean_compressed_bytes": round(mean_compressed),
                "wan_ratio": round(per_instance / mean_compressed, 2), "quiet_wan_bytes_per_s": round(quiet_rate),
                "p50_ms": round(statistics.median(latencies), 1), "p99_ms": round(percentile(latencies, 99), 1),
                "mean_ms": round(statistics.fmean(latencies), 1), "max_ms": round(max(latencies), 1),
                "all_copies_after_s": None if copies_s is None else round(copies_s, 1),
                "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1)}
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--wan-ms", type=float, default=40.0)
    parser.add_argument("--wan-jitter-ms", type=float, default=10.0)
    parser.add_argument("--lan-ms", type=float, default=0.2)
    parser.add_argument("--scopes", nargs="+", default=["local", "global"], choices=["local", "global"])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rows", type=int, default=64, help="image rows (512 with --cols 512: a ~512 KiB CT slice)")
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="site-latency-") as tmp:
        spec = datagen.StudySetSpec(patients=args.instances, studies_per_patient=1, series_per_study=1,
                                    instances_per_series=1, rows=args.rows, cols=args.cols, seed=args.seed)
        entries = datagen.write_study_set(spec, Path(tmp) / "studies")
        rows = [measure(scope, entries, args, Path(tmp) / scope) for scope in args.scopes]
    print(f"{args.instances} instances one after the other through c1; 3 sites x 2 nodes, one copy per site, W=2; "
          f"WAN {args.wan_ms:g} +- {args.wan_jitter_ms:g} ms one way, LAN {args.lan_ms:g} ms; "
          f"{args.rows}x{args.cols} 16-bit images")
    print("| scope | stored | failed | p50 ms | p99 ms | mean ms | max ms | all copies after s | load before/after | "
          "WAN bytes per instance | mean compressed | ratio | quiet WAN B/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scope']} | {r['stored']} | {r['failed']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_ms']} | "
              f"{r['max_ms']} | {r['all_copies_after_s']} | {r['load_before']} / {r['load_after']} | "
              f"{r['wan_bytes_per_instance']} | {r['mean_compressed_bytes']} | {r['wan_ratio']} | "
              f"{r['quiet_wan_bytes_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
