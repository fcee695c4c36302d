"""The C-GET handler starts reading its first instance on the reader pool as soon as the
instances are located, before pynetdicom takes the count and makes the first sub-operation
(issue 10: the time to the first retrieved instance); the read is never on the handler's
thread, and a C-GET that ends before its first sub-operation gives its budget back.

A real DicomFrontEnd over the single-node Archive and a RocksStore; the handler is driven
as pynetdicom's C-GET service class drives it (next() for the count, then per instance).
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from pacsnode.node.config import NodeConfig
from pacsnode.node.dicom import DicomFrontEnd
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive, InstanceLocation
from pacsnode.replication.model import Instance
from pacsnode.sim.datagen import StudySetSpec, iter_part10

SPEC = StudySetSpec(patients=1, series_per_study=1, instances_per_series=3, rows=16, cols=16, seed=5)


class _WatchedArchive(Archive):
    """The real single-node Archive, noting which thread reads each instance."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_threads: list[str] = []
        self.first_read = threading.Event()

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        self.read_threads.append(threading.current_thread().name)
        self.first_read.set()
        return super().read(location)


@pytest.fixture
def front_end(tmp_path: Path, make_instance: Callable[[bytes], Instance]) -> Iterator[tuple[DicomFrontEnd,
                                                                                             _WatchedArchive, str]]:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    archive = _WatchedArchive(store)
    instances = [make_instance(part10) for _entry, part10 in iter_part10(SPEC)]
    for instance in instances:
        archive.store(instance)
    dicom = DicomFrontEnd(NodeConfig(node_id="t", data_dir=tmp_path, host="127.0.0.1", dicom_port=0), archive)
    try:
        yield dicom, archive, instances[0].study_instance_uid
    finally:
        dicom.stop(grace_s=1)
        store.close()


def _event(study_uid: str) -> Any:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    assoc = SimpleNamespace(is_established=True, dul=SimpleNamespace(is_alive=lambda: True))
    return SimpleNamespace(request=SimpleNamespace(AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelGet),
                           identifier=identifier, assoc=assoc, is_cancelled=False)


def test_the_first_instance_is_read_on_the_pool_before_the_first_sub_operation(front_end: Any) -> None:
    dicom, archive, study_uid = front_end
    handler = dicom._on_get(_event(study_uid))
    assert next(handler) == 3  # The count: pynetdicom asks for nothing more yet.
    assert archive.first_read.wait(5), "the first instance's read did not start before the first sub-operation"
    status, dataset = next(handler)
    assert status == 0xFF00
    part10, offset = dataset.load()
    assert offset > 0 and part10[128:132] == b"DICM"
    assert archive.read_threads[0] != threading.current_thread().name
    assert all(name.startswith("pacsnode-read") for name in archive.read_threads)
    handler.close()
    assert dicom.spool.budget.used_bytes == 0


def test_a_get_closed_after_its_count_gives_the_budget_back(front_end: Any) -> None:
    """pynetdicom closes the handler after the count when it refuses the retrieve (no
    sub-operations, or more than 65 535): the first read, started or not, is given back."""
    dicom, archive, study_uid = front_end
    handler = dicom._on_get(_event(study_uid))
    assert next(handler) == 3
    assert archive.first_read.wait(5)
    handler.close()
    deadline = threading.Event()
    for _ in range(50):
        if dicom.spool.budget.used_bytes == 0:
            break
        deadline.wait(0.05)
    assert dicom.spool.budget.used_bytes == 0
