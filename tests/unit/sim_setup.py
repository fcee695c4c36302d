"""Set-up shared by the simulator tests of corrections: a 5-node simulated cluster with
one instance stored through node-000."""

from __future__ import annotations

from pacsnode.sim.cluster import SimCluster, SimConfig
from pacsnode.sim.workload import Workload

ENTRY = "node-000"


def one_stored_study(seed: int, config: SimConfig | None = None) -> tuple[SimCluster, Workload, str, list[str]]:
    """(cluster, workload, study UID, the study's 3 owners): one instance stored through
    ENTRY, acknowledged, and 2 s of simulated time after it. The caller closes the cluster."""
    cluster = SimCluster(5, seed=seed, config=config)
    workload = Workload(cluster, seed)
    cluster.run_for(3)
    stored = workload.next_instance()
    assert cluster.loop.run_until_complete(workload.store(stored, ENTRY)).ok
    cluster.run_for(2)
    study = stored.study_instance_uid
    return cluster, workload, study, list(cluster.process(ENTRY).membership.ring().owners_of_study(study, 3))
