"""A deterministic little network for driving many `Swim` state machines. Pure code.

One process, one thread, virtual time: a heap of timed events (message deliveries and
node ticks), a seeded `random.Random` for the network (loss, latency) and one per node
(`random.Random(f"{seed}:{node_id}:{generation}")`). The same seed gives the same run,
message for message, so `trace_hash()` identifies a run. The simulator issue (sim/) can
build on it; the tests in tests/unit/test_swim.py and tests/property/test_swim.py use it.

Faults: message loss (`loss`), latency (fixed or a uniform range), `kill` (the process
stops; messages to it vanish, or are refused with `refuse_when_down`), `restart` (a new
process, next generation, joining through a running node), `pause` (a stall: messages
queue, timers wait, then everything is handled at once, the way a GC pause or a stopped
VM looks to the node), `partition`/`heal` (messages between two groups are dropped).
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from pacsnode.ring.members import MemberInfo
from pacsnode.ring.swim import REPLIES, Message, Outbound, PushPullReply, State, Swim, SwimConfig

TraceEntry = tuple[int, str, str, "str | None", str]  # (at_ms, observer, node_id, old_state, new_state)


@dataclass
class _Process:
    swim: Swim
    info: MemberInfo
    down: bool = False
    paused_until_ms: int = 0
    inbox: list[tuple[str, Message]] = field(default_factory=list)
    scheduled_tick_ms: int | None = None
    last_tick_ms: int = -1


def member_info(index: int, *, site: str = "default", generation: int = 1) -> MemberInfo:
    """The test cluster's member `index`: node-NN at 10.0.x.y:7946."""
    node_id = f"node-{index:02d}"
    return MemberInfo(node_id=node_id, peer_host=f"10.0.{index // 200}.{index % 200 + 1}", peer_port=7946,
                      dicom_host=f"10.0.{index // 200}.{index % 200 + 1}", dicom_port=11112, ae_title="PACSNODE",
                      site=site, vnodes=8, generation=generation)


