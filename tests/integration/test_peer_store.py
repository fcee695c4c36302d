"""The peer store path against a real node: Data.StoreWholeInstance (one message with the
compressed instance and its header), the payload CRC-32 the receiver checks instead of
decompressing, lying or oversize messages refused with a typed outcome (nothing written),
and GrpcTransport's fallback to the StoreInstance stream for a peer that predates it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest

from pacsnode.node import peer_wire
from pacsnode.node.codec import compress, decompress, payload_crc32
from pacsnode.node.grpc_transport import Channels, GrpcTransport
from pacsnode.proto import PROTOCOL_VERSION, WHOLE_INSTANCE_BYTES_MAX
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.replication.model import InstanceRecord, StoredInstance
from pacsnode.replication.transport import PeerRefused, RefusalReason
from pacsnode.ring.members import MemberInfo
from pacsnode.sim.process import NodeProcess, free_port

from .test_cluster import local_sop_uids

STUDY = "1.2.826.0.1.3680043.10.777.1"
SIZE_MAX = 2_000_000  # The node's instance_size_bytes_max in these tests.


def _stored(index: int, size: int = 200_000) -> StoredInstance:
    part10 = bytes(b & 0x0F for b in random.Random(index).randbytes(size))  # Half compressible.
    record = InstanceRecord(study_instance_uid=STUDY, series_instance_uid=STUDY + ".1",
                            sop_instance_uid=f"{STUDY}.1.{index}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax_uid="1.2.840.10008.1.2.1", content_hash=f"{index:032x}",
                            size_bytes=size - 132, dataset_offset=132, stored_at_ms=1)
    attributes = {"PatientID": "PEER-STORE", "StudyInstanceUID": STUDY, "SeriesInstanceUID": STUDY + ".1",
                  "SOPInstanceUID": record.sop_instance_uid, "Modality": "CT"}
    return StoredInstance(record=record, attributes=attributes, blob=compress(part10))


def _envelope() -> pb.Envelope:
    return pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="test")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("peer-store")
    process = NodeProcess(root / "p1", node_id="p1",
                          extra_args=["--profile", "local", "--instance-size-bytes-max", str(SIZE_MAX)]).start()
    try:
        yield process
    finally:
        process.stop(timeout_s=15)


def _whole(node: NodeProcess, request: pb.StoreWholeRequest) -> pb.StoreReply:
    with grpc.insecure_channel(node.peer_address) as channel:
        return pb_grpc.DataStub(channel).StoreWholeInstance(request, timeout=10)


def test_a_whole_instance_is_stored_durably_and_reads_back(node: NodeProcess) -> None:
    stored = _stored(1)
    header = peer_wire.store_header(stored, "", payload_crc32(stored.blob))
    reply = _whole(node, peer_wire.store_whole(_envelope(), stored, header))
    assert reply.outcome == pb.STORE_OUTCOME_STORED and reply.durable, reply.message
    assert stored.sop_instance_uid in local_sop_uids(node.peer_address, STUDY)
    with grpc.insecure_channel(node.peer_address) as channel:
        chunks = list(pb_grpc.DataStub(channel).FetchInstance(pb.FetchRequest(
            envelope=_envelope(), study_instance_uid=STUDY, sop_instance_uid=stored.sop_instance_uid), timeout=10))
    assert b"".join(c.data for c in chunks) == stored.blob
    again = _whole(node, peer_wire.store_whole(_envelope(), stored, header))
    assert again.outcome == pb.STORE_OUTCOME_DUPLICATE and again.durable


@pytest.mark.parametrize("lie", ["crc", "short", "frame-size", "not-zstd", "over-whole-limit", "over-size-max"])
def test_a_lying_or_oversize_message_is_refused_and_nothing_is_written(node: NodeProcess, lie: str) -> None:
    stored = _stored(100 + len(lie))
    header = peer_wire.store_header(stored, "", payload_crc32(stored.blob))
    data = stored.blob
    expected = pb.STORE_OUTCOME_REFUSED_INVALID
    if lie == "crc":
        header.payload_crc32 ^= 1
    elif lie == "short":
        data = data[:-10]
    elif lie == "frame-size":
        header.record.total_size_bytes += 1  # The frame says otherwise.
    elif lie == "not-zstd":
        data = os.urandom(len(data))
        header.payload_crc32 = payload_crc32(data)  # A right CRC over bytes that are no zstd frame.
    elif lie == "over-whole-limit":
        data = os.urandom(WHOLE_INSTANCE_BYTES_MAX + 1)
        header.record.compressed_size_bytes = len(data)
        expected = pb.STORE_OUTCOME_REFUSED_FULL  # Over the node's instance size limit too.
    elif lie == "over-size-max":
        header.record.compressed_size_bytes = SIZE_MAX + (2 << 20)
        expected = pb.STORE_OUTCOME_REFUSED_FULL
    reply = _whole(node, pb.StoreWholeRequest(envelope=_envelope(), header=header, data=data))
    assert reply.outcome == expected and not reply.durable, (lie, reply.outcome, reply.message)
    assert stored.sop_instance_uid not in local_sop_uids(node.peer_address, STUDY)


def test_without_a_crc_the_receiver_decompresses_and_refuses_a_damaged_payload(node: NodeProcess) -> None:
    stored = _stored(200)
    damaged = bytearray(stored.blob)
    damaged[len(damaged) // 2] ^= 0xFF
    header = peer_wire.store_header(stored, "")  # An older sender: no payload_crc32.
    reply = _whole(node, pb.StoreWholeRequest(envelope=_envelope(), header=header, data=bytes(damaged)))
    assert reply.outcome == pb.STORE_OUTCOME_REFUSED_INVALID and not reply.durable
    reply = _whole(node, peer_wire.store_whole(_envelope(), stored, header))
    assert reply.outcome == pb.STORE_OUTCOME_STORED and reply.durable


def _transport(address: str) -> tuple[GrpcTransport, Channels]:
    host, port = address.split(":")
    channels = Channels()
    member = MemberInfo(node_id="target", peer_host=host, peer_port=int(port))
    return GrpcTransport(channels, lambda node_id: member if node_id == "target" else None, _envelope), channels


def test_transport_sends_whole_and_maps_a_refusal_to_its_reason(node: NodeProcess) -> None:
    async def run() -> None:
        transport, channels = _transport(node.peer_address)
        try:
            assert (await transport.store("target", _stored(300), hint_for="", timeout_ms=10_000)).outcome == "stored"
            big = _stored(301, size=10)
            big = StoredInstance(record=big.record, attributes=big.attributes,
                                 blob=big.blob + b"\x00" * WHOLE_INSTANCE_BYTES_MAX)  # Streamed: over 4 MiB.
            with pytest.raises(PeerRefused) as refused:
                await transport.store("target", big, hint_for="", timeout_ms=10_000)
            assert refused.value.reason is RefusalReason.FULL
            # The first on the StoreStream, the one over 4 MiB as a StoreInstance call.
            assert (transport.store_stream_copies, transport.whole_stores, transport.stream_stores) == (1, 0, 1)
        finally:
            await channels.close()

    asyncio.run(run())


class _OldData(pb_grpc.DataServicer):
    """A node from before StoreWholeInstance: only the stream (the base class answers
    UNIMPLEMENTED for the rest). Receives like node/peer_server.py's stream handler."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    async def StoreInstance(self, request_iterator: AsyncIterator[pb.StoreChunk], context: Any) -> pb.StoreReply:
        parts, header = [], None
        async for chunk in request_iterator:
            header = header or chunk.header
            parts.append(chunk.data)
        blob = b"".join(parts)
        assert header is not None
        decompress(blob)
        self.blobs.append(blob)
        return pb.StoreReply(envelope=_envelope(), outcome=pb.STORE_OUTCOME_STORED, durable=True)


