"""SWIM + Lifeguard membership (ring/swim.py): rules, one state machine by hand, and clusters.

The first half drives a single `Swim` with hand-made messages and checks each rule; the
second half runs clusters of the node's own driver (node/swim_membership.py) on the
deterministic network of sim/swim_cluster.py. Measured on seeds 0-19 (scripted the same
way as test_killed_member_is_declared_dead_by_everyone, bootstrap="full", 1-3 ms
latency), time from kill until every live member had it dead:

    profile  n   median    max     (base suspicion timeout)
    lan      5   6.07 s    8.01 s  4.0 s
    lan     10   5.82 s    8.41 s  4.0 s
    lan     30   8.00 s    9.65 s  5.9 s
    local    5   1.13 s    1.56 s  0.8 s
    local   10   1.13 s    1.32 s  0.8 s
    local   30   1.58 s    2.17 s  1.18 s

(The bare state machines on the datagrams of the former ring/swim_testing.py gave the same
figures to within 0.12 s.)
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator
from dataclasses import replace

import pytest

from pacsnode.ring.members import MemberInfo
from pacsnode.ring.swim import (
    Ack,
    DeadBootRecord,
    Gossip,
    IndirectPing,
    JoinRefusal,
    JoinReply,
    JoinRequest,
    MemberUpdate,
    Nack,
    Outbound,
    Ping,
    PushPullReply,
    PushPullRequest,
    State,
    Swim,
    SwimConfig,
    merge,
    message_bytes,
    newer,
    push_pull_interval_ms,
    remaining_suspicion_ms,
    removal_blocked,
    retransmit_limit,
    suspicion_timeout_ms,
)
from pacsnode.sim.swim_cluster import SwimCluster, member_info

LAN = SwimConfig.lan()
LOCAL = SwimConfig.local()


@pytest.fixture(autouse=True)
def _close_swim_clusters() -> Iterator[None]:
    yield
    SwimCluster.close_all()


# ===================================================================== configuration and pure rules


def test_profiles_are_memberlists() -> None:
    assert SwimConfig() == LAN
    assert (LAN.probe_interval_ms, LAN.probe_timeout_ms, LAN.indirect_checks, LAN.suspicion_mult,
            LAN.suspicion_max_timeout_mult, LAN.gossip_interval_ms, LAN.gossip_nodes, LAN.retransmit_mult,
            LAN.push_pull_interval_ms, LAN.awareness_max_multiplier, LAN.dead_grace_ms) == (
        1000, 500, 3, 4, 6, 200, 3, 4, 30_000, 8, 600_000)
    assert (LOCAL.probe_interval_ms, LOCAL.probe_timeout_ms, LOCAL.gossip_interval_ms,
            LOCAL.push_pull_interval_ms) == (200, 100, 50, 2_000)
    assert SwimConfig.local(dead_grace_ms=1234).dead_grace_ms == 1234
    wan = SwimConfig.wan()
    assert (wan.probe_interval_ms, wan.probe_timeout_ms, wan.suspicion_mult, wan.gossip_interval_ms,
            wan.push_pull_interval_ms) == (5000, 3000, 6, 500, 60_000)


@pytest.mark.parametrize("changes", [
    {"probe_interval_ms": 0},
    {"probe_timeout_ms": 1000},  # Not below the interval.
    {"indirect_checks": -1},
    {"ring_min_fraction": 1.5},
    {"awareness_max_multiplier": 0},
])
def test_bad_config_raises(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SwimConfig(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "expected_ms"), [
    (1, 4000), (5, 4000), (10, 4000), (100, 8000), (1000, 12000),
])
def test_suspicion_timeout_is_memberlists(n: int, expected_ms: int) -> None:
    assert suspicion_timeout_ms(4, n, 1000) == expected_ms


@pytest.mark.parametrize(("confirmations", "k", "expected_ms"), [
    (0, 3, 24000),  # Starts at the maximum...
    (1, 3, 14000),  # ...max - log(2)/log(4) * (max - min)...
    (2, 3, 8150),
    (3, 3, 4000),  # ...and reaches the minimum with k confirmations.
    (5, 3, 4000),  # Never below it.
    (0, 0, 4000),  # No confirmations to expect (small cluster): the minimum at once.
])
def test_suspicion_shrinks_log_scaled(confirmations: int, k: int, expected_ms: int) -> None:
    assert remaining_suspicion_ms(confirmations, k, 0, 4000, 24000) == expected_ms
    assert remaining_suspicion_ms(confirmations, k, 1500, 4000, 24000) == expected_ms - 1500


@pytest.mark.parametrize(("n", "expected"), [(1, 4), (9, 4), (10, 8), (99, 8), (100, 12)])
def test_retransmit_limit(n: int, expected: int) -> None:
    assert retransmit_limit(4, n) == expected


@pytest.mark.parametrize(("n", "expected_ms"), [(3, 30_000), (32, 30_000), (33, 60_000), (64, 60_000),
                                                 (65, 90_000), (128, 90_000)])
def test_push_pull_interval_stretches_above_32(n: int, expected_ms: int) -> None:
    assert push_pull_interval_ms(30_000, n) == expected_ms


def update(state: State, incarnation: int = 0, generation: int = 1, *, reporter: str = "r",
           lamport: int = 0, index: int = 1) -> MemberUpdate:
    return MemberUpdate(member_info(index, generation=generation), state, incarnation, reporter_id=reporter,
                        lamport=lamport)


@pytest.mark.parametrize(("winner", "loser"), [
    (update(State.SUSPECT, 3), update(State.ALIVE, 3)),  # Same incarnation: suspect > alive...
    (update(State.DEAD, 3), update(State.SUSPECT, 3)),  # ...dead > suspect.
    (update(State.ALIVE, 4), update(State.SUSPECT, 3)),  # A refutation beats the suspicion...
    (update(State.ALIVE, 4), update(State.DEAD, 3)),  # ...and a death it did not hear of in time.
    (update(State.LEFT, 0), update(State.ALIVE, 9)),  # Terminal within the generation.
    (update(State.REMOVED, 0), update(State.DEAD, 9)),
    (update(State.REMOVED, 1), update(State.LEFT, 5)),  # Removed over left.
    (update(State.REMOVED, 1, lamport=7), update(State.REMOVED, 1, lamport=3)),  # Later event.
    (update(State.ALIVE, 0, generation=2), update(State.REMOVED, 9, generation=1)),  # A restart rejoins.
    (update(State.ALIVE, 0, generation=2), update(State.DEAD, 9, generation=1)),
    (update(State.SUSPECT, 3, reporter="b"), update(State.SUSPECT, 3, reporter="a")),  # Deterministic tie.
    (update(State.LEAVING, 3), update(State.ALIVE, 3)),  # Leaving ranks between alive...
    (update(State.SUSPECT, 3), update(State.LEAVING, 3)),  # ...and suspect: a leaving member can be suspected...
    (update(State.LEAVING, 4), update(State.DEAD, 3)),  # ...and refutes as leaving.
    (update(State.LEFT, 0), update(State.LEAVING, 9)),  # Then it is gone for good.
])
def test_merge_precedence(winner: MemberUpdate, loser: MemberUpdate) -> None:
    assert newer(winner, loser) and not newer(loser, winner)
    assert merge(winner, loser) == merge(loser, winner) == winner
    assert merge(winner, winner) == winner


def test_member_update_keeps_info_state_in_step() -> None:
    u = MemberUpdate(member_info(1), State.DEAD, 2)
    assert u.info.state == "dead" and u.node_id == "node-01" and u.generation == 1


def test_a_leaving_record_marks_every_record_derived_from_it() -> None:
    leaving = MemberUpdate(member_info(1), State.LEAVING, 2, reporter_id="node-01")
    assert leaving.leaving and leaving.info.state == "leaving" and not leaving.in_ring
    suspect = leaving.restate(State.SUSPECT, reporter_id="node-02")
    dead = suspect.restate(State.DEAD, reporter_id="node-03")
    assert (suspect.state, suspect.incarnation, suspect.leaving) == (State.SUSPECT, 2, True)
    assert dead.leaving and not suspect.in_ring and not dead.in_ring
    assert MemberUpdate(member_info(1), State.DEAD, 2).in_ring  # A member that never left keeps its tokens.
    assert newer(suspect, leaving) and newer(dead, suspect)


def ring_of(*members: tuple[str, str, State]) -> dict[str, tuple[str, State]]:
    return {node_id: (site, state) for node_id, site, state in members}


A, S, D = State.ALIVE, State.SUSPECT, State.DEAD


@pytest.mark.parametrize(("ring", "node_id", "expected"), [
    (ring_of(("a", "x", A), ("b", "x", A), ("c", "x", A), ("d", "x", D)), "d", None),  # 3/4 live: ok.
    (ring_of(("a", "x", A), ("b", "x", S), ("c", "x", A), ("d", "x", D)), "d", None),  # Suspects count live.
    (ring_of(("a", "x", A), ("b", "x", A), ("c", "x", D), ("d", "x", D)), "d", "ring"),  # 2/4 live.
    (ring_of(("a", "x", A), ("b", "x", A), ("c", "x", D)), "c", "ring"),  # 2/3 < 75%: three nodes never auto.
    (ring_of(*[(f"n{i}", "x", A) for i in range(6)], ("y1", "y", D), ("y2", "y", D)), "y1", "site"),
    (ring_of(*[(f"n{i}", "x", A) for i in range(6)], ("y1", "y", D), ("y2", "y", A)), "y1", None),
    (ring_of(*[(f"n{i}", "x", A) for i in range(6)], ("y1", "y", D)), "y1", "site"),  # Its site's last node.
    (ring_of(("a", "x", A)), "zz", "not in ring"),
])
def test_removal_rails(ring: dict[str, tuple[str, State]], node_id: str, expected: str | None) -> None:
    assert removal_blocked(ring, node_id, 0.75) == expected


# ===================================================================== one state machine, by hand


def make(n: int = 5, config: SwimConfig = LAN, me: int = 0, seed: int = 0, now_ms: int = 0,
         sites: list[str] | None = None) -> tuple[Swim, list[MemberInfo]]:
    """Node `me` of an n-member cluster, knowing every member alive."""
    infos = [member_info(i, site=sites[i] if sites else "default") for i in range(n)]
    swim = Swim(config, infos[me], random.Random(seed), now_ms)
    swim.on_message(now_ms, "", PushPullReply(tuple(MemberUpdate(info, State.ALIVE) for info in infos)))
    swim.drain_events()
    return swim, infos


def drive(swim: Swim, until_ms: int, answer: dict[str, bool] | None = None, now_ms: int = 0
          ) -> list[tuple[int, Outbound]]:
    """Tick `swim` at each of its deadlines up to `until_ms`. Pings to ids in `answer` mapped to
    True are acked at once by their target (plain network with 0 ms latency)."""
    sent: list[tuple[int, Outbound]] = []
    for _ in range(100_000):
        at_ms = max(swim.next_tick_ms(), now_ms)
        if at_ms > until_ms:
            break
        now_ms = at_ms
        pending = list(swim.tick(now_ms))
        while pending:
            outbound = pending.pop(0)
            sent.append((now_ms, outbound))
            message = outbound.message
            if isinstance(message, Ping) and answer and answer.get(outbound.target_id):
                pending.extend(swim.on_message(now_ms, outbound.target_id, Ack(message.sequence_number)))
    return sent


def of_type(sent: list[tuple[int, Outbound]], kind: type) -> list[tuple[int, Outbound]]:
    return [(t, o) for t, o in sent if isinstance(o.message, kind)]


def next_probe(swim: Swim, now_ms: int = 0) -> tuple[int, Outbound]:
    """Tick until the next probe's Ping goes out."""
    for _ in range(1000):
        at_ms = max(swim.next_tick_ms(), now_ms)
        pings = [o for o in swim.tick(at_ms) if isinstance(o.message, Ping)]
        if pings:
            return at_ms, pings[0]
        now_ms = at_ms
    raise AssertionError("no probe")


