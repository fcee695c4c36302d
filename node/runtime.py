"""The node's asyncio loop thread, and the blocking Archive API the DICOM front end calls.

pynetdicom runs each association on its own thread; the replication coordinator, the
gRPC server and the peer channels live on one asyncio loop. `ClusterArchive` bridges the
two: each call is submitted to the loop and the association thread waits for it.
Compression happens on the association thread (zstandard releases the GIL), so parallel
associations compress in parallel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import contextlib
import logging
import struct
import threading
import time
from typing import Any, Awaitable, Callable, Coroutine, Iterator, TypeVar
from dataclasses import dataclass

from pacsnode.node.blob_files import BlobPointer, Part10Stream
from pacsnode.node.bridge import BridgeClosed, RowBridge
from pacsnode.node.codec import ZSTD_LEVEL, to_stored
from pacsnode.node.executor import CountedExecutor
from pacsnode.node import write_trace
from pacsnode.replication.archive import (
    IncompleteAnswer,
    InstanceLocation,
    ReadError,
    RetrievePlan,
    WriteResult,
    WriteStatus,
)
from pacsnode.replication.commitment import CommitResult, CommitSettings, RecentStudies, Reference
from pacsnode.replication.coordinator import Coordinator
from pacsnode.replication.delete_coordinator import DeleteCoordinator, DeleteResult, DeleteScope, DeleteStatus
from pacsnode.replication.modify_coordinator import ModifyCoordinator, ModifyResult, ModifyStatus
from pacsnode.replication.correction import Correction
from pacsnode.node.correct import corrected
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes, Instance, InstanceRecord, StoreError, StoredInstance
from pacsnode.replication.transport import FramesUnavailable
from pacsnode.proto import FRAMES_ASKED_MAX

log = logging.getLogger(__name__)
T = TypeVar("T")

FIND_BUFFER_ROWS = 1_000
# A C-GET/C-MOVE's instances read on the association's thread at most (Coordinator.locate_here);
# more go through the loop. pynetdicom refuses a retrieve of more than 65 535 sub-operations.
LOCATE_HERE_INSTANCES_MAX = 65_535
RECENT_INSTANCES = 50_000  # SOP -> study of the instances last stored here (Storage Commitment).
IO_THREADS_MAX = 16


class RequestAbandoned(Exception):
    """The requestor cancelled (C-CANCEL) or went away (abort) while the node worked for it."""


class FindInterrupted(Exception):
    """The node stopped a C-FIND before its coordinator finished (shutdown): not a complete answer."""


class LoopThread:
    """An asyncio loop running in a daemon thread."""

    def __init__(self, name: str = "pacsnode-loop", *, io_thread_prefix: str = "pacsnode-io",
                 io_threads_max: int = IO_THREADS_MAX) -> None:
        self.loop = asyncio.new_event_loop()
        # The executor behind asyncio.to_thread: every local store read and write of the loop.
        self.executor = CountedExecutor(io_threads_max, thread_name_prefix=io_thread_prefix)
        self.loop.set_default_executor(self.executor)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None = None,
            is_cancelled: Callable[[], bool] | None = None) -> T:
        """Run `coroutine` on the loop and wait for it. With `is_cancelled` (the requestor's
        C-CANCEL or abort), look at it every 0.2 s and, once true, cancel the coroutine at
        once and raise RequestAbandoned instead of waiting for an answer nobody will read."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
                if is_cancelled is not None:
                    wait_s = 0.2 if wait_s is None else min(wait_s, 0.2)
                try:
                    return future.result(wait_s)
                except concurrent.futures.TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    if is_cancelled is not None and is_cancelled():
                        future.cancel()
                        raise RequestAbandoned("the requestor cancelled or went away") from None
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("the node did not finish the request in time") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


# Which result a delete over several studies reports: the worst.
_DELETE_SEVERITY = {DeleteStatus.DELETED: 0, DeleteStatus.NOT_FOUND: 1, DeleteStatus.INCOMPLETE: 2,
                    DeleteStatus.NOT_JOINED: 3, DeleteStatus.QUORUM_FAILED: 4}


