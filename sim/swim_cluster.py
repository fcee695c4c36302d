"""SwimCluster: many of the node's SWIM drivers on a small deterministic network. Test harness.

Each member is node/swim_membership.py's `SwimMembership` (the driver `pacsnode start`
runs, over ring/swim.py's Swim) on one `VirtualEventLoop` (sim/loop.py), with its clock,
timers and carriage injected; nothing else of a node runs. It is the harness of the
protocol's unit and property tests (tests/unit/test_swim.py, tests/property/test_swim.py):
the whole simulator (sim/cluster.py) runs the same driver with a store, a coordinator and
a repairer around it.

Virtual milliseconds, one thread; a seeded `random.Random` for the network (loss, latency)
and one per member boot (`random.Random(f"{seed}:{node_id}:{generation}")`): the same seed
gives the same run, so `trace_hash()` identifies it.

The network carries each SWIM request as the node does, one call whose reply is its
result: after a latency (fixed or a uniform range) each way, or lost (`loss`, per message,
each way) or cut (`partition`), in which case the call fails at its deadline. Faults:
`kill` (the process stops; calls to it fail at their deadline, or are refused one round
trip later with `refuse_when_down`), `restart` (a new process, the next generation, joining
through running members), `pause` (a stall: calls to it wait, its timers wait, its own
calls' outcomes wait; then it reads what arrived, then its timers run).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from pacsnode.node.swim_membership import MembershipUnavailable, SwimMembership, TimerHandle
from pacsnode.replication.transport import PeerError
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.swim import Message, State, Swim, SwimConfig, Transition
from pacsnode.sim.loop import VirtualEventLoop, new_loop

TraceEntry = tuple[int, str, str, "str | None", str]  # (at_ms, observer, node_id, old_state, new_state)


def member_info(index: int, *, site: str = "default", generation: int = 1) -> MemberInfo:
    """The test cluster's member `index`: node-NN at 10.0.x.y:7946."""
    node_id = f"node-{index:02d}"
    return MemberInfo(node_id=node_id, peer_host=f"10.0.{index // 200}.{index % 200 + 1}", peer_port=7946,
                      dicom_host=f"10.0.{index // 200}.{index % 200 + 1}", dicom_port=11112, ae_title="PACSNODE",
                      site=site, vnodes=8, generation=generation)


class _Clock:
    """A member's clock: the loop's milliseconds; its timers wait while it is paused."""

    def __init__(self, cluster: "SwimCluster", process: "_Process") -> None:
        self._cluster = cluster
        self._process = process

    def now_ms(self) -> int:
        return self._cluster.loop.now_ms()

    def wall_ms(self) -> int:
        return self._cluster.loop.now_ms()

    def call_at(self, at_ms: int, callback: Callable[[], None]) -> TimerHandle:
        loop = self._cluster.loop
        return loop.call_at(max(at_ms / 1000, loop.time()), self._process.timer_fired, callback)


class _Carrier:
    def __init__(self, cluster: "SwimCluster", process: "_Process") -> None:
        self._cluster = cluster
        self._process = process

    async def call(self, target_id: str, address: str, message: Message, *, timeout_ms: int
                   ) -> tuple[str, Message | None, list[str]]:
        try:
            source, reply = await self._cluster._call(self._process, target_id, address, message, timeout_ms)
        finally:
            await self._process.running()
        return source, reply, []