def test_ping_is_acked_and_a_ping_for_someone_else_is_not() -> None:
    swim, _ = make()
    [reply] = swim.on_message(10, "node-01", Ping(42, "node-00"))
    assert reply.target_id == "node-01" and isinstance(reply.message, Ack)
    assert reply.message.sequence_number == 42
    assert swim.on_message(10, "node-01", Ping(43, "node-07")) == []


def test_probes_go_round_robin_over_a_shuffled_order() -> None:
    swim, _ = make(n=6)
    everyone = {f"node-{i:02d}": True for i in range(1, 6)}
    pings = of_type(drive(swim, 15_000, everyone), Ping)
    targets = [o.target_id for _, o in pings]
    assert len(targets) == 15  # One probe per interval.
    for cycle in range(3):  # Each cycle of n-1 probes visits every member once.
        assert sorted(targets[cycle * 5:(cycle + 1) * 5]) == sorted(everyone)
    assert targets[:5] != targets[5:10] or targets[5:10] != targets[10:15]  # Reshuffled at each wrap.
    stats = swim.statistics()
    assert stats.probes_sent == stats.probe_acks == 15 and stats.awareness == 0
    assert swim.events == []


def test_silent_target_gets_indirect_probes_then_is_suspected() -> None:
    swim, _ = make(n=6)
    start_ms, ping = next_probe(swim)
    target = ping.target_id
    sent = drive(swim, start_ms + LAN.probe_interval_ms - 1, now_ms=start_ms)
    indirect = of_type(sent, IndirectPing)
    assert len(indirect) == LAN.indirect_checks
    assert all(t == start_ms + LAN.probe_timeout_ms for t, _ in indirect)
    assert target not in {o.target_id for _, o in indirect} and "node-00" not in {o.target_id for _, o in indirect}
    for _, o in indirect:
        assert isinstance(o.message, IndirectPing) and o.message.target.node_id == target
        assert o.message.sequence_number == ping.message.sequence_number  # type: ignore[union-attr]
        assert 0 < o.message.probe_timeout_ms < LAN.probe_interval_ms - LAN.probe_timeout_ms
    # Every intermediary answers with a nack: they are fine, so we are not the problem.
    for _, o in indirect:
        swim.on_message(start_ms + 900, o.target_id, Nack(o.message.sequence_number))  # type: ignore[union-attr]
    assert swim.state_of(target) is State.ALIVE
    drive(swim, start_ms + LAN.probe_interval_ms, now_ms=start_ms + 900)
    assert swim.state_of(target) is State.SUSPECT
    assert swim.events[-1][1:] == (target, State.ALIVE, State.SUSPECT)
    stats = swim.statistics()
    assert (stats.probe_failures, stats.suspicions_raised, stats.nacks_received, stats.awareness) == (1, 1, 3, 0)
    assert swim.is_alive(target)  # A suspect still counts as reachable for data.
    assert target in {m.node_id for m in swim.ring_members()}


