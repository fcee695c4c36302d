"""Coordinator.find_here: an exact-key C-FIND answered from this node's own store on the
calling thread (issue 10), with the rows find() gives, and only when find() would ask
nothing but that store.

Each case runs find() (the loop's fan-out: RoutedGather / Gather, pump_rows through
run_blocking) and find_here() on the same coordinator and store, the node's RocksStore
(node/store.py through node/local_replica.py) and the simulator's NonDurableStore.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Iterator

import pytest

from pacsnode.node.local_replica import StoreReplica
from pacsnode.replication.correction import Correction
from pacsnode.replication.coordinator import Coordinator, CoordinatorSettings
from pacsnode.replication.hlc import HybridClock
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.planning import RangeSet, study_range
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.placement import Member, Ring
from pacsnode.sim.cluster import _decode
from pacsnode.sim.store import NonDurableStore
from pacsnode.sim.workload import DataGenerator, Study

RETURN_KEYS = ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate",
               "NumberOfStudyRelatedInstances", "ModalitiesInStudy")


class Members:
    """A MembershipView of `nodes`, all alive, joined unless told."""

    def __init__(self, *nodes: str, joined: bool = True) -> None:
        self._ring = Ring("here", [Member(node) for node in nodes])
        self._members = {node: MemberInfo(node_id=node, peer_host="127.0.0.1", peer_port=1 + i)
                         for i, node in enumerate(nodes)}
        self.joined = joined

    def ring(self) -> Ring:
        return self._ring

    def is_alive(self, node_id: str) -> bool:
        return node_id in self._members

    def member(self, node_id: str) -> MemberInfo | None:
        return self._members.get(node_id)

    def members(self) -> list[MemberInfo]:
        return list(self._members.values())

    def troubled_within(self, window_ms: int) -> bool:
        return False


class FailingStore:
    """A store whose queries fail (an operating error of the disk)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def query_rows(self, query: Query, ranges: Any) -> Iterator[dict[str, Any]]:
        raise OSError("the disk went away")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def coordinator(local: Any, members: Members, **settings: Any) -> Coordinator:
    return Coordinator("n1", members, transport=None, local=local,  # type: ignore[arg-type]
                       settings=CoordinatorSettings(**settings), decode=_decode)


def found(node: Coordinator, query: Query) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [row async for row in node.find(query)]

    return asyncio.run(collect())


@pytest.fixture(params=["rocks", "sim"])
def archive(request: Any, open_store: Callable[..., Any]) -> tuple[Any, list[Study]]:
    """A store with 3 patients of 3 studies each (a few instances and series each), and a
    correction of the first study's PatientName."""
    local: Any = StoreReplica(open_store()) if request.param == "rocks" else NonDurableStore("n1")
    data = DataGenerator(7)
    studies: list[Study] = []
    for patient in range(3):
        first = data.new_study()
        studies.append(first)
        studies += [data.new_study(first.patient_id) for _ in range(2)]
    for number, study in enumerate(studies):
        for _ in range(1 + number % 3):
            local.put_stored(data.instance(study, now_ms=number))
    correction = Correction.of(studies[0].study_instance_uid, {"PatientName": "CORRECTED^NAME"},
                               HybridClock("n1").now())
    assert local.put_correction(correction)
    return local, studies


