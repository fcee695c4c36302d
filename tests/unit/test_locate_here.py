"""Coordinator.locate_here: the instances of a C-GET/C-MOVE that names a study, read from
this node's own store on the association's thread (issue 10: the hand-off to the loop and
back was 2-6 ms of the time to the first retrieved instance), with the plan locate() gives,
and only on a ring of this node alone; ClusterArchive.locate takes that way when it can.

Each case runs locate() (the loop's fan-out) and locate_here() on the same coordinator and
store (the node's RocksStore through StoreReplica, and the simulator's NonDurableStore).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pacsnode.node.runtime import ClusterArchive, LoopThread
from pacsnode.replication.matching import Condition, Query
from pacsnode.sim.workload import Study

from tests.unit.test_find_here import Members, archive, coordinator  # noqa: F401 -- `archive` is a fixture.


def _queries(studies: list[Study]) -> list[Query]:
    first, other = studies[0], studies[4]
    return [
        Query("STUDY", (Condition("StudyInstanceUID", "UI", first.study_instance_uid),), ()),
        Query("STUDY", (Condition("StudyInstanceUID", "UI", "\\".join(
            [first.study_instance_uid, other.study_instance_uid, "1.2.3.404"])),), ()),
        Query("STUDY", (Condition("StudyInstanceUID", "UI", "1.2.3.404"),), ()),  # Nothing: an empty plan.
        Query("PATIENT", (Condition("PatientID", "LO", other.patient_id),), (), model="PATIENT"),
    ]


def _located(node: Any, query: Query) -> Any:
    return asyncio.run(node.locate(query))


def test_a_ring_of_one_locates_here_with_locates_plan(archive: tuple[Any, list[Study]]) -> None:  # noqa: F811
    local, studies = archive
    node = coordinator(local, Members("n1"))
    for query in _queries(studies):
        here = node.locate_here(query, 1_000)
        assert here is not None, query
        plan = _located(node, query)
        assert sorted(here.locations, key=lambda loc: loc.sop_instance_uid) == \
            sorted(plan.locations, key=lambda loc: loc.sop_instance_uid), query
        assert not here.unreachable and not plan.unreachable
    assert len(node.locate_here(_queries(studies)[0], 1_000).locations) >= 1  # type: ignore[union-attr]


def test_a_cluster_or_a_joining_node_or_a_big_answer_locates_on_the_loop(
        archive: tuple[Any, list[Study]]) -> None:  # noqa: F811
    local, studies = archive
    query = _queries(studies)[1]
    for node in (coordinator(local, Members("n1", "n2", "n3"), read_quorum=1, scatter_read_quorum=1),
                 coordinator(local, Members("n1", joined=False))):
        assert node.locate_here(query, 1_000) is None
    node = coordinator(local, Members("n1"))
    count = len(_located(node, query).locations)
    assert count > 1
    assert node.locate_here(query, count - 1) is None
    assert node.locate_here(query, count) is not None


def test_the_archive_locates_a_named_study_on_the_calling_thread(archive: tuple[Any, list[Study]]) -> None:  # noqa: F811
    """The front end's ClusterArchive (node/runtime.py) over a real loop thread: a ring of
    one answers from the store here (reads_here), a cluster still goes through the loop."""
    local, studies = archive
    loop = LoopThread("test-locate")
    try:
        node = coordinator(local, Members("n1"))
        plan = ClusterArchive(loop, node, store_timeout_ms=1_000).locate(_queries(studies)[0])
        assert plan.locations and not plan.unreachable
        assert node.stats.extra.get("reads_here") == 1
        cluster = coordinator(local, Members("n1", "n2", "n3"), read_quorum=1)
        ClusterArchive(loop, cluster, store_timeout_ms=1_000).locate(_queries(studies)[2])
        assert "reads_here" not in cluster.stats.extra
    finally:
        loop.stop()
