"""SimNetwork: every message between simulated nodes, on the virtual clock.

One seeded `random.Random` decides every latency, jitter, loss and reordering, so the
same seed gives the same network. Two kinds of traffic cross it:

- SWIM requests (`swim_call`): node/swim_membership.py's driver sends each request as one
  call, as a node sends a Membership RPC, and the target's driver answers it
  (`SwimMembership.answer`); the reply comes back as the call's result. They ride the
  same calls as the data path, below (a lost message costs a retransmission, a call to a
  process that is down is refused after a round trip, a cut one fails at its deadline).
- data-path calls, the methods of replication/transport.py's `Transport` (store, fetch,
  query) and replication/repair.py's `RepairTransport` (range_digest, list_bucket,
  fetch): a request travels to the target, the target's handler runs (after its disk
  latency, paused while the target is paused), and the reply travels back. The caller
  gets `PeerError` when the target's process is down (refused, after a round trip),
  when the request or the reply is lost or cut by a partition (at the call's deadline:
  `timeout_ms` on the virtual clock, as a black-holed TCP connection looks), or when
  the reply does not come back before that deadline. Data calls ride TCP (gRPC), so
  by default (`rpc_loss="retransmit"`) a lost message costs a retransmission timeout
  (200 ms, doubling) rather than the call, and only a message lost
  `retransmissions_max` times in a row is gone (the caller then fails at its deadline).
  `rpc_loss="drop"` drops data messages like datagrams: harsher, for stress runs.

Link model: a one-way latency per link (within a site or between sites) plus uniform
jitter, plus serialisation time at the link bandwidth (size / bytes per second), plus,
with probability `reorder`, an extra random delay (so later messages overtake it).
Partitions are lists of (side A, side B, one_way) rules checked when a message is sent:
random halves, one-way, a site cut from the rest, and a bridge (two halves that both
still reach one node) are built by the helpers below.

`SimNetwork.transport(node_id)` returns the node's `NodeTransport`: what the real
Coordinator and Repairer are given as their transport.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pacsnode.replication.correction import Correction
from pacsnode.replication.delete_coordinator import DeleteScope
from pacsnode.replication.digest import Digest
from pacsnode.replication.hlc import Version
from pacsnode.replication.matching import Query
from pacsnode.replication.model import Attributes, StoredInstance, Tombstone
from pacsnode.replication.transport import PeerError, StoreReply
from pacsnode.ring.placement import TokenRange
from pacsnode.ring.swim import Message, message_bytes

Entry = tuple[str, str, str]


@dataclass
class LinkModel:
    """Latency, bandwidth and loss of the simulated links. Changed by faults while running."""

    lan_latency_ms: float = 0.25  # One way, between two nodes of one site.
    wan_latency_ms: float = 15.0  # One way, between sites.
    jitter_ms: float = 0.25  # Uniform extra delay in [0, jitter_ms] within a site.
    wan_jitter_ms: float = 2.5  # The same between sites.
    lan_bytes_per_second: float = 120e6  # ~1 Gb/s.
    wan_bytes_per_second: float = 12e6  # ~100 Mb/s.
    loss: float = 0.0  # Probability that one message is dropped.
    reorder: float = 0.0  # Probability that a message is held back by up to reorder_delay_ms.
    reorder_delay_ms: float = 20.0
    rpc_loss: str = "retransmit"  # Data calls: "retransmit" (TCP: a lost message costs an RTO) or "drop".
    retransmission_timeout_ms: float = 200.0  # TCP's minimum RTO; doubles on every retry.
    retransmissions_max: int = 6  # Then the connection is given up (the caller fails at its deadline).


class Endpoint(Protocol):
    """A node's running process, as the network sees it (sim/cluster.py's `_Process`)."""

    node_id: str

    def deliver(self, callback: Callable[[], None]) -> None:
        """Run `callback` now, or when the process resumes if it is paused."""
        ...

    def spawn(self, coroutine: Any) -> None:
        """Run a coroutine as part of this process (cancelled if the process dies)."""
        ...

    async def wait_running(self) -> None:
        """Return when the process is running (not paused); CancelledError if it died."""
        ...

    def ring_version(self) -> int:
        """The version of the node's ring now: what its envelopes carry (node/peer_wire.py)."""
        ...

    async def handle(self, method: str, args: tuple[Any, ...], sender_id: str, ring_version: int) -> tuple[Any, int]:
        """Serve one data call from `sender_id`, whose ring had `ring_version` when it sent
        it: (result, reply size in bytes). Raises PeerError to refuse."""
        ...