class _Process:
    """One boot of a member."""

    def __init__(self, cluster: "SwimCluster", info: MemberInfo, seeds: list[str]) -> None:
        self.info = info
        self.cluster = cluster
        self.down = False
        self.paused_until_ms = 0
        self._timers: list[Callable[[], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self.membership = SwimMembership(
            "swim-test", info, seeds, config=cluster.config, clock=_Clock(cluster, self),
            rng=random.Random(f"{cluster.seed}:{info.node_id}:{info.generation}"),
            **(cluster.swim_hooks(info.node_id) if cluster.swim_hooks is not None else {}))
        self.membership.on_transitions.append(self._observe)
        self.carrier = _Carrier(cluster, self)

    @property
    def swim(self) -> Swim:
        return self.membership.swim

    @property
    def paused(self) -> bool:
        return self.paused_until_ms > self.cluster.now_ms

    def _observe(self, events: list[Transition]) -> None:
        node_id = self.info.node_id
        self.cluster.trace.extend((event.at_ms, node_id, event.node_id,
                                   None if event.old_state is None else event.old_state.value,
                                   event.new_state.value) for event in events)

    def timer_fired(self, callback: Callable[[], None]) -> None:
        if self.down:
            return
        if self.paused:
            self._timers.append(callback)
            return
        callback()

    async def up(self) -> bool:
        """Wait while this process is paused; False if it is (or was meanwhile) killed."""
        while not self.down and self.paused:
            waiter: asyncio.Future[None] = self.cluster.loop.create_future()
            self._waiters.append(waiter)
            await waiter
        return not self.down

    async def running(self) -> None:
        """Return once this process runs (not paused); CancelledError if it was killed (a
        dead process runs no more code)."""
        if not await self.up():
            raise asyncio.CancelledError(f"{self.info.node_id} is down")

    def resume(self) -> None:
        if self.down or self.paused:
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # What arrived during the stall is read first...
            if not waiter.done():
                waiter.set_result(None)
        timers, self._timers = self._timers, []

        def overdue() -> None:
            for callback in timers:  # ...then the overdue timers run.
                if not self.down:
                    callback()

        self.cluster.loop.call_soon(overdue)

    def kill(self) -> None:
        self.down = True
        self._timers.clear()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.membership.stopped()
        self.cluster.loop.create_task(self.membership.stop())  # Cancels its calls in flight.


class SwimCluster:
    """N members on a simulated network.

    `sites`: a site name per member (a list), or a number of sites assigned round-robin.
    `bootstrap`: "join" (every member joins through node-00 at time 0, the real path) or
    "full" (every member starts knowing every other member alive, for tests that are not
    about joining).
    """

    _open: list["SwimCluster"] = []  # Not closed yet (close_all, for test fixtures).

    def __init__(self, n: int, config: SwimConfig | None = None, seed: int = 0, *, loss: float = 0.0,
                 latency_ms: int | tuple[int, int] = 1, sites: int | list[str] = 1, bootstrap: str = "join",
                 refuse_when_down: bool = False, swim_hooks: Callable[[str], dict[str, Any]] | None = None
                 ) -> None:
        """`swim_hooks(node_id)`: extra keyword arguments of each member's SwimMembership
        (its `signer` and `verifier`: node/member_signing.py)."""
        SwimCluster._open.append(self)
        self.swim_hooks = swim_hooks
        self.config = config or SwimConfig.lan()
        self.seed = seed
        self.loss = loss
        self.latency_ms = latency_ms
        self.refuse_when_down = refuse_when_down
        self.loop: VirtualEventLoop = new_loop()
        self.trace: list[TraceEntry] = []
        self.delivered = 0
        self.dropped = 0
        self._network_rng = random.Random(f"{seed}:network")
        self._blocked: list[tuple[frozenset[str], frozenset[str]]] = []
        self._by_address: dict[str, str] = {}
        self.processes: dict[str, _Process] = {}
        site_names = sites if isinstance(sites, list) else [f"site-{i % sites}" for i in range(n)]
        infos = [member_info(index, site=site_names[index]) for index in range(n)]
        for info in infos:
            self._by_address[info.peer_address] = info.node_id
        if bootstrap not in ("join", "full"):
            raise ValueError(f"bootstrap must be 'join' or 'full', got {bootstrap!r}")
        seed_address = infos[0].peer_address if infos else ""
        for index, info in enumerate(infos):
            seeds = [seed_address] if bootstrap == "join" and index > 0 else []
            self.processes[info.node_id] = _Process(self, info, seeds)
        if bootstrap == "full":
            everyone = tuple(p.swim.me for p in self.processes.values())
            for process in self.processes.values():
                process.membership.learn(everyone)
        for process in self.processes.values():
            process.membership.start(process.carrier)

    # ----------------------------------------------------------------- views

    @property
    def now_ms(self) -> int:
        return self.loop.now_ms()

    @property
    def nodes(self) -> dict[str, Swim]:
        return {node_id: p.swim for node_id, p in self.processes.items()}

    def running(self) -> list[str]:
        return [node_id for node_id, p in self.processes.items() if not p.down]

    def swim(self, node_id: str) -> Swim:
        return self.processes[node_id].swim

    def membership(self, node_id: str) -> SwimMembership:
        return self.processes[node_id].membership

    def view(self, observer: str, node_id: str) -> State | None:
        return self.processes[observer].swim.state_of(node_id)

    def views_of(self, node_id: str, observers: Iterable[str] | None = None) -> dict[str, State | None]:
        chosen = observers if observers is not None else [o for o in self.running() if o != node_id]
        return {o: self.view(o, node_id) for o in chosen}

    def agree(self, node_id: str, state: State, observers: Iterable[str] | None = None) -> bool:
        return all(s == state for s in self.views_of(node_id, observers).values())

    def converged(self) -> bool:
        """Every running member sees every running member alive, and all hold the same ring."""
        running = self.running()
        rings = set()
        for observer in running:
            swim = self.processes[observer].swim
            if any(swim.state_of(other) is not State.ALIVE for other in running):
                return False
            rings.add(tuple((m.node_id, m.generation) for m in swim.ring_members()))
        return len(rings) == 1

    def first_seen(self, observer: str, node_id: str, state: State, after_ms: int = 0) -> int | None:
        """When `observer` first saw `node_id` enter `state` at or after `after_ms`."""
        for at_ms, who, about, _, new in self.trace:
            if at_ms >= after_ms and who == observer and about == node_id and new == state:
                return at_ms
        return None

    def transitions(self, node_id: str | None = None, state: State | None = None, after_ms: int = 0
                    ) -> list[TraceEntry]:
        return [t for t in self.trace if t[0] >= after_ms and (node_id is None or t[2] == node_id)
                and (state is None or t[4] == state)]

    def trace_hash(self) -> str:
        digest = hashlib.sha256()
        for entry in self.trace:
            digest.update(repr(entry).encode())
        return digest.hexdigest()

    def message_totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for process in self.processes.values():
            for name, count in process.swim.statistics().messages_sent.items():
                totals[name] = totals.get(name, 0) + count
        return totals

    # ----------------------------------------------------------------- driving

    def run_until(self, until_ms: int) -> None:
        """Process every event up to and including `until_ms`."""
        self.loop.run_until(until_ms / 1000)

    def run_for(self, duration_ms: int) -> None:
        self.run_until(self.now_ms + duration_ms)

    def run_until_true(self, predicate: Callable[[], bool], timeout_ms: int, step_ms: int = 50) -> bool:
        """Run in steps until `predicate()` holds; False if it still does not after `timeout_ms`."""
        deadline = self.now_ms + timeout_ms
        while not predicate():
            if self.now_ms >= deadline:
                return False
            self.run_until(min(deadline, self.now_ms + step_ms))
        return True

    def close(self) -> None:
        """Stop every member and close the loop (so no task is left pending)."""
        if self.loop.is_closed():
            return
        for process in self.processes.values():
            if not process.down:
                process.kill()
        self.loop.run_for(0.001)
        self.loop.close()
        if self in SwimCluster._open:
            SwimCluster._open.remove(self)

    @classmethod
    def close_all(cls) -> None:
        while cls._open:
            cls._open[0].close()

    # ----------------------------------------------------------------- faults and operations

    def kill(self, node_id: str) -> None:
        self.processes[node_id].kill()

    def restart(self, node_id: str, seed_ids: Iterable[str] | None = None) -> Swim:
        """Start `node_id` again with the next generation, joining through running members."""
        old = self.processes[node_id]
        if not old.down:
            old.kill()
        info = replace(old.info, generation=old.swim.generation + 1)
        seeds = [self.processes[s].info.peer_address
                 for s in (seed_ids if seed_ids is not None else self.running()) if s != node_id]
        process = self.processes[node_id] = _Process(self, info, seeds)
        process.membership.start(process.carrier)
        return process.swim

    def pause(self, node_id: str, duration_ms: int) -> None:
        process = self.processes[node_id]
        if process.down:
            return
        process.paused_until_ms = max(process.paused_until_ms, self.now_ms + duration_ms)
        self.loop.call_at(process.paused_until_ms / 1000, process.resume)

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        self._blocked.append((frozenset(side_a), frozenset(side_b)))

    def heal(self) -> None:
        self._blocked.clear()

    def start_leaving(self, node_id: str) -> None:
        self.processes[node_id].membership.leave()

    def leave(self, node_id: str) -> None:
        """`mark_left`: LEFT, told to every reachable member (the call runs on the loop)."""
        self.loop.create_task(self.processes[node_id].membership.mark_left())

    def remove(self, operator_node: str, node_id: str) -> None:
        self.processes[operator_node].membership.remove(node_id, reason="operator")

    # ----------------------------------------------------------------- the network

    def _latency_s(self) -> float:
        if isinstance(self.latency_ms, tuple):
            return self._network_rng.randint(*self.latency_ms) / 1000
        return self.latency_ms / 1000

    def _cut(self, sender: str, target: str) -> bool:
        if any((sender in a and target in b) or (sender in b and target in a) for a, b in self._blocked):
            return True
        return bool(self.loss) and self._network_rng.random() < self.loss

    async def _call(self, source: _Process, target_id: str, address: str, message: Message, timeout_ms: int
                    ) -> tuple[str, Message | None]:
        await source.running()
        sender = source.info.node_id
        target = target_id or self._by_address.get(address, "")
        if target not in self.processes or target == sender:
            await asyncio.sleep(0.001)
            raise PeerError(f"{address or target_id}: no such member")
        deadline_at = self.loop.time() + timeout_ms / 1000
        try:
            async with asyncio.timeout_at(deadline_at):
                return target, await self._carry(sender, target, message, deadline_at)
        except TimeoutError:
            raise PeerError(f"{target}: deadline of {timeout_ms} ms exceeded") from None

    async def _carry(self, sender: str, target: str, message: Message, deadline_at: float) -> Message | None:
        never: asyncio.Future[Message | None] = self.loop.create_future()  # A lost message: the deadline ends it.
        process = self.processes[target]
        if process.down:
            self.dropped += 1
            if self.refuse_when_down:
                await asyncio.sleep(2 * self._latency_s())
                raise PeerError(f"{target}: connection refused")
            return await never
        if self._cut(sender, target):
            self.dropped += 1
            return await never
        await asyncio.sleep(self._latency_s())
        process = self.processes[target]
        if not await process.up():  # A paused member reads it when it resumes.
            return await never
        self.delivered += 1
        try:
            reply = await process.membership.answer(sender, message, deadline_s=deadline_at - self.loop.time())
        except MembershipUnavailable as silent:
            await asyncio.sleep(self._latency_s())
            raise PeerError(str(silent)) from None
        if not await process.up():
            return await never
        if self._cut(target, sender):
            self.dropped += 1
            return await never
        await asyncio.sleep(self._latency_s())
        return reply
