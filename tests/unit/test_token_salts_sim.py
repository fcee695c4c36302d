"""Chosen token salts in the simulator (SimConfig.token_salts, as a node's first start does):
every node gets a salt, every process builds the same ring from the gossiped salts, each
site is balanced, and stores land on the owners that ring names."""

from __future__ import annotations

import asyncio

from pacsnode.ring.placement import SiteReplicas
from pacsnode.sim.cluster import SimCluster, SimConfig
from pacsnode.sim.run import format_result, run_scenario
from pacsnode.sim.workload import Workload

POLICY = SiteReplicas.of({"site-a": 1, "site-b": 1, "site-c": 1})


def test_salted_nodes_agree_on_the_ring_and_each_site_is_balanced() -> None:
    config = SimConfig(replication_factor=POLICY, write_quorum=1, token_salts=True)
    cluster = SimCluster(12, sites=3, seed=3, config=config)
    workload = Workload(cluster, 3)

    async def run() -> None:
        await asyncio.sleep(10)
        salts = {node_id: node.token_salt for node_id, node in cluster.nodes.items()}
        assert all(salt >= 1 for salt in salts.values()), salts
        rings = {cluster.process(n).membership.ring() for n in cluster.live_ids()}
        assert len({r.version for r in rings}) == 1
        ring = next(iter(rings))
        assert {m.node_id: m.token_salt for m in ring.members} == salts  # Gossiped with the member.
        held = ring.ownership(POLICY)
        for site in ("site-a", "site-b", "site-c"):
            values = [held[m.node_id] for m in ring.members if m.site == site]
            assert max(values) / (sum(values) / len(values)) <= 1.25, (site, values)
        records = [await workload.store(workload.next_instance(), "node-001") for _ in range(12)]
        assert all(r.ok for r in records)
        await asyncio.sleep(3)
        for r in records:
            study = workload.stored[r.sop_instance_uid].study_instance_uid
            assert cluster.replicas.holders.get(r.sop_instance_uid, set()) >= set(ring.owners_of_study(study, POLICY))

    try:
        cluster.loop.run_until_complete(run())
    finally:
        cluster.close()


def test_a_wiped_node_chooses_its_salt_again_and_the_cluster_takes_its_new_tokens() -> None:
    """identity.json keeps the token salt with the generation: a wipe that loses it makes the
    node choose again at its first start (node/token_salt.py), here another salt (1 -> 5),
    so its generation 3 joins with other tokens. Every checker passes (nothing acknowledged
    lost, one ring, every study at N copies on the new owners)."""
    result = run_scenario("wipe-restarted", nodes=10, sites=3, seed=0, config=SimConfig(token_salts=True))
    assert result["ok"], format_result(result)
    assert ["token-salt", "node-002 1 -> 5"] in [f[1:] for f in result["faults"]]
    assert ["rejoin", "node-002 generation=3 was=alive"] in [f[1:] for f in result["faults"]]
