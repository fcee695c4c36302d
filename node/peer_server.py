"""The peer port: gRPC (grpc.aio) servicers for Data, Membership and Admin.

The Data and Repair services are adapters: what a request does is node/peer_handler.py's
PeerHandler (the same code the simulator runs); here are the envelope, the chunking and
the status codes.

Every call's envelope is checked first: traffic from another cluster, from a newer
protocol, or without an envelope is refused with a clear status and logged; the node
keeps serving everyone else. Blocking store work runs in threads.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import grpc

from pacsnode.node import peer_wire, write_trace
from pacsnode.proto import (
    CHUNK_BYTES_MAX,
    FRAMES_ASKED_MAX,
    PROTOCOL_VERSION,
    STORE_STREAM_IN_FLIGHT_MAX,
    WHOLE_INSTANCE_BYTES_MAX,
)
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.replication.correction import Correction
from pacsnode.replication.delete_coordinator import DeleteScope, DeleteStatus
from pacsnode.replication.modify_coordinator import ModifyStatus
from pacsnode.replication.digest import SEGMENT_COUNT, Digest
from pacsnode.replication.matching import Query, QueryError
from pacsnode.ring import swim
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.placement import TokenRange, replica_total
from pacsnode.replication.model import StoredInstance, StoreOutcome
from pacsnode.replication.transport import PeerRefused, RefusalReason, cancelled_by_caller
from pacsnode.node.codec import crc32_of
from pacsnode.node.peer_frames import FramesAnswer, FramesOutcome, open_frames
from pacsnode.node.peer_handler import RangesPending
from pacsnode.node.swim_membership import MembershipUnavailable

if TYPE_CHECKING:
    from pacsnode.node.server import Node

log = logging.getLogger(__name__)

# Bigger than one chunk plus its header; the default 4 MiB is kept for everything else.
MESSAGE_BYTES_MAX = 8 * 1024 * 1024
# Rows a peer Query reads from the store per thread hop.
QUERY_BATCH_ROWS = 200
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
]


# A refused store, on the wire.
REFUSAL_TO_WIRE = {
    RefusalReason.NOT_OWNER: pb.STORE_OUTCOME_REFUSED_NOT_OWNER,
    RefusalReason.INVALID: pb.STORE_OUTCOME_REFUSED_INVALID,
    RefusalReason.FULL: pb.STORE_OUTCOME_REFUSED_FULL,
    RefusalReason.ERROR: pb.STORE_OUTCOME_ERROR,
    RefusalReason.OTHER: pb.STORE_OUTCOME_ERROR,
}


MODIFY_OUTCOME_TO_WIRE = {
    ModifyStatus.MODIFIED: pb.MODIFY_OUTCOME_MODIFIED,
    ModifyStatus.NOT_FOUND: pb.MODIFY_OUTCOME_NOT_FOUND,
    ModifyStatus.INCOMPLETE: pb.MODIFY_OUTCOME_INCOMPLETE,
    ModifyStatus.QUORUM_FAILED: pb.MODIFY_OUTCOME_QUORUM_FAILED,
    ModifyStatus.INVALID: pb.MODIFY_OUTCOME_INVALID,
    ModifyStatus.NOT_JOINED: pb.MODIFY_OUTCOME_NOT_JOINED,
}
DELETE_OUTCOME_TO_WIRE = {
    DeleteStatus.DELETED: pb.DELETE_OUTCOME_DELETED,
    DeleteStatus.NOT_FOUND: pb.DELETE_OUTCOME_NOT_FOUND,
    DeleteStatus.INCOMPLETE: pb.DELETE_OUTCOME_INCOMPLETE,
    DeleteStatus.QUORUM_FAILED: pb.DELETE_OUTCOME_QUORUM_FAILED,
    DeleteStatus.NOT_JOINED: pb.DELETE_OUTCOME_NOT_JOINED,
}


class EnvelopeRefused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerServer:
    """Owns the grpc.aio server of one node."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.refused = 0
        # Payload bytes sent to peers by FetchInstance (whole instances) and by FetchFrames
        # (frames only): /metrics pacsnode_peer_fetch_sent_bytes, pacsnode_peer_frames_sent_bytes.
        self.fetch_sent_bytes = 0
        self.frames_sent_bytes = 0
        self.frames_answers = 0
        # The read loops of open StoreStreams: stop() ends them, so each stream answers what
        # it has read and ends at once instead of holding the server's grace period.
        self.store_stream_readers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self.server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_DataServicer_to_server(DataService(self), self.server)
        pb_grpc.add_MembershipServicer_to_server(MembershipService(self), self.server)
        pb_grpc.add_AdminServicer_to_server(AdminService(self), self.server)
        pb_grpc.add_RepairServicer_to_server(RepairService(self), self.server)
        self.port = self.node.security.add_peer_port(self.server, f"{host}:{port}")  # mTLS with tls_dir
        if self.port == 0:
            raise OSError(f"cannot listen on peer port {host}:{port}")
        await self.server.start()
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        for reader in list(self.store_stream_readers):
            reader.cancel()
        if self.server is not None:
            await self.server.stop(grace_s)

    def envelope(self) -> pb.Envelope:
        return self.node.envelope()

    async def check(self, env: pb.Envelope | None, context: grpc.aio.ServicerContext, method: str) -> None:
        """Refuse (and log) a call whose envelope is missing or from another cluster or protocol."""
        problem = self.refusal(env, context, method)
        if problem is not None:
            await context.abort(problem[0], problem[1])
            return
        assert env is not None
        self.check_ring(env)

    def refusal(self, env: pb.Envelope | None, context: grpc.aio.ServicerContext,
                method: str) -> tuple[grpc.StatusCode, str] | None:
        """check()'s verdict without the abort: the status and reason a refused envelope
        gets (counted and logged here), or None when it passes."""
        problem: tuple[grpc.StatusCode, str] | None = None
        if env is None or env.protocol_version == 0:
            problem = (grpc.StatusCode.INVALID_ARGUMENT, "request has no envelope")
        elif env.cluster_id != self.node.config.cluster_id:
            problem = (grpc.StatusCode.FAILED_PRECONDITION,
                       f"cluster_id {env.cluster_id[:64]!r} is not this node's {self.node.config.cluster_id!r}")
        elif env.protocol_version > PROTOCOL_VERSION:
            problem = (grpc.StatusCode.FAILED_PRECONDITION,
                       f"protocol_version {env.protocol_version} is newer than this node's {PROTOCOL_VERSION}; "
                       "upgrade this node")
        if problem is None and env is not None:
            problem = self.node.security.guard.problem(env.sender_id, context, method)  # sender = certificate
        if problem is not None:
            self.refused += 1
            log.warning("peer.refused method=%s sender=%s peer=%s reason=%s", method,
                        (env.sender_id[:64] if env is not None else ""), context.peer(), problem[1])
        return problem

    def check_ring(self, env: pb.Envelope) -> None:
        """The ring-version part of the envelope rule, for an envelope that passed check()."""
        if env.ring_version and env.sender_id != self.node.config.node_id:
            # Another view of the ring: exchange membership with the sender (rate-limited).
            self.node.membership.ring_mismatch(env.sender_id, int(env.ring_version))