def test_transport_falls_back_to_the_stream_for_an_older_peer() -> None:
    async def run() -> None:
        server = grpc.aio.server()
        old = _OldData()
        pb_grpc.add_DataServicer_to_server(old, server)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        transport, channels = _transport(f"127.0.0.1:{port}")
        try:
            first, second = _stored(400), _stored(401)
            assert (await transport.store("target", first, hint_for="", timeout_ms=10_000)).outcome == "stored"
            assert (await transport.store("target", second, hint_for="", timeout_ms=10_000)).outcome == "stored"
            assert old.blobs == [first.blob, second.blob]
            # The first asked for StoreStream, then whole, and fell back; the second went straight
            # to the StoreInstance stream.
            assert (transport.store_stream_copies, transport.whole_stores, transport.stream_stores) == (0, 0, 2)
            assert not channels.store_streams.available(f"127.0.0.1:{port}")
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(run())


class _WholeData(pb_grpc.DataServicer):
    """Takes StoreWholeInstance and keeps what arrived (after gRPC undid any compression)."""

    def __init__(self) -> None:
        self.requests: list[pb.StoreWholeRequest] = []

    async def StoreWholeInstance(self, request: pb.StoreWholeRequest, context: Any) -> pb.StoreReply:
        self.requests.append(request)
        return pb.StoreReply(envelope=_envelope(), outcome=pb.STORE_OUTCOME_STORED, durable=True)


