"""Storage Commitment with per-site copies (issue 15 item 2: "Storage Commitment still means
every copy in every site"), on the simulator (production coordinator, virtual time): 3 sites
x 2 nodes, one copy per site, local write scope, 40 ms between sites. A store through a site
cut off from the others succeeds (local scope), but its commitment is not given while the
other sites' owners lack their copies; after the heal the same request is committed."""

from __future__ import annotations

import asyncio

from pacsnode.replication.commitment import CommitSettings, FailureReason, Reference
from pacsnode.replication.coordinator import WriteScope
from pacsnode.ring.placement import SiteReplicas
from pacsnode.sim.cluster import SimCluster, SimConfig
from pacsnode.sim.network import LinkModel
from pacsnode.sim.workload import Workload

POLICY = SiteReplicas.of({"site-a": 1, "site-b": 1, "site-c": 1})
ENTRY = "node-000"  # site-a
SHORT = CommitSettings(timeout_s=4.0, recheck_s=0.5)


def test_a_commitment_waits_for_the_copies_of_every_site() -> None:
    link = LinkModel(wan_latency_ms=40.0, wan_jitter_ms=0.0)
    config = SimConfig(replication_factor=POLICY, write_quorum=2, write_scope=WriteScope.LOCAL, link=link)
    cluster = SimCluster(6, sites=3, seed=7, config=config)
    workload = Workload(cluster, 7)

    async def run() -> None:
        await asyncio.sleep(30)  # Settled: first anti-entropy passes done.
        coordinator = cluster.process(ENTRY).coordinator
        cut = cluster.network.partition_site("site-a", sorted(cluster.nodes))
        records = [await workload.store(workload.next_instance(), ENTRY) for _ in range(4)]
        assert all(r.ok for r in records)  # Local scope: the site's own copy is enough to store.
        stored = [workload.stored[r.sop_instance_uid] for r in records]
        references = [Reference(s.record.sop_class_uid, s.sop_instance_uid) for s in stored]
        known = {s.sop_instance_uid: s.study_instance_uid for s in stored}
        during = await coordinator.commitment(references, SHORT, known)
        assert during.committed == ()  # The owners in site-b and site-c do not hold them.
        assert {reason for _ref, reason in during.failed} == {FailureReason.NOT_ON_ALL_OWNERS}
        cluster.network.heal()
        del cut
        await asyncio.sleep(15)  # Hint replay delivers the other sites' copies.
        after = await coordinator.commitment(references, SHORT, known)
        assert sorted(r.sop_instance_uid for r in after.committed) == sorted(known)
        ring = cluster.process(ENTRY).membership.ring()
        for s in stored:  # Committed means a copy on the study's owner in every site.
            owners = ring.owners_of_study(s.study_instance_uid, POLICY)
            assert {cluster.nodes[o].site for o in owners} == {"site-a", "site-b", "site-c"}
            assert cluster.replicas.holders.get(s.sop_instance_uid, set()) >= set(owners)

    try:
        cluster.loop.run_until_complete(run())
    finally:
        cluster.close()