def test_missing_nacks_raise_local_health_score_and_stretch_the_probe_interval() -> None:
    swim, _ = make(n=6)
    pings = of_type(drive(swim, 60_000), Ping)  # Nobody answers anything: 3 missing nacks per probe.
    gaps = [b - a for (a, _), (b, _) in zip(pings, pings[1:])]
    # (awareness + 1) x probe interval, awareness 0, 3, 6, then the cap 7.
    assert gaps[:4] == [1_000, 4_000, 7_000, 8_000]
    assert set(gaps[4:]) == {LAN.probe_interval_ms * LAN.awareness_max_multiplier}
    assert swim.statistics().awareness == LAN.awareness_max_multiplier - 1
    # Everyone was suspected, then declared dead, meanwhile. They refute; successful probes
    # bring the score back down, one step each.
    refutations = tuple(MemberUpdate(member_info(i), State.ALIVE, 1) for i in range(1, 6))
    swim.on_message(60_000, "node-01", Gossip(refutations))
    everyone = {f"node-{i:02d}": True for i in range(1, 6)}
    drive(swim, 60_000 + 3 * 8_000, everyone, now_ms=60_000)
    stats = swim.statistics()
    assert stats.probe_acks >= 3 and stats.awareness == LAN.awareness_max_multiplier - 1 - stats.probe_acks


def test_an_indirect_ack_saves_the_target() -> None:
    swim, _ = make(n=6)
    start_ms, ping = next_probe(swim)
    indirect = of_type(drive(swim, start_ms + LAN.probe_timeout_ms, now_ms=start_ms), IndirectPing)
    helper = indirect[0][1]
    swim.on_message(start_ms + 700, helper.target_id, Ack(helper.message.sequence_number))  # type: ignore[union-attr]
    drive(swim, start_ms + 2 * LAN.probe_interval_ms - 1, now_ms=start_ms + 700)
    assert swim.state_of(ping.target_id) is State.ALIVE
    stats = swim.statistics()
    assert (stats.probe_acks, stats.indirect_acks, stats.probe_failures) == (1, 1, 0)


def test_intermediary_relays_the_ack_or_nacks_on_silence() -> None:
    swim, infos = make(n=6)
    [ping] = swim.on_message(100, "node-01", IndirectPing(7, infos[2], 400))
    assert ping.target_id == "node-02" and ping.address == infos[2].peer_address
    assert isinstance(ping.message, Ping)
    [relayed] = swim.on_message(105, "node-02", Ack(ping.message.sequence_number))
    assert relayed.target_id == "node-01" and isinstance(relayed.message, Ack)
    assert relayed.message.sequence_number == 7
    assert swim.relay_deadline_ms(ping.message.sequence_number) is None  # Done with.
    # A silent target: the nack comes at the deadline the requester set, not later.
    [ping] = swim.on_message(200, "node-01", IndirectPing(8, infos[3], 400))
    assert swim.relay_deadline_ms(ping.message.sequence_number) == 600  # The transport waits that long.
    assert swim.next_tick_ms() <= 600
    nacks = [o for o in swim.tick(600) if isinstance(o.message, Nack)]
    assert [(o.target_id, o.message.sequence_number) for o in nacks] == [("node-01", 8)]  # type: ignore[union-attr]
    assert swim.on_message(650, "node-03", Ack(ping.message.sequence_number)) == []  # type: ignore[union-attr]


def test_undeliverable_probe_goes_straight_to_indirect_probes() -> None:
    swim, _ = make(n=6)
    start_ms, ping = next_probe(swim)
    out = swim.message_failed(start_ms + 1, ping)
    assert len([o for o in out if isinstance(o.message, IndirectPing)]) == LAN.indirect_checks


