"""A node still joining its cluster does not answer reads Success.

Found by `pacsnode sim chaos --nodes 5 --duration 180 --seed 11` (a06f495): c3's data
dir was wiped, its join was refused (then fixed in the membership), and meanwhile a
C-GET of an acknowledged study through c3 answered Success with none of its 4 instances.
Until a seed accepts its join a node's ring holds only itself (a new node, or a wiped
one: no peers.json), so it was the only owner of every study and its empty store the
whole answer. Writes through such a node were refused already (not-joined); reads now
say they could not ask the archive (IncompleteAnswer: C-FIND 0xC001, C-GET/C-MOVE a
failed sub-operation, never Success).

The production coordinator in the simulator: a study stored in a running cluster, then a
new node that cannot reach any seed (cut off before it starts) is asked for it.
"""

from __future__ import annotations

from typing import Any

from pacsnode.replication.archive import IncompleteAnswer
from pacsnode.replication.matching import Condition, Query
from pacsnode.sim.cluster import SimCluster
from pacsnode.sim.workload import DataGenerator


def test_a_node_whose_join_is_not_accepted_answers_reads_incomplete_not_empty() -> None:
    cluster = SimCluster(5, seed=3)
    try:
        cluster.run_for(3)
        data = DataGenerator(3)
        entry = cluster.running_ids()[0]
        study = data.new_study()
        stored = data.instance(study, now_ms=cluster.now_ms())
        result = cluster.loop.run_until_complete(cluster.process(entry).coordinator.store(stored))
        assert result.status == "success"
        others = cluster.running_ids()
        new = cluster.add_node()
        cluster.network.partition([new.node_id], others)  # Before its join request goes out.
        cluster.run_for(2)
        process = cluster.process(new.node_id)
        assert not process.coordinator.joined() and process.membership.ring().node_ids == (new.node_id,)
        image = Query("IMAGE", (Condition("StudyInstanceUID", "UI", study.study_instance_uid),), ())

        async def find(query: Query) -> tuple[list[Any], IncompleteAnswer | None]:
            rows: list[Any] = []
            try:
                async for row in process.coordinator.find(query):
                    rows.append(row)
            except IncompleteAnswer as error:
                return rows, error
            return rows, None

        rows, incomplete = cluster.loop.run_until_complete(find(image))
        assert rows == [] and incomplete is not None and incomplete.shortfall.studies == 1
        patient = Query("STUDY", (Condition("PatientID", "LO", "*"),), ())
        rows, incomplete = cluster.loop.run_until_complete(find(patient))  # A scatter: no study key.
        assert incomplete is not None and incomplete.shortfall.ranges >= 1
        plan = cluster.loop.run_until_complete(process.coordinator.locate(image))  # C-GET / C-MOVE.
        assert plan.locations == [] and plan.unreachable >= 1

        cluster.network.heal()  # Joined, it answers from the study's owners.
        cluster.run_for(5)
        assert process.coordinator.joined()
        rows, incomplete = cluster.loop.run_until_complete(find(image))
        assert incomplete is None and [row["SOPInstanceUID"] for row in rows] == [stored.sop_instance_uid]
    finally:
        cluster.close()