@dataclass(frozen=True)
class PartitionRule:
    side_a: frozenset[str]
    side_b: frozenset[str]
    one_way: bool = False  # True: only messages from A to B are cut.

    def blocks(self, source: str, target: str) -> bool:
        if source in self.side_a and target in self.side_b:
            return True
        return not self.one_way and source in self.side_b and target in self.side_a


@dataclass
class Traffic:
    """Counters of what crossed the network, for the reports."""

    messages: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dropped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    refused: int = 0
    deadlines: int = 0
    swim_bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # By node.
    wan_bytes: int = 0
    wan_bytes_by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # data.store, reply.fetch...


class Trace:
    """A running hash of everything that happened, in order: same seed, same hash."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self._pending: list[str] = []  # Lines not hashed yet (hashed in batches: the same digest).
        self.events = 0

    def record(self, *fields: object) -> None:
        pending = self._pending
        pending.append("|".join(map(str, fields)))
        self.events += 1
        if len(pending) >= 4096:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._pending.append("")  # Every line ends with a newline, as one update per line gave.
            self._hash.update("\n".join(self._pending).encode())
            self._pending.clear()

    def hexdigest(self) -> str:
        self._flush()
        return self._hash.hexdigest()


class SimNetwork:
    def __init__(self, loop: asyncio.AbstractEventLoop, seed: int, model: LinkModel | None = None,
                 trace: Trace | None = None) -> None:
        self.loop = loop
        self.model = model or LinkModel()
        self.rng = random.Random(f"{seed}:network")
        self.trace = trace or Trace()
        self.traffic = Traffic()
        self.rules: list[PartitionRule] = []
        self._sites: dict[str, str] = {}
        self._endpoints: dict[str, Callable[[], Endpoint | None]] = {}
        self._by_address: dict[str, str] = {}
        self._transports: dict[str, NodeTransport] = {}
        # When a list: every data call as (source, target, method), for tests and reports
        # that count who a request asked (e.g. peers per one-study retrieve).
        self.call_log: list[tuple[str, str, str]] | None = None

    # ----------------------------------------------------------------- nodes
    def register(self, node_id: str, site: str, address: str, endpoint: Callable[[], Endpoint | None]) -> None:
        """`endpoint()` returns the node's running process, or None while it is down."""
        self._sites[node_id] = site
        self._endpoints[node_id] = endpoint
        self._by_address[address] = node_id

    def transport(self, node_id: str) -> "NodeTransport":
        """The Transport + RepairTransport the node's coordinator and repairer call through."""
        transport = self._transports.get(node_id)
        if transport is None:
            transport = self._transports[node_id] = NodeTransport(self, node_id)
        return transport

    def site_of(self, node_id: str) -> str:
        return self._sites.get(node_id, "")

    def _endpoint(self, node_id: str) -> Endpoint | None:
        resolve = self._endpoints.get(node_id)
        return None if resolve is None else resolve()

    # ----------------------------------------------------------------- partitions
    def blocked(self, source: str, target: str) -> bool:
        return any(rule.blocks(source, target) for rule in self.rules)

    def partition(self, side_a: Iterable[str], side_b: Iterable[str], *, one_way: bool = False) -> PartitionRule:
        rule = PartitionRule(frozenset(side_a), frozenset(side_b), one_way)
        self.rules.append(rule)
        self.trace.record(self.loop.time(), "partition", sorted(rule.side_a), sorted(rule.side_b), one_way)
        return rule

    def partition_random_halves(self, node_ids: Sequence[str], rng: random.Random) -> PartitionRule:
        shuffled = sorted(node_ids)
        rng.shuffle(shuffled)
        half = len(shuffled) // 2
        return self.partition(shuffled[:half], shuffled[half:])

    def partition_site(self, site: str, node_ids: Sequence[str]) -> PartitionRule:
        inside = [n for n in node_ids if self._sites.get(n) == site]
        outside = [n for n in node_ids if self._sites.get(n) != site]
        return self.partition(inside, outside)

    def partition_bridge(self, node_ids: Sequence[str], rng: random.Random) -> tuple[PartitionRule, str]:
        """Two halves cut from each other, and one node (the bridge) that both still reach."""
        shuffled = sorted(node_ids)
        rng.shuffle(shuffled)
        bridge, rest = shuffled[0], shuffled[1:]
        half = len(rest) // 2
        return self.partition(rest[:half], rest[half:]), bridge

    def heal(self) -> None:
        self.rules.clear()
        self.trace.record(self.loop.time(), "heal")

    # ----------------------------------------------------------------- the link
    def _delay_s(self, source: str, target: str, size_bytes: int, *, stream: bool = False, kind: str = ""
                 ) -> float | None:
        """One-way delay of a message, or None when it is lost or cut. `stream`: it rides TCP."""
        model = self.model
        rng = self.rng
        if self.rules and self.blocked(source, target):
            return None
        retransmit_ms = 0.0
        if model.loss and rng.random() < model.loss:
            if not stream or model.rpc_loss != "retransmit":
                return None
            timeout_ms = model.retransmission_timeout_ms
            for attempt in range(model.retransmissions_max):
                retransmit_ms += timeout_ms
                timeout_ms *= 2
                if rng.random() >= model.loss:
                    break
            else:
                return None
        same_site = self._sites.get(source) == self._sites.get(target)
        if same_site:
            delay_ms = model.lan_latency_ms + rng.random() * model.jitter_ms
            delay_ms += 1000 * size_bytes / model.lan_bytes_per_second
        else:
            delay_ms = model.wan_latency_ms + rng.random() * model.wan_jitter_ms
            delay_ms += 1000 * size_bytes / model.wan_bytes_per_second
            self.traffic.wan_bytes += size_bytes
            self.traffic.wan_bytes_by_kind[kind] += size_bytes
        if model.reorder and rng.random() < model.reorder:
            delay_ms += rng.random() * model.reorder_delay_ms
        return (delay_ms + retransmit_ms) / 1000

    def _count(self, kind: str, size_bytes: int, delivered: bool) -> None:
        traffic = self.traffic
        if delivered:
            traffic.messages[kind] += 1
            traffic.bytes[kind] += size_bytes
        else:
            traffic.dropped[kind] += 1

    # ----------------------------------------------------------------- SWIM requests
    async def swim_call(self, source: Endpoint, target_id: str, address: str, message: Message,
                        timeout_ms: int) -> tuple[str, Message | None]:
        """One SWIM request from `source` (node/swim_membership.py's carriage): (the answering
        node, its reply). The target's `handle("swim", ...)` answers it; PeerError as `call`."""
        target = target_id or self._by_address.get(address, "")
        size = message_bytes(message)
        self.traffic.swim_bytes_sent[source.node_id] += size
        if not target or target == source.node_id or target not in self._endpoints:
            await asyncio.sleep(0)
            raise PeerError(f"{address or target_id}: no such node")
        deadline_s = self.loop.time() + max(timeout_ms, 0) / 1000
        reply = await self.call(source, target, "swim", (message, deadline_s), size, timeout_ms,
                                kind="swim." + type(message).__name__)
        return target, reply

    def now_us(self) -> int:
        return round(self.loop.time() * 1_000_000)

    # ----------------------------------------------------------------- data calls
    async def call(self, source: Endpoint, target: str, method: str, args: tuple[Any, ...], request_bytes: int,
                   timeout_ms: int, *, kind: str = "") -> Any:
        """One request/reply call from `source` to `target` (see the module docstring)."""
        await source.wait_running()  # A paused node sends nothing until it resumes.
        if self.call_log is not None and method != "swim":
            self.call_log.append((source.node_id, target, method))
        loop = self.loop
        kind = kind or "data." + method
        future: asyncio.Future[Any] = loop.create_future()
        deadline = loop.call_later(max(timeout_ms, 0) / 1000, self._expire, future, target, method, timeout_ms)
        if target not in self._endpoints:
            deadline.cancel()
            raise PeerError(f"unknown node {target}")
        delay = self._delay_s(source.node_id, target, request_bytes, stream=True, kind=kind)
        self._count(kind, request_bytes, delay is not None)
        if delay is not None:
            loop.call_at(loop.time() + delay, self._arrive_call, source, target, method, args, future, kind,
                         source.ring_version())
        try:
            return await future
        finally:
            deadline.cancel()

    def _expire(self, future: asyncio.Future[Any], target: str, method: str, timeout_ms: int) -> None:
        if not future.done():
            self.traffic.deadlines += 1
            future.set_exception(PeerError(f"{target}: {method} deadline of {timeout_ms} ms exceeded"))

    def _arrive_call(self, source: Endpoint, target: str, method: str, args: tuple[Any, ...],
                     future: asyncio.Future[Any], kind: str, ring_version: int) -> None:
        endpoint = self._endpoint(target)
        if endpoint is None:  # Process down: connection refused, known one round trip later.
            self.traffic.refused += 1
            back = self._delay_s(target, source.node_id, 64, stream=True, kind="refused")
            if back is not None:
                error = PeerError(f"{target}: connection refused (node down)")
                self.loop.call_at(self.loop.time() + back, self._reply, source, future, None, error)
            return
        self.trace.record(self.now_us(), source.node_id, target, kind)
        endpoint.deliver(lambda: endpoint.spawn(self._serve(endpoint, source, method, args, future, ring_version)))

    async def _serve(self, endpoint: Endpoint, source: Endpoint, method: str, args: tuple[Any, ...],
                     future: asyncio.Future[Any], ring_version: int) -> None:
        result: Any = None
        error: BaseException | None = None
        size = 96
        try:
            result, size = await endpoint.handle(method, args, source.node_id, ring_version)
        except PeerError as refused:
            error = refused
        delay = self._delay_s(endpoint.node_id, source.node_id, size, stream=True, kind="reply." + method)
        self._count("reply." + method, size, delay is not None)
        if method == "swim":
            self.traffic.swim_bytes_sent[endpoint.node_id] += size
        if delay is None:
            return  # The caller finds out at its deadline.
        self.loop.call_at(self.loop.time() + delay, self._reply, source, future, result, error)

    def _reply(self, source: Endpoint, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        source.deliver(settle)


class NodeTransport:
    """One node's side of the network: replication's `Transport` and `RepairTransport`.

    The calling process is looked up at each call, so the transport outlives restarts; a
    call made by a task of a process that has since died raises CancelledError (a dead
    process runs no more code), never a PeerError the real code would act on.
    """

    def __init__(self, network: SimNetwork, node_id: str) -> None:
        self._network = network
        self.node_id = node_id
        self.process: Callable[[], Endpoint | None] = lambda: None
        self.observe: Callable[[Version], None] = lambda version: None  # The running process's hlc.observe.
        self.calls = 0

    def _source(self) -> Endpoint:
        process = self.process()
        if process is None:
            raise asyncio.CancelledError(f"{self.node_id} is down")
        return process

    async def _call(self, target: str, method: str, args: tuple[Any, ...], request_bytes: int, timeout_ms: int
                    ) -> Any:
        self.calls += 1
        return await self._network.call(self._source(), target, method, args, request_bytes, timeout_ms)

    # ----------------------------------------------------------------- SWIM carriage
    async def swim_call(self, target_id: str, address: str, message: Message, *, timeout_ms: int
                        ) -> tuple[str, Message | None]:
        """One of the node's SWIM requests (see SimNetwork.swim_call)."""
        return await self._network.swim_call(self._source(), target_id, address, message, timeout_ms)

    # ----------------------------------------------------------------- Transport
    async def store(self, target: str, stored: StoredInstance, *, hint_for: str, timeout_ms: int) -> StoreReply:
        size = len(stored.blob) + 200 + 40 * len(stored.attributes)
        result: tuple[str, Version | None] = await self._call(target, "store", (stored, hint_for), size, timeout_ms)
        outcome, tombstone_version = result
        if tombstone_version is not None:  # As StoreReply.tombstone_version: the node's clock observes it.
            self.observe(tombstone_version)
        return StoreReply(outcome, tombstone_version)

    async def tombstone(self, target: str, tombstones: Sequence[Tombstone], *, scope: DeleteScope | None,
                        hint_for: str, timeout_ms: int) -> int:
        size = 200 + 150 * len(tombstones)
        removed: int = await self._call(target, "tombstone", (list(tombstones), scope, hint_for), size, timeout_ms)
        return removed

    async def correct(self, target: str, correction: Correction, *, timeout_ms: int, hint_for: str = "") -> bool:
        size = 200 + len(correction.dumps())
        changed: bool = await self._call(target, "correct", (correction, hint_for), size, timeout_ms)
        return changed

    async def fetch(self, target: str, study_instance_uid: str, sop_instance_uid: str, *, timeout_ms: int,
                    include_hints: bool = False, started: Callable[[], None] | None = None) -> StoredInstance | None:
        # One reply message here: the peer is known to be answering when it arrives.
        result: StoredInstance | None = await self._call(
            target, "fetch", (study_instance_uid, sop_instance_uid, include_hints), 160, timeout_ms)
        if started is not None:
            started()
        return result

    async def query(self, target: str, query: Query, ranges: Sequence[TokenRange] | None, *,
                    timeout_ms: int, started: Callable[[], None] | None = None,
                    include_hints: bool = False) -> AsyncIterator[Attributes]:
        size = 200 + 24 * (len(ranges) if ranges is not None else 0)
        rows: list[Attributes] = await self._call(
            target, "query", (query, None if ranges is None else list(ranges), include_hints), size, timeout_ms)
        if started is not None:
            started()
        for row in rows:
            yield row

    # ----------------------------------------------------------------- RepairTransport
    async def range_digest(self, target: str, token_range: TokenRange, *, timeout_ms: int) -> dict[int, Digest]:
        result: dict[int, Digest] = await self._call(target, "range_digest", (token_range,), 120, timeout_ms)
        return result

    async def list_bucket(self, target: str, token_range: TokenRange, segment: int, *,
                          timeout_ms: int) -> list[Entry]:
        result: list[Entry] = await self._call(target, "list_bucket", (token_range, segment), 128, timeout_ms)
        return result