def exact_queries(studies: list[Study]) -> list[Query]:
    first, other = studies[0], studies[4]
    uid = Condition("StudyInstanceUID", "UI", first.study_instance_uid)
    return [
        Query("STUDY", (uid,), RETURN_KEYS),
        Query("STUDY", (Condition("StudyInstanceUID", "UI", "\\".join(
            [first.study_instance_uid, other.study_instance_uid, "1.2.3.404"])),), RETURN_KEYS),
        Query("STUDY", (Condition("AccessionNumber", "SH", other.accession_number),), RETURN_KEYS),
        Query("STUDY", (Condition("PatientID", "LO", first.patient_id),), RETURN_KEYS),
        Query("STUDY", (Condition("PatientID", "LO", "NOBODY"),), RETURN_KEYS),
        # Conditions on corrected attributes are matched over the corrected row.
        Query("STUDY", (uid, Condition("PatientName", "PN", "CORRECTED^NAME")), RETURN_KEYS),
        Query("STUDY", (uid, Condition("PatientName", "PN", first.patient_name)), RETURN_KEYS),
        Query("STUDY", (Condition("PatientID", "LO", first.patient_id),),
              RETURN_KEYS + ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances")),
        Query("PATIENT", (Condition("PatientID", "LO", first.patient_id),),
              ("PatientID", "PatientName", "NumberOfPatientRelatedStudies"), model="PATIENT"),
        Query("SERIES", (uid,), ("SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances")),
        Query("IMAGE", (Condition("StudyInstanceUID", "UI", other.study_instance_uid),), ("SOPInstanceUID",)),
        Query("IMAGE", (Condition("PatientID", "LO", other.patient_id),), ("SOPInstanceUID",)),
    ]


def test_a_ring_of_one_answers_exact_keys_here_with_finds_rows(archive: tuple[Any, list[Study]]) -> None:
    local, studies = archive
    node = coordinator(local, Members("n1"))
    for query in exact_queries(studies):
        here = node.find_here(query, 1_000)
        assert here is not None, query
        assert here == found(node, query), query
    assert node.stats.extra["reads_here"] == len(exact_queries(studies))
    corrected = node.find_here(exact_queries(studies)[0], 1_000)
    assert corrected is not None and corrected[0]["PatientName"] == "CORRECTED^NAME"


def test_queries_no_index_bounds_go_the_loops_way(archive: tuple[Any, list[Study]]) -> None:
    local, studies = archive
    node = coordinator(local, Members("n1"))
    for query in [
        Query("STUDY", (), RETURN_KEYS),  # Every study: a scan.
        Query("STUDY", (Condition("PatientName", "PN", "SIM*"),), RETURN_KEYS),  # A prefix.
        Query("STUDY", (Condition("StudyDate", "DA", "20100101-20301231"),), RETURN_KEYS),  # A range.
        Query("STUDY", (Condition("PatientID", "LO", "PID*"),), RETURN_KEYS),
        Query("STUDY", (Condition("StudyDescription", "LO", "SIMULATED"),), RETURN_KEYS),  # Not indexed.
    ]:
        assert node.find_here(query, 1_000) is None, query
    assert "reads_here" not in node.stats.extra


def test_an_answer_over_the_bound_goes_the_loops_way(archive: tuple[Any, list[Study]]) -> None:
    local, studies = archive
    node = coordinator(local, Members("n1"))
    query = Query("IMAGE", (Condition("PatientID", "LO", studies[0].patient_id),), ("SOPInstanceUID",))
    rows = found(node, query)
    assert len(rows) > 2
    assert node.find_here(query, len(rows) - 1) is None
    assert node.find_here(query, len(rows)) == rows


def test_a_failing_store_goes_the_loops_way(archive: tuple[Any, list[Study]]) -> None:
    local, studies = archive
    node = coordinator(FailingStore(local), Members("n1"))
    assert node.find_here(exact_queries(studies)[0], 1_000) is None


def test_a_node_still_joining_or_filling_its_ranges_goes_the_loops_way(archive: tuple[Any, list[Study]]) -> None:
    local, studies = archive
    query = exact_queries(studies)[0]
    assert coordinator(local, Members("n1", joined=False)).find_here(query, 1_000) is None
    members = Members("n1")
    filling = coordinator(local, members)
    # Ranges it still fills (a ring range, and the named study's): asked of another owner.
    some_range = members.ring().ranges(1)[0].token_range
    filling.pending = lambda: RangeSet([study_range(studies[0].study_instance_uid), some_range])
    assert filling.find_here(query, 1_000) is None
    assert filling.find_here(exact_queries(studies)[2], 1_000) is None  # A scatter asks every range.


def test_in_a_cluster_only_an_owner_with_r_1_answers_here(archive: tuple[Any, list[Study]]) -> None:
    local, studies = archive
    members = Members("n1", "n2", "n3", "n4", "n5")
    by_uid = {s.study_instance_uid: s for s in studies}
    ring = members.ring()
    owned = [uid for uid in by_uid if "n1" in ring.owners_of_study(uid, 3)]
    elsewhere = [uid for uid in by_uid if "n1" not in ring.owners_of_study(uid, 3)]
    assert owned and elsewhere
    named = Query("STUDY", (Condition("StudyInstanceUID", "UI", owned[0]),), RETURN_KEYS)
    # R = 2 (the default): another owner must answer too.
    assert coordinator(local, members).find_here(named, 1_000) is None
    one = coordinator(local, members, read_quorum=1, scatter_read_quorum=1)
    here = one.find_here(named, 1_000)
    assert here is not None and [row["StudyInstanceUID"] for row in here] == [owned[0]]
    # Not an owner: the owners are asked; nor a query over every range (other nodes own some).
    assert one.find_here(Query("STUDY", (Condition("StudyInstanceUID", "UI", elsewhere[0]),), RETURN_KEYS),
                         1_000) is None
    assert one.find_here(exact_queries(studies)[2], 1_000) is None


def test_an_owner_of_every_range_with_r_1_answers_a_scatter_here(archive: tuple[Any, list[Study]]) -> None:
    """Three nodes, N = 3: this node owns every range; with R = 1 the scatter asks it alone."""
    local, studies = archive
    node = coordinator(local, Members("n1", "n2", "n3"), read_quorum=1, scatter_read_quorum=1)
    for query in exact_queries(studies):
        here = node.find_here(query, 1_000)
        assert here is not None, query
        assert here == found(node, query), query
    assert coordinator(local, Members("n1", "n2", "n3")).find_here(exact_queries(studies)[2], 1_000) is None
