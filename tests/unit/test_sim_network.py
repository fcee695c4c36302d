"""sim/loop.py and sim/network.py: virtual time, and what the network does to a call."""

from __future__ import annotations

import asyncio

import pytest

from pacsnode.replication.transport import PeerError
from pacsnode.ring.placement import TokenRange
from pacsnode.sim.cluster import SimCluster, SimConfig
from pacsnode.sim.loop import SimDeadlock, new_loop
from pacsnode.sim.network import LinkModel


def test_virtual_time_jumps_to_the_next_timer() -> None:
    loop = new_loop()
    try:
        async def main() -> float:
            await asyncio.sleep(3600)
            await asyncio.wait_for(asyncio.sleep(0.25), 1)
            return loop.time()

        assert loop.run_until_complete(main()) == pytest.approx(3600.25)
        loop.run_until(4000)
        assert loop.time() == 4000
    finally:
        loop.close()


def test_waiting_on_nothing_is_a_deadlock_not_a_hang() -> None:
    loop = new_loop()
    try:
        with pytest.raises(SimDeadlock):
            loop.run_until_complete(loop.create_future())
    finally:
        loop.close()


def test_sets_of_tasks_iterate_in_creation_order() -> None:
    loop = new_loop()
    try:
        async def main() -> list[int]:
            tasks = [asyncio.ensure_future(asyncio.sleep(1, result=i)) for i in range(50)]
            done, _ = await asyncio.wait(set(reversed(tasks)))
            return [t.result() for t in done]

        assert loop.run_until_complete(main()) == list(range(50))
    finally:
        loop.close()


def _call(cluster: SimCluster, source: str, target: str, timeout_ms: int = 1_000) -> tuple[str, float]:
    """A range_digest call from source to target: ('ok' or the error, virtual seconds it took)."""
    transport = cluster.network.transport(source)
    process = cluster.process(source)

    async def call() -> tuple[str, float]:
        started = cluster.loop.time()
        try:
            await transport.range_digest(target, TokenRange(0, 1 << 62), timeout_ms=timeout_ms)
            return "ok", cluster.loop.time() - started
        except PeerError as error:
            return str(error), cluster.loop.time() - started

    return cluster.loop.run_until_complete(process.spawn(call()))


def test_calls_fail_as_the_network_says() -> None:
    cluster = SimCluster(4, sites=1, seed=1, config=SimConfig())
    try:
        cluster.run_for(2)
        assert _call(cluster, "node-000", "node-001")[0] == "ok"
        # Down: refused after a round trip.
        cluster.crash("node-001")
        error, took = _call(cluster, "node-000", "node-001")
        assert "refused" in error and took < 0.01
        # Partitioned: black-holed until the deadline.
        cluster.network.partition(["node-000"], ["node-002"])
        error, took = _call(cluster, "node-000", "node-002", timeout_ms=700)
        assert "deadline" in error and took == pytest.approx(0.7)
        # One way: 2 -> 0 is cut, so 0's request gets there but the reply does not.
        cluster.network.heal()
        cluster.network.partition(["node-002"], ["node-000"], one_way=True)
        assert "deadline" in _call(cluster, "node-000", "node-002")[0]
        assert _call(cluster, "node-000", "node-003")[0] == "ok"
        cluster.network.heal()
        # Paused: the call waits for the target to resume.
        cluster.pause("node-003", 0.5)
        result, took = _call(cluster, "node-000", "node-003")
        assert result == "ok" and 0.49 < took < 0.52
    finally:
        cluster.close()


def test_loss_costs_retransmissions_on_calls_or_drops_them() -> None:
    cluster = SimCluster(3, sites=1, seed=2, config=SimConfig(link=LinkModel(loss=0.3)))
    try:
        cluster.run_for(1)
        took = [_call(cluster, "node-000", "node-001", timeout_ms=30_000)[1] for _ in range(40)]
        assert all(t < 30 for t in took)
        assert any(t >= 0.2 for t in took)  # Some paid a retransmission timeout.
    finally:
        cluster.close()
    # rpc_loss="drop": a lost message is gone (the SWIM calls of the run show it).
    cluster = SimCluster(3, sites=1, seed=2, config=SimConfig(link=LinkModel(loss=0.3, rpc_loss="drop")))
    try:
        cluster.run_for(2)
        dropped = cluster.network.traffic.dropped
        assert sum(count for kind, count in dropped.items() if kind.startswith("swim.")) > 0
    finally:
        cluster.close()