class ClusterArchive:
    """The front end's Archive API (store, find, locate, read), served by the coordinator."""

    def __init__(self, loop: LoopThread, coordinator: Coordinator, *, store_timeout_ms: int,
                 zstd_level: int = ZSTD_LEVEL, alone: Callable[[], bool] = lambda: False,
                 local_store: Callable[[Any], WriteResult] | None = None,
                 find_buffer_rows: int = FIND_BUFFER_ROWS, deletes: DeleteCoordinator | None = None,
                 own_copy: Callable[[InstanceLocation], tuple[bytes, int] | None] | None = None,
                 own_stream: Callable[[InstanceLocation], tuple[bytes | Part10Stream, int] | None] | None = None,
                 own_compressed: Callable[[InstanceLocation], CompressedCopy | None] | None = None,
                 modifies: ModifyCoordinator | None = None,
                 metadata_of: Callable[[InstanceRecord, bytes], bytes | None] | None = None) -> None:
        self._loop = loop
        self._metadata_of = metadata_of
        self._deletes = deletes
        self._modifies = modifies
        self._own_copy = own_copy
        self._own_stream = own_stream
        self._own_compressed = own_compressed
        self._find_buffer_rows = find_buffer_rows
        self._coordinator = coordinator
        self._alone = alone
        self._local_store = local_store
        self._store_timeout_s = store_timeout_ms / 1000
        self._zstd_level = zstd_level
        self.recent = RecentStudies(RECENT_INSTANCES)

    def store(self, instance: Instance) -> WriteResult:
        result = self._store(instance)
        if result.status == WriteStatus.SUCCESS:
            self.recent.add(instance.sop_instance_uid, instance.study_instance_uid)
        return result

    def commit(self, references: list[Reference],
               settings: CommitSettings) -> "concurrent.futures.Future[CommitResult]":
        """Start a Storage Commitment check on the loop; the future ends with its result
        (cancel it to stop the check and its peer calls)."""
        known = self.recent.lookup([r.sop_instance_uid for r in references])
        return asyncio.run_coroutine_threadsafe(self._coordinator.commitment(references, settings, known),
                                                self._loop.loop)

    def _store(self, instance: Instance) -> WriteResult:
        stored = to_stored(instance, level=self._zstd_level, version=self._coordinator.hlc.now())
        if self._local_store is not None and self._alone():
            # A ring of one: the only owner is this node; write from this thread and
            # skip the hand-off to the loop (same outcome, two thread switches fewer).
            return self._local_store(stored)
        if self._metadata_of is not None:
            # Built once here for every copy (peers get it in the StoreHeader), not by each owner;
            # also from a DIMSE worker's blob file (mapped): every owner would build it otherwise.
            stored = dataclasses.replace(stored, metadata_json=self._metadata_of(stored.record, stored.blob))
        write_trace.mark("hop", stored.sop_instance_uid)
        try:
            return self._loop.run(self._traced_store(stored) if write_trace.enabled() else self._coordinator.store(stored),
                                  self._store_timeout_s + 5)
        except TimeoutError as error:
            log.error("archive.store.timeout sop_instance_uid=%s", instance.sop_instance_uid)
            return WriteResult(WriteStatus.QUORUM_FAILED, message=str(error))
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            # Never a false Success, and never an exception inside the DICOM handler.
            log.error("archive.store.interrupted sop_instance_uid=%s", instance.sop_instance_uid)
            return WriteResult(WriteStatus.QUORUM_FAILED, message="the write was interrupted; retry")

    async def _traced_store(self, stored: StoredInstance) -> WriteResult:
        write_trace.mark("plan", stored.sop_instance_uid)
        result = await self._coordinator.store(stored)
        write_trace.mark("quorum", stored.sop_instance_uid)
        return result

    def delete(self, scope: DeleteScope) -> DeleteResult:
        """Delete a study, series or instance through this node (replication/delete_coordinator.py);
        a series or instance named without its study is looked up first. From any thread
        but the node's loop. Logged without UIDs (they identify patients' studies)."""
        if self._deletes is None:
            return DeleteResult(DeleteStatus.QUORUM_FAILED, message="deletes are not wired on this node")
        deletes = self._deletes

        async def run() -> DeleteResult:
            try:
                scopes = await deletes.resolve(scope)
            except IncompleteAnswer:
                return DeleteResult(DeleteStatus.INCOMPLETE, message="part of the archive could not be asked "
                                    "where this series or instance is; nothing deleted")
            if not scopes:
                return DeleteResult(DeleteStatus.NOT_FOUND, message="nothing in this scope")
            results = [await deletes.delete(one) for one in scopes]
            worst = max(results, key=lambda r: _DELETE_SEVERITY[r.status])
            return DeleteResult(worst.status, sum(r.instances for r in results), min(r.acked for r in results),
                                worst.message)

        try:
            result = self._loop.run(run(), 600)
        except TimeoutError as error:
            result = DeleteResult(DeleteStatus.QUORUM_FAILED, message=str(error))
        log.info("archive.delete level=%s status=%s instances=%d acked=%d", scope.level, result.status.value,
                 result.instances, result.acked)
        return result

    def modify(self, study_instance_uid: str, changes: dict[str, str]) -> ModifyResult:
        """Correct one study's patient/study attributes through this node
        (replication/modify_coordinator.py). From any thread but the node's loop. Logged
        with attribute names only (the values are patient data)."""
        if self._modifies is None:
            return ModifyResult(ModifyStatus.QUORUM_FAILED, message="modify is not wired on this node")
        modifies = self._modifies
        try:
            result = self._loop.run(modifies.modify(study_instance_uid, changes), 600)
        except TimeoutError as error:
            result = ModifyResult(ModifyStatus.QUORUM_FAILED, message=str(error))
        log.info("archive.modify attributes=%s status=%s acked=%d", ",".join(result.attributes),
                 result.status.value, result.acked)
        return result

    def merge_patient(self, from_patient_id: str, to_patient_id: str, changes: dict[str, str]) -> ModifyResult:
        """Every study of one PatientID under another (replication/modify_coordinator.py)."""
        if self._modifies is None:
            return ModifyResult(ModifyStatus.QUORUM_FAILED, message="modify is not wired on this node")
        modifies = self._modifies
        try:
            result = self._loop.run(modifies.merge_patient(from_patient_id, to_patient_id, changes), 600)
        except TimeoutError as error:
            result = ModifyResult(ModifyStatus.QUORUM_FAILED, message=str(error))
        log.info("archive.merge_patient attributes=%s status=%s studies=%d", ",".join(result.attributes),
                 result.status.value, result.studies)
        return result

    def find(self, query: Query, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Attributes]:
        """The coordinator's rows, on this (association) thread. Bounded by find_buffer_rows;
        when this generator is closed (C-CANCEL, abort, a result cap) the producer, the
        coordinator's scatter and its buffered rows go at once (node/bridge.py). An error the
        coordinator raises after its rows is raised here after them.

        An exact-key query on a ring of one, which this node's own store answers whole
        (Coordinator.find_here), is read here, on this thread,
        without the hand-offs to the loop and its I/O threads and back (issue 10: about
        half of a one-row C-FIND's node CPU). The caller checks C-CANCEL between rows."""
        here = self._coordinator.find_here(query, self._find_buffer_rows)
        if here is not None:
            yield from here
            return
        bridge: RowBridge[Attributes] = RowBridge(self._loop.loop, self._find_buffer_rows)

        async def produce() -> None:
            error: BaseException | None = FindInterrupted("the node stopped the query")
            try:
                async with contextlib.aclosing(self._coordinator.find(query)) as rows:
                    async for row in rows:
                        await bridge.put(row)
                error = None
            except BridgeClosed:
                error = None
            except asyncio.CancelledError:
                raise
            except Exception as raised:  # Delivered to the association thread, after the rows.
                error = raised
            finally:
                bridge.finish(error)

        future = asyncio.run_coroutine_threadsafe(produce(), self._loop.loop)
        try:
            while not is_cancelled():
                batch = bridge.take(0.2)
                if batch is None:
                    return
                if not batch and future.done():  # Cancelled before it ran (the loop stopped).
                    bridge.finish(FindInterrupted("the node stopped the query"))
                for row in batch:
                    yield row
        finally:
            bridge.close()
            future.cancel()

    def locate(self, query: Query, is_cancelled: Callable[[], bool] | None = None) -> RetrievePlan:
        """With `is_cancelled`, a requestor that cancels or aborts stops the fan-out at once
        (RequestAbandoned) instead of holding this thread until every peer answered.
        An exact key on a ring of one is located on this (association) thread, from this
        node's own store (Coordinator.locate_here), without the hand-offs to the loop and
        its I/O threads and back: 2-6 ms of a C-GET's time to its first instance (issue 10)."""
        here = self._coordinator.locate_here(query, LOCATE_HERE_INSTANCES_MAX)
        if here is not None:
            return here
        return self._loop.run(self._coordinator.locate(query), 600, is_cancelled)

    def read(self, location: InstanceLocation, is_cancelled: Callable[[], bool] | None = None) -> tuple[bytes, int]:
        """The instance as retrieval sends it: the stored bytes, with the study's correction
        applied to the header when it has one (node/correct.py; the stored bytes stay as received)."""
        part10, offset = self._read_stored(location, is_cancelled)
        if not location.correction:
            return part10, offset
        try:
            return corrected(part10, offset, location.transfer_syntax_uid, Correction.loads(location.correction))
        except (ValueError, KeyError, struct.error) as error:
            # Never send the uncorrected header as if it were corrected: the sub-operation fails.
            log.error("archive.read.correct_failed sop_instance_uid=%s error=%s", location.sop_instance_uid,
                      type(error).__name__)
            raise ReadError("the study's correction could not be applied to this instance") from None

    def open_streamed(self, location: InstanceLocation,
                      is_cancelled: Callable[[], bool] | None = None) -> tuple[bytes | Part10Stream, int]:
        """`read`, except that an own copy kept as a blob file (node/blob_files.py) comes as a
        Part10Stream, decompressed as it is sent (the caller closes it). A corrected study's
        instance, or one read from a peer, comes whole as from `read`."""
        if self._own_stream is not None and not location.correction and \
                self._coordinator.owns(location.study_instance_uid):
            found = self._own_stream(location)
            if found is not None:
                return found
            # Missing here, or corrupt (the store logged it): the coordinator's read asks the
            # owners, this one again (its check of the bytes logs nothing; a missing or
            # resized file is logged again) and the others. `own_copy` would read this copy
            # again and log it a second time.
            return self._coordinated_read(location, is_cancelled)
        return self.read(location, is_cancelled)

    def open_frames(self, location: InstanceLocation, numbers: list[int]) -> "RemoteFrames | None":
        """WADO-RS /frames of an instance of a study this node does not own, from an owner
        that cuts them from its copy (Coordinator.read_frames, Data.FetchFrames): only the
        frames' bytes cross between nodes. None: this node owns the study (its own copy is
        read), the list is over FRAMES_ASKED_MAX, or no owner answered FetchFrames (an older
        node, a copy missing or unreadable): the caller reads the instance whole (`read`).
        FrameNotFound (404) and FrameListRefused (400) are an owner's final answer. Blocking:
        call it on a reader thread; the first frame has begun when it returns."""
        if self._coordinator.owns(location.study_instance_uid) or len(numbers) > FRAMES_ASKED_MAX:
            return None
        frames = RemoteFrames(self._loop, self._coordinator.read_frames(location, numbers))
        try:
            frames.start()
        except FramesUnavailable:
            frames.close()
            return None
        except BaseException:
            frames.close()
            raise
        return frames

    def open_compressed(self, location: InstanceLocation) -> "CompressedCopy | None":
        """This node's own copy of an uncorrected instance as kept (zstd blob or blob file),
        for a DICOM worker that decompresses it itself (node/archive_channel.py); None when
        the study has a correction, is not owned here, or the copy is missing: then `read`."""
        if self._own_compressed is None or location.correction or \
                not self._coordinator.owns(location.study_instance_uid):
            return None
        return self._own_compressed(location)

    def _read_stored(self, location: InstanceLocation, is_cancelled: Callable[[], bool] | None) -> tuple[bytes, int]:
        if self._own_copy is not None and self._coordinator.owns(location.study_instance_uid):
            # The coordinator reads an owner's own copy first too: take it from this thread,
            # without two hand-offs to the loop and two to its I/O threads per instance.
            # Missing or corrupt here: the coordinator's read asks the other owners.
            found = self._own_copy(location)
            if found is not None:
                return found
        return self._coordinated_read(location, is_cancelled)

    def _coordinated_read(self, location: InstanceLocation,
                          is_cancelled: Callable[[], bool] | None) -> tuple[bytes, int]:
        try:
            return self._loop.run(self._coordinator.read(location), 600, is_cancelled)
        except TimeoutError as error:
            raise ReadError(str(error)) from None


