"""StoreStreams: the copies of a write sent over one long-lived Data.StoreStream per peer.

A copy is one message on a stream that stays open, not a gRPC call of its own: a unary
call costs each side its own call set-up, metadata and status on top of the message
(measured 0.22 + 0.37 ms of CPU per 132 KB copy against 0.15 + 0.18 ms on a stream,
bench/README.md "Cluster copies over one stream"). The stream runs on the peer's channel
(node/grpc_transport.py Channels), so mutual TLS, the fault proxy's routes and the
reconnect settings are the ones every other call uses, and the receiver checks each
request's envelope as it checks a call's (node/peer_server.py DataService.StoreStream).

Each copy keeps what a call had:
- its own deadline (`timeout_s`): waiting for a place in the queue, the write and the
  reply all count; at the deadline it is PeerError, as a call's DEADLINE_EXCEEDED, and a
  request not yet written by then is never sent;
- its own typed answer: the reply with its id, as StoreWholeInstance's, or PeerError when
  the stream broke before it came (the peer went away, reset, or answered nonsense) and
  StreamUnavailable when the peer predates StoreStream (the caller sends that copy by
  StoreWholeInstance, and keeps doing so for NO_STREAM_RECHECK_S);
- back-pressure: at most STORE_STREAM_QUEUE_MAX requests wait to be written per peer; the
  receiver reads at most STORE_STREAM_IN_FLIGHT_MAX unanswered ones, and HTTP/2 flow
  control holds the writer beyond that.

A broken stream is dropped and the next copy opens a new one. A peer's reply with an id
that is not waiting (late, repeated or made up) is ignored.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import grpc

from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.replication.transport import PeerError, cancelled_by_caller

log = logging.getLogger(__name__)

# Requests waiting to be written on one peer's stream; a copy past them waits (within its
# deadline) for a place.
STORE_STREAM_QUEUE_MAX = 64
# A peer that answered StoreStream with UNIMPLEMENTED (a node from before it) is sent
# StoreWholeInstance calls; it is asked again after this long (it may have been upgraded).
NO_STREAM_RECHECK_S = 300.0


class StreamUnavailable(Exception):
    """The peer does not serve Data.StoreStream: send this copy another way."""


def _describe(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"


class _PeerStream:
    """One open StoreStream call: a writer task, a reader task, the unanswered requests."""

    def __init__(self, channel: grpc.aio.Channel, label: str) -> None:
        self.channel = channel
        self._label = label  # The peer's node id (or address) for errors and logs.
        self._call: Any = pb_grpc.DataStub(channel).StoreStream()
        self._queue: asyncio.Queue[pb.StoreStreamRequest | None] = asyncio.Queue(maxsize=STORE_STREAM_QUEUE_MAX)
        self._pending: dict[int, asyncio.Future[pb.StoreReply]] = {}
        self._ids = itertools.count(1)
        self.broken: Exception | None = None  # Set once: no copy is sent on it after that.
        self._finishing = False
        self._writer = asyncio.create_task(self._write_loop())
        self._reader = asyncio.create_task(self._read_loop())

    @property
    def done(self) -> bool:
        return self._reader.done()

    async def store(self, request: pb.StoreStreamRequest, timeout_s: float) -> pb.StoreReply:
        if self.broken is not None:
            raise self._error(self.broken)
        request_id = next(self._ids)
        request.request_id = request_id
        future: asyncio.Future[pb.StoreReply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with asyncio.timeout(timeout_s):
                if self._queue.full():
                    await self._put_when_room(request, future)
                else:
                    self._queue.put_nowait(request)
                return await future
        except TimeoutError:
            raise PeerError(f"{self._label}: DEADLINE_EXCEEDED: no answer to the copy within "
                            f"{timeout_s * 1000:.0f} ms") from None
        except (PeerError, StreamUnavailable) as error:
            raise self._error(error) from None
        finally:
            del self._pending[request_id]
            if not future.done():
                future.cancel()  # The writer skips a request whose copy gave up.

    async def _put_when_room(self, request: pb.StoreStreamRequest, future: asyncio.Future[pb.StoreReply]) -> None:
        """Queue `request` once there is room, unless its answer fails first (the stream
        broke: then a full queue would never empty)."""
        put = asyncio.ensure_future(self._queue.put(request))
        try:
            await asyncio.wait((put, future), return_when=asyncio.FIRST_COMPLETED)
        finally:
            put.cancel()

    def _error(self, error: Exception) -> Exception:
        """A fresh exception for each copy (one stream failure fails many)."""
        return StreamUnavailable(str(error)) if isinstance(error, StreamUnavailable) else PeerError(str(error))

    async def _write_loop(self) -> None:
        try:
            while True:
                request = await self._queue.get()
                if request is None:  # finish(): no more requests on this stream.
                    await self._call.done_writing()
                    return
                future = self._pending.get(request.request_id)
                if future is None or future.done():
                    continue  # Its copy gave up (deadline) before it was written: not sent.
                await self._call.write(request)
        except asyncio.CancelledError:
            if cancelled_by_caller():
                raise
            self._call.cancel()
        except Exception as error:  # The call ended (the reader reports its status) or broke.
            log.debug("peer.store_stream.write_failed target=%s error=%r", self._label, error)
            self._call.cancel()

    async def _read_loop(self) -> None:
        error: Exception = PeerError(f"{self._label}: the store stream ended")
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    break
                future = self._pending.get(message.request_id)
                if future is None or future.done():
                    continue  # Late (its copy gave up), repeated or made up: nothing waits for it.
                if message.HasField("reply"):
                    future.set_result(message.reply)
                else:
                    future.set_exception(PeerError(f"{self._label}: the copy failed on the peer"))
        except grpc.aio.AioRpcError as failure:
            if failure.code() == grpc.StatusCode.UNIMPLEMENTED:
                error = StreamUnavailable(f"{self._label}: no StoreStream there")
            else:
                error = PeerError(f"{self._label}: {_describe(failure)}")
        except asyncio.CancelledError:
            if cancelled_by_caller():
                error = PeerError(f"{self._label}: the store stream was closed")
                raise
            error = PeerError(f"{self._label}: the store stream was cancelled underneath us")
        except Exception as failure:  # A reply that does not parse: the peer is broken.
            error = PeerError(f"{self._label}: bad store stream reply: {failure!r}")
        finally:
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        if self.broken is None:
            self.broken = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._error(error))
        while not self._queue.empty():  # A copy waiting for a place gets one, and finds its answer failed.
            self._queue.get_nowait()
        self._writer.cancel()
        self._call.cancel()

    def finish(self) -> None:
        """No new copies here: the writer half-closes the stream after those queued, and the
        replies still due are read until the peer ends it."""
        if self.broken is None:
            self.broken = PeerError(f"{self._label}: the store stream is being replaced")
        if not self._finishing:
            self._finishing = True
            try:
                self._queue.put_nowait(None)
            except asyncio.QueueFull:  # A full queue of copies that will wait: end it now.
                self._fail(PeerError(f"{self._label}: the store stream was replaced"))

    async def close(self) -> None:
        self._fail(PeerError(f"{self._label}: the store stream was closed"))
        for task in (self._writer, self._reader):
            task.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)


class StoreStreams:
    """One StoreStream per peer address, on that address's current channel."""

    def __init__(self) -> None:
        self._streams: dict[str, _PeerStream] = {}
        self._finishing: set[_PeerStream] = set()  # Replaced streams still reading their replies.
        self._unavailable_until: dict[str, float] = {}  # Address -> monotonic time to ask again.
        self.opened = 0

    def available(self, address: str) -> bool:
        """False while `address` is known not to serve StoreStream (NO_STREAM_RECHECK_S)."""
        return self._unavailable_until.get(address, 0.0) <= time.monotonic()

    def _stream(self, address: str, channel: grpc.aio.Channel, label: str) -> _PeerStream:
        stream = self._streams.get(address)
        if stream is not None and stream.broken is None and stream.channel is channel:
            return stream
        if stream is not None:
            self._retire(stream)
        stream = self._streams[address] = _PeerStream(channel, label)
        self.opened += 1
        return stream

    def _retire(self, stream: _PeerStream) -> None:
        stream.finish()
        if not stream.done:
            self._finishing.add(stream)
        self._finishing = {s for s in self._finishing if not s.done}

    async def store(self, address: str, channel: grpc.aio.Channel, label: str, request: pb.StoreStreamRequest,
                    timeout_s: float) -> pb.StoreReply:
        """The peer's reply to one copy. PeerError as a call's failure; StreamUnavailable
        when the peer does not serve StoreStream (the copy was not stored by it)."""
        try:
            return await self._stream(address, channel, label).store(request, timeout_s)
        except StreamUnavailable:
            if self.available(address):
                log.info("peer.store_stream.unimplemented target=%s: sending calls to it", label)
            self._unavailable_until[address] = time.monotonic() + NO_STREAM_RECHECK_S
            raise

    def finish_all(self) -> None:
        """New copies open new streams (new channels after a certificate reload); the old
        ones end once their replies are in."""
        for stream in self._streams.values():
            self._retire(stream)
        self._streams.clear()

    async def close(self) -> None:
        streams = [*self._streams.values(), *self._finishing]
        self._streams.clear()
        self._finishing.clear()
        await asyncio.gather(*(stream.close() for stream in streams), return_exceptions=True)