def _datagen_stored(tmp_path: Path) -> list[StoredInstance]:
    """Instances as the benches store them (64x64 images, the full index attribute set)."""
    from pacsnode.node.codec import to_stored
    from pacsnode.node.ingest import instance_from_part10
    from pacsnode.sim import datagen

    spec = datagen.StudySetSpec(patients=8, rows=64, cols=64, seed=5)
    result = []
    for entry in datagen.write_study_set(spec, tmp_path / "studies"):
        part10 = Path(entry["path"]).read_bytes()
        length = int.from_bytes(part10[140:144], "little")  # (0002,0000) group length, explicit VR LE.
        result.append(to_stored(instance_from_part10(part10, 144 + length, entry["transfer_syntax_uid"])))
    return result


def test_a_small_copy_to_another_site_is_sent_compressed(tmp_path: Path) -> None:
    """Through a byte-counting proxy: copies to a node of another site cross in fewer bytes
    than the same copies to a node of this site, and arrive the same."""
    from pacsnode.sim.faultproxy import FaultProxy

    stored_list = _datagen_stored(tmp_path)

    async def run(proxy: FaultProxy) -> None:
        server = grpc.aio.server()
        data = _WholeData()
        pb_grpc.add_DataServicer_to_server(data, server)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        members = {name: MemberInfo(node_id=name, peer_host="127.0.0.1", peer_port=port, site=site)
                   for name, site in (("near", "east"), ("far", "west"))}
        # One proxy link per target (both are this one server), dialled through peer routes.
        channels = {name: Channels({f"127.0.0.1:{port}": f"127.0.0.1:{proxy.add_link(name, '127.0.0.1', port)}"})
                    for name in members}
        transports = {name: GrpcTransport(channels[name], members.get, _envelope, site="east") for name in members}
        try:
            for name, transport in transports.items():
                for stored in stored_list:
                    assert (await transport.store(name, stored, hint_for="", timeout_ms=10_000)).outcome == "stored"
            assert (transports["far"].compressed_stores, transports["near"].compressed_stores) == \
                (len(stored_list), 0)
            sent = [r.SerializeToString() for r in data.requests]
            assert sent[:len(stored_list)] == sent[len(stored_list):]  # The same requests arrived.
            assert [r.data for r in data.requests[:len(stored_list)]] == [s.blob for s in stored_list]
            stats = proxy.stats()
            assert stats["far"].bytes_forward < stats["near"].bytes_forward - 200 * len(stored_list), \
                (stats["far"].bytes_forward, stats["near"].bytes_forward)
        finally:
            for channel_set in channels.values():
                await channel_set.close()
            await server.stop(None)

    with FaultProxy() as proxy:
        asyncio.run(run(proxy))


# ----------------------------------------------------------------- Data.StoreStream

def _stream_request(stored: StoredInstance, request_id: int, sender: str = "test", timeout_ms: int = 10_000,
                    crc: bool = True) -> pb.StoreStreamRequest:
    header = peer_wire.store_header(stored, "", payload_crc32(stored.blob) if crc else None)
    env = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id=sender)
    return pb.StoreStreamRequest(envelope=env, request_id=request_id, header=header, data=stored.blob,
                                 timeout_ms=timeout_ms)


def test_transport_sends_many_copies_on_one_stream_side_by_side(node: NodeProcess) -> None:
    stored = [_stored(500 + i) for i in range(12)]

    async def run() -> None:
        transport, channels = _transport(node.peer_address)
        try:
            replies = await asyncio.gather(*(transport.store("target", s, hint_for="", timeout_ms=10_000)
                                             for s in stored))
            assert [r.outcome for r in replies] == ["stored"] * len(stored)
            again = await transport.store("target", stored[0], hint_for="", timeout_ms=10_000)
            assert again.outcome == "duplicate"
            assert transport.store_stream_copies == len(stored) + 1
            assert (transport.whole_stores, transport.stream_stores) == (0, 0)
            assert channels.store_streams.opened == 1  # One stream carried them all.
        finally:
            await channels.close()

    asyncio.run(run())
    held = local_sop_uids(node.peer_address, STUDY)
    assert all(s.sop_instance_uid in held for s in stored)