class RemoteFrames:
    """Coordinator.read_frames (an async iterator on the node's loop) as a blocking
    iterator for the HTTP front end's reader threads: each piece (a frame's number as it
    starts, then its bytes) one step on the loop. `close` cancels the peer call."""

    STEP_TIMEOUT_S = 600.0  # Each step is also bounded by the peer call's own deadline.

    def __init__(self, loop: LoopThread, stream: Any) -> None:
        self._loop = loop
        self._stream = stream
        self._first: int | bytes | None = None
        self._done = False

    async def _step(self) -> int | bytes | None:
        try:
            piece: int | bytes = await self._stream.__anext__()
        except StopAsyncIteration:
            return None
        return piece

    def start(self) -> None:
        """Wait for the first piece (before the status line goes out)."""
        self._first = self._next()

    def _next(self) -> int | bytes | None:
        if self._done:
            return None
        try:
            piece = self._loop.run(self._step(), self.STEP_TIMEOUT_S)
        except BaseException:
            self._done = True
            raise
        if piece is None:
            self._done = True
        return piece

    def __iter__(self) -> "RemoteFrames":
        return self

    def __next__(self) -> int | bytes:
        first = self._first
        if first is not None:
            self._first = None
            return first
        piece = self._next()
        if piece is None:
            raise StopIteration
        return piece

    async def _close(self) -> None:
        await self._stream.aclose()

    def close(self) -> None:
        self._done = True
        try:
            self._loop.run(self._close(), 30)
        except Exception as error:  # The call is cancelled either way; nothing is sent after this.
            log.info("archive.frames.close_failed error=%s", type(error).__name__)


