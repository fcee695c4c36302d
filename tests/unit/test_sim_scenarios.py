"""A few fixed seeds of the fault scenarios, small enough for CI, and the checkers' teeth.

Every run must pass every checker (sim/checkers.py): no acknowledged write lost or
changed, every study back at N copies, one ring everywhere, no unexpected exception.
Bigger clusters and many seeds are for `python -m pacsnode.sim sweep`, by hand.
"""

from __future__ import annotations

import pytest

from pacsnode.sim.checkers import run_checkers
from pacsnode.sim.cluster import SimCluster
from pacsnode.sim.run import format_result, run_scenario
from pacsnode.sim.workload import Workload


@pytest.mark.parametrize(("scenario", "nodes", "seed"), [
    ("kill-one", 5, 1),
    ("kill-one", 6, 2),
    ("partition-halves", 6, 3),
    ("wipe", 5, 4),
    ("wipe-restarted", 6, 13),
    ("join", 5, 5),
    ("leave", 6, 6),
    ("restart-storm", 6, 8),
    ("site-cut", 6, 9),
    ("isolate-one", 6, 10),
    ("churn", 6, 11),
    ("churn", 8, 12),
])
def test_scenario_passes_its_checks(scenario: str, nodes: int, seed: int) -> None:
    result = run_scenario(scenario, nodes=nodes, sites=3, seed=seed, load=300)
    assert result["ok"], format_result(result)
    assert result["instances_acked"] >= 300


def test_kill_one_measures_what_it_should() -> None:
    result = run_scenario("kill-one", nodes=6, sites=3, seed=7, load=300)
    assert result["ok"], format_result(result)
    (detection,) = result["detection"]
    assert detection["all_dead_s"] is not None and 4 <= detection["all_dead_s"] <= 30  # LAN profile.
    assert result["false_positives"]["declared_dead"] == 0
    assert result["movement"]["kind"] == "loss" and result["movement"]["ratio"] == pytest.approx(1.0, abs=0.05)
    assert result["rereplication_s"] is not None and result["under_replicated_monotonic"]
    store = result["availability"]["fault"]["store"]
    assert store["ok"] == store["attempted"] - store["entry_down"]  # Only clients of the dead node failed.


def test_the_checkers_catch_a_lost_write() -> None:
    cluster = SimCluster(4, sites=1, seed=9)
    try:
        workload = Workload(cluster, 9)

        async def load_then_lose() -> list[str]:
            await workload.load(20)
            sop = sorted(workload.acked)[0]
            study = workload.acked[sop][0].study_instance_uid
            for node in cluster.nodes.values():  # Every copy gone: what the checkers must never miss.
                node.store.delete_study(study)
                for owner in list(node.store.hint_owners()):
                    node.store.delete_hint(owner, study, sop)
            checks = await run_checkers(cluster, workload, 9)
            return [c.name for c in checks if c.ok is False]

        failed = cluster.loop.run_until_complete(load_then_lose())
        assert "acked-writes" in failed and "replication" in failed
    finally:
        cluster.close()