class DataService(pb_grpc.DataServicer):
    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self.node = server.node

    async def StoreInstance(self, request_iterator: AsyncIterator[pb.StoreChunk],
                            context: grpc.aio.ServicerContext) -> pb.StoreReply:
        """The streamed store (any size; the only one older nodes send)."""
        header: pb.StoreHeader | None = None
        env: pb.Envelope | None = None
        parts: list[bytes] = []
        received = 0
        complete = False
        async for chunk in request_iterator:
            if header is None:
                env = chunk.envelope if chunk.HasField("envelope") else None
                await self.server.check(env, context, "StoreInstance")
                if not chunk.HasField("header"):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first chunk has no header")
                header = chunk.header
                if self._over_size_limit(header):
                    return self._reply(pb.STORE_OUTCOME_REFUSED_FULL, "instance is over the size limit")
            received += len(chunk.data)
            if received > int(header.record.compressed_size_bytes):
                return self._reply(pb.STORE_OUTCOME_REFUSED_INVALID, "more data than the header announced")
            parts.append(chunk.data)
            if chunk.last:
                complete = True
                break
        if header is None or env is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty store stream")
            raise AssertionError("unreachable")
        if not complete or received != int(header.record.compressed_size_bytes):
            return self._reply(pb.STORE_OUTCOME_REFUSED_INVALID, "truncated transfer: nothing stored")
        return await self._store(env, header, b"".join(parts))

    async def StoreWholeInstance(self, request: pb.StoreWholeRequest,
                                 context: grpc.aio.ServicerContext) -> pb.StoreReply:
        """The one-message store of an instance of at most WHOLE_INSTANCE_BYTES_MAX."""
        write_trace.mark("peer.rx", request.header.record.sop_instance_uid)
        env = request.envelope if request.HasField("envelope") else None
        await self.server.check(env, context, "StoreWholeInstance")
        assert env is not None
        if not request.HasField("header"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request has no header")
        return await self._store_whole(env, request.header, request.data)

    async def StoreStream(self, request_iterator: AsyncIterator[pb.StoreStreamRequest],
                          context: grpc.aio.ServicerContext) -> None:
        """Many stores over one stream (node/store_stream.py sends them): every request's
        envelope is checked as a call's (a refused one ends the stream with that status);
        up to STORE_STREAM_IN_FLIGHT_MAX are stored side by side, each answered with its id
        as soon as it is durable or refused. Ends when the sender half-closes the stream
        and every reply is written, or when the server stops (what was read is answered)."""
        slots = asyncio.Semaphore(STORE_STREAM_IN_FLIGHT_MAX)
        write_lock = asyncio.Lock()
        answering: set[asyncio.Task[None]] = set()

        async def answer(request: pb.StoreStreamRequest, deadline: float) -> None:
            reply: pb.StoreReply | None
            try:
                reply = await self._stream_store(request, deadline)
            except Exception:  # Our bug: this copy fails as a call would (no promise); the stream goes on.
                log.exception("peer.store_stream.failed sop_instance_uid=%s",
                              request.header.record.sop_instance_uid[:64])
                reply = None
            finally:
                slots.release()
            message = pb.StoreStreamReply(request_id=request.request_id, reply=reply)
            async with write_lock:
                await context.write(message)

        refused: list[tuple[grpc.StatusCode, str]] = []

        async def read() -> None:
            checked: tuple[str, int, str] | None = None
            async for request in request_iterator:
                env = request.envelope if request.HasField("envelope") else None
                sender = (env.cluster_id, env.protocol_version, env.sender_id) if env is not None else None
                if sender is None or sender != checked:
                    # A refused envelope stops the reading; the stream is aborted with its
                    # status once the requests read before it are answered (an abort from
                    # here, while their replies were still to be written, left those writes
                    # waiting and the stream open to its deadline).
                    problem = self.server.refusal(env, context, "StoreStream")
                    if problem is not None:
                        refused.append(problem)
                        return
                    assert env is not None
                    self.server.check_ring(env)
                    checked = sender
                else:
                    assert env is not None
                    self.server.check_ring(env)  # Same sender, cluster and protocol: passed above.
                received = time.monotonic()
                await slots.acquire()
                task = asyncio.create_task(answer(request, received + request.timeout_ms / 1000
                                                  if request.timeout_ms else float("inf")))
                answering.add(task)
                task.add_done_callback(answering.discard)

        reader = asyncio.create_task(read())
        self.server.store_stream_readers.add(reader)
        try:
            try:
                await reader
            except asyncio.CancelledError:
                if cancelled_by_caller() or not reader.cancelled():
                    raise
                # PeerServer.stop(): answer what was read, then end the stream.
            except BaseException:
                # A broken stream: the requests read before it finish first, then the
                # stream ends with its error.
                while answering:
                    await asyncio.gather(*answering, return_exceptions=True)
                raise
            while answering:
                await asyncio.gather(*answering, return_exceptions=True)
            if refused:
                await context.abort(*refused[0])
        finally:
            self.server.store_stream_readers.discard(reader)
            reader.cancel()
            for task in list(answering):
                task.cancel()

    async def _stream_store(self, request: pb.StoreStreamRequest, deadline: float) -> pb.StoreReply:
        if not request.HasField("header"):
            return self._reply(pb.STORE_OUTCOME_REFUSED_INVALID, "request has no header")
        write_trace.mark("peer.rx", request.header.record.sop_instance_uid)
        if time.monotonic() > deadline:
            return self._reply(pb.STORE_OUTCOME_ERROR, "the sender's deadline passed before the write: nothing stored")
        return await self._store_whole(request.envelope, request.header, request.data)

    async def _store_whole(self, env: pb.Envelope, header: pb.StoreHeader, data: bytes) -> pb.StoreReply:
        """A whole payload (StoreWholeInstance, StoreStream): its sizes checked, then stored."""
        if self._over_size_limit(header):
            return self._reply(pb.STORE_OUTCOME_REFUSED_FULL, "instance is over the size limit")
        if len(data) > WHOLE_INSTANCE_BYTES_MAX:
            return self._reply(pb.STORE_OUTCOME_REFUSED_INVALID,
                               f"a whole-instance payload is at most {WHOLE_INSTANCE_BYTES_MAX} bytes")
        if len(data) != int(header.record.compressed_size_bytes):
            return self._reply(pb.STORE_OUTCOME_REFUSED_INVALID, "payload size differs from the header's")
        return await self._store(env, header, data)

    def _over_size_limit(self, header: pb.StoreHeader) -> bool:
        return int(header.record.compressed_size_bytes) > self.node.config.instance_size_bytes_max + (1 << 20)

    async def _store(self, env: pb.Envelope, header: pb.StoreHeader, blob: bytes) -> pb.StoreReply:
        """A received instance (its payload whole and of the announced size): checked, and
        durably written in one thread hop."""
        try:
            attributes = peer_wire.attributes_from_json(header.index_attributes_json)
            record = peer_wire.record_from_wire(header.record, attributes)
            if not record.sop_instance_uid or not record.study_instance_uid or not record.series_instance_uid:
                raise ValueError("missing UID")
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            return self._reply(pb.STORE_OUTCOME_REFUSED_INVALID, f"bad header: {error}")
        stored = StoredInstance(record=record, attributes=attributes, blob=blob,
                                metadata_json=peer_wire.metadata_from_wire(header))
        crc = int(header.payload_crc32) if header.HasField("payload_crc32") else None
        self.node.coordinator.hlc.observe(record.version)  # Later versions stamped here pass it.
        try:
            outcome = await self.node.peer_handler.store_instance(stored, hint_for=header.hint_for, sender_id=env.sender_id,
                                                                  sender_ring_version=int(env.ring_version), crc32=crc)
        except PeerRefused as refusal:
            return self._reply(REFUSAL_TO_WIRE[refusal.reason], str(refusal))
        write_trace.mark("peer.stored", record.sop_instance_uid)
        reply = self._reply(peer_wire.OUTCOME_TO_WIRE[outcome], "", durable=True)
        if outcome == StoreOutcome.DELETED:
            won = await self.node.peer_handler.tombstone_version(record.study_instance_uid, record.sop_instance_uid)
            if won is not None:
                reply.tombstone_version.CopyFrom(peer_wire.version_to_wire(won))
        return reply

    def _reply(self, outcome: pb.StoreOutcome, message: str, durable: bool = False) -> pb.StoreReply:
        return pb.StoreReply(envelope=self.server.envelope(), outcome=outcome, message=message[:200],
                             durable=durable)

    async def FetchInstance(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.FetchChunk]:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "FetchInstance")
        # An empty first chunk at once: the caller knows this replica is answering (and
        # gives a silent one up after replica_start_timeout_ms), however long the read takes.
        yield pb.FetchChunk(envelope=self.server.envelope())
        stored = await self.node.peer_handler.fetch(request.study_instance_uid, request.sop_instance_uid,
                                                    include_hints=request.include_hints)
        if stored is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "instance not held here")
            return
        if request.expected_content_hash and request.expected_content_hash != stored.content_hash:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "content changed; fetch from offset 0")
            return
        blob = stored.blob
        offset = int(request.offset)
        if offset > len(blob):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset past the end")
            return
        first = True
        while True:
            data = blob[offset : offset + CHUNK_BYTES_MAX]
            chunk = pb.FetchChunk(data=data, offset=offset, last=offset + len(data) >= len(blob))
            if first:
                chunk.record.CopyFrom(peer_wire.record_to_wire(stored.record, len(blob)))
                chunk.index_attributes_json = peer_wire.attributes_json(stored.attributes)
                first = False
            self.server.fetch_sent_bytes += len(data)
            yield chunk
            offset += len(data)
            if chunk.last:
                return

    async def FetchFrames(self, request: pb.FetchFramesRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.FramesChunk]:
        """Some frames of an instance held here (node/peer_frames.py), each message read
        and cut on a thread; a copy that fails a check after frames went out ends the
        stream with DATA_LOSS (no `last`: the caller never takes it for a complete answer)."""
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "FetchFrames")
        numbers = [int(number) for number in request.frame_numbers]
        study, sop = request.study_instance_uid, request.sop_instance_uid
        if not study or len(study) > 64 or not sop or len(sop) > 64 or not numbers or \
                len(numbers) > FRAMES_ASKED_MAX or min(numbers) < 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"FetchFrames needs a study and SOP Instance UID and 1 to {FRAMES_ASKED_MAX} "
                                "frame numbers of at least 1")
            return
        # The envelope at once: the caller knows this replica is answering (and gives a
        # silent one up after replica_start_timeout_ms), however long the read takes.
        yield pb.FramesChunk(envelope=self.server.envelope())
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, lambda: open_frames(self.node.store, study, sop, numbers,
                                                                 include_hints=request.include_hints))
        try:
            answer = await asyncio.shield(opening)
        except asyncio.CancelledError:  # The caller went while the copy was opened: close it once open.
            opening.add_done_callback(_close_answer)
            raise
        self.server.frames_answers += 1
        pending: asyncio.Future[list[pb.FramesChunk]] | None = None
        try:
            yield pb.FramesChunk(outcome=_FRAMES_OUTCOME_TO_WIRE[answer.outcome], message=answer.message[:200],
                                 transfer_syntax_uid=answer.transfer_syntax_uid, content_hash=answer.content_hash)
            if answer.outcome is not FramesOutcome.SENDING:
                return
            messages = FrameMessages(answer)
            while True:
                pending = loop.run_in_executor(None, messages.batch)
                try:
                    batch = await pending
                except Exception as error:  # CorruptBlob, FrameLayoutError: the copy broke mid-stream.
                    pending = None
                    log.error("peer.frames.unreadable sop_instance_uid=%s sent_bytes=%d error=%s", sop,
                              messages.sent_bytes, type(error).__name__)
                    await context.abort(grpc.StatusCode.DATA_LOSS, "this copy failed a check while its frames "
                                                                   "were read; ask another replica")
                    return
                pending = None
                if not batch:
                    return
                for message in batch:
                    self.server.frames_sent_bytes += len(message.data)
                    yield message
        finally:
            if pending is not None and not pending.done():  # Cancelled while a batch was read: close after it.
                pending.add_done_callback(lambda _future: answer.close())
            else:
                answer.close()

    async def Query(self, request: pb.QueryRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.QueryRow]:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Query")
        try:
            query = Query.from_json(json.loads(request.query_json.decode("utf-8")))
        except (ValueError, KeyError, TypeError, QueryError, UnicodeDecodeError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad query: {error}")
            return
        ranges = peer_wire.ranges_from_wire(request.token_ranges) if request.token_ranges else None
        try:
            rows = self.node.peer_handler.query_rows(query, ranges, include_hints=request.include_hints)
        except RangesPending as pending:
            # This node is still filling some of these ranges: the caller asks another replica.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(pending))
            return
        # The envelope row at once: the caller knows this replica is answering (and gives a
        # silent one up after replica_start_timeout_ms), however long the query takes.
        yield pb.QueryRow(envelope=self.server.envelope())
        # Rows in batches, each read on a thread: a caller that cancels (or goes) costs at most
        # the batch being read, not a thread and a list of every match until the scan ends.
        # Asked as a hint holder, the copies it keeps for owners that are down follow.
        while True:
            batch = await asyncio.to_thread(lambda: list(itertools.islice(rows, QUERY_BATCH_ROWS)))
            if not batch:
                return
            for row in batch:  # A cancelled call raises CancelledError at the next yield.
                yield pb.QueryRow(attributes_json=peer_wire.attributes_json(row))

    async def Tombstone(self, request: pb.TombstoneRequest, context: grpc.aio.ServicerContext) -> pb.TombstoneReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Tombstone")
        try:
            tombstones, scope = peer_wire.tombstones_from_wire(request)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad tombstone request: {error}")
            raise AssertionError("unreachable") from None
        for tombstone in tombstones[:1]:
            self.node.coordinator.hlc.observe(tombstone.version)  # Later versions stamped here pass it.
        try:
            removed = await self.node.peer_handler.apply_tombstones(tombstones, scope=scope,
                                                                    hint_for=request.hint_for)
        except PeerRefused as refusal:
            return pb.TombstoneReply(envelope=self.server.envelope(), outcome=pb.TOMBSTONE_OUTCOME_ERROR,
                                     message=str(refusal)[:200])
        if tombstones:
            log.info("peer.tombstone.applied sender=%s tombstones=%d removed=%d hint_for=%s",
                     request.envelope.sender_id[:64], len(tombstones), removed, request.hint_for[:64])
        return pb.TombstoneReply(envelope=self.server.envelope(), outcome=pb.TOMBSTONE_OUTCOME_APPLIED,
                                 durable=True, instances_deleted_count=removed)

    async def Correct(self, request: pb.CorrectRequest, context: grpc.aio.ServicerContext) -> pb.CorrectReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Correct")
        try:
            correction = Correction.loads(request.correction_json)
        except (ValueError, KeyError, TypeError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad correction")
            raise AssertionError("unreachable") from None
        if correction.study_instance_uid != request.study_instance_uid or not correction.fields:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "correction names another study or nothing")
        self.node.coordinator.hlc.observe(correction.version)  # Later versions stamped here pass it.
        try:
            changed = await self.node.peer_handler.apply_correction(correction, hint_for=request.hint_for)
        except PeerRefused as refusal:
            return pb.CorrectReply(envelope=self.server.envelope(), outcome=pb.CORRECT_OUTCOME_ERROR,
                                   message=str(refusal)[:200])
        log.info("peer.correct.applied sender=%s attributes=%s changed=%s hint_for=%s", request.envelope.sender_id[:64],
                 ",".join(sorted(correction.fields)), changed, request.hint_for[:64])
        return pb.CorrectReply(envelope=self.server.envelope(), durable=True,
                               outcome=pb.CORRECT_OUTCOME_APPLIED if changed else pb.CORRECT_OUTCOME_DUPLICATE)

    async def ListStudy(self, request: pb.ListStudyRequest, context: grpc.aio.ServicerContext) -> pb.ListStudyReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "ListStudy")
        records = await self.node.peer_handler.list_study(request.study_instance_uid)
        reply = pb.ListStudyReply(envelope=self.server.envelope())
        for record in records:
            reply.records.append(peer_wire.record_to_wire(record, 0))
        return reply