def test_suspected_member_refutes_with_a_higher_incarnation() -> None:
    swim, infos = make()
    accusation = MemberUpdate(infos[0], State.SUSPECT, 0, reporter_id="node-03")
    [reply] = swim.on_message(50, "node-03", Ping(1, "node-00", (accusation,)))
    assert swim.incarnation == 1 and swim.self_state() is State.ALIVE
    assert isinstance(reply.message, Ack)
    refutation = [u for u in reply.message.updates if u.node_id == "node-00"]
    assert refutation == [MemberUpdate(infos[0], State.ALIVE, 1, reporter_id="node-00")]
    stats = swim.statistics()
    assert stats.suspicions_refuted == 1 and stats.awareness == 1  # Lifeguard: being suspected hints we are slow.
    # Even a death at our incarnation is refuted; an old one is ignored.
    swim.on_message(60, "node-04", Gossip((MemberUpdate(infos[0], State.DEAD, 1, reporter_id="node-04"),)))
    assert swim.incarnation == 2
    swim.on_message(70, "node-04", Gossip((MemberUpdate(infos[0], State.DEAD, 0, reporter_id="node-04"),)))
    assert swim.incarnation == 2
    # Another generation of us is not ours to refute.
    older = replace(infos[0], generation=0)
    swim.on_message(80, "node-04", Gossip((MemberUpdate(older, State.DEAD, 9, reporter_id="node-04"),)))
    assert swim.incarnation == 2 and swim.self_state() is State.ALIVE


def test_a_ping_to_a_suspect_carries_its_suspicion_first() -> None:
    swim, infos = make(n=6)
    suspicion = MemberUpdate(infos[3], State.SUSPECT, 0, reporter_id="node-01")
    swim.on_message(0, "node-01", Gossip((suspicion,)))
    now_ms = 0
    for _ in range(6):
        now_ms, out = next_probe(swim, now_ms)
        swim.on_message(now_ms, out.target_id, Ack(out.message.sequence_number))  # type: ignore[union-attr]
        if out.target_id == "node-03":
            assert isinstance(out.message, Ping) and out.message.updates[0] == suspicion
            return
    pytest.fail("node-03 was never probed")


def test_suspicion_timer_shrinks_with_distinct_accusers() -> None:
    swim, infos = make(n=8)
    base = suspicion_timeout_ms(LAN.suspicion_mult, 8, LAN.probe_interval_ms)
    maximum = base * LAN.suspicion_max_timeout_mult

    def accuse(reporter: str, at_ms: int) -> None:
        swim.on_message(at_ms, reporter, Gossip((MemberUpdate(infos[5], State.SUSPECT, 0, reporter_id=reporter),)))

    def deadline() -> int:
        return swim._suspicions["node-05"].deadline_ms()  # noqa: SLF001 - the timer itself is the subject.

    accuse("node-01", 1000)  # The first accuser starts the timer but does not count.
    assert deadline() == 1000 + maximum
    accuse("node-01", 1100)  # The same accuser again: no change.
    assert deadline() == 1000 + maximum
    accuse("node-02", 1200)
    assert deadline() == 1000 + remaining_suspicion_ms(1, 3, 0, base, maximum)
    accuse("node-03", 1300)
    accuse("node-04", 1400)
    assert deadline() == 1000 + base
    drive(swim, 1000 + base - 1, now_ms=1400)
    assert swim.state_of("node-05") is State.SUSPECT
    drive(swim, 1000 + base, now_ms=1000 + base - 1)
    assert swim.state_of("node-05") is State.DEAD
    assert swim.statistics().deaths_declared == 1
    assert not swim.is_alive("node-05") and "node-05" in {m.node_id for m in swim.ring_members()}


def test_small_cluster_expects_no_confirmations() -> None:
    swim, infos = make(n=4)  # n - 2 = 2 < 3 possible confirmers: k = 0, the base timeout.
    swim.on_message(0, "node-01", Gossip((MemberUpdate(infos[2], State.SUSPECT, 0, reporter_id="node-01"),)))
    assert swim._suspicions["node-02"].deadline_ms() == 4000  # noqa: SLF001


def test_refutation_ends_the_suspicion() -> None:
    swim, infos = make(n=6)
    swim.on_message(0, "node-01", Gossip((MemberUpdate(infos[2], State.SUSPECT, 0, reporter_id="node-01"),)))
    swim.on_message(500, "node-02", Gossip((MemberUpdate(infos[2], State.ALIVE, 1, reporter_id="node-02"),)))
    drive(swim, 60_000, {f"node-{i:02d}": True for i in range(1, 6)}, now_ms=500)
    assert swim.state_of("node-02") is State.ALIVE
    assert swim.statistics().suspicions_cleared == 1


def test_a_stalled_node_does_not_accuse() -> None:
    swim, _ = make(n=6)
    start_ms, ping = next_probe(swim)
    swim.tick(start_ms + 3_000)  # Our own process stopped for 3 s mid-probe.
    assert swim.state_of(ping.target_id) is State.ALIVE
    assert swim.statistics().probes_abandoned == 1


def test_piggybacked_updates_respect_budget_and_retransmit_limit() -> None:
    config = replace(LAN, piggyback_bytes_max=300)
    swim, infos = make(n=6, config=config)
    while swim.statistics().broadcast_queue_depth:  # What the set-up queued goes first.
        swim.on_message(0, "node-02", Ping(1, "node-00"))
    others = [member_info(i) for i in range(10, 30)]
    swim.on_message(0, "node-01", Gossip(tuple(MemberUpdate(info, State.ALIVE) for info in others)))
    limit = retransmit_limit(config.retransmit_mult, 26)
    counts: dict[str, int] = {}
    for _ in range(200):
        [reply] = swim.on_message(1, "node-02", Ping(1, "node-00"))
        updates = reply.message.updates  # type: ignore[union-attr]
        assert sum(message_bytes(Gossip((u,))) - message_bytes(Gossip(())) for u in updates) <= 300
        for u in updates:
            counts[u.node_id] = counts.get(u.node_id, 0) + 1
    assert set(counts) == {info.node_id for info in others}
    assert set(counts.values()) == {limit}
    assert swim.statistics().broadcast_queue_depth == 0


def test_newest_updates_go_first() -> None:
    swim, infos = make(n=6, config=replace(LAN, piggyback_bytes_max=100))
    swim.on_message(0, "node-01", Gossip((MemberUpdate(member_info(20), State.ALIVE),)))
    swim.on_message(0, "node-01", Gossip((MemberUpdate(member_info(21), State.ALIVE),)))
    [reply] = swim.on_message(1, "node-02", Ping(1, "node-00"))
    assert [u.node_id for u in reply.message.updates] == ["node-21"]  # type: ignore[union-attr]


