"""The front end's final statuses for answers that are not whole, and for internal errors.

A real DicomFrontEnd on a free loopback port over a real Archive (RocksStore); a subclass
of the Archive injects the outcome under test (a cluster that could not ask every owner,
or a failure inside the archive), and a pynetdicom SCU reads what the node answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet

from pacsnode.node.config import NodeConfig
from pacsnode.node.dicom import DicomFrontEnd
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive, IncompleteAnswer, RetrievePlan, Shortfall
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes


class _FaultyArchive(Archive):
    """The real single-node Archive, with find/locate outcomes a cluster can produce."""

    mode = "incomplete"

    def find(self, query: Query, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Attributes]:
        if self.mode == "error":
            raise RuntimeError("boom")
        yield {"StudyInstanceUID": "1.2.3", "PatientID": "P"}
        raise IncompleteAnswer(Shortfall(studies=2))

    def locate(self, query: Query) -> RetrievePlan:
        if self.mode == "error":
            raise RuntimeError("boom")
        return RetrievePlan([], Shortfall(ranges=3))


@pytest.fixture
def front_end(tmp_path: Path) -> Iterator[tuple[DicomFrontEnd, _FaultyArchive]]:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    archive = _FaultyArchive(store)
    config = NodeConfig(node_id="t", data_dir=tmp_path, host="127.0.0.1", dicom_port=0)
    dicom = DicomFrontEnd(config, archive)
    dicom.start()
    try:
        yield dicom, archive
    finally:
        dicom.stop(grace_s=1)
        store.close()


def _identifier() -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3"
    return identifier


def _responses(port: int, service: str) -> list[Any]:
    ae = AE(ae_title="TESTSCU")
    model = StudyRootQueryRetrieveInformationModelFind if service == "find" else \
        StudyRootQueryRetrieveInformationModelGet
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        send = assoc.send_c_find if service == "find" else assoc.send_c_get
        return [status for status, _ in send(_identifier(), model) if status]
    finally:
        assoc.release()


def test_find_that_could_not_ask_everything_ends_in_failure(front_end: Any) -> None:
    dicom, _archive = front_end
    statuses = _responses(dicom.port, "find")
    assert [int(s.Status) for s in statuses] == [0xFF00, 0xC001]
    assert str(statuses[-1].ErrorComment) == "incomplete: 2 studies unreachable"


def test_get_that_could_not_ask_everything_counts_failed_suboperations(front_end: Any) -> None:
    dicom, _archive = front_end
    final = _responses(dicom.port, "get")[-1]
    assert int(final.Status) == 0xA702
    assert int(final.NumberOfFailedSuboperations) == 3
    assert str(final.ErrorComment) == "incomplete: 3 ranges unreachable"


@pytest.mark.parametrize(("service", "code"), [("find", 0xC311), ("get", 0xC411)])
def test_an_internal_error_is_not_a_bad_identifier(front_end: Any, service: str, code: int) -> None:
    dicom, archive = front_end
    archive.mode = "error"
    final = _responses(dicom.port, service)[-1]
    assert int(final.Status) == code and str(final.ErrorComment) == "internal error; see the node log"