_FRAMES_OUTCOME_TO_WIRE = {
    FramesOutcome.SENDING: pb.FRAMES_OUTCOME_SENDING,
    FramesOutcome.NOT_HELD: pb.FRAMES_OUTCOME_NOT_HELD,
    FramesOutcome.NO_FRAME: pb.FRAMES_OUTCOME_NO_FRAME,
    FramesOutcome.LIST_REFUSED: pb.FRAMES_OUTCOME_LIST_REFUSED,
    FramesOutcome.UNREADABLE: pb.FRAMES_OUTCOME_UNREADABLE,
}
def _close_answer(done: "asyncio.Future[FramesAnswer]") -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().close()


# Frame bytes one thread hop of a FetchFrames reads and cuts into messages.
FRAMES_BATCH_BYTES = 2 * CHUNK_BYTES_MAX


class FrameMessages:
    """A FetchFrames answer's frames as FramesChunk messages (each at most CHUNK_BYTES_MAX
    of data; a frame's first message names it, its last carries its size and CRC-32; the
    stream's last message has `last`). Blocking: `batch` reads the answer's events."""

    def __init__(self, answer: FramesAnswer) -> None:
        self._events = answer.events
        self._number = 0  # The frame being sent (0: none yet).
        self._starts = False  # The next message is the current frame's first.
        self._size = 0
        self._crc = 0
        self._parts: list[bytes] = []
        self._parts_bytes = 0
        self._done = False
        self.sent_bytes = 0

    def _message(self, *, frame_end: bool) -> pb.FramesChunk:
        message = pb.FramesChunk(data=b"".join(self._parts))
        self._parts, self._parts_bytes = [], 0
        if self._starts:
            message.frame_number = self._number
            self._starts = False
        if frame_end:
            message.frame_end = True
            message.frame_size_bytes = self._size
            message.frame_crc32 = self._crc
        self.sent_bytes += len(message.data)
        return message

    def batch(self, bytes_max: int = FRAMES_BATCH_BYTES) -> list[pb.FramesChunk]:
        """The next messages (about `bytes_max` of data); [] after the last."""
        out: list[pb.FramesChunk] = []
        read = 0
        while read < bytes_max and not self._done:
            event = next(self._events, None)
            if event is None:
                self._done = True
                last = self._message(frame_end=True) if self._number else pb.FramesChunk()
                last.last = True
                out.append(last)
            elif isinstance(event, int):
                if self._number:
                    out.append(self._message(frame_end=True))
                self._number, self._starts, self._size, self._crc = event, True, 0, 0
            else:
                if self._parts_bytes + len(event) > CHUNK_BYTES_MAX:
                    out.append(self._message(frame_end=False))
                self._size += len(event)
                self._crc = crc32_of(event, self._crc)
                self._parts.append(event)
                self._parts_bytes += len(event)
                read += len(event)
        return out


