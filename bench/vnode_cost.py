"""What more vnodes per node cost: ring build, memory, ranges, and an anti-entropy pass over the WAN.

    .venv/bin/python bench/vnode_cost.py --vnodes 64 128 256 [--nodes 9 48 144] [--sim-nodes 6 12]

1. Ring (pure code, no node started): build time of a `Ring` of N members in 3 sites,
   the time to fill its owner cache for one copy per site (what the first stores and the
   first anti-entropy pass do), the Python memory both hold (tracemalloc), and the ranges
   one node owns (each range is one digest call per other owner per anti-entropy pass,
   and one entry in `pacsnode status`'s pending list). Gossip does not grow: a member is
   gossiped with its vnode count, never its tokens.
2. Simulator (production repairer, virtual time so not noisy): 3 sites, one copy per site,
   40 ms one way between sites, empty stores; the longest anti-entropy pass over the nodes
   (`RepairStats.last_pass_ms`) after the first two passes, and the bytes anti-entropy sends
   across sites per pass per node.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tracemalloc

from pacsnode.ring.placement import Member, Ring, SiteReplicas
from pacsnode.sim.cluster import SimCluster, SimConfig, site_names
from pacsnode.sim.network import LinkModel

SITES = ("a", "b", "c")


def ring_cost(nodes: int, vnodes: int) -> dict[str, float]:
    members = [Member(f"{SITES[i % 3]}-n{i}", site=SITES[i % 3], vnodes=vnodes) for i in range(nodes)]
    policy = SiteReplicas.of({site: 1 for site in SITES})
    tracemalloc.start()
    started = time.perf_counter()
    ring = Ring("cost", members)
    built = time.perf_counter()
    owned = ring.ranges(policy)
    filled = time.perf_counter()
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mine = sum(1 for o in owned if members[0].node_id in o.owners)
    return {"build_ms": (built - started) * 1000, "fill_ms": (filled - built) * 1000,
            "memory_kib": peak / 1024, "ranges": len(owned), "ranges_per_node": mine}


def pass_cost(nodes: int, vnodes: int, wan_ms: float) -> dict[str, float]:
    policy = SiteReplicas.of({site: 1 for site in site_names(3)})
    config = SimConfig(replication_factor=policy, vnodes=vnodes, anti_entropy_interval_ms=20_000,
                       link=LinkModel(wan_latency_ms=wan_ms, wan_jitter_ms=0.0))
    cluster = SimCluster(nodes, sites=3, seed=1, config=config)

    async def run() -> dict[str, float]:
        await asyncio.sleep(60)  # Two passes: the first (pending ranges) is done.
        traffic = cluster.network.traffic
        before = {k: v for k, v in traffic.wan_bytes_by_kind.items()}
        passes = {n: cluster.process(n).repairer.stats.passes for n in cluster.live_ids()}
        await asyncio.sleep(60)
        done = sum(cluster.process(n).repairer.stats.passes - passes[n] for n in cluster.live_ids())
        digest = sum(v - before.get(k, 0) for k, v in traffic.wan_bytes_by_kind.items()
                     if k.split(".")[-1] in ("range_digest", "list_bucket"))
        longest = max(cluster.process(n).repairer.stats.last_pass_ms for n in cluster.live_ids())
        return {"pass_ms": longest, "wan_bytes_per_pass_per_node": digest / max(1, done)}

    try:
        return cluster.loop.run_until_complete(run())
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vnodes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--nodes", type=int, nargs="+", default=[9, 48, 144])
    parser.add_argument("--sim-nodes", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--wan-ms", type=float, default=40.0)
    args = parser.parse_args()
    print("| nodes | vnodes | ring build | owner cache fill | memory | ranges | ranges one node owns |")
    print("|---|---|---|---|---|---|---|")
    for nodes in args.nodes:
        for vnodes in args.vnodes:
            r = ring_cost(nodes, vnodes)
            print(f"| {nodes} | {vnodes} | {r['build_ms']:.1f} ms | {r['fill_ms']:.1f} ms | {r['memory_kib']:.0f} KiB "
                  f"| {r['ranges']:.0f} | {r['ranges_per_node']:.0f} |", flush=True)
    print()
    print(f"| nodes (3 sites, 1 copy each, {args.wan_ms:g} ms WAN) | vnodes | longest anti-entropy pass | "
          "anti-entropy bytes across sites per pass per node |")
    print("|---|---|---|---|")
    for nodes in args.sim_nodes:
        for vnodes in args.vnodes:
            r = pass_cost(nodes, vnodes, args.wan_ms)
            print(f"| {nodes} | {vnodes} | {r['pass_ms'] / 1000:.1f} s | {r['wan_bytes_per_pass_per_node']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
