"""GrpcTransport: replication.transport.Transport over grpc.aio, addressed by node id."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Mapping, Sequence

import grpc

from pacsnode.node import peer_wire, write_trace
from pacsnode.node.codec import crc32_of, payload_crc32
from pacsnode.node.peer_server import GRPC_OPTIONS, describe_rpc_error
from pacsnode.node.store_stream import StoreStreams, StreamUnavailable
from pacsnode.node.tls import CHANNEL_OPTIONS
from pacsnode.proto import WHOLE_INSTANCE_BYTES_MAX
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.replication.digest import Digest
from pacsnode.replication.matching import Query
from pacsnode.replication.correction import Correction
from pacsnode.replication.delete_coordinator import DeleteScope
from pacsnode.replication.hlc import Version
from pacsnode.replication.model import Attributes, StoredInstance, Tombstone
from pacsnode.replication.transport import (
    FrameListRefused,
    FramesNotHeld,
    FramesUnsupported,
    FrameNotFound,
    PeerError,
    PeerRefused,
    RefusalReason,
    StoreReply,
    cancelled_by_caller,
)
from pacsnode.ring.placement import TokenRange

if TYPE_CHECKING:
    from pacsnode.ring.members import MemberInfo

log = logging.getLogger(__name__)

# A peer that answered StoreWholeInstance with UNIMPLEMENTED (a node from before it) is
# sent streams; it is asked again after this long (it may have been upgraded).
WHOLE_RECHECK_S = 300.0
# A peer that answered FetchFrames with UNIMPLEMENTED (a node from before it) is read
# with FetchInstance; it is asked again after this long (it may have been upgraded).
FRAMES_RECHECK_S = 300.0
# Payload CRCs remembered (by blob identity): a write's copies to every peer share one.
CRC_MEMO_ENTRIES = 16
# A whole-instance copy to a node in another site is sent gzip-compressed (gRPC message
# compression, which every gRPC server takes: no protocol change) when its payload is at
# most this big. The payload is zstd already; what shrinks is the ~1.2 KB header (the index
# attributes as JSON repeat the record's UIDs): 9 050 -> 8 675 B per copy on the benches'
# 7.9 KB instances, a 4% cut of the bytes across sites, for ~0.1 ms of CPU on each side.
# Above this the header is under 2% of the copy and gzip would only cost CPU; within a
# site bytes are cheap and CPU is not, so nothing is compressed there.
CROSS_SITE_GZIP_PAYLOAD_BYTES_MAX = 64 * 1024


# A peer that was down (killed, restarting) is dialled again within a second, not after
# gRPC's default backoff of up to two minutes: its probes and its hints depend on it.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class Channels:
    """One grpc.aio channel per peer address, reused by every call, and on each the
    long-lived StoreStream that carries copies to that peer (node/store_stream.py).

    `routes` (the peer_routes setting) maps a peer's advertised address to the address
    actually dialled: a NAT or tunnel, or the chaos runner's fault proxy for this pair.
    """

    def __init__(self, routes: Mapping[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._routes = dict(routes or {})
        self._credentials = credentials  # Mutual TLS (node/tls.py) when the node has a tls_dir.
        self.store_streams = StoreStreams()

    def dialled(self, address: str) -> str:
        return self._routes.get(address, address)

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = (grpc.aio.insecure_channel(self.dialled(address), options=GRPC_OPTIONS + RECONNECT_OPTIONS)
                       if self._credentials is None else
                       grpc.aio.secure_channel(self.dialled(address), self._credentials,
                                               options=GRPC_OPTIONS + RECONNECT_OPTIONS + CHANNEL_OPTIONS))
            self._channels[address] = channel
        return channel

    async def set_credentials(self, credentials: grpc.ChannelCredentials, grace_s: float = 5.0) -> None:
        """A reloaded certificate: later calls get new channels (new handshakes with it);
        the old channels finish their calls in flight within `grace_s`, then close."""
        old, self._channels = self._channels, {}
        self._credentials = credentials
        self.store_streams.finish_all()  # Their replies come in within the grace; new copies, new streams.
        await asyncio.gather(*(channel.close(grace=grace_s) for channel in old.values()), return_exceptions=True)

    async def close(self) -> None:
        await self.store_streams.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


# A store reply that is not a durable copy, as the reason the coordinator acts on.
_REFUSALS = {
    pb.STORE_OUTCOME_REFUSED_FULL: RefusalReason.FULL,
    pb.STORE_OUTCOME_REFUSED_INVALID: RefusalReason.INVALID,
    pb.STORE_OUTCOME_ERROR: RefusalReason.ERROR,
    pb.STORE_OUTCOME_REFUSED_NOT_OWNER: RefusalReason.NOT_OWNER,
}


@contextlib.contextmanager
def _peer_errors(target: str) -> Iterator[None]:
    """A failed gRPC call as PeerError; so is a CancelledError that is not the caller's
    own cancellation (one can escape from inside grpc.aio; see cancelled_by_caller)."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise PeerError(f"{target}: {describe_rpc_error(error)}") from None
    except asyncio.CancelledError:
        if cancelled_by_caller():
            raise
        raise PeerError(f"{target}: the call was cancelled underneath us") from None