class RepairService(pb_grpc.RepairServicer):
    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self.node = server.node

    async def RangeDigest(self, request: pb.RangeDigestRequest, context: grpc.aio.ServicerContext
                          ) -> pb.RangeDigestReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "RangeDigest")
        token_range = _range(request.range)
        digests = await self.node.peer_handler.range_digest(token_range)
        reply = pb.RangeDigestReply(envelope=self.server.envelope(), range=request.range, bucket_count=SEGMENT_COUNT)
        total = Digest()
        for segment, digest in sorted(digests.items()):
            total = total.combine(digest)
            reply.buckets.append(pb.BucketDigest(bucket=segment, digest=pb.Digest(
                xor_high=digest.high, xor_low=digest.low, entry_count=max(digest.count, 0))))
        reply.total.CopyFrom(pb.Digest(xor_high=total.high, xor_low=total.low, entry_count=max(total.count, 0)))
        return reply

    async def ListBucket(self, request: pb.ListBucketRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListBucketReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "ListBucket")
        token_range = _range(request.range)
        reply = pb.ListBucketReply(envelope=self.server.envelope())
        for study_uid, sop_uid, content_hash in await self.node.peer_handler.list_bucket(token_range,
                                                                                         int(request.bucket)):
            reply.entries.append(peer_wire.bucket_entry_to_wire(study_uid, sop_uid, content_hash))
        return reply