def test_full_state_dead_only_makes_us_suspect() -> None:
    swim, infos = make(n=6)
    dead = MemberUpdate(infos[3], State.DEAD, 0, reporter_id="node-04")
    swim.on_message(0, "node-04", PushPullReply((dead,)))
    assert swim.state_of("node-03") is State.SUSPECT
    swim.on_message(0, "node-04", Gossip((dead,)))  # Gossiped news of a death is taken as it is.
    assert swim.state_of("node-03") is State.DEAD


def test_push_pull_request_is_answered_with_the_state_before_the_merge() -> None:
    swim, infos = make(n=3)
    newcomer = MemberUpdate(member_info(9), State.ALIVE)
    [reply] = swim.on_message(0, "node-09", PushPullRequest((newcomer,)))
    assert isinstance(reply.message, PushPullReply)
    assert {u.node_id for u in reply.message.members} == {"node-00", "node-01", "node-02"}
    assert swim.state_of("node-09") is State.ALIVE


def test_join_is_refused_for_an_older_generation_of_a_known_id() -> None:
    swim, infos = make(n=3)
    stale = MemberUpdate(replace(infos[1], generation=0), State.ALIVE)
    [reply] = swim.on_message(0, "node-01", JoinRequest(stale))
    assert isinstance(reply.message, JoinReply) and not reply.message.accepted
    assert "generation" in reply.message.reason
    [reply] = swim.on_message(0, "node-00", JoinRequest(swim.me))
    assert isinstance(reply.message, JoinReply) and not reply.message.accepted
    swim.remove(0, "node-02")  # A removed generation cannot come back; the next one can.
    [reply] = swim.on_message(1, "node-02", JoinRequest(MemberUpdate(infos[2], State.ALIVE)))
    assert isinstance(reply.message, JoinReply) and not reply.message.accepted and "restart" in reply.message.reason
    [reply] = swim.on_message(2, "node-02", JoinRequest(MemberUpdate(replace(infos[2], generation=2), State.ALIVE)))
    assert isinstance(reply.message, JoinReply) and reply.message.accepted
    assert swim.state_of("node-02") is State.ALIVE and swim.record("node-02").generation == 2  # type: ignore[union-attr]


def test_join_retries_until_a_seed_answers() -> None:
    info = member_info(5)
    swim = Swim(LAN, info, random.Random(1), 0)
    first = swim.join(0, ["10.0.0.1:7946", info.peer_address])  # Our own address is not a seed.
    assert [(o.target_id, o.address) for o in first] == [("", "10.0.0.1:7946")]
    sent = drive(swim, 3 * LAN.join_retry_interval_ms)
    assert len(of_type(sent, JoinRequest)) == 3
    seed = member_info(1)
    swim.on_message(16_000, "node-01", JoinReply(True, "", (MemberUpdate(seed, State.ALIVE),)))
    assert swim.state_of("node-01") is State.ALIVE
    assert of_type(drive(swim, 40_000, {"node-01": True}, now_ms=16_000), JoinRequest) == []


def test_a_join_refused_for_placement_is_not_asked_again() -> None:
    """A refusal that may clear up (an id in use) is retried; one for other placement
    settings (JoinRefusal.PLACEMENT: the joiner's shell compared the seed's settings) is
    not: join_refusal says so and no JoinRequest follows."""
    info = member_info(5)
    swim = Swim(LAN, info, random.Random(1), 0)
    swim.join(0, ["10.0.0.1:7946"])
    swim.on_message(10, "node-01", JoinReply(False, "node id in use"))
    assert swim.join_refusal is JoinRefusal.NONE and not swim.joined
    assert len(of_type(drive(swim, 2 * LAN.join_retry_interval_ms, now_ms=10), JoinRequest)) == 2
    at_ms = 2 * LAN.join_retry_interval_ms + 10
    swim.on_message(at_ms, "node-01", JoinReply(False, "replication settings differ", refusal=JoinRefusal.PLACEMENT))
    assert swim.join_refusal is JoinRefusal.PLACEMENT and not swim.joined
    assert swim.join_refused_reason == "replication settings differ"
    assert of_type(drive(swim, at_ms + 5 * LAN.join_retry_interval_ms, now_ms=at_ms), JoinRequest) == []


def test_operator_remove_needs_a_known_other_member() -> None:
    swim, _ = make()
    with pytest.raises(ValueError):
        swim.remove(0, "node-00")
    with pytest.raises(KeyError):
        swim.remove(0, "node-77")
    out = swim.remove(0, "node-02")
    assert swim.state_of("node-02") is State.REMOVED
    assert out and all(isinstance(o.message, Gossip) for o in out)
    assert "node-02" not in {m.node_id for m in swim.ring_members()}
    assert swim.remove(1, "node-02") == []


def test_statistics_count_messages_and_bytes_by_type() -> None:
    swim, _ = make()
    swim.on_message(0, "node-01", Ping(1, "node-00"))
    stats = swim.statistics()
    assert stats.messages_received == {"PushPullReply": 1, "Ping": 1} and stats.messages_sent == {"Ack": 1}
    assert stats.bytes_sent["Ack"] >= 64
    assert stats.members_by_state["alive"] == 5


# ===================================================================== clusters on the simulated network


def wait_converged(cluster: SwimCluster, timeout_ms: int = 30_000) -> None:
    assert cluster.run_until_true(cluster.converged, timeout_ms), "cluster did not converge"


def test_cluster_converges_through_a_seed() -> None:
    cluster = SwimCluster(12, LOCAL, seed=3)
    wait_converged(cluster, 10_000)
    assert cluster.now_ms < 2_000
    ring = cluster.swim("node-05").ring_members()
    assert [m.node_id for m in ring] == [f"node-{i:02d}" for i in range(12)]


