"""`pacsnode sim routing`: who a one-study retrieve asks, at several cluster sizes.

For each cluster size: start the cluster on the virtual clock, store `studies` studies of
`instances` instances through one node, then retrieve each study (locate + read every
instance, what a C-GET does) through a node that does not own it, and count the distinct
peers each retrieve asked (Query and FetchInstance calls) and its virtual latency; then
pause one node that owns none of those studies and retrieve again. Production code
(Coordinator, Gather) on the simulated network.
"""

from __future__ import annotations

import statistics
from typing import Any

from pacsnode.replication.matching import Condition, Query
from pacsnode.sim.cluster import SimCluster, SimConfig
from pacsnode.sim.workload import DataGenerator


def measure(nodes: int, *, seed: int = 0, studies: int = 10, instances: int = 3,
            read_quorum: int | None = None) -> dict[str, Any]:
    config = SimConfig() if read_quorum is None else SimConfig(read_quorum=read_quorum)
    cluster = SimCluster(nodes, seed=seed, config=config)
    try:
        cluster.run_for(3)
        data = DataGenerator(seed)
        entry = cluster.running_ids()[0]
        coordinator = cluster.process(entry).coordinator
        n = cluster.config.replication_factor
        ring = cluster.process(entry).membership.ring()
        bystander = cluster.running_ids()[-1]  # Owns none of the studies; paused for the second pass.
        chosen = []
        while len(chosen) < studies:
            study = data.new_study()
            if not {entry, bystander} & set(ring.owners_of_study(study.study_instance_uid, n)):
                chosen.append(study)

        async def store_all() -> None:
            for study in chosen:
                for _ in range(instances):
                    result = await coordinator.store(data.instance(study, now_ms=cluster.now_ms()))
                    if result.status != "success":
                        raise RuntimeError(f"store failed: {result}")

        cluster.loop.run_until_complete(store_all())

        def retrieve_all(subset: list[Any] | None = None) -> tuple[list[int], list[int], int]:
            peers, latencies, missing = [], [], 0
            for study in subset if subset is not None else chosen:
                cluster.network.call_log = []
                started = cluster.now_ms()

                async def get(uid: str = study.study_instance_uid) -> int:
                    plan = await coordinator.locate(Query("STUDY", (Condition("StudyInstanceUID", "UI", uid),)))
                    locations = getattr(plan, "locations", plan)
                    for location in locations:
                        await coordinator.read(location)
                    return len(locations)

                found = cluster.loop.run_until_complete(get())
                missing += instances - found
                latencies.append(cluster.now_ms() - started)
                peers.append(len({target for source, target, method in cluster.network.call_log
                                  if source == entry and method in ("query", "fetch")}))
                cluster.network.call_log = None
            return peers, latencies, missing

        peers, latencies, missing = retrieve_all()
        cluster.pause(bystander, 600)
        paused_peers, paused_latencies, paused_missing = retrieve_all()
        # During a fault: one owner of the first study paused (not yet known dead).
        victim = ring.owners_of_study(chosen[0].study_instance_uid, n)[0]
        owned = [s for s in chosen if victim in ring.owners_of_study(s.study_instance_uid, n)]
        cluster.pause(victim, 600)
        fault_peers, fault_latencies, fault_missing = retrieve_all(owned)
        return {
            "nodes": nodes, "studies": studies, "replication_factor": n,
            "read_quorum": cluster.config.read_quorum,
            "fault_studies": len(owned), "fault_peers_max": max(fault_peers),
            "fault_latency_ms_p50": statistics.median(fault_latencies),
            "fault_latency_ms_max": max(fault_latencies),
            "peers_max": max(peers), "peers_mean": statistics.mean(peers),
            "latency_ms_p50": statistics.median(latencies), "latency_ms_max": max(latencies),
            "paused_peers_max": max(paused_peers),
            "paused_latency_ms_p50": statistics.median(paused_latencies),
            "paused_latency_ms_max": max(paused_latencies),
            "instances_missing": missing + paused_missing + fault_missing,
        }
    finally:
        cluster.close()


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["one-study retrieves (locate + read every instance) through a non-owner; virtual ms",
             "nodes  R | peers max  mean | latency p50  max | non-owner paused: peers, p50, max"
             " | an owner paused: studies, peers, p50, max | missing"]
    for row in rows:
        lines.append(
            f"{row['nodes']:>5} {row['read_quorum']:>2} | {row['peers_max']:>9} {row['peers_mean']:>5.2f}"
            f" | {row['latency_ms_p50']:>11.0f} {row['latency_ms_max']:>4.0f}"
            f" | {row['paused_peers_max']:>24}, {row['paused_latency_ms_p50']:.0f}, {row['paused_latency_ms_max']:.0f}"
            f" | {row['fault_studies']:>24}, {row['fault_peers_max']}, {row['fault_latency_ms_p50']:.0f},"
            f" {row['fault_latency_ms_max']:.0f} | {row['instances_missing']}")
    return "\n".join(lines)
