"""Data.FetchFrames between processes, on the caller's side (node/grpc_transport.py
fetch_frames): an answer that lies about a frame (its size, its CRC-32, its number, the
count, its end) is PeerError before that frame's last bytes are handed on, never a
complete answer; the owner's typed outcomes become typed exceptions; a peer without the
RPC (UNIMPLEMENTED, what any server answers for a method it does not have) is
FramesUnsupported and is not asked again for a while. The lying peers are small gRPC
servers here: no real node lies. The real owner's side is in test_frames_from_peer.py."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, AsyncIterator

import grpc
import pytest

from pacsnode.node.grpc_transport import Channels, GrpcTransport
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.replication.transport import (
    FrameListRefused,
    FrameNotFound,
    FramesNotHeld,
    FramesUnsupported,
    PeerError,
)
from pacsnode.ring.members import MemberInfo
from pacsnode.sim.process import free_port

FRAME_1 = bytes(range(256)) * 8
FRAME_2 = b"\x07" * 3000
TAIL = b"LAST-BYTES-OF-THE-FRAME"


def _envelope() -> pb.Envelope:
    return pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="test")


def _frame(number: int, data: bytes) -> list[pb.FramesChunk]:
    """An honest frame in two messages, its last bytes (TAIL) in the second."""
    whole = data + TAIL
    return [pb.FramesChunk(frame_number=number, data=data),
            pb.FramesChunk(data=TAIL, frame_end=True, frame_size_bytes=len(whole), frame_crc32=zlib.crc32(whole))]


def _honest() -> list[pb.FramesChunk]:
    messages = [pb.FramesChunk(envelope=_envelope()),
                pb.FramesChunk(outcome=pb.FRAMES_OUTCOME_SENDING, transfer_syntax_uid="1.2.840.10008.1.2.1")]
    messages += _frame(1, FRAME_1) + _frame(2, FRAME_2)
    messages[-1].last = True
    return messages


def _lie(kind: str) -> tuple[list[pb.FramesChunk], grpc.StatusCode | None]:
    messages = _honest()
    status = None
    if kind == "size":
        messages[5].frame_size_bytes += 1
    elif kind == "crc":
        messages[5].frame_crc32 ^= 1
    elif kind == "number":
        messages[4].frame_number = 3
    elif kind == "short":  # Ends complete after one of the two frames.
        messages = messages[:4]
        messages[-1].last = True
    elif kind == "no-last":
        messages[-1].last = False
    elif kind == "outside":  # Bytes between two frames.
        messages.insert(4, pb.FramesChunk(data=b"stray"))
    elif kind == "extra":
        messages[-1].last = False
        messages += _frame(2, FRAME_2)
        messages[-1].last = True
    elif kind == "unended":  # A frame begins while the one before has not ended.
        messages[3].frame_end = False
    elif kind == "data-loss":  # The owner's copy failed a check mid-stream.
        messages = messages[:5]
        status = grpc.StatusCode.DATA_LOSS
    return messages, status


class _Frames(pb_grpc.DataServicer):
    """Answers FetchFrames with the messages it is given (then, optionally, a status)."""

    def __init__(self) -> None:
        self.messages: list[pb.FramesChunk] = []
        self.status: grpc.StatusCode | None = None
        self.calls = 0

    async def FetchFrames(self, request: pb.FetchFramesRequest, context: Any) -> AsyncIterator[pb.FramesChunk]:
        self.calls += 1
        for message in self.messages:
            yield message
        if self.status is not None:
            await context.abort(self.status, "broken")


def _transport(address: str) -> tuple[GrpcTransport, Channels]:
    host, port = address.split(":")
    channels = Channels()
    member = MemberInfo(node_id="target", peer_host=host, peer_port=int(port))
    return GrpcTransport(channels, lambda node_id: member if node_id == "target" else None, _envelope), channels


async def _serve(servicer: pb_grpc.DataServicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_DataServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _collect(transport: GrpcTransport, pieces: list[int | bytes]) -> None:
    async for piece in transport.fetch_frames("target", "1.2.3", "1.2.3.4", [1, 2], timeout_ms=10_000):
        pieces.append(piece)


def test_an_honest_answer_comes_whole() -> None:
    async def run() -> list[int | bytes]:
        servicer = _Frames()
        servicer.messages = _honest()
        server, address = await _serve(servicer)
        transport, channels = _transport(address)
        pieces: list[int | bytes] = []
        try:
            await _collect(transport, pieces)
        finally:
            await channels.close()
            await server.stop(None)
        return pieces

    assert asyncio.run(run()) == [1, FRAME_1, TAIL, 2, FRAME_2, TAIL]


@pytest.mark.parametrize("kind", ["size", "crc", "number", "short", "no-last", "outside", "extra", "unended",
                                  "data-loss"])
def test_a_lying_or_broken_answer_is_an_error_and_never_complete(kind: str) -> None:
    async def run() -> tuple[list[int | bytes], BaseException | None]:
        servicer = _Frames()
        servicer.messages, servicer.status = _lie(kind)
        server, address = await _serve(servicer)
        transport, channels = _transport(address)
        pieces: list[int | bytes] = []
        raised: BaseException | None = None
        try:
            await _collect(transport, pieces)
        except PeerError as error:
            raised = error
        finally:
            await channels.close()
            await server.stop(None)
        return pieces, raised

    pieces, raised = asyncio.run(run())
    assert raised is not None, (kind, pieces)
    assert pieces != [1, FRAME_1, TAIL, 2, FRAME_2, TAIL]
    if kind in ("size", "crc", "no-last", "extra"):  # The last frame's last bytes never came out.
        assert pieces == [1, FRAME_1, TAIL, 2, FRAME_2], pieces


@pytest.mark.parametrize(("outcome", "expected"), [
    (pb.FRAMES_OUTCOME_NO_FRAME, FrameNotFound),
    (pb.FRAMES_OUTCOME_LIST_REFUSED, FrameListRefused),
    (pb.FRAMES_OUTCOME_NOT_HELD, FramesNotHeld),
    (pb.FRAMES_OUTCOME_UNREADABLE, FramesNotHeld),
    (pb.FRAMES_OUTCOME_UNSPECIFIED, PeerError),
])
def test_outcomes_are_typed(outcome: int, expected: type[BaseException]) -> None:
    async def run() -> None:
        servicer = _Frames()
        servicer.messages = [pb.FramesChunk(envelope=_envelope()), pb.FramesChunk(outcome=outcome, message="why")]
        server, address = await _serve(servicer)
        transport, channels = _transport(address)
        try:
            with pytest.raises(expected):
                await _collect(transport, [])
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(run())


def test_a_peer_without_fetch_frames_is_unsupported_and_not_asked_again_at_once() -> None:
    async def run() -> None:
        server, address = await _serve(pb_grpc.DataServicer())  # Every method UNIMPLEMENTED.
        transport, channels = _transport(address)
        try:
            with pytest.raises(FramesUnsupported):
                await _collect(transport, [])
            with pytest.raises(FramesUnsupported):
                await _collect(transport, [])
            assert transport.frames_calls == 1  # The second was not sent.
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(run())
