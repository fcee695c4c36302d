"""The seams of the replication layer: how it reaches peers, the local replica and time.

The node supplies gRPC and RocksDB behind these; the simulator supplies a simulated
network and an in-memory store. Nothing in replication/ imports grpc or rocksdict.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Protocol, Sequence, runtime_checkable

from pacsnode.replication.hlc import Version
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes, StoredInstance, Tombstone
from pacsnode.ring.placement import TokenRange


def cancelled_by_caller() -> bool:
    """True while the current task is being cancelled (Task.cancel() was called on it).

    A CancelledError can also escape from a library call that cancelled something of its
    own (seen with grpc.aio under a partition): a background loop must not mistake that
    for its own shutdown and end silently."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class PeerError(Exception):
    """A peer did not answer in time, refused, or broke off. An operating error."""


class RefusalReason(enum.Enum):
    """Why a peer that answered would not do what was asked."""

    FULL = "full"  # Disk full, over the size limit, back-pressure: 0xA700 to the client.
    INVALID = "invalid"  # The request is wrong; the same bytes will not do better.
    ERROR = "error"  # Failed for another reason (I/O error, shutting down); a retry may work.
    NOT_OWNER = "not-owner"  # The receiver does not own the study under its (newer) ring: re-plan.
    OTHER = "other"


class PeerRefused(PeerError):
    """The peer answered but would not do it; `reason` says why (never read the text)."""

    def __init__(self, message: str, reason: RefusalReason = RefusalReason.OTHER) -> None:
        super().__init__(message)
        self.reason = reason


class FramesUnsupported(Exception):
    """The peer predates Data.FetchFrames (it answered UNIMPLEMENTED): read the instance
    whole. Not a PeerError: the peer answered, and is not to be taken for a slow one."""


class FramesNotHeld(Exception):
    """The peer does not hold the instance (or its copy failed a check before any frame):
    ask another replica. Not a PeerError, as FetchInstance's NOT_FOUND is none."""


class FrameNotFound(Exception):
    """A replica that holds the instance says it has no pixel data or not a frame asked:
    the final answer (WADO-RS 404), not a reason to ask another replica."""


class FramesUnavailable(Exception):
    """No owner could answer a frames read with FetchFrames: read the instance whole."""


class FrameListRefused(Exception):
    """A replica refuses the frame list: it goes back over the instance too often (400)."""


@dataclass(frozen=True, slots=True)
class StoreReply:
    """A store's answer once durable on its target: a StoreOutcome value and, with DELETED,
    the version of the newer tombstone that won there (StoreReply.tombstone_version on the
    wire): a write acknowledged before that tombstone was stamped was deleted after it."""

    outcome: str
    tombstone_version: Version | None = None


class Transport(Protocol):
    """Calls to other nodes, addressed by node id. Every call has a deadline."""

    async def store(self, target: str, stored: StoredInstance, *, hint_for: str, timeout_ms: int) -> StoreReply:
        """Store on `target`; returns its answer once the copy (or the tombstone) is durable there."""
        ...

    async def fetch(self, target: str, study_instance_uid: str, sop_instance_uid: str, *,
                    timeout_ms: int, include_hints: bool = False,
                    started: Callable[[], None] | None = None) -> StoredInstance | None:
        """The instance as `target` holds it, or None when it does not hold it.
        `started` is called as soon as `target` is known to be answering."""
        ...

    def query(self, target: str, query: Query, ranges: Sequence[TokenRange] | None, *,
              timeout_ms: int, started: Callable[[], None] | None = None,
              include_hints: bool = False) -> AsyncIterator[Attributes]:
        """Matching rows from `target`'s replica, restricted to `ranges` (None: all);
        with `include_hints`, also from the hints `target` holds in those ranges.
        `started` is called as soon as `target` is known to be answering."""
        ...


@runtime_checkable
class FrameTransport(Protocol):
    """A Transport that can also ask a peer for some frames of an instance (Data.FetchFrames)."""

    def fetch_frames(self, target: str, study_instance_uid: str, sop_instance_uid: str, numbers: Sequence[int],
                     *, timeout_ms: int, started: Callable[[], None] | None = None) -> AsyncIterator[int | bytes]:
        """The frames `numbers` of the instance as `target` holds it: each frame's number as
        it starts, then its bytes as stored, in the order asked; the last bytes of each
        frame only once its size and CRC-32 match what `target` announced. Raises, before
        the first frame, FramesUnsupported, FramesNotHeld, FrameNotFound or FrameListRefused;
        PeerError at any point when the call or the answer breaks (a broken answer is never
        a complete one). `started` as in `fetch`."""
        ...


class LocalReplica(Protocol):
    """This node's own store, as the coordinator uses it (blocking calls: run in a thread)."""

    def put_stored(self, stored: StoredInstance, *, hint_for: str = "") -> str: ...
    def read_stored(self, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None: ...
    def read_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> StoredInstance | None: ...
    def query_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]: ...
    def query_hint_rows(self, query: Query, ranges: Sequence[TokenRange] | None) -> Iterator[Attributes]: ...
    def hint_owners(self) -> dict[str, tuple[int, int]]: ...
    def hints(self, owner: str) -> Iterator[StoredInstance]: ...
    def delete_hint(self, owner: str, study_instance_uid: str, sop_instance_uid: str) -> None: ...
    def tombstone(self, study_instance_uid: str, sop_instance_uid: str) -> Tombstone | None: ...


class Clock(Protocol):
    def now_ms(self) -> int: ...