@pytest.mark.parametrize("profile", ["lan", "local"])
@pytest.mark.parametrize("n", [5, 10, 30])
def test_killed_member_is_declared_dead_by_everyone(profile: str, n: int) -> None:
    config = getattr(SwimConfig, profile)()
    cluster = SwimCluster(n, config, seed=n, bootstrap="full", latency_ms=(1, 3))
    cluster.run_for(3 * config.probe_interval_ms + 137)
    victim = f"node-{n // 2:02d}"
    killed_ms = cluster.now_ms
    cluster.kill(victim)
    base_ms = suspicion_timeout_ms(config.suspicion_mult, n, config.probe_interval_ms)
    # Lifeguard's bound: a probe round to notice, plus the longest a suspicion can last.
    bound_ms = 4 * config.probe_interval_ms + base_ms * config.suspicion_max_timeout_mult
    assert cluster.run_until_true(lambda: cluster.agree(victim, State.DEAD), bound_ms, step_ms=10)
    detection = [cluster.first_seen(o, victim, State.DEAD, killed_ms) - killed_ms  # type: ignore[operator]
                 for o in cluster.running()]
    # With independent confirmations the timer runs close to the base timeout.
    assert statistics.median(detection) <= base_ms + (config.suspicion_confirmations + 3) * config.probe_interval_ms
    assert not [t for t in cluster.trace if t[4] == "dead" and t[2] != victim]


def test_no_false_positives_at_1_percent_loss_with_a_member_pausing() -> None:
    """10 minutes, 10 members, 1% loss, one member stalls 2 s every 30 s: suspected, never dead."""
    cluster = SwimCluster(10, LAN, seed=11, loss=0.01, latency_ms=(1, 3))
    wait_converged(cluster)
    start_ms = cluster.now_ms
    for period in range(20):
        cluster.run_until(start_ms + period * 30_000)
        cluster.pause("node-04", 2_000)
    cluster.run_until(start_ms + 600_000)
    assert cluster.transitions(state=State.DEAD) == []
    suspected = cluster.transitions(state=State.SUSPECT, after_ms=start_ms)
    assert suspected and {t[2] for t in suspected} == {"node-04"}  # The pauses are noticed...
    assert cluster.swim("node-04").statistics().suspicions_refuted >= 5  # ...and refuted.
    assert cluster.converged()


def test_a_suspected_live_member_refutes() -> None:
    cluster = SwimCluster(8, LAN, seed=5, bootstrap="full")
    cluster.run_for(2_000)
    others = [i for i in cluster.running() if i != "node-03"]
    cluster.partition(["node-03"], others)
    assert cluster.run_until_true(lambda: any(cluster.view(o, "node-03") is State.SUSPECT for o in others), 20_000)
    cluster.heal()  # Well within the suspicion timeout.
    assert cluster.run_until_true(lambda: cluster.agree("node-03", State.ALIVE), 5_000)
    assert cluster.swim("node-03").incarnation >= 1
    assert cluster.transitions("node-03", State.DEAD) == []


@pytest.mark.parametrize("after", ["dead", "removed", "unnoticed"])
def test_a_restarted_member_rejoins_with_a_higher_generation(after: str) -> None:
    cluster = SwimCluster(6, SwimConfig.local(dead_grace_ms=3_000), seed=8, bootstrap="full")
    cluster.run_for(1_000)
    cluster.kill("node-02")
    if after != "unnoticed":
        state = State.DEAD if after == "dead" else State.REMOVED
        assert cluster.run_until_true(lambda: cluster.agree("node-02", state), 20_000)
    restarted = cluster.restart("node-02")
    assert restarted.generation == 2
    wait_converged(cluster, 10_000)
    for observer in cluster.running():
        record = cluster.swim(observer).record("node-02")
        assert record is not None and (record.state, record.generation) == (State.ALIVE, 2)


def test_leave_propagates_as_left() -> None:
    cluster = SwimCluster(10, LOCAL, seed=4, bootstrap="full", loss=0.05)
    cluster.run_for(1_000)
    cluster.leave("node-06")
    assert cluster.run_until_true(lambda: cluster.agree("node-06", State.LEFT), 5_000)
    cluster.run_for(5_000)
    for observer in cluster.running():
        swim = cluster.swim(observer)
        if observer != "node-06":
            assert "node-06" not in {m.node_id for m in swim.ring_members()} and not swim.is_alive("node-06")
    assert cluster.swim("node-06").self_state() is State.LEFT
    assert cluster.swim("node-06").incarnation == 1
    assert cluster.transitions("node-06", State.SUSPECT) == []


def test_a_leaving_member_stays_reachable_out_of_the_ring_then_leaves() -> None:
    cluster = SwimCluster(6, LOCAL, seed=12, bootstrap="full", loss=0.02)
    cluster.run_for(1_000)
    cluster.start_leaving("node-03")
    assert cluster.swim("node-03").self_state() is State.LEAVING
    assert cluster.run_until_true(lambda: cluster.agree("node-03", State.LEAVING), 2_000)
    cluster.run_for(3_000)  # Probes and gossip go on; nobody suspects it.
    for observer in cluster.running():
        swim = cluster.swim(observer)
        assert "node-03" not in {m.node_id for m in swim.ring_members()}
        assert swim.is_alive("node-03") and swim.state_of("node-03") is State.LEAVING
    assert cluster.swim("node-03").statistics().probes_sent > 0  # It still takes part.
    cluster.leave("node-03")
    assert cluster.run_until_true(lambda: cluster.agree("node-03", State.LEFT), 3_000)
    assert cluster.transitions("node-03", State.SUSPECT) == []


def test_a_suspected_leaving_member_refutes_as_leaving_and_never_rejoins_the_ring() -> None:
    cluster = SwimCluster(8, LAN, seed=13, bootstrap="full")
    cluster.run_for(2_000)
    cluster.start_leaving("node-03")
    assert cluster.run_until_true(lambda: cluster.agree("node-03", State.LEAVING), 3_000)
    others = [i for i in cluster.running() if i != "node-03"]
    cluster.partition(["node-03"], others)
    assert cluster.run_until_true(lambda: any(cluster.view(o, "node-03") is State.SUSPECT for o in others), 20_000)
    for observer in others:
        assert "node-03" not in {m.node_id for m in cluster.swim(observer).ring_members()}
    cluster.heal()
    assert cluster.run_until_true(lambda: cluster.agree("node-03", State.LEAVING), 5_000)
    assert cluster.swim("node-03").self_state() is State.LEAVING
    assert cluster.transitions("node-03", State.ALIVE, after_ms=1) == []


