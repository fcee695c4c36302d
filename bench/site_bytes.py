"""Bytes sent across sites per stored instance, and store latency, local vs global write scope.

The simulator (production coordinator, virtual time; sim/network.py counts every byte that
crosses between sites): 3 sites x 2 nodes, one copy per site (`--site-replicas` A=1,B=1,C=1),
W=2, links between sites `--wan-ms` one way. After the cluster settles (first anti-entropy
pass done), K instances are stored one after the other through one node, nothing else runs
but membership and the hint replay; then the run waits for every copy to arrive. The WAN
bytes of the same wait without stores (membership gossip, replay passes) are measured
first and subtracted. Goal (issue 15): one compressed copy per remote site, nothing more,
i.e. 2 x the mean compressed size per instance here.

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
        await asyncio.sleep(40)  # Membership settled, first anti-entropy pass done (empty stores).
        quiet_start, t0 = cluster.network.traffic.wan_bytes, cluster.now_ms()
        await asyncio.sleep(30)
        quiet_per_ms = (cluster.network.traffic.wan_bytes - quiet_start) / (cluster.now_ms() - t0)
        start, t1 = cluster.network.traffic.wan_bytes, cluster.now_ms()
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
        wan = cluster.network.traffic.wan_bytes - start - quiet_per_ms * (cluster.now_ms() - t1)
        latencies = sorted(r.latency_ms for r in records)
        hints = sum(sum(c for c, _ in node.store.hint_owners().values()) for node in cluster.nodes.values())
        return {"ok": sum(r.ok for r in records), "wan_bytes_per_instance": wan / instances,
                "mean_blob_bytes": statistics.mean(sizes), "p50_ms": latencies[len(latencies) // 2],
                "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], "hints_left": hints,
                "delivered_s": delivered_s}

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
    for scope in (WriteScope.LOCAL, WriteScope.GLOBAL):
        r = measure(scope, args.instances, args.wan_ms)
        print(f"| {scope.value} | {r['ok']:.0f} | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['delivered_s']:.0f} s | "
              f"{r['wan_bytes_per_instance']:.0f} | {r['mean_blob_bytes']:.0f} | "
              f"{r['wan_bytes_per_instance'] / r['mean_blob_bytes']:.2f} | {r['hints_left']:.0f} |")


if __name__ == "__main__":
    main()
