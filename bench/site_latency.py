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

    .venv/bin/python bench/site_latency.py [--instances 200] [--wan-ms 40] [--wan-jitter-ms 10] \
        [--lan-ms 0.2] [--scopes local global]

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
        load_before = os.getloadavg()[0]
        results = store_timed(cluster.nodes["c1"].dicom_port, entries)
        stored_at = time.monotonic()
        healthy = wait_until(lambda: cluster.health()[0], 120, 0.25)
        copies_s = time.monotonic() - stored_at if healthy else None
        latencies = [ms for ms, status in results if status == 0]
        return {"scope": scope, "stored": len(latencies), "failed": len(results) - len(latencies),
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="site-latency-") as tmp:
        spec = datagen.StudySetSpec(patients=args.instances, studies_per_patient=1, series_per_study=1,
                                    instances_per_series=1, rows=64, cols=64, seed=args.seed)
        entries = datagen.write_study_set(spec, Path(tmp) / "studies")
        rows = [measure(scope, entries, args, Path(tmp) / scope) for scope in args.scopes]
    print(f"{args.instances} instances one after the other through c1; 3 sites x 2 nodes, one copy per site, W=2; "
          f"WAN {args.wan_ms:g} +- {args.wan_jitter_ms:g} ms one way, LAN {args.lan_ms:g} ms")
    print("| scope | stored | failed | p50 ms | p99 ms | mean ms | max ms | all copies after s | load before/after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scope']} | {r['stored']} | {r['failed']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_ms']} | "
              f"{r['max_ms']} | {r['all_copies_after_s']} | {r['load_before']} / {r['load_after']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
