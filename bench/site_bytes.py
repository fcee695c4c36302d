"""Bytes sent across sites per stored instance, and store latency, local vs global write scope.

The simulator (production coordinator, virtual time; sim/network.py counts every byte that
crosses between sites): 3 sites x 2 nodes, one copy per site (`--site-replicas` A=1,B=1,C=1),
W=2, links between sites `--wan-ms` one way. After the cluster settles (first anti-entropy
pass done), K instances are stored one after the other through one node, nothing else runs
but membership and the hint replay; then the run waits for every copy to arrive. The WAN
bytes of the same wait without stores (membership gossip, replay passes) are measured
first and subtracted. Goal (issue 15): one compressed copy per remote site, nothing more,
i.e. 2 x the mean compressed size per instance here.

The bytes are sim/network.py's sizes, counted per message kind: a store request is the
compressed payload + 200 + 40 per index attribute (~840 B for these 16 attributes; the real
StoreWholeRequest's header is ~750 B: the attributes as JSON ~515 B, the instance record
~223 B, plus a 36 B envelope), its reply 96 B. Anti-entropy (digests every pass) and
membership run on timers, not per instance: their share depends on how many passes fell in
the window, so they are shown apart from the copies. bench/site_latency.py counts the real
bytes on real processes (through the delay proxy).

    .venv/bin/python bench/site_bytes.py [--instances 200] [--wan-ms 40]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from pacsnode.replication.coordinator import WriteScope
from pacsnode.ring.placement import SiteReplicas
from pacsnode.sim.cluster import SimCluster, SimConfig, site_names
from pacsnode.sim.network import LinkModel
from pacsnode.sim.workload import Workload


def measure(scope: WriteScope, instances: int, wan_ms: float, seed: int = 1) -> dict[str, float]:
    policy = SiteReplicas.of({site: 1 for site in site_names(3)})
    config = SimConfig(replication_factor=policy, write_quorum=2, write_scope=scope,
                       link=LinkModel(wan_latency_ms=wan_ms, wan_jitter_ms=0.0))
    cluster = SimCluster(6, sites=3, seed=seed, config=config)
    workload = Workload(cluster, seed)
    entry = "node-000"

    async def run() -> dict[str, float]:
        traffic = cluster.network.traffic
        await asyncio.sleep(40)  # Membership settled, first anti-entropy pass done (empty stores).
        quiet_start, t0 = traffic.wan_bytes, cluster.now_ms()
        quiet_kinds = dict(traffic.wan_bytes_by_kind)
        await asyncio.sleep(30)
        quiet_ms = cluster.now_ms() - t0
        quiet_per_ms = (traffic.wan_bytes - quiet_start) / quiet_ms
        quiet_kind_per_ms = {k: (v - quiet_kinds.get(k, 0)) / quiet_ms for k, v in traffic.wan_bytes_by_kind.items()}
        start, t1 = traffic.wan_bytes, cluster.now_ms()
        start_kinds = dict(traffic.wan_bytes_by_kind)
        records = []
        sizes = []
        for _ in range(instances):
            stored = workload.next_instance()
            sizes.append(len(stored.blob))
            records.append(await workload.store(stored, entry))
        stored_ms = cluster.now_ms()
        for _ in range(300):  # Until every remote copy is delivered (no hint left), at most 300 s.
            await asyncio.sleep(1)
            if not any(node.store.hint_owners() for node in cluster.nodes.values()):
                break
        delivered_s = (cluster.now_ms() - stored_ms) / 1000
        elapsed_ms = cluster.now_ms() - t1
        wan = traffic.wan_bytes - start - quiet_per_ms * elapsed_ms
        by_kind = {k: (v - start_kinds.get(k, 0) - quiet_kind_per_ms.get(k, 0.0) * elapsed_ms) / instances
                   for k, v in traffic.wan_bytes_by_kind.items()}
        latencies = sorted(r.latency_ms for r in records)
        hints = sum(sum(c for c, _ in node.store.hint_owners().values()) for node in cluster.nodes.values())
        return {"ok": sum(r.ok for r in records), "wan_bytes_per_instance": wan / instances,
                "mean_blob_bytes": statistics.mean(sizes), "p50_ms": latencies[len(latencies) // 2],
                "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], "hints_left": hints,
                "delivered_s": delivered_s,
                **{"kind:" + k: v for k, v in sorted(by_kind.items()) if abs(v) >= 1}}

    try:
        return cluster.loop.run_until_complete(run())
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--wan-ms", type=float, default=40.0)
    args = parser.parse_args()
    print(f"3 sites x 2 nodes, 1 copy per site, W=2, {args.wan_ms:g} ms one way between sites, "
          f"{args.instances} instances stored through one node")
    print("| scope | stored | store p50 | store p99 | all copies in place after | WAN bytes per instance | "
          "mean compressed instance | ratio | hints left |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for scope in (WriteScope.LOCAL, WriteScope.GLOBAL):
        r = results[scope] = measure(scope, args.instances, args.wan_ms)
        print(f"| {scope.value} | {r['ok']:.0f} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['delivered_s']:.0f} s | "
              f"{r['wan_bytes_per_instance']:.0f} | {r['mean_blob_bytes']:.0f} | "
              f"{r['wan_bytes_per_instance'] / r['mean_blob_bytes']:.2f} | {r['hints_left']:.0f} |")
    print()
    print("| scope | copies (store, fetch and their replies) per instance | ratio | anti-entropy (digests, "
          "listings) per instance | membership per instance |")
    print("|---|---|---|---|---|")
    for scope, r in results.items():
        groups = {"copies": 0.0, "anti-entropy": 0.0, "membership": 0.0}
        for kind, value in r.items():
            if kind.startswith("kind:"):
                name = kind[5:]
                group = "copies" if name.split(".")[-1] in ("store", "fetch") else \
                    "anti-entropy" if name.split(".")[-1] in ("range_digest", "list_bucket") else "membership"
                groups[group] += value
        print(f"| {scope.value} | {groups['copies']:.0f} | {groups['copies'] / r['mean_blob_bytes']:.2f} | "
              f"{groups['anti-entropy']:.0f} | {groups['membership']:.0f} |")
    print()
    print("WAN bytes per instance by message kind (request `data.*`, its reply `reply.*`; quiet rate subtracted):")
    kinds = sorted({k for r in results.values() for k in r if k.startswith("kind:")})
    print("| kind | " + " | ".join(scope.value for scope in results) + " |")
    print("|---|" + "---|" * len(results))
    for kind in kinds:
        print(f"| {kind[5:]} | " + " | ".join(f"{r.get(kind, 0.0):.0f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
