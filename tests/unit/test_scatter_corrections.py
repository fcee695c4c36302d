"""Corrections seen by queries with no study key (issue 14): one owner of a patient's
study is cut off while the study is corrected (a new PatientName, or a patient merge: a
new PatientID), the cut heals, hint replay and anti-entropy are held off (so that owner
still holds the old values), and the patient is looked up through that owner itself (it
asks itself first).

With scatter_read_quorum = 2 (the default) the other owner asked holds the correction: a
query by the new value finds the study, one by the old value does not, and every row
carries the new values. With 1, the owner that missed it answers alone (README "Read your
writes")."""

from __future__ import annotations

from typing import Any

import pytest

from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.modify_coordinator import ModifyStatus
from pacsnode.sim.cluster import SimCluster

from .test_scatter_quorum import _find, _owned_study, _six_nodes_one_to_lag

NEW_NAME = "Corrected^Name"
NEW_ID = "MERGED-7"


def _missed_correction_cluster(scatter_read_quorum: int, merge: bool) -> tuple[SimCluster, str, str, dict[str, str]]:
    """(cluster, the owner that missed the correction, the study, its old values)."""
    cluster, data, lagging, writer = _six_nodes_one_to_lag(scatter_read_quorum)
    study = _owned_study(cluster, data, lagging, None)
    for _ in range(2):
        instance = data.instance(study, now_ms=cluster.now_ms())
        assert cluster.loop.run_until_complete(cluster.process(writer).coordinator.store(instance)).status == "success"
    cluster.run_for(2)
    others = [node_id for node_id in cluster.running_ids() if node_id != lagging]
    cluster.network.partition([lagging], others)  # Cut off: the correction never reaches it.
    modifies = cluster.process(writer).modifies
    if merge:
        result = cluster.loop.run_until_complete(modifies.merge_patient(study.patient_id, NEW_ID, {}))
    else:
        result = cluster.loop.run_until_complete(modifies.modify(study.study_instance_uid, {"PatientName": NEW_NAME}))
    assert result.status is ModifyStatus.MODIFIED
    cluster.network.heal()
    cluster.run_for(3)  # Back; the correction hint for it is still held elsewhere (replay every 600 s).
    held = cluster.nodes[lagging].store.correction(study.study_instance_uid)
    assert held is None  # As intended: it missed the correction.
    return cluster, lagging, study.study_instance_uid, {"PatientName": study.patient_name, "PatientID": study.patient_id}


def _query(level: str, keyword: str, value: str) -> Query:
    return Query(level, (Condition(keyword, "PN" if keyword == "PatientName" else "LO", value),),
                 ("StudyInstanceUID", "SOPInstanceUID", "PatientName", "PatientID", "NumberOfStudyRelatedInstances",
                  "NumberOfPatientRelatedStudies"))


def _studies(rows: list[Any]) -> dict[str, tuple[str, str]]:
    return {str(r["StudyInstanceUID"]): (str(r["PatientName"]), str(r["PatientID"])) for r in rows}


def _patients(rows: list[Any]) -> list[tuple[str, str, int]]:
    return [(str(r["PatientName"]), str(r["PatientID"]), int(str(r["NumberOfPatientRelatedStudies"]))) for r in rows]


@pytest.mark.parametrize("level", ["STUDY", "IMAGE"])
@pytest.mark.parametrize("merge", [False, True], ids=["modify", "merge"])
def test_with_scatter_r_2_a_correction_the_asked_owner_missed_is_matched_and_shown(level: str, merge: bool) -> None:
    cluster, lagging, study_uid, old = _missed_correction_cluster(2, merge)
    try:
        keyword, new = ("PatientID", NEW_ID) if merge else ("PatientName", NEW_NAME)
        expected = (old["PatientName"], NEW_ID) if merge else (NEW_NAME, old["PatientID"])
        rows, error = _find(cluster, lagging, _query(level, keyword, new))
        assert error is None
        assert _studies(rows) == {study_uid: expected}
        if level == "STUDY":
            assert [int(str(r["NumberOfStudyRelatedInstances"])) for r in rows] == [2]
        rows, error = _find(cluster, lagging, _query(level, keyword, old[keyword]))
        assert error is None
        assert _studies(rows) == {}  # Not under its old value any more.
        # The other key, which the correction did not change: found, with the new values.
        other = "PatientName" if merge else "PatientID"
        rows, error = _find(cluster, lagging, _query(level, other, old[other]))
        assert error is None
        assert _studies(rows) == {study_uid: expected}
    finally:
        cluster.close()


@pytest.mark.parametrize("merge", [False, True], ids=["modify", "merge"])
def test_with_scatter_r_2_patient_level_finds_the_patient_by_the_new_value_only(merge: bool) -> None:
    cluster, lagging, _study_uid, old = _missed_correction_cluster(2, merge)
    try:
        keyword, new = ("PatientID", NEW_ID) if merge else ("PatientName", NEW_NAME)
        expected = (old["PatientName"], NEW_ID, 1) if merge else (NEW_NAME, old["PatientID"], 1)
        rows, error = _find(cluster, lagging, _query("PATIENT", keyword, new))
        assert error is None and _patients(rows) == [expected]
        rows, error = _find(cluster, lagging, _query("PATIENT", keyword, old[keyword]))
        assert error is None and _patients(rows) == []
    finally:
        cluster.close()


def test_a_scatter_recheck_hands_the_correction_to_the_owner_that_missed_it() -> None:
    """Read repair, as named reads do: not left to anti-entropy (every 600 s here)."""
    cluster, lagging, study_uid, old = _missed_correction_cluster(2, merge=False)
    try:
        _find(cluster, lagging, _query("STUDY", "PatientID", old["PatientID"]))
        cluster.run_for(2)
        held = cluster.nodes[lagging].store.correction(study_uid)
        assert held is not None and held.values().get("PatientName") == NEW_NAME
    finally:
        cluster.close()


def test_with_scatter_r_1_the_owner_that_missed_the_correction_answers_the_old_values() -> None:
    cluster, lagging, study_uid, old = _missed_correction_cluster(1, merge=False)
    try:
        rows, error = _find(cluster, lagging, _query("STUDY", "PatientName", old["PatientName"]))
        assert error is None
        assert _studies(rows) == {study_uid: (old["PatientName"], old["PatientID"])}
    finally:
        cluster.close()