def own_stream_reader(store: Any) -> Callable[[InstanceLocation], tuple[bytes | Part10Stream, int] | None]:
    """ClusterArchive's `own_stream`: own_copy_reader, except that a copy kept as a blob
    file comes as a Part10Stream (the same two lookups for a small one: its record and
    its blob, decompressed and checksum-verified); None when missing or unreadable."""
    def open_stream(location: InstanceLocation) -> tuple[bytes | Part10Stream, int] | None:
        record = store.instance_record(location.study_instance_uid, location.sop_instance_uid)
        if record is None:
            return None
        try:
            opened = store.open_part10(location.study_instance_uid, location.sop_instance_uid,
                                       record.size_bytes + record.dataset_offset)
        except (KeyError, StoreError):  # Deleted meanwhile, or corrupt (logged by the store).
            return None
        return opened, record.dataset_offset
    return open_stream


@dataclass(frozen=True)
class CompressedCopy:
    """An own copy as the store keeps it: the zstd blob, or the pointer to its blob file."""

    kept: bytes | BlobPointer
    part10_bytes: int
    dataset_offset: int


def own_compressed_reader(store: Any) -> Callable[[InstanceLocation], CompressedCopy | None]:
    """ClusterArchive's `own_compressed`: an instance from this node's store as kept."""
    def read(location: InstanceLocation) -> CompressedCopy | None:
        found = store.compressed_copy(location.study_instance_uid, location.sop_instance_uid)
        if found is None:
            return None
        kept, record = found
        return CompressedCopy(kept, record.size_bytes + record.dataset_offset, record.dataset_offset)
    return read


def own_copy_reader(store: Any) -> Callable[[InstanceLocation], tuple[bytes, int] | None]:
    """ClusterArchive's `own_copy`: an instance from this node's store (node/store.py's
    RocksStore), checksum-verified, or None when it is not here or fails its checksum."""
    def read(location: InstanceLocation) -> tuple[bytes, int] | None:
        record = store.instance_record(location.study_instance_uid, location.sop_instance_uid)
        if record is None:
            return None
        try:
            return store.read_part10(location.study_instance_uid, location.sop_instance_uid), record.dataset_offset
        except (KeyError, StoreError):  # Deleted meanwhile, or corrupt (logged by the store).
            return None
    return read
