"""The seams the simulator plugs into.

Coordinator(run_blocking=...) lets the simulator run blocking store calls inline, on the
loop, with no thread. The simulator found that Coordinator._pump_local (the local part of
every C-FIND / locate) handed rows back with `asyncio.run_coroutine_threadsafe(...).result()`,
which only works when run_blocking moved it to another thread: inline, it waited on the
loop it was blocking, forever. Fixed in 50f868f; these tests keep it fixed.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from pacsnode.replication.coordinator import Coordinator, CoordinatorSettings
from pacsnode.replication.matching import Condition, Query
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.placement import Member, Ring
from pacsnode.sim.cluster import SimCluster, _decode
from pacsnode.sim.loop import inline
from pacsnode.sim.store import NonDurableStore
from pacsnode.sim.workload import DataGenerator


class _Alone:
    """A MembershipView of a ring of one."""

    def __init__(self) -> None:
        self._ring = Ring("seam", [Member("n1")])
        self._me = MemberInfo(node_id="n1", peer_host="127.0.0.1", peer_port=1)

    def ring(self) -> Ring:
        return self._ring

    def is_alive(self, node_id: str) -> bool:
        return True

    def member(self, node_id: str) -> MemberInfo | None:
        return self._me if node_id == "n1" else None

    def members(self) -> list[MemberInfo]:
        return [self._me]

    def troubled_within(self, window_ms: int) -> bool:
        return False


def _find_inline(store: NonDurableStore, patient_id: str) -> list[str]:
    coordinator = Coordinator("n1", _Alone(), transport=None, local=store,  # type: ignore[arg-type]
                              settings=CoordinatorSettings(), decode=_decode, run_blocking=inline)
    query = Query("STUDY", (Condition("PatientID", "LO", patient_id),), ("StudyInstanceUID",))

    async def find() -> list[str]:
        return [str(row["StudyInstanceUID"]) async for row in coordinator.find(query)]

    return asyncio.new_event_loop().run_until_complete(find())


def test_find_with_an_inline_run_blocking_finishes() -> None:
    """Found by the simulator: _pump_local used to block on run_coroutine_threadsafe(...).result(),
    a deadlock when run_blocking runs inline. Fixed: it reads batches through run_blocking."""
    data = DataGenerator(1)
    study = data.new_study()
    store = NonDurableStore("n1")
    store.put_stored(data.instance(study, now_ms=0))
    found: list[list[str]] = []
    worker = threading.Thread(target=lambda: found.append(_find_inline(store, study.patient_id)), daemon=True)
    worker.start()
    worker.join(timeout=2)  # The thread stays blocked forever when the bug is there (a daemon: harmless).
    assert found == [[study.study_instance_uid]]


def test_the_simulator_runs_local_finds_inline() -> None:
    """The simulator's run_blocking gets the same find through, on one thread."""
    cluster = SimCluster(1, seed=3)
    try:
        data = DataGenerator(1)
        study = data.new_study()
        process = cluster.process("node-000")

        async def store_then_find() -> list[str]:
            await process.coordinator.store(data.instance(study, now_ms=0))
            query = Query("STUDY", (Condition("PatientID", "LO", study.patient_id),), ("StudyInstanceUID",))
            return [str(row["StudyInstanceUID"]) async for row in process.coordinator.find(query)]

        assert cluster.loop.run_until_complete(store_then_find()) == [study.study_instance_uid]
    finally:
        cluster.close()
