"""`pacsnode merge-patient` when one of the patient's studies is gone by the time it is
corrected (issue 14, a known gap): the scatter C-FIND of the old PatientID lists a study,
then the study is deleted before the merge reaches it, so its own named read finds
nothing. The merge corrected every study that is still there, so it answers MODIFIED
(saying how many it found gone), not NOT_FOUND, which means "no study of that PatientID".

Runs on the simulator's cluster with the production ModifyCoordinator and
DeleteCoordinator; the only hook is at the coordinator's injected `find` seam: the real
find, and the study's delete (through the real DeleteCoordinator) once the scatter
listing has been read."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pacsnode.replication.delete_coordinator import DeleteScope, DeleteStatus
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes
from pacsnode.replication.modify_coordinator import ModifyCoordinator, ModifyStatus
from pacsnode.sim.cluster import SimCluster
from pacsnode.sim.workload import Workload


def test_a_study_deleted_between_the_listing_and_its_correction_does_not_make_the_merge_not_found() -> None:
    cluster = SimCluster(5, seed=8)
    workload = Workload(cluster, 8)
    try:
        cluster.run_for(3)
        entry = "node-000"
        studies = [workload.data.new_study("PIDGONE"), workload.data.new_study("PIDGONE")]
        for study in studies:
            workload.studies.append(study)
            stored = workload.data.instance(study, now_ms=cluster.now_ms())
            assert cluster.loop.run_until_complete(workload.store(stored, entry)).ok
        cluster.run_for(2)
        process = cluster.process(entry)
        gone = studies[0].study_instance_uid
        deleted: list[DeleteStatus] = []

        async def find_then_delete(query: Query) -> AsyncIterator[Attributes]:
            async for row in process.coordinator.find(query):
                yield row
            if any(c.keyword == "PatientID" for c in query.conditions) and not deleted:
                deleted.append((await process.deletes.delete(DeleteScope(gone))).status)

        original = process.modifies
        merger = ModifyCoordinator(entry, process.membership, original._transport, original._local, original.hlc,
                                   find_then_delete, replication_factor=original._n, write_quorum=original._w,
                                   run_blocking=process.run_blocking)
        result = cluster.loop.run_until_complete(merger.merge_patient("PIDGONE", "PIDKEPT", {}))
        assert deleted == [DeleteStatus.DELETED]
        assert result.status is ModifyStatus.MODIFIED, result
        assert result.studies == 1 and "1 of 2" in result.message, result
        cluster.run_for(5)
        kept = studies[1].study_instance_uid
        owners = process.membership.ring().owners_of_study(kept, 3)
        for owner in owners:
            correction = cluster.nodes[owner].store.correction(kept)
            assert correction is not None and correction.values().get("PatientID") == "PIDKEPT", owner
    finally:
        cluster.close()
