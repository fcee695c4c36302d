"""The simulator's read-your-writes checks and deletes: a read that overlaps a delete of
what it reads may or may not see it (either is right), so it is not counted stale. Found
by the stop-24 sweep (docs/sim.md): isolate-one seed 16, site-cut 27 and partition-bridge
33 each counted a stale read whose study's delete was acknowledged while the read ran."""

from __future__ import annotations

import asyncio

from .sim_setup import ENTRY, one_stored_study


def test_a_read_overlapping_an_acknowledged_study_delete_is_not_stale() -> None:
    cluster, workload, study, owners = one_stored_study(24)
    try:
        reader = next(n for n in cluster.running_ids() if n not in owners and n != ENTRY)
        patient_id = workload.patient_id_of(study)
        cluster.pause(reader, 3)  # The reads begin now and run once the reader resumes.
        reads = [asyncio.ensure_future(workload.find(patient_id, reader)),
                 asyncio.ensure_future(workload.retrieve(study, reader)),
                 asyncio.ensure_future(workload.find_study(study, reader))]
        deleted = cluster.loop.run_until_complete(workload.delete(study, node_id=ENTRY))
        assert deleted.ok  # Acknowledged while the reads wait on the paused reader.
        cluster.loop.run_until_complete(asyncio.gather(*reads))
        find, _found = reads[0].result()
        retrieve, find_study = reads[1].result(), reads[2].result()
        assert find.started_ms < deleted.ended_ms < find.ended_ms  # They overlapped.
        assert (find.status, retrieve.status, find_study.status) == ("success", "success", "success")
    finally:
        cluster.close()