def test_a_leaving_member_that_dies_is_declared_dead_and_removed_without_rejoining_the_ring() -> None:
    cluster = SwimCluster(6, SwimConfig.local(dead_grace_ms=3_000), seed=14, bootstrap="full")
    cluster.run_for(1_000)
    cluster.start_leaving("node-04")
    assert cluster.run_until_true(lambda: cluster.agree("node-04", State.LEAVING), 2_000)
    rings = {o: [m.node_id for m in cluster.swim(o).ring_members()] for o in cluster.running() if o != "node-04"}
    cluster.kill("node-04")

    def ring_unchanged_and(state: State) -> bool:  # Checked at every step: no flap back into the ring.
        for observer, ring in rings.items():
            assert [m.node_id for m in cluster.swim(observer).ring_members()] == ring, observer
        return cluster.agree("node-04", state)

    assert cluster.run_until_true(lambda: ring_unchanged_and(State.DEAD), 10_000, step_ms=10)
    assert cluster.run_until_true(lambda: ring_unchanged_and(State.REMOVED), 10_000, step_ms=10)
    assert cluster.transitions("node-04", State.SUSPECT)  # It went the usual way.


def test_operator_remove_propagates_and_the_removed_node_comes_back_as_its_next_generation() -> None:
    cluster = SwimCluster(10, LOCAL, seed=9, bootstrap="full", loss=0.05)
    cluster.run_for(1_000)
    removed_ms = cluster.now_ms
    cluster.remove("node-01", "node-07")
    assert cluster.run_until_true(lambda: all(cluster.first_seen(o, "node-07", State.REMOVED, removed_ms) is not None
                                              for o in cluster.running()), 5_000)
    assert cluster.swim("node-01").statistics().operator_removals == 1
    # node-07 heard it too (it is in every running node's trace above, its own included), and
    # its driver came back as the next generation (node/swim_membership.py _rejoin).
    assert cluster.membership("node-07").counters.rejoins == 1
    wait_converged(cluster, 10_000)
    for observer in cluster.running():
        record = cluster.swim(observer).record("node-07")
        assert record is not None and (record.state, record.generation) == (State.ALIVE, 2), observer


def test_dead_member_is_removed_after_the_grace_period() -> None:
    cluster = SwimCluster(8, SwimConfig.local(dead_grace_ms=5_000), seed=2, bootstrap="full")
    cluster.run_for(1_000)
    cluster.kill("node-05")
    assert cluster.run_until_true(lambda: cluster.agree("node-05", State.DEAD), 10_000)
    dead_ms = cluster.now_ms
    cluster.run_for(4_000)
    assert cluster.agree("node-05", State.DEAD)
    assert cluster.run_until_true(lambda: cluster.agree("node-05", State.REMOVED), 3_000)
    assert cluster.now_ms - dead_ms >= 4_000


def test_ring_rail_stops_automatic_removal_below_75_percent() -> None:
    cluster = SwimCluster(8, SwimConfig.local(dead_grace_ms=2_000), seed=6, bootstrap="full")
    cluster.run_for(1_000)
    for victim in ("node-01", "node-02", "node-03"):  # 5 of 8 left alive: 62.5%.
        cluster.kill(victim)
    cluster.run_for(20_000)
    survivors = cluster.running()
    for victim in ("node-01", "node-02", "node-03"):
        assert cluster.agree(victim, State.DEAD, survivors)
    assert cluster.swim("node-00").removal_blocked_reasons() == dict.fromkeys(("node-01", "node-02", "node-03"),
                                                                             "ring")
    cluster.remove("node-00", "node-03")  # The operator may; now 5 of 7 alive is still under 75%.
    cluster.run_for(10_000)
    assert cluster.agree("node-01", State.DEAD, survivors) and cluster.agree("node-03", State.REMOVED, survivors)
    cluster.remove("node-00", "node-02")  # 5 of 6 alive: the last dead member may now go.
    assert cluster.run_until_true(lambda: cluster.agree("node-01", State.REMOVED, survivors), 5_000)


def test_site_rail_never_removes_a_whole_site() -> None:
    sites = ["east"] * 8 + ["west"] * 2
    cluster = SwimCluster(10, SwimConfig.local(dead_grace_ms=2_000), seed=12, bootstrap="full", sites=sites)
    cluster.run_for(1_000)
    east = [f"node-{i:02d}" for i in range(8)]
    cluster.partition(east, ["node-08", "node-09"])  # 8/10 = 80%: the ring rail alone would allow it.
    cluster.run_for(20_000)
    assert cluster.agree("node-08", State.DEAD, east) and cluster.agree("node-09", State.DEAD, east)
    assert cluster.swim("node-00").removal_blocked_reasons() == {"node-08": "site", "node-09": "site"}
    # The west side sees 8 of 10 dead: the ring rail holds there.
    assert cluster.swim("node-08").removal_blocked_reasons().get("node-00") == "ring"
    cluster.heal()
    assert cluster.run_until_true(cluster.converged, 20_000)


def test_a_healed_site_cut_removes_no_member() -> None:
    """Chaos run 02:04 UTC, stop 22 (3 sites x 2 nodes, site3 cut 18.4 s, dead grace 10 s): at
    the heal the side that saw site3 dead heard c3 alive first, the site rail let go of c6
    (dead past its grace) before c6 could refute, and c6 was removed; the cut side did the
    same to c2. A member a rail held back gets a fresh grace once the rail lets go."""
    sites = ["site1", "site2", "site3"] * 2
    for seed in range(6):
        cluster = SwimCluster(6, SwimConfig.local(dead_grace_ms=2_000), seed=seed, bootstrap="full", sites=sites)
        cluster.run_for(1_000)
        cut = ["node-02", "node-05"]
        rest = [n for n in cluster.running() if n not in cut]
        cluster.partition(rest, cut)
        cluster.run_for(15_000)
        assert cluster.agree("node-02", State.DEAD, rest) and cluster.agree("node-05", State.DEAD, rest)
        # 4 of 6 alive: the ring rail holds them (the site rail too).
        assert set(cluster.swim("node-00").removal_blocked_reasons()) == {"node-02", "node-05"}
        healed_ms = cluster.now_ms
        # Links come back one at a time: node-02 is heard alive a moment before node-05.
        cluster.heal()
        cluster.partition([n for n in cluster.running() if n != "node-05"], ["node-05"])
        cluster.run_for(500)
        cluster.heal()
        assert cluster.run_until_true(cluster.converged, 20_000), seed
        removed = cluster.transitions(state=State.REMOVED, after_ms=healed_ms)
        assert removed == [], (seed, removed)
        for observer in cluster.running():
            for node_id in cluster.running():
                record = cluster.swim(observer).record(node_id)
                assert record is not None and (record.state, record.generation) == (State.ALIVE, 1), (seed, observer)
        cluster.close()


