"""Queries see hints: a study stored while its owners were down lives only in hints.

The real store (RocksStore through StoreReplica, as the peer server queries it) and the
simulator's store give the same rows for the same hints, and those rows are what the
main index gives once the instances are stored as primary copies.
"""

from __future__ import annotations

from typing import Any, Callable

from pacsnode.node.codec import to_stored
from pacsnode.node.local_replica import StoreReplica
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.planning import study_range
from pacsnode.sim.datagen import StudySetSpec, iter_part10
from pacsnode.sim.store import NonDurableStore

SPEC = StudySetSpec(patients=2, studies_per_patient=1, series_per_study=2, instances_per_series=2, rows=4, cols=4,
                    seed=5)


def _stored(make_instance: Callable[[bytes], Any]) -> list[Any]:
    return [to_stored(make_instance(part10), now_ms=1_000) for _entry, part10 in iter_part10(SPEC)]


def _rows(rows: Any, key: str) -> list[tuple[str, str]]:
    return sorted((str(row[key]), str(row.get("NumberOfStudyRelatedInstances", row.get("SOPInstanceUID", ""))))
                  for row in rows)


def test_hint_rows_match_primary_rows(open_store: Any, make_instance: Any) -> None:
    instances = _stored(make_instance)
    holder = StoreReplica(open_store("holder"))
    primary = StoreReplica(open_store("primary"))
    sim = NonDurableStore("sim")
    for index, stored in enumerate(instances):
        owner = "owner-a" if index % 2 else "owner-b"  # Held for two owners: each instance counts once.
        holder.put_stored(stored, hint_for=owner)
        holder.put_stored(stored, hint_for="owner-c")
        primary.put_stored(stored)
        sim.put_stored(stored, hint_for=owner)
    study_query = Query("STUDY", (), ("StudyInstanceUID", "NumberOfStudyRelatedInstances"))
    assert list(holder.query_rows(study_query, None)) == []  # Hints are not in the main index.
    expected = _rows(primary.query_rows(study_query, None), "StudyInstanceUID")
    assert len(expected) == 2
    assert _rows(holder.query_hint_rows(study_query, None), "StudyInstanceUID") == expected
    assert _rows(sim.query_hint_rows(study_query, None), "StudyInstanceUID") == expected

    # IMAGE level, one study by its range and its key, a patient condition: the same rows.
    study_uid = instances[0].study_instance_uid
    image_query = Query("IMAGE", (Condition("StudyInstanceUID", "UI", study_uid),
                                  Condition("PatientID", "LO", str(instances[0].attributes["PatientID"]))),
                        ("SOPInstanceUID",))
    ranges = [study_range(study_uid)]
    expected_images = _rows(primary.query_rows(image_query, ranges), "SOPInstanceUID")
    assert len(expected_images) == 4
    assert _rows(holder.query_hint_rows(image_query, ranges), "SOPInstanceUID") == expected_images
    assert _rows(sim.query_hint_rows(image_query, ranges), "SOPInstanceUID") == expected_images
    # A range that holds no hinted study: nothing.
    other = study_range("1.2.3.4.5")
    assert list(holder.query_hint_rows(study_query, [other])) == []


def test_no_hints_no_rows(open_store: Any) -> None:
    replica = StoreReplica(open_store())
    assert list(replica.query_hint_rows(Query("STUDY"), None)) == []
