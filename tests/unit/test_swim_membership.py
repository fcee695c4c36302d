"""node/swim_membership.py: SwimMembership shells on one asyncio loop, joined by an in-memory
transport that speaks the real protobuf messages (serialised and parsed on every call).

Real time and the `local` profile (probe 0.2 s), so each test runs for a second or few:
joining through a seed, a dead member removed after the grace period, and a member the
cluster removed while it was alive coming back as its next generation. The indirect probe
saving a member whose direct link is cut (the held IndirectPing call) runs on the
simulator's virtual-time asyncio loop (`run_cluster(..., virtual=True)`): what it checks,
that nobody suspects that member, holds only if every 200 ms probe round gets its turn,
which real time on a loaded machine does not give (it failed once at load 17).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable

import pytest

from pacsnode.node import peer_wire
from pacsnode.node.metrics import Metrics
from pacsnode.node.swim_membership import GrpcCarrier, SwimMembership, swim_config
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.replication.transport import PeerError
from pacsnode.ring import swim
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.swim import State, SwimConfig
from pacsnode.sim.loop import new_loop


class Network:
    """Who listens where, which nodes are down and which one-way links are cut."""

    def __init__(self) -> None:
        self.by_address: dict[str, SwimMembership] = {}
        self.down: set[str] = set()
        self.cut: set[tuple[str, str]] = set()  # (caller, callee): the caller's requests are lost.


class LoopbackTransport:
    """What SwimMembership needs of GrpcTransport, served by the target's SwimMembership the way
    node/peer_server.py MembershipService serves it."""

    def __init__(self, network: Network, membership: SwimMembership) -> None:
        self.network = network
        self.membership = membership

    def envelope(self) -> pb.Envelope:
        m = self.membership
        return peer_wire.envelope("test", m.self_id, m.generation, m.ring().version, m.incarnation)

    async def membership_call(self, address: str, method: str, request: Any, *, timeout_ms: int) -> Any:
        await asyncio.sleep(0.001)
        target = self.network.by_address.get(address)
        me = self.membership.self_id
        if target is None or target.self_id in self.network.down or me in self.network.down \
                or (me, target.self_id) in self.network.cut:
            raise PeerError(f"{address}: unreachable")
        request = type(request).FromString(request.SerializeToString())
        try:
            reply = await asyncio.wait_for(serve(target, method, request), timeout_ms / 1000)
        except asyncio.TimeoutError:
            raise PeerError(f"{address}: deadline exceeded") from None
        return type(reply).FromString(reply.SerializeToString())


async def serve(target: SwimMembership, method: str, request: Any) -> Any:
    source = request.envelope.sender_id
    env = peer_wire.envelope("test", target.self_id, target.generation, target.ring().version, target.incarnation)
    if method == "Ping":
        updates, _ = peer_wire.updates_from_wire(request.updates)
        if request.sequence_number == 0:
            target.receive(source, swim.Gossip(updates))
            return pb.Ack(envelope=env)
        reply = target.receive(source, swim.Ping(int(request.sequence_number), target.self_id, updates))
        if not isinstance(reply, swim.Ack):  # SwimMembership.answer's MembershipUnavailable: gRPC UNAVAILABLE.
            raise PeerError(f"{target.self_id}: no ack (unavailable)")
        return peer_wire.ack_to_wire(reply, env)
    if method == "IndirectPing":
        info = MemberInfo(node_id=request.target_id, peer_host=request.target_address.host,
                          peer_port=request.target_address.port)
        updates, _ = peer_wire.updates_from_wire(request.updates)
        answer = await target.relay(source, swim.IndirectPing(int(request.sequence_number), info,
                                                              int(request.probe_timeout_ms), updates))
        return peer_wire.ack_to_wire(answer, env)
    if method == "PushPull":
        updates, _ = peer_wire.updates_from_wire(request.members)
        reply = target.receive(source, swim.PushPullRequest(updates))
        assert isinstance(reply, swim.PushPullReply)
        return pb.PushPullReply(envelope=env, members=[peer_wire.update_to_wire(u) for u in reply.members])
    if method == "Join":
        reply = target.receive(source, swim.JoinRequest(peer_wire.update_from_wire(request.member)))
        assert isinstance(reply, swim.JoinReply)
        return pb.JoinReply(envelope=env, accepted=reply.accepted, reason=reply.reason,
                            members=[peer_wire.update_to_wire(u) for u in reply.members])
    if method == "Leave":
        reply = target.receive(source, swim.LeaveRequest(peer_wire.update_from_wire(request.member)))
        return pb.LeaveReply(envelope=env, accepted=isinstance(reply, swim.LeaveReply))
    raise AssertionError(method)


CONFIG = swim_config("local", dead_grace_ms=600)


class LoopClock:
    """MembershipClock on the running loop's own time (virtual time on the simulator's loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def now_ms(self) -> int:
        # Through microseconds, as VirtualEventLoop.now_ms: a timer set for at_ms / 1000 then
        # reads at_ms, not at_ms - 1 (int() of 1.003 * 1000 is 1002), which would re-arm it forever.
        return round(self._loop.time() * 1_000_000) // 1000

    def wall_ms(self) -> int:
        return self.now_ms()

    def call_at(self, at_ms: int, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self._loop.call_at(at_ms / 1000, callback)


def run_cluster(n: int, scenario: Callable[[Network, list[SwimMembership]], Awaitable[None]],
                config: SwimConfig = CONFIG, *, virtual: bool = False) -> None:
    """`virtual`: on sim/loop.py's virtual-time loop (the same asyncio machinery; time moves
    only when nothing is ready, so a busy machine cannot make a probe round run out)."""
    async def main() -> None:
        network = Network()
        members: list[SwimMembership] = []
        clock = LoopClock(asyncio.get_running_loop()) if virtual else None
        for index in range(n):
            info = MemberInfo(node_id=f"m{index + 1}", peer_host="127.0.0.1", peer_port=7001 + index, generation=1)
            seeds = [members[0]._me.peer_address] if members else []
            membership = SwimMembership("test", info, seeds, config=config, rng=random.Random(index), clock=clock)
            network.by_address[info.peer_address] = membership
            members.append(membership)
        for membership in members:
            membership.start(GrpcCarrier(LoopbackTransport(network, membership)))  # type: ignore[arg-type]
        try:
            assert await wait_for(lambda: all(len(m.ring()) == n and all(m.is_alive(o.self_id) for o in members)
                                              for m in members), 3.0), "did not converge"
            await scenario(network, members)
        finally:
            for membership in members:
                await membership.stop()

    if not virtual:
        asyncio.run(main())
        return
    loop = new_loop()
    try:
        loop.run_task(main())
        assert not loop.errors, loop.errors
    finally:
        loop.close()
        asyncio.set_event_loop(None)


async def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """True once `predicate` holds, polled every 20 ms of the loop's time, for `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def test_members_join_through_a_seed_and_report_changes() -> None:
    async def scenario(network: Network, members: list[SwimMembership]) -> None:
        for membership in members:
            assert [r.state for r in membership.records()] == [State.ALIVE] * 3
            assert membership.ring().node_ids == ("m1", "m2", "m3")
            assert membership.ring().version == members[0].ring().version
            assert membership.member("m2") is not None and membership.member("m2").ae_title == ""  # type: ignore[union-attr]

    run_cluster(3, scenario)


def test_an_indirect_probe_keeps_a_member_whose_direct_link_is_cut() -> None:
    """Virtual time: in real time a loaded machine can stall the loop for most of a 200 ms
    probe round twice over (each stall under the round, so not taken for this node's own
    stall), and the round ends before the relayed ack is read: m1 suspected m3 (refuted:
    1 == 0). Reproduced in real time by putting the loop to sleep for up to 0.19 s at random
    every 0-30 ms (1 run of 6 with a suspicion; see the commit that moved it here): the
    host's scheduling, not the protocol. With indirect_checks=0 this test fails."""
    async def scenario(network: Network, members: list[SwimMembership]) -> None:
        m1, m2, m3 = members
        network.cut.add(("m1", "m3"))
        await asyncio.sleep(2.0)  # m1 probes m3 several times; every direct ping fails.
        assert m1.statistics().indirect_acks > 0, m1.statistics()
        assert m2.statistics().relays >= m1.statistics().indirect_acks  # Through m2's held IndirectPing call.
        assert m1.statistics().probe_failures == 0, m1.statistics()  # Every round of m1's ended in an ack.
        assert all(m.is_alive("m3") for m in members)
        assert m3.statistics().suspicions_refuted == 0  # Nobody even suspected it.
        assert all(m.statistics().suspicions_raised == 0 for m in members)

    run_cluster(3, scenario, virtual=True)


def test_a_dead_member_is_removed_after_the_grace_and_the_ring_shrinks() -> None:
    changes: list[tuple[str, ...]] = []

    async def scenario(network: Network, members: list[SwimMembership]) -> None:
        observer = members[0]
        observer.on_change.append(lambda: changes.append(observer.ring().node_ids))
        network.down.add("m4")
        assert await wait_for(lambda: all(m.swim.state_of("m4") is State.DEAD for m in members[:3]), 6.0)
        assert observer.ring().node_ids == ("m1", "m2", "m3", "m4")  # Dead keeps its tokens...
        assert not observer.is_alive("m4")
        assert await wait_for(lambda: all(m.swim.state_of("m4") is State.REMOVED for m in members[:3]), 3.0)
        assert observer.ring().node_ids == ("m1", "m2", "m3")  # ...removed does not.
        assert changes[-1] == ("m1", "m2", "m3") and len(changes) >= 2  # Death, then removal.

    run_cluster(4, scenario)


def test_a_member_removed_while_alive_comes_back_as_its_next_generation() -> None:
    async def scenario(network: Network, members: list[SwimMembership]) -> None:
        m1, _, m3 = members
        generations: list[int] = []

        def next_generation(at_least: int) -> int:
            generations.append(max(m3.generation + 1, at_least))
            return generations[-1]

        m3._next_generation = next_generation
        await asyncio.sleep(2)  # Some probe rounds of generation 1.
        before = m3.metrics()
        assert before["pacsnode.membership.probes_count"] > 0 and before["pacsnode.membership.sent_bytes"] > 0
        assert m1.remove("m3", reason="test")
        assert await wait_for(lambda: generations and all(
            (r := m.swim.record("m3")) is not None and (r.state, r.generation) == (State.ALIVE, 2) for m in members),
            5.0), [m.swim.record("m3") for m in members]
        assert m3.counters.rejoins == 1 and m3.self_state() is State.ALIVE
        assert all(len(m.ring()) == 3 for m in members)
        # The new generation's SWIM state counts from 0; /metrics carries the old counts on
        # (a Prometheus counter must never go back).
        assert await wait_for(lambda: m3.swim.statistics().probes_sent > 0, 5.0)  # The new generation probed.
        after = m3.metrics()
        assert all(after[name] >= value for name, value in before.items()
                   if name.endswith(("_count", "_bytes")) and "members_" not in name
                   and not name.endswith(("awareness_count", "broadcast_queue_depth_count", "incarnation_count"))), \
            {name: (value, after[name]) for name, value in before.items() if after[name] < value}
        assert after["pacsnode.membership.probes_count"] > before["pacsnode.membership.probes_count"]

    run_cluster(3, scenario, replace(CONFIG, dead_grace_ms=60_000))


@pytest.mark.parametrize("held_dead_first", [True, False], ids=["old-boot-dead-first", "wiped-node-back-at-once"])
def test_a_node_whose_data_dir_was_wiped_after_a_restart_joins_above_its_last_generation(held_dead_first: bool) -> None:
    """Found by `pacsnode sim chaos --nodes 5 --duration 180 --seed 11`: c3 restarted once
    (generation 2), then its data dir was wiped, so it started again as generation 1 and
    every seed refused it ("node id 'c3' is in use by generation 2, newer than 1") to the
    end of the run. The seed now sends the dead boot's record with the refusal and the node
    joins again above it (its next generation persisted at least that high).

    wiped-node-back-at-once (found by the simulator's wipe-restarted scenario): the wiped
    node was back at its address before anyone held generation 2 dead, and acked the
    probes meant for generation 2, so nobody ever did: refused for good. Now the refusal
    carries the reachable record too and the node leaves probes for that boot unanswered
    until it is dead. Virtual time (sim/loop.py)."""
    async def scenario(network: Network, members: list[SwimMembership]) -> None:
        m1, m2, m3 = members
        boots: list[SwimMembership] = []
        clock = LoopClock(asyncio.get_running_loop())

        async def boot(generation: int, asked: list[int] | None = None) -> SwimMembership:
            info = replace(m3._me, generation=generation)
            membership = SwimMembership("test", info, [m1._me.peer_address], config=CONFIG,
                                        rng=random.Random(generation), clock=clock,
                                        next_generation=(lambda at_least: asked.append(at_least) or at_least + 1)
                                        if asked is not None else None)
            network.by_address[info.peer_address] = membership
            network.down.discard("m3")
            membership.start(GrpcCarrier(LoopbackTransport(network, membership)))  # type: ignore[arg-type]
            boots.append(membership)
            return membership

        async def crash(membership: SwimMembership, *, held_dead: bool = True) -> None:
            network.down.add("m3")
            await membership.stop()
            if held_dead:
                assert await wait_for(lambda: all(m.swim.state_of("m3") in (State.DEAD, State.REMOVED)
                                                  for m in (m1, m2)), 5.0)

        try:
            await crash(m3)
            restarted = await boot(2)  # A restart: the data dir says generation 2.
            assert await wait_for(lambda: all((r := m.swim.record("m3")) is not None
                                              and (r.state, r.generation) == (State.ALIVE, 2) for m in (m1, m2)), 5.0)
            await crash(restarted, held_dead=held_dead_first)
            asked: list[int] = []
            wiped = await boot(1, asked)  # Data dir wiped: the generation count starts over.
            assert await wait_for(lambda: all((r := m.swim.record("m3")) is not None and r.state is State.ALIVE
                                              and r.generation > 2 for m in (m1, m2)), 15.0), \
                [m.swim.record("m3") for m in (m1, m2)]
            assert asked and asked[0] == 3  # Persisted above the dead boot's generation.
            assert wiped.generation == 4 and wiped.self_state() is State.ALIVE and wiped.joined
            assert all(len(m.ring()) == 3 for m in (m1, m2, wiped))
        finally:
            for membership in boots:
                await membership.stop()

    run_cluster(3, scenario, virtual=True)


def test_pings_for_a_newer_boot_are_a_prometheus_counter() -> None:
    """SwimStatistics.pings_for_a_newer_boot (d4d3ab4: a wiped node back at its address
    leaves the probes meant for the newer boot the cluster holds unanswered) reaches
    /metrics as pacsnode_membership_pings_for_a_newer_boot_total, beside the other
    membership counters."""
    seed_info = MemberInfo(node_id="m1", peer_host="127.0.0.1", peer_port=7001, generation=1)
    second_boot = MemberInfo(node_id="m2", peer_host="127.0.0.1", peer_port=7002, generation=2)
    seed = swim.Swim(CONFIG, seed_info, random.Random(1), 0)
    seed.on_message(1, "m2", swim.PushPullReply((swim.MemberUpdate(second_boot, State.ALIVE, 0, reporter_id="m2"),)))
    wiped = SwimMembership("test", replace(second_boot, generation=1), [seed_info.peer_address], config=CONFIG,
                           rng=random.Random(2))
    (request,) = wiped.swim.join(2, wiped.seeds)
    (reply,) = seed.on_message(3, "m2", request.message)
    wiped.receive("m1", reply.message)
    assert wiped.swim.newer_boot_held == 2
    for sequence_number in (7, 8, 9):
        assert wiped.receive("m1", swim.Ping(sequence_number, "m2", ())) is None  # Meant for generation 2.

    assert wiped.metrics()["pacsnode.membership.pings_for_a_newer_boot_count"] == 3
    text = Metrics(wiped.metrics).render().decode()
    assert "# TYPE pacsnode_membership_pings_for_a_newer_boot_total counter" in text
    assert "pacsnode_membership_pings_for_a_newer_boot_total 3.0" in text


def test_a_wiped_node_joins_as_soon_as_the_newer_boot_is_dead_not_at_its_next_join_retry() -> None:
    """The wiped node is back at its address before the cluster held its previous boot
    (generation 2) dead, so its first join is refused with that boot reachable. Once the
    cluster holds it dead, the gossip still sent to a dead member (gossip_to_dead_ms) reaches
    the wiped node at that address and says so: it joins above it at once, instead of at
    its next join retry (join_retry_interval_ms, 10 s here); and a probe round of the old
    boot still open then does not accuse the new one. Virtual time."""
    config = replace(CONFIG, join_retry_interval_ms=10_000)

    async def scenario(network: Network, members: list[SwimMembership]) -> None:
        m1, m2, m3 = members
        loop = asyncio.get_running_loop()
        clock = LoopClock(loop)
        boots: list[SwimMembership] = []

        def boot(generation: int) -> SwimMembership:
            info = replace(m3._me, generation=generation)
            membership = SwimMembership("test", info, [m1._me.peer_address], config=config,
                                        rng=random.Random(generation), clock=clock,
                                        next_generation=lambda at_least: at_least)
            network.by_address[info.peer_address] = membership
            network.down.discard("m3")
            membership.start(GrpcCarrier(LoopbackTransport(network, membership)))  # type: ignore[arg-type]
            boots.append(membership)
            return membership

        def held(generation: int, states: frozenset[State]) -> bool:
            return all((r := m.swim.record("m3")) is not None and r.generation == generation and r.state in states
                       for m in (m1, m2))

        try:
            network.down.add("m3")
            await m3.stop()
            assert await wait_for(lambda: held(1, frozenset({State.DEAD, State.REMOVED})), 5.0)
            restarted = boot(2)
            assert await wait_for(lambda: held(2, frozenset({State.ALIVE})), 5.0)
            network.down.add("m3")
            await restarted.stop()
            dead_at: dict[str, float] = {}  # When m1 and m2 each came to hold generation 2 dead.
            accused: list[tuple[str, State]] = []  # Generation 3 held anything but alive.
            for member in (m1, m2):
                def note(_: object, member: SwimMembership = member) -> None:
                    if (r := member.swim.record("m3")) is not None and (r.generation, r.state) == (2, State.DEAD):
                        dead_at.setdefault(member.self_id, loop.time())
                    if r is not None and r.generation == 3 and r.state is not State.ALIVE:
                        accused.append((member.self_id, r.state))
                member.on_transitions.append(note)
            wiped = boot(1)  # Back at once: generation 2 is still alive in every view.
            assert await wait_for(lambda: wiped.swim.newer_boot_held == 2, 2.0)
            assert await wait_for(lambda: wiped.joined and held(3, frozenset({State.ALIVE})), 15.0), \
                [m.swim.record("m3") for m in (m1, m2)]
            assert sorted(dead_at) == ["m1", "m2"], dead_at
            assert loop.time() - max(dead_at.values()) < 1.0, (loop.time(), dead_at)
            assert wiped.generation == 3 and wiped.counters.rejoins == 1
            await asyncio.sleep(2.0)
            # A probe round of generation 2 still open when generation 3 joined (its ping went
            # unanswered) must not accuse generation 3.
            assert accused == [] and wiped.statistics().suspicions_refuted == 0, accused
        finally:
            for membership in boots:
                await membership.stop()

    run_cluster(3, scenario, config, virtual=True)


def test_a_probe_round_of_an_old_boot_does_not_accuse_the_new_one() -> None:
    """A probe round that began while m3's generation 2 was alive ends without an ack after
    generation 3 joined (a restart, or a wiped node that left the pings for the boot it
    replaced unanswered and joined above it at once): it said nothing about generation 3,
    which stays alive. Without the probe's generation the observer suspected the new boot
    (wipe-restarted seed 1: 8 of 9 observers, refuted)."""
    observer = swim.Swim(CONFIG, MemberInfo(node_id="m1", peer_host="127.0.0.1", peer_port=7001, generation=1),
                         random.Random(1), 0)
    old_boot = MemberInfo(node_id="m3", peer_host="127.0.0.1", peer_port=7003, generation=2)
    observer.on_message(1, "m3", swim.PushPullReply((swim.MemberUpdate(old_boot, State.ALIVE, 0, reporter_id="m3"),)))
    started = next(t for t in range(0, CONFIG.probe_interval_ms * 2)
                   if any(isinstance(o.message, swim.Ping) and o.message.target_id == "m3" for o in observer.tick(t)))
    observer.on_message(started + 1, "m3", swim.Gossip((swim.MemberUpdate(replace(old_boot, generation=3),
                                                                          State.ALIVE, 0, reporter_id="m3"),)))
    for t in range(started + 1, started + CONFIG.probe_interval_ms + 1):  # To the end of that round.
        observer.tick(t)
    assert observer.statistics().probe_failures == 0
    record = observer.record("m3")
    assert record is not None and (record.generation, record.state) == (3, State.ALIVE), record
    assert observer.statistics().suspicions_raised == 0