def _range(message: pb.TokenRange) -> TokenRange:
    return TokenRange(int(message.start), int(message.end))


class MembershipService(pb_grpc.MembershipServicer):
    """SWIM's RPCs: each request goes to the node's SwimMembership, and the reply is the one
    its state machine produced (node/swim_membership.py)."""

    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self.node = server.node

    def _updates(self, messages: Any, source: str) -> tuple[swim.MemberUpdate, ...]:
        updates, problems = peer_wire.updates_from_wire(messages)
        self.node.membership.ignored(problems, source)
        return updates

    async def Ping(self, request: pb.PingRequest, context: grpc.aio.ServicerContext) -> pb.Ack:
        """A probe (answered with our Ack), or a gossip round (sequence_number 0: an empty Ack)."""
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Ping")
        if request.target_id and request.target_id != self.node.config.node_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this is {self.node.config.node_id}, not {request.target_id[:64]}")
        source = request.envelope.sender_id
        membership = self.node.membership
        updates = self._updates(request.updates, source)
        if request.sequence_number == 0:
            await membership.answer(source, swim.Gossip(updates))
            return pb.Ack(envelope=self.server.envelope())
        try:
            reply = await membership.answer(source, swim.Ping(int(request.sequence_number), self.node.config.node_id,
                                                              updates))
        except MembershipUnavailable as silent:  # Unhealthy, or we have left or were removed.
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(silent))
            raise AssertionError("unreachable") from None
        assert isinstance(reply, swim.Ack)
        return peer_wire.ack_to_wire(reply, self.server.envelope())

    async def IndirectPing(self, request: pb.IndirectPingRequest, context: grpc.aio.ServicerContext) -> pb.Ack:
        """Probe the target for the caller; the call stays open until it acks or the relay times out."""
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "IndirectPing")
        if not request.target_id or not request.target_address.host or not 0 < request.target_address.port < 65536:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "indirect ping without a target")
        source = request.envelope.sender_id
        sequence_number = int(request.sequence_number)
        probe_timeout_ms = max(1, min(int(request.probe_timeout_ms), 60_000))
        target = MemberInfo(node_id=request.target_id, peer_host=request.target_address.host,
                            peer_port=int(request.target_address.port))
        message = swim.IndirectPing(sequence_number, target, probe_timeout_ms, self._updates(request.updates, source))
        reply = await self.node.membership.answer(source, message, deadline_s=context.time_remaining())
        assert isinstance(reply, (swim.Ack, swim.Nack))
        return peer_wire.ack_to_wire(reply, self.server.envelope())

    async def PushPull(self, request: pb.PushPullRequest, context: grpc.aio.ServicerContext) -> pb.PushPullReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "PushPull")
        source = request.envelope.sender_id
        reply = await self.node.membership.answer(source, swim.PushPullRequest(self._updates(request.members, source)))
        members = reply.members if isinstance(reply, swim.PushPullReply) else ()
        return pb.PushPullReply(envelope=self.server.envelope(), members=[peer_wire.update_to_wire(u) for u in members])

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Join")
        source = request.envelope.sender_id
        try:
            member = peer_wire.update_from_wire(request.member)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad join: {error}")
            raise AssertionError("unreachable")
        if member.state is not swim.State.ALIVE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a joining member must be alive, not {member.state}")
        await self.node.security.refuse(context, self.node.security.guard.join_problem(member.node_id, source))
        config = self.node.config
        settings = replication_settings(config)
        mismatch = peer_wire.placement_mismatch(settings, request.settings) if request.HasField("settings") else None
        if mismatch is not None:
            # Checked before membership sees the joiner: it never enters the ring, so no
            # node computes owners with it under the other placement.
            log.warning("membership.join.refused node=%s reason=%s", member.node_id[:64], mismatch)
            self.node.security.admin_action("join", context, member.node_id, False, mismatch)
            return pb.JoinReply(envelope=self.server.envelope(), accepted=False, reason=mismatch, settings=settings)
        reply = self.node.membership.receive(source, swim.JoinRequest(member))
        if not isinstance(reply, swim.JoinReply):
            return pb.JoinReply(envelope=self.server.envelope(), accepted=False,
                                reason=f"{config.node_id} is not a member now", settings=settings)
        if not reply.accepted:
            log.warning("membership.join.refused node=%s reason=%s", member.node_id, reply.reason)
        self.node.security.admin_action("join", context, member.node_id, reply.accepted, reply.reason)
        return pb.JoinReply(envelope=self.server.envelope(), accepted=reply.accepted, reason=reply.reason,
                            members=[peer_wire.update_to_wire(u) for u in reply.members], settings=settings)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        """Three kinds of request:
        - a member announcing that it has left (member = the sender, LEFT): gossip it;
        - the operator asking this node to leave (`pacsnode leave`: member = us or empty);
        - the operator removing a stopped member (`pacsnode remove`: state REMOVED)."""
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Leave")
        target = request.member.node_id
        me = self.node.config.node_id
        membership = self.node.membership
        source = request.envelope.sender_id
        await self.node.security.refuse(context, self.node.security.guard.leave_problem(
            context, target=target, removing=request.member.state == pb.MEMBER_STATE_REMOVED, me=me))
        if request.member.state == pb.MEMBER_STATE_REMOVED:
            if target == me:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "a node cannot remove itself; use `pacsnode leave` to hand its ranges over")
            if membership.member(target) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no member {target[:64]!r}")
            if membership.is_alive(target):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{target} is {membership.member(target).state}: stop it first, "  # type: ignore[union-attr]
                                    "or use `pacsnode leave` on it")
            accepted = membership.remove(target, reason="operator")
            self.node.security.admin_action("remove", context, target, accepted)
            return pb.LeaveReply(envelope=self.server.envelope(), accepted=accepted)
        if target and target != me and target == source:
            try:
                update = peer_wire.update_from_wire(request.member)
            except ValueError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad leave: {error}")
                raise AssertionError("unreachable")
            if update.state is not swim.State.LEFT:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a leave announces LEFT, not {update.state}")
            reply = membership.receive(source, swim.LeaveRequest(update))
            accepted = isinstance(reply, swim.LeaveReply) and reply.accepted
            self.node.security.admin_action("left", context, target, accepted)
            return pb.LeaveReply(envelope=self.server.envelope(), accepted=accepted)
        if target not in ("", me):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this is {me}; ask {target[:64]} itself to leave")
        state = membership.self_state()
        if state is not swim.State.ALIVE and state is not swim.State.LEAVING:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{me} is {state.value}")
        if state is swim.State.ALIVE and membership.ring().node_ids == (me,):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{me} is the only member of the ring: there is nobody to hand its data to")
        membership.leave()
        self.node.security.admin_action("leave", context, me, True)
        return pb.LeaveReply(envelope=self.server.envelope(), accepted=True)


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self.node = server.node

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Status")
        node = self.node
        membership = node.membership
        ring = membership.ring()
        n = ring.effective(node.config.replication)
        ownership = ring.ownership(n) if len(ring) else {}
        reply = pb.StatusReply(envelope=self.server.envelope(), started_at_ms=node.started_at_ms,
                               software_version=node.software_version)
        for record in membership.records():
            reply.members.append(pb.MemberStatus(member=peer_wire.update_to_wire(record),
                                                 ring_ownership_fraction=ownership.get(record.node_id, 0.0)))
        stats = node.store.statistics()
        # On the admin threads, with a bound: a node whose store path is stuck still answers
        # Status (and says it is unhealthy) instead of waiting for the stuck executor.
        disk_free = await _admin_call(node, lambda: shutil.disk_usage(node.store.path).free)
        under_replicated = await _admin_call(node, node.under_replicated_studies)
        hint_summary = await _admin_call(node, node.store.hint_summary) if stats.hints else {}
        health = node.health.current
        io = node.loop.executor.statistics()
        reply.local.CopyFrom(pb.LocalStats(
            instance_count=stats.instances, received_bytes=stats.bytes_received, stored_bytes=stats.bytes_stored,
            study_count=stats.studies, hint_count=stats.hints, hint_bytes=stats.hint_bytes,
            disk_free_bytes=disk_free or 0,
            under_replicated_study_count=under_replicated or 0,
            health=pb.LocalHealth(unhealthy=not health.healthy, reason=health.reason.value, detail=health.detail,
                                  oldest_write_age_ms=health.oldest_write_age_ms, probe_wait_ms=health.probe_wait_ms,
                                  unhealthy_for_ms=health.unhealthy_for_ms, io_threads=io.threads,
                                  io_running=io.running, io_queued=io.queued,
                                  store_stall_ms=node.config.store_stall_ms),
        ))
        for owner, (count, size, oldest_ms) in sorted((hint_summary or {}).items()):
            reply.local.hints_by_owner.append(pb.HintSummary(owner_id=owner, hint_count=count, hint_bytes=size,
                                                             oldest_stored_at_ms=oldest_ms))
        for transfer in list(node.repairer.transfers.values()):
            reply.local.transfers.append(pb.RangeTransfer(
                range=pb.TokenRange(start=transfer.token_range.start, end=transfer.token_range.end),
                source_id=transfer.source, done_bytes=transfer.done_bytes, total_bytes=max(transfer.total_bytes,
                                                                                          transfer.done_bytes)))
        reply.settings.CopyFrom(replication_settings(node.config, effective_n=ring.effective_replicas(n) if len(ring) else 0))
        return reply


    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteReply:
        """`pacsnode delete`: this node coordinates the delete (replication/delete_coordinator.py)."""
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Delete")
        await self.node.security.refuse(context, self.node.security.guard.delete_problem(context))
        uids = (request.study_instance_uid, request.series_instance_uid, request.sop_instance_uid)
        if not any(uids) or any(len(uid) > 64 for uid in uids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name a study, a series or an instance "
                                "(UIDs of at most 64 characters)")
        scope = DeleteScope(*uids)
        result = await asyncio.get_running_loop().run_in_executor(None, self.node.archive.delete, scope)
        self.node.security.delete_action(context, scope, result)
        return pb.DeleteReply(envelope=self.server.envelope(), outcome=DELETE_OUTCOME_TO_WIRE[result.status],
                              instances_deleted_count=result.instances, message=result.message[:200])

    async def Modify(self, request: pb.ModifyRequest, context: grpc.aio.ServicerContext) -> pb.ModifyReply:
        """`pacsnode modify` / `pacsnode merge-patient`: this node coordinates the correction
        (replication/modify_coordinator.py)."""
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Modify")
        await self.node.security.refuse(context, self.node.security.guard.modify_problem(context))
        study, from_patient = request.study_instance_uid, request.from_patient_id
        if bool(study) == bool(from_patient) or len(study) > 64 or len(from_patient) > 64:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name one study (UID of at most 64 characters) "
                                "or one PatientID to merge")
        changes = dict(request.attributes)
        loop = asyncio.get_running_loop()
        if study:
            result = await loop.run_in_executor(None, self.node.archive.modify, study, changes)
        else:
            to_patient = changes.pop("PatientID", "")
            result = await loop.run_in_executor(None, self.node.archive.merge_patient, from_patient, to_patient,
                                                changes)
        self.node.security.modify_action(context, study, "study" if study else "patient", result)
        return pb.ModifyReply(envelope=self.server.envelope(), outcome=MODIFY_OUTCOME_TO_WIRE[result.status],
                              studies_count=result.studies, message=result.message[:200])

    async def RingView(self, request: pb.RingViewRequest, context: grpc.aio.ServicerContext) -> pb.RingViewReply:
        """The ring as this node sees it: every vnode, every range with its owners (and this
        node where it is still pulling a range it owns)."""
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "RingView")
        node = self.node
        ring = node.membership.ring()
        n = ring.effective(node.config.replication)
        reply = pb.RingViewReply(envelope=self.server.envelope())
        reply.settings.CopyFrom(replication_settings(node.config, effective_n=ring.effective_replicas(n) if len(ring) else 0))
        # The members with their token salts: a node joining for the first time chooses its
        # own salt against them (ring/token_choice.py, node/token_salt.py).
        reply.members.extend(peer_wire.update_to_wire(update) for update in node.membership.records() if update.in_ring)
        if not len(ring):
            return reply
        pending = node.repairer.pending()
        for vnode in ring.ranges(1):
            reply.tokens.append(pb.VnodeToken(token=vnode.token_range.end, node_id=vnode.owners[0]))
        for owned in ring.ranges(n):
            entry = pb.RangeOwners(range=pb.TokenRange(start=owned.token_range.start, end=owned.token_range.end))
            entry.owner_ids.extend(owned.owners)
            if owned.token_range.end in pending:
                entry.pending_owner_ids.append(node.config.node_id)
            reply.ranges.append(entry)
        return reply

    async def Metrics(self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext) -> pb.MetricsReply:
        await self.server.check(request.envelope if request.HasField("envelope") else None, context, "Metrics")
        reply = pb.MetricsReply(envelope=self.server.envelope())
        for name, value in self.node.metrics().items():
            if name.startswith(request.name_prefix):
                reply.values[name] = float(value)
        return reply


ADMIN_CALL_TIMEOUT_S = 2.0


async def _admin_call(node: "Node", function: Any) -> Any:
    """`function()` on the node's admin threads; None when it does not answer in time."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(node.admin_executor, function), ADMIN_CALL_TIMEOUT_S)
    except asyncio.TimeoutError:
        log.warning("peer.status.slow_figure timeout_s=%.0f", ADMIN_CALL_TIMEOUT_S)
        return None


def replication_settings(config: Any, *, effective_n: int = 0) -> pb.ReplicationSettings:
    """The node's replication settings as Join, Status and RingView report them (reads: R=1)."""
    return pb.ReplicationSettings(replication_factor=replica_total(config.replication), write_quorum=config.write_quorum,
                                  read_quorum=config.read_quorum, vnodes=config.vnodes, effective_replication_factor=effective_n,
                                  site_replicas=str(config.replication) if config.site_replicas else "")


def describe_rpc_error(error: Any) -> str:
    try:
        return f"{error.code().name}: {error.details()}"
    except Exception:  # Not an RpcError.
        return str(error)