class GrpcTransport:
    def __init__(self, channels: Channels, resolve: Callable[[str], "MemberInfo | None"],
                 envelope: Callable[[], pb.Envelope], observe: Callable[[Version], None] | None = None,
                 *, site: str = "", store_stream: bool = True) -> None:
        self._channels = channels
        self._store_stream = store_stream  # False: every copy a call, as before StoreStream (benches' A/B).
        self._site = site  # This node's site: copies to other sites are compressed (see above).
        # The node's hybrid clock observes versions that replies carry (a tombstone that won).
        self._observe = observe or (lambda version: None)
        self._resolve = resolve
        self._envelope = envelope
        # One stub per peer address, reused by every call, on the address's current channel
        # (Channels replaces them all when the certificate is reloaded).
        self._membership_stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.MembershipStub]] = {}
        self._data_stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.DataStub]] = {}
        self._repair_stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.RepairStub]] = {}
        self._stream_only_until: dict[str, float] = {}  # Address -> monotonic time to ask for whole again.
        self._crcs: collections.OrderedDict[int, tuple[bytes, int]] = collections.OrderedDict()
        self.whole_stores = 0
        self.stream_stores = 0  # Copies sent as a StoreInstance call (chunks: over 4 MiB, or an old peer).
        self.store_stream_copies = 0  # Copies sent on the peer's long-lived StoreStream.
        self.compressed_stores = 0  # Whole copies sent gzip-compressed (to another site).
        self._frames_unsupported_until: dict[str, float] = {}  # Address -> monotonic time to ask again.
        self.frames_calls = 0  # FetchFrames calls made.
        self.frames_received_bytes = 0  # Frame bytes they brought.

    def _address(self, target: str) -> str:
        member = self._resolve(target)
        if member is None:
            raise PeerError(f"unknown node {target}")
        return member.peer_address

    def _data(self, target: str) -> tuple[str, pb_grpc.DataStub]:
        address = self._address(target)
        channel = self._channels.get(address)
        cached = self._data_stubs.get(address)
        if cached is None or cached[0] is not channel:
            cached = self._data_stubs[address] = (channel, pb_grpc.DataStub(channel))
        return address, cached[1]

    def _repair(self, target: str) -> pb_grpc.RepairStub:
        address = self._address(target)
        channel = self._channels.get(address)
        cached = self._repair_stubs.get(address)
        if cached is None or cached[0] is not channel:
            cached = self._repair_stubs[address] = (channel, pb_grpc.RepairStub(channel))
        return cached[1]

    def _crc(self, blob: bytes) -> int:
        """The payload's CRC-32, computed once for all the copies of one write."""
        memo = self._crcs.get(id(blob))
        if memo is not None and memo[0] is blob:
            return memo[1]
        crc = payload_crc32(blob)
        self._crcs[id(blob)] = (blob, crc)
        while len(self._crcs) > CRC_MEMO_ENTRIES:
            self._crcs.popitem(last=False)
        return crc

    async def store(self, target: str, stored: StoredInstance, *, hint_for: str, timeout_ms: int) -> StoreReply:
        """One copy on `target`. A payload of at most WHOLE_INSTANCE_BYTES_MAX goes as one
        message on the peer's long-lived StoreStream (node/store_stream.py), or, to another
        site (gzip) or a peer that predates the stream, as one StoreWholeInstance call; a
        bigger one (or one to a peer that predates both) as a StoreInstance stream of chunks."""
        write_trace.mark("remote.call:" + target, stored.sop_instance_uid)
        address, stub = self._data(target)
        header = peer_wire.store_header(stored, hint_for, self._crc(stored.blob))
        reply: pb.StoreReply | None = None
        streams = self._channels.store_streams
        with _peer_errors(target):
            whole = len(stored.blob) <= WHOLE_INSTANCE_BYTES_MAX
            compression = self._compression(target, len(stored.blob)) if whole else None
            if whole and compression is None and self._store_stream and streams.available(address):
                request = pb.StoreStreamRequest(envelope=self._envelope(), header=header,
                                                data=peer_wire.payload_bytes(stored.blob),
                                                timeout_ms=timeout_ms)
                try:
                    reply = await streams.store(address, self._channels.get(address), target, request,
                                                timeout_ms / 1000)
                    self.store_stream_copies += 1
                except StreamUnavailable:
                    reply = None  # Not stored there: sent as a call below.
            if reply is None and whole and self._stream_only_until.get(address, 0.0) <= time.monotonic():
                try:
                    reply = await stub.StoreWholeInstance(peer_wire.store_whole(self._envelope(), stored, header),
                                                          timeout=timeout_ms / 1000, compression=compression)
                    self.whole_stores += 1
                    if compression is not None:
                        self.compressed_stores += 1
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._stream_only_until[address] = time.monotonic() + WHOLE_RECHECK_S
                    log.info("peer.store.whole_unimplemented target=%s: streaming to it", target)
            if reply is None:
                reply = await stub.StoreInstance(peer_wire.store_chunks(self._envelope(), stored, hint_for, header),
                                                 timeout=timeout_ms / 1000)
                self.stream_stores += 1
        write_trace.mark("remote.done:" + target, stored.sop_instance_uid)
        outcome = peer_wire.OUTCOME_FROM_WIRE.get(reply.outcome)
        won = peer_wire.version_from_wire(reply.tombstone_version) if reply.HasField("tombstone_version") else None
        if won is not None:
            self._observe(won)
        if outcome is not None and reply.durable:
            return StoreReply(outcome, won)
        reason = _REFUSALS.get(reply.outcome, RefusalReason.OTHER)
        raise PeerRefused(f"{target}: {reason.value}: {reply.message[:200]}", reason)

    def _compression(self, target: str, payload_bytes: int) -> grpc.Compression | None:
        """Gzip for a small copy to a node of another site (CROSS_SITE_GZIP_PAYLOAD_BYTES_MAX)."""
        if not self._site or payload_bytes > CROSS_SITE_GZIP_PAYLOAD_BYTES_MAX:
            return None
        member = self._resolve(target)
        if member is None or (member.site or "default") == self._site:
            return None
        return grpc.Compression.Gzip

    async def fetch(self, target: str, study_instance_uid: str, sop_instance_uid: str, *, timeout_ms: int,
                    include_hints: bool = False, started: Callable[[], None] | None = None) -> StoredInstance | None:
        _address, stub = self._data(target)
        request = pb.FetchRequest(envelope=self._envelope(), study_instance_uid=study_instance_uid,
                                  sop_instance_uid=sop_instance_uid, include_hints=include_hints)
        parts: list[bytes] = []
        record = None
        attributes: Attributes = {}
        complete = False
        with _peer_errors(target):
            try:
                async for chunk in stub.FetchInstance(request, timeout=timeout_ms / 1000):
                    if started is not None:
                        started()
                        started = None
                    if chunk.HasField("record"):
                        record = chunk.record
                        attributes = peer_wire.attributes_from_json(chunk.index_attributes_json)
                    parts.append(chunk.data)
                    if chunk.last:
                        complete = True
                        break
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise
            except ValueError as error:
                raise PeerError(f"{target}: bad reply: {error}") from None
        if record is None or not complete:
            raise PeerError(f"{target}: fetch of {sop_instance_uid} ended early")
        blob = b"".join(parts)
        if len(blob) != int(record.compressed_size_bytes):
            raise PeerError(f"{target}: fetch of {sop_instance_uid} returned {len(blob)} of "
                            f"{record.compressed_size_bytes} bytes")
        return StoredInstance(record=peer_wire.record_from_wire(record, attributes), attributes=attributes, blob=blob)

    async def fetch_frames(self, target: str, study_instance_uid: str, sop_instance_uid: str,
                           numbers: Sequence[int], *, timeout_ms: int,
                           started: Callable[[], None] | None = None) -> AsyncIterator[int | bytes]:
        """replication.transport.FrameTransport over Data.FetchFrames. Every frame is checked
        against what the peer announced for it (its number, its size and CRC-32, the count
        and the end of the answer); a mismatch is PeerError before the frame's last bytes
        are handed on, so a lying or broken answer is never a complete one."""
        address, stub = self._data(target)
        if self._frames_unsupported_until.get(address, 0.0) > time.monotonic():
            raise FramesUnsupported(f"{target}: predates FetchFrames")
        asked = list(numbers)
        request = pb.FetchFramesRequest(envelope=self._envelope(), study_instance_uid=study_instance_uid,
                                        sop_instance_uid=sop_instance_uid, frame_numbers=asked)
        self.frames_calls += 1
        call = stub.FetchFrames(request, timeout=timeout_ms / 1000)
        try:
            with _peer_errors(target):
                try:
                    messages = call.__aiter__()
                    await messages.__anext__()  # The envelope, sent at once.
                    if started is not None:
                        started()
                    head = await messages.__anext__()
                except StopAsyncIteration:
                    raise PeerError(f"{target}: FetchFrames answer without an outcome") from None
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                        self._frames_unsupported_until[address] = time.monotonic() + FRAMES_RECHECK_S
                        log.info("peer.frames.unimplemented target=%s: reading whole instances from it", target)
                        raise FramesUnsupported(f"{target}: predates FetchFrames") from None
                    raise
                if head.outcome == pb.FRAMES_OUTCOME_NO_FRAME:
                    raise FrameNotFound(head.message[:200] or "no such frame")
                if head.outcome == pb.FRAMES_OUTCOME_LIST_REFUSED:
                    raise FrameListRefused(head.message[:200] or "frame list refused")
                if head.outcome in (pb.FRAMES_OUTCOME_NOT_HELD, pb.FRAMES_OUTCOME_UNREADABLE):
                    raise FramesNotHeld(f"{target}: {head.message[:200]}")
                if head.outcome != pb.FRAMES_OUTCOME_SENDING:
                    raise PeerError(f"{target}: FetchFrames outcome {head.outcome}")
                index = 0  # Frames begun.
                open_frame = False
                size = crc = 0
                complete = False
                # A frame's last bytes are handed on only once the next message checks out
                # (or this one ends the answer): an answer that goes on wrongly or stops
                # after it never hands on every byte of every frame.
                held: bytes | None = None
                async for message in messages:
                    number = int(message.frame_number)
                    if number:
                        if open_frame or index >= len(asked) or number != asked[index]:
                            raise PeerError(f"{target}: frame {number} sent where "
                                            f"{asked[index] if index < len(asked) and not open_frame else 'none'} "
                                            "was due")
                        index += 1
                        open_frame, size, crc = True, 0, 0
                    data = message.data
                    if data and not open_frame:
                        raise PeerError(f"{target}: frame bytes outside a frame")
                    size += len(data)
                    crc = crc32_of(data, crc)
                    if message.frame_end:
                        if not open_frame or size != message.frame_size_bytes or crc != message.frame_crc32:
                            raise PeerError(f"{target}: frame {asked[index - 1] if index else 0}: {size} bytes "
                                            f"received, {message.frame_size_bytes} announced (or its CRC-32 differs)")
                        open_frame = False
                    if message.last and (open_frame or index != len(asked)):
                        raise PeerError(f"{target}: FetchFrames ended after {index} of {len(asked)} frames")
                    if held is not None:
                        yield held
                        held = None
                    if number:
                        yield number
                    if data:
                        self.frames_received_bytes += len(data)
                        if message.frame_end and not message.last:
                            held = bytes(data)
                        else:
                            yield bytes(data)
                    if message.last:
                        complete = True
                        break
                if not complete:
                    raise PeerError(f"{target}: FetchFrames ended early ({index} of {len(asked)} frames begun)")
        finally:
            call.cancel()

    async def query(self, target: str, query: Query, ranges: Sequence[TokenRange] | None, *,
                    timeout_ms: int, started: Callable[[], None] | None = None,
                    include_hints: bool = False) -> AsyncIterator[Attributes]:
        _address, stub = self._data(target)
        request = pb.QueryRequest(envelope=self._envelope(), query_json=json.dumps(query.to_json()).encode(),
                                  include_hints=include_hints)
        if ranges is not None:
            request.token_ranges.extend(peer_wire.ranges_to_wire(ranges))
        call = stub.Query(request, timeout=timeout_ms / 1000)
        try:
            with _peer_errors(target):
                async for row in call:
                    if started is not None:
                        started()
                        started = None
                    if row.attributes_json:
                        yield peer_wire.attributes_from_json(row.attributes_json)
        except ValueError as error:
            raise PeerError(f"{target}: bad row: {error}") from None
        finally:
            call.cancel()

    async def range_digest(self, target: str, token_range: TokenRange, *, timeout_ms: int) -> dict[int, Digest]:
        stub = self._repair(target)
        request = pb.RangeDigestRequest(envelope=self._envelope(),
                                        range=pb.TokenRange(start=token_range.start, end=token_range.end))
        with _peer_errors(target):
            reply = await stub.RangeDigest(request, timeout=timeout_ms / 1000)
        return {int(b.bucket): Digest((int(b.digest.xor_high) << 64) | int(b.digest.xor_low), int(b.digest.entry_count))
                for b in reply.buckets}

    async def list_bucket(self, target: str, token_range: TokenRange, segment: int, *,
                          timeout_ms: int) -> list[tuple[str, str, str]]:
        stub = self._repair(target)
        request = pb.ListBucketRequest(envelope=self._envelope(), bucket=segment,
                                       range=pb.TokenRange(start=token_range.start, end=token_range.end))
        with _peer_errors(target):
            reply = await stub.ListBucket(request, timeout=timeout_ms / 1000)
        return [peer_wire.bucket_entry_from_wire(e) for e in reply.entries]

    async def tombstone(self, target: str, tombstones: Sequence[Tombstone], *, scope: DeleteScope | None,
                        hint_for: str, timeout_ms: int) -> int:
        """Tombstones (one study, one version) on `target`; how many instances it removed.
        PeerRefused unless it answered that they are durable."""
        _address, stub = self._data(target)
        request = peer_wire.tombstone_request(self._envelope(), tombstones, scope, hint_for)
        with _peer_errors(target):
            reply = await stub.Tombstone(request, timeout=timeout_ms / 1000)
        if reply.outcome in (pb.TOMBSTONE_OUTCOME_APPLIED, pb.TOMBSTONE_OUTCOME_DUPLICATE) and reply.durable:
            return int(reply.instances_deleted_count)
        raise PeerRefused(f"{target}: tombstone not durable: {reply.message[:200]}", RefusalReason.ERROR)

    async def correct(self, target: str, correction: Correction, *, timeout_ms: int, hint_for: str = "") -> bool:
        """A study's correction merged on `target` (with `hint_for`: kept there as a hint for
        that owner); True if it changed anything there. PeerRefused unless it answered that
        it is durable."""
        _address, stub = self._data(target)
        request = pb.CorrectRequest(envelope=self._envelope(), study_instance_uid=correction.study_instance_uid,
                                    correction_json=correction.dumps(), hint_for=hint_for)
        with _peer_errors(target):
            reply = await stub.Correct(request, timeout=timeout_ms / 1000)
        if reply.outcome in (pb.CORRECT_OUTCOME_APPLIED, pb.CORRECT_OUTCOME_DUPLICATE) and reply.durable:
            return bool(reply.outcome == pb.CORRECT_OUTCOME_APPLIED)
        raise PeerRefused(f"{target}: correction not durable: {reply.message[:200]}", RefusalReason.ERROR)

    def envelope(self) -> pb.Envelope:
        return self._envelope()

    async def membership_call(self, address: str, method: str, request: Any, *, timeout_ms: int) -> Any:
        """One Membership RPC (Ping, IndirectPing, PushPull, Join, Leave) to the node at `address`."""
        channel = self._channels.get(address)
        cached = self._membership_stubs.get(address)
        if cached is None or cached[0] is not channel:
            cached = self._membership_stubs[address] = (channel, pb_grpc.MembershipStub(channel))
        with _peer_errors(address):
            return await getattr(cached[1], method)(request, timeout=timeout_ms / 1000)