def test_a_lying_request_on_the_stream_is_refused_with_its_id_and_the_stream_goes_on(node: NodeProcess) -> None:
    good, damaged, headless = _stored(600), _stored(601), _stored(602)
    bad_crc = _stream_request(damaged, 7)
    bad_crc.header.payload_crc32 ^= 1
    short = _stream_request(_stored(603), 8)
    short.data = short.data[:-10]
    no_header = pb.StoreStreamRequest(envelope=_envelope(), request_id=9, data=headless.blob)

    async def run() -> dict[int, pb.StoreReply]:
        async with grpc.aio.insecure_channel(node.peer_address) as channel:
            call = pb_grpc.DataStub(channel).StoreStream()
            for request in (bad_crc, short, no_header, _stream_request(good, 11)):
                await call.write(request)
            await call.done_writing()
            replies = {}
            async for message in call:
                replies[message.request_id] = message.reply
            assert await call.code() == grpc.StatusCode.OK
            return replies

    replies = asyncio.run(run())
    assert {i: r.outcome for i, r in replies.items()} == {
        7: pb.STORE_OUTCOME_REFUSED_INVALID, 8: pb.STORE_OUTCOME_REFUSED_INVALID, 9: pb.STORE_OUTCOME_REFUSED_INVALID,
        11: pb.STORE_OUTCOME_STORED}
    assert replies[11].durable and not any(replies[i].durable for i in (7, 8, 9))
    held = local_sop_uids(node.peer_address, STUDY)
    assert good.sop_instance_uid in held
    assert not {damaged.sop_instance_uid, headless.sop_instance_uid, _stored(603).sop_instance_uid} & held


def test_a_stream_from_another_cluster_is_refused_like_a_call(node: NodeProcess) -> None:
    request = _stream_request(_stored(700), 1)
    request.envelope.cluster_id = "someone-else"
    second = _stream_request(_stored(701), 2)

    async def run(first: pb.StoreStreamRequest, then: pb.StoreStreamRequest | None) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(node.peer_address) as channel:
            call = pb_grpc.DataStub(channel).StoreStream()
            await call.write(first)
            if then is not None:
                await call.write(then)
            await call.done_writing()
            try:
                async for _message in call:
                    pass
            except grpc.aio.AioRpcError as error:
                return error.code()
            return await call.code()

    assert asyncio.run(run(request, None)) == grpc.StatusCode.FAILED_PRECONDITION
    # A good first request does not vouch for the next: each envelope is checked.
    assert asyncio.run(run(second, request)) == grpc.StatusCode.FAILED_PRECONDITION
    assert _stored(700).sop_instance_uid not in local_sop_uids(node.peer_address, STUDY)


class _LyingStreamData(pb_grpc.DataServicer):
    """A broken peer on the stream: answers ids nobody asked for, one twice, one with no
    reply, never answers the last, or ends the stream early."""

    def __init__(self, end_after: int | None = None) -> None:
        self.end_after = end_after
        self.received = 0

    async def StoreStream(self, request_iterator: AsyncIterator[pb.StoreStreamRequest],
                          context: Any) -> AsyncIterator[pb.StoreStreamReply]:
        stored = pb.StoreReply(outcome=pb.STORE_OUTCOME_STORED, durable=True)
        async for request in request_iterator:
            self.received += 1
            if self.end_after is not None and self.received > self.end_after:
                return
            yield pb.StoreStreamReply(request_id=request.request_id + 1000, reply=stored)  # Made up.
            if request.header.record.sop_instance_uid.endswith(".1"):
                yield pb.StoreStreamReply(request_id=request.request_id, reply=stored)
                yield pb.StoreStreamReply(request_id=request.request_id, reply=stored)  # Twice.
            elif request.header.record.sop_instance_uid.endswith(".2"):
                yield pb.StoreStreamReply(request_id=request.request_id)  # Failed there.
            # Anything else: never answered.


