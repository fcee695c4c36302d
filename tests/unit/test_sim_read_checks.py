"""The simulator's read-your-writes checks and deletes: a read that overlaps a delete of
what it reads may or may not see it (either is right), so it is not counted stale. Found
by the stop-24 sweep (docs/sim.md): isolate-one seed 16, site-cut 27 and partition-bridge
33 each counted a stale read whose study's delete was acknowledged while the read ran."""

from __future__ import annotations

import asyncio

from pacsnode.sim.cluster import SimConfig

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


def test_a_find_after_a_merge_that_overlapped_a_store_of_the_patient_is_not_stale() -> None:
    # Sweep seeds kill-two-sites-apart 472 and isolate-one 816: a store of a new study of
    # patient A was on its owners but not yet acknowledged when a merge of A into B ran; the
    # merge found the copy and moved the study; the store was acknowledged after the merge.
    # A later find of A does not list the study: right (the merge and the store overlapped),
    # but the checker expected it under A and counted the find stale.
    # Copies' deadlines (default 2 s) longer than the entry node's pause, so that its store
    # succeeds; the merge's reads give up on the paused node sooner.
    cluster, workload, first, owners = one_stored_study(31, SimConfig(replica_timeout_ms=20_000,
                                                                      replica_start_timeout_ms=500))
    try:
        patient = workload.patient_id_of(first)
        ring = cluster.process(ENTRY).membership.ring()
        while True:  # A second study of the patient, and an entry node that owns neither (the merge waits for no copy on it).
            study = workload.data.new_study(patient)
            others = [n for n in cluster.running_ids() if n != ENTRY and n not in owners
                      and n not in ring.owners_of_study(study.study_instance_uid, 3)]
            if others:
                break
        workload.studies.append(study)
        stored = workload.data.instance(study, now_ms=cluster.now_ms())
        entry = others[0]
        store = asyncio.ensure_future(workload.store(stored, entry))
        # Once a copy is on an owner, the entry node is paused before the acknowledgments reach it.
        while not any(node.store.read_stored(study.study_instance_uid, stored.sop_instance_uid) is not None
                      for node in cluster.nodes.values()):
            cluster.run_for(0.0002)
        cluster.pause(entry, 4)  # Longer than the merge takes.
        cluster.loop.run_until_complete(asyncio.sleep(0))
        merge = cluster.loop.run_until_complete(workload.merge_patient(patient, "PID999999", ENTRY))
        assert merge.ok and not store.done(), (merge, store.result())
        stored_op = cluster.loop.run_until_complete(store)
        assert stored_op.ok and stored_op.ended_ms > merge.ended_ms  # Acknowledged after the merge.
        cluster.run_for(2)
        reader = next(n for n in cluster.running_ids() if n != entry)
        find, found = cluster.loop.run_until_complete(workload.find(patient, reader))
        assert study.study_instance_uid not in found  # The merge moved it.
        assert find.status == "success"
    finally:
        cluster.close()
