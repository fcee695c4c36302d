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

from pacsnode.sim.store import NonDurableStore

from tests.unit.test_find_here import FailingStore, Members, archive, coordinator  # noqa: F401 -- `archive` is a fixture.


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


def _sent(locations: list[Any]) -> list[tuple[str, ...]]:
    """Every field a retrieve uses of a location (InstanceLocation's equality leaves out the
    Part-10 length and the correction)."""
    return sorted((loc.study_instance_uid, loc.series_instance_uid, loc.sop_instance_uid, loc.sop_class_uid,
                   loc.transfer_syntax_uid, str(loc.part10_bytes), loc.correction) for loc in locations)


def _named(studies: list[Study], local: Any) -> list[Query]:
    """Identifiers that name one study, and series or instances of it."""
    corrected, plain = studies[0], studies[2]
    instances = [row for row in local.query_rows(Query("IMAGE", (Condition(
        "StudyInstanceUID", "UI", plain.study_instance_uid),), ()), None)]
    assert len(instances) == 3
    series = str(instances[0]["SeriesInstanceUID"])
    sops = "\\".join(str(row["SOPInstanceUID"]) for row in instances[:2])
    study = Condition("StudyInstanceUID", "UI", plain.study_instance_uid)
    return [
        Query("STUDY", (Condition("StudyInstanceUID", "UI", corrected.study_instance_uid),), ()),
        Query("STUDY", (study,), ()),
        Query("SERIES", (study, Condition("SeriesInstanceUID", "UI", series)), ()),
        Query("IMAGE", (study, Condition("SOPInstanceUID", "UI", sops + "\\1.2.3.404")), ()),
        Query("IMAGE", (study, Condition("SeriesInstanceUID", "UI", "1.2.3.404"),
                        Condition("SOPInstanceUID", "UI", sops)), ()),
        Query("STUDY", (Condition("StudyInstanceUID", "UI", "1.2.3.404"),), ()),
    ]


def test_a_named_study_is_located_here_with_every_field_of_locates_plan(
        archive: tuple[Any, list[Study]]) -> None:  # noqa: F811
    """Part-10 lengths and the study's correction too: the node's store lists the study
    itself (RocksStore.study_locations), the simulator's goes find_here's way."""
    local, studies = archive
    node = coordinator(local, Members("n1"))
    for query in _named(studies, local):
        here = node.locate_here(query, 1_000)
        assert here is not None, query
        assert _sent(here.locations) == _sent(_located(node, query).locations), query
    first = node.locate_here(_named(studies, local)[0], 1_000)
    assert first is not None and first.locations
    assert all(loc.correction and loc.part10_bytes == 0 for loc in first.locations)
    plain = node.locate_here(_named(studies, local)[1], 1_000)
    assert plain is not None and all(not loc.correction and loc.part10_bytes > 0 for loc in plain.locations)


def test_the_node_store_lists_a_named_study_without_query_rows(archive: tuple[Any, list[Study]]) -> None:  # noqa: F811
    """The store's study_locations, not one query row per instance: with query_rows failing,
    the node's store still locates a named study here; the simulator's store (no
    study_locations) declines, and so does an identifier that also names a patient."""
    local, studies = archive
    node = coordinator(FailingStore(local), Members("n1"))
    query = _named(studies, local)[1]
    here = node.locate_here(query, 1_000)
    if isinstance(local, NonDurableStore):
        assert here is None
        return
    assert here is not None and len(here.locations) == 3
    assert node.locate_here(query, 2) is None  # Past the bound: the loop's way.
    with_patient = Query("STUDY", (*query.conditions, Condition("PatientID", "LO", studies[2].patient_id)), ())
    assert node.locate_here(with_patient, 1_000) is None  # find_here's way (which fails here).