def test_partition_heals_through_push_pull() -> None:
    cluster = SwimCluster(10, SwimConfig.local(dead_grace_ms=600_000), seed=13, bootstrap="full")
    cluster.run_for(1_000)
    side_a, side_b = cluster.running()[:6], cluster.running()[6:]
    cluster.partition(side_a, side_b)
    cluster.run_for(15_000)
    assert all(cluster.agree(b, State.DEAD, side_a) for b in side_b)
    healed_ms = cluster.now_ms
    cluster.heal()
    assert cluster.run_until_true(cluster.converged, 30_000)
    assert cluster.now_ms - healed_ms <= 10 * LOCAL.push_pull_interval_ms


def seeded_trace(seed: int) -> str:
    cluster = SwimCluster(8, LOCAL, seed=seed, loss=0.05, latency_ms=(1, 5))
    cluster.run_for(2_000)
    cluster.kill("node-03")
    cluster.pause("node-05", 700)
    cluster.run_for(5_000)
    cluster.restart("node-03")
    cluster.run_for(3_000)
    return cluster.trace_hash()


def test_same_seed_same_event_trace() -> None:
    assert seeded_trace(21) == seeded_trace(21)
    assert seeded_trace(21) != seeded_trace(22)


def test_gossip_reaches_98_percent_within_log2_n_plus_3_rounds_at_10_percent_loss() -> None:
    """Operator removals spread from one node; rounds = elapsed / gossip_interval_ms, rounded up."""
    n = 30
    cluster = SwimCluster(n, LAN, seed=17, loss=0.10, latency_ms=(1, 3), bootstrap="full")
    cluster.run_for(3_000)
    bound = math.ceil(math.log2(n)) + 3
    rounds = []
    for trial in range(8):
        running = cluster.running()
        origin, victim = running[trial], running[-1]
        started_ms = cluster.now_ms
        cluster.remove(origin, victim)
        cluster.kill(victim)
        cluster.run_for(bound * LAN.gossip_interval_ms + 1)
        for observer in cluster.running():
            if observer != origin:
                seen = cluster.first_seen(observer, victim, State.REMOVED, started_ms)
                rounds.append(math.inf if seen is None else math.ceil((seen - started_ms) / LAN.gossip_interval_ms))
        cluster.run_for(3_000)
    within = sum(r <= bound for r in rounds) / len(rounds)
    assert within >= 0.98, (within, sorted(rounds)[-10:])


def test_a_join_let_in_by_a_seed_with_a_stale_view_is_withdrawn_on_hearing_a_newer_live_boot() -> None:
    """wipe-restarted seed 551: node-01 restarted as generation 2, then its data dir was wiped
    and it came back as generation 1 before one seed had heard of generation 2. That seed let
    it in (it held generation 1 alive); the others held generation 2 alive, and the wiped
    node's acks to their probes kept it so: to the end of the run the cluster held a boot
    that no process ran. Now the join is withdrawn when a newer live boot of our id is heard:
    probes meant for it go unanswered until the cluster holds it dead, and then the node
    joins above it."""
    infos = [member_info(i) for i in range(3)]
    stale_seed = Swim(LAN, infos[0], random.Random(1), 0)  # Still holds node-01's generation 1.
    stale_seed.on_message(0, "", PushPullReply(tuple(MemberUpdate(info, State.ALIVE) for info in infos)))
    second_boot = MemberUpdate(member_info(1, generation=2), State.ALIVE, 0, reporter_id="node-01")
    other_seed = Swim(LAN, infos[2], random.Random(2), 0)
    other_seed.on_message(0, "", PushPullReply((MemberUpdate(infos[0], State.ALIVE), second_boot,
                                                MemberUpdate(infos[2], State.ALIVE))))
    wiped = Swim(LAN, infos[1], random.Random(3), 0)  # Generation 1 again.
    wiped.join(1, [infos[0].peer_address, infos[2].peer_address])
    (accepted,) = stale_seed.on_message(2, "node-01", JoinRequest(wiped.me))
    assert isinstance(accepted.message, JoinReply) and accepted.message.accepted
    wiped.on_message(3, "node-00", accepted.message)
    assert wiped.joined
    (refused,) = other_seed.on_message(4, "node-01", JoinRequest(wiped.me))
    assert isinstance(refused.message, JoinReply) and not refused.message.accepted
    wiped.on_message(5, "node-02", refused.message)  # Carries generation 2, alive.
    assert not wiped.joined and wiped.newer_boot_held == 2
    assert wiped.statistics().joins_withdrawn == 1
    assert wiped.on_message(6, "node-02", Ping(9, "node-01")) == []  # Meant for generation 2.
    assert any(isinstance(o.message, JoinRequest) for o in wiped.tick(6 + LAN.join_retry_interval_ms))
    # The cluster holds generation 2 dead: the node takes it for the boot it replaced (its
    # shell then restarts it above it, as after a refusal carrying a dead record).
    wiped.on_message(7, "node-02", Gossip((second_boot.restate(State.DEAD, reporter_id="node-02"),)))
    assert wiped.dead_boot_record is DeadBootRecord.TAKEN and wiped.dead_boot_generation == 2

    # The seed's own order: the refusal first, then the stale seed's acceptance, which is
    # not taken.
    again = Swim(LAN, infos[1], random.Random(4), 0)
    again.join(1, [infos[0].peer_address, infos[2].peer_address])
    (refused,) = other_seed.on_message(2, "node-01", JoinRequest(again.me))
    again.on_message(3, "node-02", refused.message)
    assert not again.joined and again.newer_boot_held == 2
    (accepted,) = stale_seed.on_message(4, "node-01", JoinRequest(again.me))
    assert isinstance(accepted.message, JoinReply) and accepted.message.accepted
    again.on_message(5, "node-00", accepted.message)
    assert not again.joined and again.statistics().joins_withdrawn == 1
    assert again.on_message(6, "node-02", Ping(9, "node-01")) == []
