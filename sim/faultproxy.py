"""A fault-injecting TCP proxy for the chaos runner: one listening port per directed link.

Node A reaches node B's peer port through the link "A>B" (A's `--peer-route` sends it
there), so the runner can cut, slow or reset traffic between chosen nodes while they
run, without root and without touching the kernel's firewall:

- `block(link)`: bytes stop moving both ways on the link's connections (held, not
  dropped, as TCP holds unacknowledged segments), and new connections hang the same
  way. A call over a blocked link runs into its deadline, as across a real partition.
- `unblock(link)`: held bytes move again, in order; connections that outlived the cut
  carry on (TCP retransmission), the others were closed by their owners meanwhile.
- `delay(link, ms, jitter_ms)`: a one-way latency, as on a WAN link: each chunk is passed
  on `ms` (plus or minus up to `jitter_ms`, uniform, from the proxy's seeded random) after
  it arrived, in order (a chunk never overtakes an earlier one), and chunks in flight do
  not wait for each other: a delayed link still carries its full rate.
- `base_delay(link, ms, jitter_ms)`: the link's own latency, kept across `heal_all`
  (the chaos runner gives links between sites a WAN latency this way).
- `reset(link)`: every open connection of the link is closed at once (a peer's RST).

Everything runs on one asyncio loop in a daemon thread; the control methods are safe to
call from any thread and take effect before they return.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

CHUNK_BYTES = 65_536
IN_FLIGHT_CHUNKS = 64  # Per direction of a connection: 4 MiB in flight, then the reader waits.


@dataclass
class LinkStats:
    connections: int = 0
    refused: int = 0            # The target was down: the client's connection was closed at once.
    bytes_forward: int = 0      # Client -> target.
    bytes_backward: int = 0     # Target -> client.


@dataclass
class _Link:
    name: str
    target_host: str
    target_port: int
    listen_port: int = 0
    open: asyncio.Event = field(default_factory=asyncio.Event)
    delay_s: float = 0.0
    jitter_s: float = 0.0
    base: tuple[float, float] = (0.0, 0.0)  # (delay_s, jitter_s) the link has when healed: its WAN latency.
    stats: LinkStats = field(default_factory=LinkStats)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    server: asyncio.AbstractServer | None = None


class FaultProxy:
    """Directed TCP links on 127.0.0.1, each with its own fault switch."""

    def __init__(self, host: str = "127.0.0.1", seed: int = 0) -> None:
        self.host = host
        self._random = random.Random(seed)  # Jitter draws: one seed, one run.
        self._loop = asyncio.new_event_loop()
        self._links: dict[str, _Link] = {}
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ control (any thread)
    def _call(self, make: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout_s)

    def add_link(self, name: str, target_host: str, target_port: int) -> int:
        """Open a link to target; returns the port to dial instead of the target."""
        return int(self._call(lambda: self._add(name, target_host, target_port)))

    def block(self, name: str) -> None:
        self._call(lambda: self._set_open(name, False))

    def unblock(self, name: str) -> None:
        self._call(lambda: self._set_open(name, True))

    def delay(self, name: str, ms: float, jitter_ms: float = 0.0) -> None:
        """Each chunk on the link arrives ms +- jitter_ms after it was sent (ms >= jitter_ms)."""
        if not 0 <= jitter_ms <= ms:
            raise ValueError(f"need 0 <= jitter_ms <= ms, got ms={ms} jitter_ms={jitter_ms}")
        self._call(lambda: self._set_delay(name, ms / 1000.0, jitter_ms / 1000.0))

    def base_delay(self, name: str, ms: float, jitter_ms: float = 0.0) -> None:
        """The link's own latency (a WAN link's): set now, and restored by `heal_all`."""
        self.delay(name, ms, jitter_ms)
        self._call(lambda: self._set_base(name, ms / 1000.0, jitter_ms / 1000.0))

    def reset(self, name: str) -> None:
        self._call(lambda: self._reset(name))

    def heal_all(self) -> None:
        for name in list(self._links):
            self.unblock(name)
            delay_s, jitter_s = self._links[name].base
            self.delay(name, delay_s * 1000.0, jitter_s * 1000.0)

    def blocked(self) -> list[str]:
        return sorted(name for name, link in self._links.items() if not link.open.is_set())

    def port(self, name: str) -> int:
        return self._links[name].listen_port

    def stats(self) -> dict[str, LinkStats]:
        return {name: LinkStats(**vars(link.stats)) for name, link in self._links.items()}

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._close_all)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop's side
    async def _add(self, name: str, target_host: str, target_port: int) -> int:
        if name in self._links:
            raise ValueError(f"link {name!r} exists")
        link = _Link(name=name, target_host=target_host, target_port=target_port)
        link.open.set()
        link.server = await asyncio.start_server(lambda r, w: self._serve(link, r, w), self.host, 0)
        link.listen_port = int(link.server.sockets[0].getsockname()[1])
        self._links[name] = link
        return link.listen_port

    async def _set_open(self, name: str, value: bool) -> None:
        link = self._links[name]
        if value:
            link.open.set()
        else:
            link.open.clear()

    async def _set_delay(self, name: str, seconds: float, jitter_s: float) -> None:
        link = self._links[name]
        link.delay_s = max(0.0, seconds)
        link.jitter_s = max(0.0, jitter_s)

    async def _set_base(self, name: str, delay_s: float, jitter_s: float) -> None:
        self._links[name].base = (delay_s, jitter_s)

    async def _reset(self, name: str) -> None:
        for writer in list(self._links[name].writers):
            _abort(writer)

    async def _close_all(self) -> None:
        for link in self._links.values():
            if link.server is not None:
                link.server.close()
            for writer in list(link.writers):
                _abort(writer)
            link.open.set()  # Wake every pump so it sees its connection gone.

    async def _serve(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link.stats.connections += 1
        await link.open.wait()  # A connection made across a cut hangs until the cut heals.
        try:
            target_reader, target_writer = await asyncio.open_connection(link.target_host, link.target_port)
        except OSError:
            link.stats.refused += 1
            _abort(writer)
            return
        link.writers.update((writer, target_writer))
        try:
            await asyncio.gather(self._pump(link, reader, target_writer, forward=True),
                                 self._pump(link, target_reader, writer, forward=False))
        finally:
            link.writers.discard(writer)
            link.writers.discard(target_writer)
            _abort(writer)
            _abort(target_writer)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *, forward: bool) -> None:
        """Read chunks, stamp each with the time it is due, hand them on at that time.

        The reader stamps and queues; the sender waits for each chunk's due time. Due times
        never go backwards (a chunk with less jitter waits for the one before it), so the
        stream stays in order, and a chunk's wait overlaps the earlier chunks' waits.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=IN_FLIGHT_CHUNKS)
        sender = asyncio.ensure_future(self._send(link, queue, writer, forward=forward))
        last_due = 0.0
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                await link.open.wait()
                latency = link.delay_s
                if link.jitter_s:
                    latency += self._random.uniform(-link.jitter_s, link.jitter_s)
                last_due = max(loop.time() + latency, last_due)
                await queue.put((last_due, data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put(None)
            await sender
            _abort(writer)

    async def _send(self, link: _Link, queue: asyncio.Queue[tuple[float, bytes] | None],
                    writer: asyncio.StreamWriter, *, forward: bool) -> None:
        """Pass chunks on at their due time; once the writer is gone, drain and drop them."""
        loop = asyncio.get_running_loop()
        broken = False
        while (item := await queue.get()) is not None:
            if broken:
                continue  # Keep taking, so that the reader never waits on a full queue.
            due, data = item
            try:
                await link.open.wait()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                    await link.open.wait()
                if writer.is_closing():
                    broken = True
                    continue
                if forward:  # Counted as handed on, before the receiver can see them.
                    link.stats.bytes_forward += len(data)
                else:
                    link.stats.bytes_backward += len(data)
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                broken = True
                _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close at once (RST rather than FIN when data is pending): a reset, not a goodbye."""
    transport = writer.transport
    if transport is not None and not transport.is_closing():
        transport.abort()
