"""Deletes seen by queries with no study key (issue 14, the scatter reads): one owner of a
patient's two studies is cut off while one instance of the first and the whole second
study are deleted (tombstones durable on the two other owners: DELETED), the cut heals,
and the patient is looked up through that owner itself (it asks itself first). Hint
replay and anti-entropy are held off, so the owner still holds what was deleted.

With scatter_read_quorum = 2 (the default) the other owner asked holds the tombstones, so
the owners' answers differ and the study is read again by its key: the IMAGE answer drops
what an owner answers DELETED for, and a STUDY/PATIENT count is re-read from an owner
that holds the tombstones, never from the one that missed them. With 1, the owner that
missed the delete answers alone (documented in README "Read your writes")."""

from __future__ import annotations

import pytest

from pacsnode.replication.delete_coordinator import DeleteScope, DeleteStatus
from pacsnode.replication.matching import Condition, Query
from pacsnode.sim.cluster import SimCluster
from pacsnode.sim.workload import Study

from .test_scatter_quorum import _answer, _find, _owned_study, _query, _six_nodes_one_to_lag, _truth


def _missed_delete_cluster(scatter_read_quorum: int) -> tuple[SimCluster, str, str, dict[str, set[str]]]:
    """(cluster, the owner that missed the deletes, the patient, SOP UIDs left by study)."""
    cluster, data, lagging, writer = _six_nodes_one_to_lag(scatter_read_quorum)
    first = _owned_study(cluster, data, lagging, None)
    second = _owned_study(cluster, data, lagging, first.patient_id)
    stored: dict[str, list[str]] = {first.study_instance_uid: [], second.study_instance_uid: []}

    def store(study: Study) -> None:
        instance = data.instance(study, now_ms=cluster.now_ms())
        result = cluster.loop.run_until_complete(cluster.process(writer).coordinator.store(instance))
        assert result.status == "success"
        stored[study.study_instance_uid].append(instance.sop_instance_uid)

    for study, count in ((first, 3), (second, 2)):
        for _ in range(count):
            store(study)
    cluster.run_for(2)
    others = [node_id for node_id in cluster.running_ids() if node_id != lagging]
    cluster.network.partition([lagging], others)  # Cut off: these deletes never reach it.
    gone = stored[first.study_instance_uid][0]
    for scope in (DeleteScope(first.study_instance_uid, "", gone), DeleteScope(second.study_instance_uid)):
        result = cluster.loop.run_until_complete(cluster.process(writer).deletes.delete(scope))
        assert result.status is DeleteStatus.DELETED
    cluster.network.heal()
    cluster.run_for(3)  # Back; the tombstone hints for it are still held elsewhere (replay every 600 s).
    held = {s: {r.sop_instance_uid for r in cluster.nodes[lagging].store.instances(s)} for s in stored}
    assert held == {s: set(sops) for s, sops in stored.items()}  # As intended: it missed both deletes.
    left = {first.study_instance_uid: set(stored[first.study_instance_uid]) - {gone}}
    return cluster, lagging, first.patient_id, left


@pytest.mark.parametrize("level", ["STUDY", "PATIENT", "IMAGE"])
def test_with_scatter_r_2_a_delete_the_asked_owner_missed_is_not_shown(level: str) -> None:
    cluster, lagging, patient_id, left = _missed_delete_cluster(scatter_read_quorum=2)
    try:
        rows, error = _find(cluster, lagging, _query(level, patient_id))
        assert error is None
        assert _answer(level, rows) == _truth(level, left)
        assert cluster.process(lagging).coordinator.stats.extra.get("scatter_rechecks", 0) == 1
    finally:
        cluster.close()


@pytest.mark.parametrize("level", ["STUDY", "IMAGE"])
def test_a_named_read_through_the_owner_that_missed_the_delete_does_not_show_it(level: str) -> None:
    """The same through a request naming each study (what the scatter's recheck does):
    the STUDY count is re-read from an owner holding the tombstones."""
    cluster, lagging, _patient_id, left = _missed_delete_cluster(scatter_read_quorum=2)
    try:
        for study_uid in left:
            named = Query(level, (Condition("StudyInstanceUID", "UI", study_uid),),
                          ("StudyInstanceUID", "SOPInstanceUID", "NumberOfStudyRelatedInstances"))
            rows, error = _find(cluster, lagging, named)
            assert error is None
            assert _answer(level, rows) == _truth(level, {study_uid: left[study_uid]})
            assert cluster.process(lagging).coordinator.stats.extra.get("read_disagreements", 0) >= 1
    finally:
        cluster.close()


@pytest.mark.parametrize("level", ["STUDY", "IMAGE"])
def test_with_scatter_r_1_the_owner_that_missed_the_delete_shows_it(level: str) -> None:
    """Why scatter_read_quorum = 1 is documented as showing deleted instances for a while:
    one owner per range, no other answer to hold the tombstone against."""
    cluster, lagging, patient_id, left = _missed_delete_cluster(scatter_read_quorum=1)
    try:
        rows, error = _find(cluster, lagging, _query(level, patient_id))
        assert error is None
        assert _answer(level, rows) != _truth(level, left)
    finally:
        cluster.close()
