"""The Archive API the DICOM front end calls: store, find, locate and read instances.

This is the single-node form (a ring of one): every request is served by the local
replica. The cluster coordinator keeps the same API and fans out to the owner set.
Calls block (the front end calls them from pynetdicom's association threads).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import (
    Attributes,
    CorruptBlob,
    Instance,
    InstanceRecord,
    StoreError,
    StoreFull,
    StoreOutcome,
)
from pacsnode.replication.query import (HeaderReader, IndexReader, LocalQuery, aggregate_patients,
                                        wants_patient_counts, with_patient_counts)

log = logging.getLogger(__name__)


class LocalReplica(IndexReader, Protocol):
    """What the archive needs of the local store (node/store.py's RocksStore)."""

    def put_instance(self, instance: Instance, *, now_ms: int | None = None) -> str: ...
    def read_part10(self, study_instance_uid: str, sop_instance_uid: str) -> bytes: ...
    def instance_record(self, study_instance_uid: str, sop_instance_uid: str) -> InstanceRecord | None: ...


class ArchiveApi(Protocol):
    """What the front ends call: `Archive` over this node's replica alone, or
    node/runtime.py's `ClusterArchive` over the coordinator."""

    def store(self, instance: Instance) -> "WriteResult": ...
    def find(self, query: Query, is_cancelled: Callable[[], bool] = ...) -> Iterator[Attributes]: ...
    def locate(self, query: Query) -> "RetrievePlan": ...
    def read(self, location: "InstanceLocation") -> tuple[bytes, int]: ...


class WriteStatus(enum.StrEnum):
    """How a store through the Archive API ended; the front end maps it to a DICOM status."""

    SUCCESS = "success"  # Durable on the required number of replicas.
    OUT_OF_RESOURCES = "out-of-resources"  # Disk full, too large, back-pressure: 0xA700.
    QUORUM_FAILED = "quorum-failed"  # Fewer than W replicas answered: 0xA701.
    FAILED = "failed"  # Store error: 0xA701 with the reason.


@dataclass(frozen=True)
class WriteResult:
    status: WriteStatus
    outcome: str = ""  # StoreOutcome when successful.
    message: str = ""  # For the ErrorComment; never patient data.
    latency_ms: int = 0


@dataclass(frozen=True)
class InstanceLocation:
    """One instance to retrieve: enough to open the right presentation context."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    # Length of the stored Part-10 bytes (0: the index did not say); not part of its identity.
    part10_bytes: int = field(default=0, compare=False)
    # The study's correction (replication/correction.py JSON; "" for none): what retrieval
    # applies to the header of the bytes it sends (node/correct.py).
    correction: str = field(default="", compare=False)


class ReadError(Exception):
    """An instance could not be read (missing, or its blob is corrupt)."""


@dataclass(frozen=True)
class Shortfall:
    """What a cluster read could not ask: token ranges (a scatter) or studies (a request
    that names them) none of whose owners answered. Empty on a complete answer."""

    ranges: int = 0
    studies: int = 0

    def __bool__(self) -> bool:
        return bool(self.ranges or self.studies)

    def __add__(self, other: "Shortfall") -> "Shortfall":
        return Shortfall(ranges=self.ranges + other.ranges, studies=self.studies + other.studies)

    def describe(self) -> str:
        """For an ErrorComment (at most 64 characters) and the log; never patient data."""
        parts = []
        if self.studies:
            parts.append(f"{self.studies} stud{'y' if self.studies == 1 else 'ies'}")
        if self.ranges:
            parts.append(f"{self.ranges} range{'' if self.ranges == 1 else 's'}")
        return f"incomplete: {' and '.join(parts)} unreachable"


class IncompleteAnswer(Exception):
    """Raised by a find after its last row when part of the archive could not be asked:
    the rows already delivered are true, but the answer must not end as Success."""

    def __init__(self, shortfall: Shortfall) -> None:
        super().__init__(shortfall.describe())
        self.shortfall = shortfall


@dataclass(frozen=True)
class RetrievePlan:
    """What a C-GET/C-MOVE identifier selects: the instances found, and what could not be
    asked (each unreachable study or range counts as one failed sub-operation)."""

    locations: list[InstanceLocation]
    shortfall: Shortfall = Shortfall()

    @property
    def unreachable(self) -> int:
        return self.shortfall.ranges + self.shortfall.studies


class Archive:
    def __init__(self, replica: LocalReplica, header_reader: HeaderReader | None = None) -> None:
        self._replica = replica
        self._header_reader = header_reader

    def store(self, instance: Instance) -> WriteResult:
        started = time.monotonic()
        try:
            outcome = self._replica.put_instance(instance)
        except StoreFull as error:
            log.warning("archive.store.refused sop_instance_uid=%s reason=%s", instance.sop_instance_uid, error)
            return WriteResult(WriteStatus.OUT_OF_RESOURCES, message=str(error))
        except StoreError as error:
            log.error("archive.store.failed sop_instance_uid=%s reason=%s", instance.sop_instance_uid, error)
            return WriteResult(WriteStatus.FAILED, message=str(error))
        latency_ms = int((time.monotonic() - started) * 1000)
        if outcome == StoreOutcome.CONFLICT:
            log.warning(
                "archive.store.conflict sop_instance_uid=%s rule=first-wins kept=first",
                instance.sop_instance_uid,
            )
        return WriteResult(WriteStatus.SUCCESS, outcome=outcome, latency_ms=latency_ms)

    def find(self, query: Query, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Attributes]:
        """Matching rows at the query's level, each exactly once; stops early when cancelled."""
        rows = LocalQuery(self._replica, query, self._header_reader).rows()
        if query.level == "PATIENT":
            rows = aggregate_patients(_until_cancelled(rows, is_cancelled))
        elif wants_patient_counts(query):
            rows = with_patient_counts(_until_cancelled(rows, is_cancelled))
        yield from _until_cancelled(rows, is_cancelled)

    def locate(self, query: Query) -> RetrievePlan:
        """The instances a C-GET/C-MOVE identifier selects (study, series or image level)."""
        image_query = Query(
            level="IMAGE",
            model=query.model,
            conditions=tuple(c for c in query.conditions if c.keyword in _RETRIEVE_KEYS),
            return_keys=(),
        )
        locations = []
        for row in LocalQuery(self._replica, image_query).rows():
            record = self._replica.instance_record(str(row["StudyInstanceUID"]), str(row["SOPInstanceUID"]))
            if record is None:
                continue
            locations.append(
                InstanceLocation(
                    study_instance_uid=record.study_instance_uid,
                    series_instance_uid=record.series_instance_uid,
                    sop_instance_uid=record.sop_instance_uid,
                    sop_class_uid=record.sop_class_uid,
                    transfer_syntax_uid=record.transfer_syntax_uid,
                    part10_bytes=record.size_bytes + record.dataset_offset,
                )
            )
        return RetrievePlan(locations)

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        """The Part-10 bytes and the offset where the dataset starts. Raises ReadError."""
        record = self._replica.instance_record(location.study_instance_uid, location.sop_instance_uid)
        if record is None:
            raise ReadError(f"instance {location.sop_instance_uid} is not stored here")
        try:
            return self._replica.read_part10(location.study_instance_uid, location.sop_instance_uid), record.dataset_offset
        except CorruptBlob as error:
            raise ReadError(str(error)) from error
        except KeyError:
            raise ReadError(f"blob of {location.sop_instance_uid} is missing") from None


# Unique keys that select instances for a retrieve (PS3.4 C.4.2.2.1 / C.4.3.2.1).
_RETRIEVE_KEYS = frozenset({"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"})


def _until_cancelled(rows: Iterator[Attributes], is_cancelled: Callable[[], bool]) -> Iterator[Attributes]:
    for row in rows:
        if is_cancelled():
            return
        yield row


def retrieve_conditions(query: Query) -> tuple[Condition, ...]:
    return tuple(c for c in query.conditions if c.keyword in _RETRIEVE_KEYS)
