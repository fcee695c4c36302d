"""ReplicaStore: every operation the replication code asks of a node's own store.

One typed seam, satisfied by the node's store (node/local_replica.py's `StoreReplica`
over node/store.py's `RocksStore`) and by the simulator's `NonDurableStore`
(sim/store.py). The narrower views the code takes, `transport.LocalReplica` (the
coordinator, hint replay and peer Store/Fetch/Query) and `repair.RepairStore` (the
repairer and peer Digest/ListBucket), are subsets of it, so anything that is a
ReplicaStore is both. tests/unit/test_sim_store.py runs every operation below against
both stores and compares the answers.

All calls block (RocksDB I/O): run them in a thread off the event loop.
Not here: `statistics()` (each store reports its own StoreStats type; only the admin
endpoint reads it) and the node-only reads of DICOM headers.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence, runtime_checkable

from pacsnode.replication.correction import Correction
from pacsnode.replication.digest import Digest
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes, InstanceRecord, StoredInstance, Tombstone
from pacsnode.ring.placement import TokenRange

# (study uid, sop uid, content hash): one instance as a range listing names it.
Entry = tuple[str, str, str]


@runtime_checkable
class ReplicaStore(Protocol):
    """A node's own replica of the studies it owns, plus the hints it holds for others."""

    # Writes.
    def put_stored(self, stored: StoredInstance, *, hint_for: str = "") -> str:
        """Store an instance (or, with `hint_for`, a hint for that owner); a StoreOutcome value."""
        ...

    def delete_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> None: ...

    def delete_study(self, study_instance_uid: str) -> int:
        """Drop every instance of the study; how many were dropped."""
        ...

    def delete_instances(self, entries: Sequence[Entry]) -> int:
        """Drop exactly these entries (an entry whose content hash changed since stays)."""
        ...

    # Reads of single instances.
    def read_stored(self, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None: ...
    def read_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None: ...

    # Hints.
    def hint_owners(self) -> dict[str, tuple[int, int]]:
        """Owner -> (hint count, hint bytes)."""
        ...

    def hints(self, owner: str) -> Iterator[StoredInstance]: ...

    # C-FIND.
    def query_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]: ...
    def query_hint_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]: ...

    # Token ranges (repair, peer Digest and ListBucket).
    def segment_digests(self, intervals: list[tuple[int, int]]) -> dict[int, Digest]: ...
    def entries(self, low: int, high: int) -> Iterator[Entry]: ...
    def studies_in(self, low: int, high: int) -> list[str]: ...
    def is_empty(self) -> bool: ...

    # Instance records (peer Instances listing).
    def instances(self, study_instance_uid: str) -> Iterator[InstanceRecord]: ...
    def all_instances(self) -> Iterator[InstanceRecord]: ...

    # Deletes (tombstones; see node/store.py put_tombstones).
    def put_tombstones(self, tombstones: Sequence[Tombstone], *, hint_for: str = "") -> int:
        """Apply deletes (or keep them as hints for `hint_for`); how many instances they removed."""
        ...

    def tombstone(self, study_instance_uid: str, sop_instance_uid: str) -> Tombstone | None: ...
    def tombstones(self, low: int = 0, high: int = (1 << 64) - 1) -> Iterator[Tombstone]: ...
    def deleted(self, record: InstanceRecord) -> bool: ...
    def tombstone_hint_owners(self) -> list[str]: ...
    def tombstone_hints(self, owner: str) -> Iterator[Tombstone]: ...
    def delete_tombstone_hints(self, owner: str, tombstones: Sequence[Tombstone]) -> None: ...
    def purge_tombstones(self, tombstones: Sequence[Tombstone]) -> int: ...

    # Corrections (study-level overlays; replication/correction.py, node/store.py put_correction).
    def put_correction(self, correction: Correction, *, hint_for: str = "") -> bool:
        """Merge a study's correction into the one held (or, with `hint_for`, into the hint
        held for that owner); True if anything changed."""
        ...

    def correction_hint_owners(self) -> list[str]: ...
    def correction_hints(self, owner: str) -> Iterator[Correction]: ...

    def delete_correction_hints(self, owner: str, corrections: Sequence[Correction]) -> None:
        """Forget these hints (each only if still held unchanged)."""
        ...

    def correction(self, study_instance_uid: str) -> Correction | None: ...
    def corrections(self, low: int = 0, high: int = (1 << 64) - 1) -> Iterator[Correction]: ...
