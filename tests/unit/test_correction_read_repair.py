"""Read repair carries corrections (issue 14, a known gap): a named read that finds an
owner answering without the study's newest correction pushes it to that owner, as it
copies instances an owner lacks, instead of leaving it to anti-entropy (60 s here).

The stale owner is made by putting the correction into the other two owners' stores
only (what an owner that missed a modify and lost its hint looks like); the read goes
through the stale owner, which asks itself first."""

from __future__ import annotations

from pacsnode.replication.correction import Correction
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import Attributes

from .sim_setup import ENTRY, one_stored_study


def test_a_named_read_pushes_the_newest_correction_to_an_owner_that_answered_without_it() -> None:
    cluster, workload, study, owners = one_stored_study(6)
    entry = ENTRY
    try:
        stale, *others = owners
        correction = Correction.of(study, {"PatientName": "Corrected^Name"}, cluster.process(entry).coordinator.hlc.now())
        for owner in others:
            assert cluster.nodes[owner].store.put_correction(correction)
        assert cluster.nodes[stale].store.correction(study) is None
        query = Query("STUDY", (Condition("StudyInstanceUID", "UI", study),), ("PatientName",))

        async def find() -> list[Attributes]:
            return [row async for row in cluster.process(stale).coordinator.find(query)]

        rows = cluster.loop.run_until_complete(find())
        assert [row["PatientName"] for row in rows] == ["Corrected^Name"]  # Merged over the stale answer.
        cluster.run_for(1)  # Well under the anti-entropy interval.
        held = cluster.nodes[stale].store.correction(study)
        assert held is not None and held.values() == {"PatientName": "Corrected^Name"}
        assert cluster.process(stale).coordinator.stats.extra.get("read_correction_repairs") == 1
    finally:
        cluster.close()