class SwimCluster:
    """N Swim nodes on a simulated network.

    `sites`: a site name per node (a list), or a number of sites assigned round-robin.
    `bootstrap`: "join" (every node joins through node-00 at time 0, the real path) or
    "full" (every node starts knowing every other member alive, for tests that are not
    about joining).
    """

    def __init__(self, n: int, config: SwimConfig | None = None, seed: int = 0, *, loss: float = 0.0,
                 latency_ms: int | tuple[int, int] = 1, sites: int | list[str] = 1, bootstrap: str = "join",
                 refuse_when_down: bool = False, swim_hooks: Callable[[str], dict[str, object]] | None = None
                 ) -> None:
        """`swim_hooks(node_id)`: extra keyword arguments of each node's Swim (signer, verifier)."""
        self.config = config or SwimConfig.lan()
        self.swim_hooks = swim_hooks
        self.seed = seed
        self.loss = loss
        self.latency_ms = latency_ms
        self.refuse_when_down = refuse_when_down
        self.now_ms = 0
        self.trace: list[TraceEntry] = []
        self.delivered = 0
        self.dropped = 0
        self._network_rng = random.Random(f"{seed}:network")
        self._heap: list[tuple[int, int, str, tuple[object, ...]]] = []
        self._sequence = 0
        self._blocked: list[tuple[frozenset[str], frozenset[str]]] = []
        self._by_address: dict[str, str] = {}
        self.processes: dict[str, _Process] = {}
        site_names = sites if isinstance(sites, list) else [f"site-{i % sites}" for i in range(n)]
        for index in range(n):
            info = member_info(index, site=site_names[index])
            self._by_address[info.peer_address] = info.node_id
            self.processes[info.node_id] = _Process(self._new_swim(info), info)
        ids = list(self.processes)
        if bootstrap == "full":
            everyone = tuple(p.swim.me for p in self.processes.values())
            for node_id in ids:
                self._handle(node_id, lambda swim: swim.on_message(0, "", PushPullReply(everyone)))
        elif bootstrap == "join":
            seed_address = self.processes[ids[0]].info.peer_address
            for node_id in ids[1:]:
                self._handle(node_id, lambda swim: swim.join(0, [seed_address]))
        else:
            raise ValueError(f"bootstrap must be 'join' or 'full', got {bootstrap!r}")
        for node_id in ids:
            self._reschedule(node_id)

    # ----------------------------------------------------------------- views

    @property
    def nodes(self) -> dict[str, Swim]:
        return {node_id: p.swim for node_id, p in self.processes.items()}

    def running(self) -> list[str]:
        return [node_id for node_id, p in self.processes.items() if not p.down]

    def swim(self, node_id: str) -> Swim:
        return self.processes[node_id].swim

    def view(self, observer: str, node_id: str) -> State | None:
        return self.processes[observer].swim.state_of(node_id)

    def views_of(self, node_id: str, observers: Iterable[str] | None = None) -> dict[str, State | None]:
        chosen = observers if observers is not None else [o for o in self.running() if o != node_id]
        return {o: self.view(o, node_id) for o in chosen}

    def agree(self, node_id: str, state: State, observers: Iterable[str] | None = None) -> bool:
        return all(s == state for s in self.views_of(node_id, observers).values())

    def converged(self) -> bool:
        """Every running node sees every running node alive, and all hold the same ring."""
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
        heap = self._heap
        while heap and heap[0][0] <= until_ms:
            at_ms, _, kind, payload = heapq.heappop(heap)
            self.now_ms = at_ms
            if kind == "tick":
                (node_id,) = payload
                assert isinstance(node_id, str)
                self._tick(node_id, at_ms)
            elif kind == "deliver":
                target, source, message = payload
                assert isinstance(target, str) and isinstance(source, str)
                self._deliver(target, source, message)  # type: ignore[arg-type]
            elif kind == "failed":
                sender, outbound = payload
                assert isinstance(sender, str) and isinstance(outbound, Outbound)
                process = self.processes[sender]
                if not process.down:
                    self._handle(sender, lambda swim: swim.message_failed(self.now_ms, outbound))
            elif kind == "resume":
                (node_id,) = payload
                assert isinstance(node_id, str)
                self._resume(node_id)
        self.now_ms = max(self.now_ms, until_ms)

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

    # ----------------------------------------------------------------- faults and operations

    def kill(self, node_id: str) -> None:
        process = self.processes[node_id]
        process.down = True
        process.inbox.clear()
        process.scheduled_tick_ms = None

    def restart(self, node_id: str, seed_ids: Iterable[str] | None = None) -> Swim:
        """Start `node_id` again with the next generation, joining through running nodes."""
        process = self.processes[node_id]
        info = replace(process.info, generation=process.info.generation + 1)
        seeds = [self.processes[s].info.peer_address
                 for s in (seed_ids if seed_ids is not None else self.running()) if s != node_id]
        process.info = info
        process.swim = self._new_swim(info)
        process.down = False
        process.paused_until_ms = 0
        process.inbox.clear()
        process.last_tick_ms = -1
        self._handle(node_id, lambda swim: swim.join(self.now_ms, seeds))
        self._reschedule(node_id)
        return process.swim

    def pause(self, node_id: str, duration_ms: int) -> None:
        process = self.processes[node_id]
        if process.down:
            return
        process.paused_until_ms = max(process.paused_until_ms, self.now_ms + duration_ms)
        process.scheduled_tick_ms = None
        self._push(process.paused_until_ms, "resume", (node_id,))

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        self._blocked.append((frozenset(side_a), frozenset(side_b)))

    def heal(self) -> None:
        self._blocked.clear()

    def start_leaving(self, node_id: str) -> None:
        self._handle(node_id, lambda swim: swim.start_leaving(self.now_ms))

    def leave(self, node_id: str) -> None:
        self._handle(node_id, lambda swim: swim.leave(self.now_ms))

    def remove(self, operator_node: str, node_id: str) -> None:
        self._handle(operator_node, lambda swim: swim.remove(self.now_ms, node_id))

    # ----------------------------------------------------------------- internals

    def _new_swim(self, info: MemberInfo) -> Swim:
        rng = random.Random(f"{self.seed}:{info.node_id}:{info.generation}")
        hooks = self.swim_hooks(info.node_id) if self.swim_hooks is not None else {}
        return Swim(self.config, info, rng, self.now_ms, **hooks)  # type: ignore[arg-type]

    def _push(self, at_ms: int, kind: str, payload: tuple[object, ...]) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (at_ms, self._sequence, kind, payload))

    def _available(self, node_id: str) -> bool:
        process = self.processes[node_id]
        return not process.down and process.paused_until_ms <= self.now_ms

    def _tick(self, node_id: str, at_ms: int) -> None:
        process = self.processes[node_id]
        if process.scheduled_tick_ms != at_ms or not self._available(node_id):
            return  # Superseded by a later schedule, or the process is not running.
        process.scheduled_tick_ms = None
        process.last_tick_ms = at_ms
        self._handle(node_id, lambda swim: swim.tick(at_ms))

    def _deliver(self, target: str, source: str, message: Message) -> None:
        process = self.processes[target]
        if process.down:
            return
        if process.paused_until_ms > self.now_ms:
            process.inbox.append((source, message))
            return
        self.delivered += 1
        self._handle(target, lambda swim: swim.on_message(self.now_ms, source, message))

    def _resume(self, node_id: str) -> None:
        process = self.processes[node_id]
        if process.down or process.paused_until_ms > self.now_ms:
            return
        inbox, process.inbox = process.inbox, []
        for source, message in inbox:  # What arrived during the stall is read first...
            self._deliver(node_id, source, message)
        process.last_tick_ms = self.now_ms  # ...then the overdue timers run.
        self._handle(node_id, lambda swim: swim.tick(self.now_ms))

    def _handle(self, node_id: str, step: Callable[[Swim], list[Outbound]]) -> None:
        process = self.processes[node_id]
        outbound = step(process.swim)
        for event in process.swim.drain_events():
            self.trace.append((event.at_ms, node_id, event.node_id,
                               None if event.old_state is None else event.old_state.value, event.new_state.value))
        for item in outbound:
            self._send(node_id, item)
        self._reschedule(node_id)

    def _send(self, sender: str, outbound: Outbound) -> None:
        target = outbound.target_id or self._by_address.get(outbound.address, "")
        if target not in self.processes or target == sender:
            self._push(self.now_ms + 1, "failed", (sender, outbound))
            return
        if self.processes[target].down:
            if self.refuse_when_down and not isinstance(outbound.message, REPLIES):
                self._push(self.now_ms + self._latency(), "failed", (sender, outbound))
            self.dropped += 1
            return
        if any((sender in a and target in b) or (sender in b and target in a) for a, b in self._blocked):
            self.dropped += 1
            return
        if self.loss and self._network_rng.random() < self.loss:
            self.dropped += 1
            return
        self._push(self.now_ms + self._latency(), "deliver", (target, sender, outbound.message))

    def _latency(self) -> int:
        if isinstance(self.latency_ms, tuple):
            return self._network_rng.randint(*self.latency_ms)
        return self.latency_ms

    def _reschedule(self, node_id: str) -> None:
        process = self.processes[node_id]
        if process.down or process.paused_until_ms > self.now_ms:
            return
        at_ms = process.swim.next_tick_ms()
        if at_ms <= process.last_tick_ms:
            at_ms = process.last_tick_ms + 1  # Never tick twice at one instant.
        at_ms = max(at_ms, self.now_ms)
        if process.scheduled_tick_ms == at_ms:
            return
        process.scheduled_tick_ms = at_ms
        self._push(at_ms, "tick", (node_id,))