def test_a_crashed_node_runs_no_more_code() -> None:
    cluster = SimCluster(3, sites=1, seed=4)
    try:
        cluster.run_for(1)
        process = cluster.process("node-002")
        ran: list[float] = []

        async def forever() -> None:
            while True:
                await asyncio.sleep(0.1)
                ran.append(cluster.loop.time())

        process.spawn(forever())
        cluster.run_for(1)
        cluster.crash("node-002")
        count = len(ran)
        cluster.run_for(5)
        assert count > 5 and len(ran) == count
        assert process.tasks and all(task.done() for task in process.tasks.values())  # Done ones are pruned later.
    finally:
        cluster.close()


def test_clock_skew_reaches_swim_and_the_cluster_copes() -> None:
    cluster = SimCluster(6, sites=1, seed=5)
    try:
        cluster.run_for(5)
        before = cluster.process("node-001").now_ms()
        cluster.set_clock("node-001", drift_ppm=50_000)  # 5% fast.
        cluster.set_clock("node-002", drift_ppm=-50_000)  # 5% slow.
        cluster.set_clock("node-003", forward_ms=1_500)  # A jump forward.
        assert cluster.process("node-001").now_ms() == before
        assert cluster.process("node-003").now_ms() - cluster.loop.now_ms() >= 1_500
        cluster.run_for(120)
        assert 125_990 <= cluster.process("node-001").now_ms() - before <= 126_010  # 120 s at +5%.
        assert cluster.converged()
        assert not [t for t in cluster.transitions if t.new == "dead"]
    finally:
        cluster.close()


def _callback_order(debug: bool, seed: int) -> tuple[list[tuple[float, str]], list[str], int]:
    """What a random program of tasks, timers (many cancelled, many due at the same time),
    call_soon chains and failing callbacks does on a virtual loop, in order."""
    import random

    events: list[tuple[float, str]] = []
    loop = new_loop()
    loop.set_debug(debug)
    rng = random.Random(seed)

    def note(what: str) -> None:
        events.append((loop.time(), what))

    def fail(what: str) -> None:
        note(what)
        raise ValueError(what)

    async def worker(index: int) -> None:
        for step in range(rng.randrange(1, 6)):
            await asyncio.sleep(rng.choice((0, 0, 0.001, 0.25, 0.5, 1.0)))  # Ties on purpose.
            note(f"w{index}.{step}")
            if rng.random() < 0.3:
                loop.call_soon(note, f"w{index}.{step}.soon")

    async def main() -> None:
        handles = [loop.call_later(rng.choice((0.5, 1.0, 2.0)), note, f"t{i}") for i in range(300)]
        for handle in handles[::3] + handles[1::3]:
            handle.cancel()  # Two thirds cancelled: the loop compacts its timer heap.
        loop.call_later(0.25, fail, "boom")
        tasks = [asyncio.ensure_future(worker(i)) for i in range(40)]
        await asyncio.wait(tasks)
        await asyncio.sleep(3)

    try:
        loop.run_task(main())
    finally:
        loop.close()
        asyncio.set_event_loop(None)
    return events, [e.split(":")[0] for e in loop.errors], loop.clock_jumps


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_loop_runs_callbacks_in_asyncios_own_order(seed: int) -> None:
    """sim/loop.py's _run_once (the simulator's hottest function) must run callbacks in the
    order asyncio's BaseEventLoop._run_once does (debug mode uses asyncio's own): same
    events at the same virtual times, same errors, same clock jumps."""
    fast, reference = _callback_order(False, seed), _callback_order(True, seed)
    assert fast[0] == reference[0]
    assert fast[1] == reference[1] and len(fast[1]) == 1 and "fail('boom')" in fast[1][0], fast[1]
    assert fast[2] == reference[2] > 0
    assert len(fast[0]) > 150  # Every uncancelled timer and every worker step ran.