def test_a_lying_or_silent_peer_fails_each_copy_typed_and_never_breaks_the_sender() -> None:
    from pacsnode.replication.transport import PeerError

    async def run() -> None:
        server = grpc.aio.server()
        lying = _LyingStreamData()
        pb_grpc.add_DataServicer_to_server(lying, server)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        transport, channels = _transport(f"127.0.0.1:{port}")
        record = _stored(1).record
        try:
            def instance(suffix: str) -> StoredInstance:
                base = _stored(800, size=1000)
                return StoredInstance(record=dataclasses.replace(record, sop_instance_uid=f"{STUDY}.9{suffix}"),
                                      attributes=base.attributes, blob=base.blob)
            assert (await transport.store("target", instance(".1"), hint_for="", timeout_ms=5_000)).outcome == "stored"
            with pytest.raises(PeerError) as failed:
                await transport.store("target", instance(".2"), hint_for="", timeout_ms=5_000)
            assert not isinstance(failed.value, PeerRefused)
            started = asyncio.get_running_loop().time()
            with pytest.raises(PeerError) as silent:
                await transport.store("target", instance(".3"), hint_for="", timeout_ms=300)
            assert "DEADLINE_EXCEEDED" in str(silent.value)
            assert asyncio.get_running_loop().time() - started < 3.0
            # Still the one stream, still usable.
            assert (await transport.store("target", instance(".1"), hint_for="", timeout_ms=5_000)).outcome == "stored"
            assert channels.store_streams.opened == 1
            # The peer ends the stream with copies unanswered: each fails as PeerError, the next opens a new one.
            lying.end_after = lying.received
            with pytest.raises(PeerError):
                await transport.store("target", instance(".3"), hint_for="", timeout_ms=5_000)
            lying.end_after = None
            assert (await transport.store("target", instance(".1"), hint_for="", timeout_ms=5_000)).outcome == "stored"
            assert channels.store_streams.opened == 2
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(run())


def test_a_dead_peer_fails_the_copy_quickly_and_a_restarted_one_gets_a_new_stream(tmp_path: Path) -> None:
    from pacsnode.replication.transport import PeerError

    port = free_port()

    async def serve() -> grpc.aio.Server:
        server = grpc.aio.server()
        pb_grpc.add_DataServicer_to_server(_LyingStreamData(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server

    async def run() -> None:
        record = _stored(1).record
        base = _stored(900, size=1000)
        first = StoredInstance(record=dataclasses.replace(record, sop_instance_uid=f"{STUDY}.8.1"),
                               attributes=base.attributes, blob=base.blob)
        transport, channels = _transport(f"127.0.0.1:{port}")
        server = await serve()
        try:
            assert (await transport.store("target", first, hint_for="", timeout_ms=5_000)).outcome == "stored"
            await server.stop(None)
            started = asyncio.get_running_loop().time()
            with pytest.raises(PeerError):
                await transport.store("target", first, hint_for="", timeout_ms=5_000)
            assert asyncio.get_running_loop().time() - started < 4.0
            server = await serve()
            for _attempt in range(50):  # The channel reconnects within a second (RECONNECT_OPTIONS).
                try:
                    reply = await transport.store("target", first, hint_for="", timeout_ms=5_000)
                    break
                except PeerError:
                    await asyncio.sleep(0.1)
            assert reply.outcome == "stored"
            assert channels.store_streams.opened >= 2
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(run())


class _StuckStreamData(pb_grpc.DataServicer):
    """Takes the stream, reads nothing, and gives up after `stuck_s`."""

    def __init__(self, stuck_s: float) -> None:
        self.stuck_s = stuck_s

    async def StoreStream(self, request_iterator: Any, context: Any) -> None:
        await asyncio.sleep(self.stuck_s)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "gave up")


def test_copies_queued_behind_a_stuck_peer_fail_when_its_stream_breaks_not_at_their_deadline() -> None:
    """More copies than the queue and the flow-control window hold: when the stream breaks,
    those still waiting for a place in the queue fail at once too."""
    from pacsnode.node.store_stream import STORE_STREAM_QUEUE_MAX
    from pacsnode.replication.transport import PeerError

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_DataServicer_to_server(_StuckStreamData(stuck_s=1.0), server)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        transport, channels = _transport(f"127.0.0.1:{port}")
        base = _stored(1000, size=1000)
        blob = os.urandom(200_000)
        copies = [StoredInstance(record=dataclasses.replace(base.record, sop_instance_uid=f"{STUDY}.7.{i}",
                                                            size_bytes=len(blob)),
                                 attributes=base.attributes, blob=blob) for i in range(4 * STORE_STREAM_QUEUE_MAX + 200)]
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            results = await asyncio.gather(*(transport.store("target", c, hint_for="", timeout_ms=20_000)
                                             for c in copies), return_exceptions=True)
            elapsed = loop.time() - started
            assert all(isinstance(r, PeerError) for r in results), {type(r).__name__ for r in results}
            assert elapsed < 8.0, elapsed  # Not their 20 s deadline.
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(run())
