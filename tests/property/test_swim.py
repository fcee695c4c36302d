"""Properties of SWIM membership (ring/swim.py) over generated updates and fault schedules.

- The merge of member updates is a join: commutative, associative and idempotent, so
  nodes that heard the same updates in any order, any number of times, agree.
- A `Swim` node holds exactly that merge for every other member, whatever the order
  and chunking of the gossip that brought the updates.
- After any schedule of kills, restarts, stalls, loss and partitions, healing the network
  and restarting what is down (as the node layer does with a removed generation) brings
  every node to the same view: all alive, one ring.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacsnode.ring.swim import Gossip, MemberUpdate, State, Swim, SwimConfig, merge, merge_all
from pacsnode.sim.swim_cluster import SwimCluster, member_info

NODE_INDEXES = [1, 2, 3]


@pytest.fixture(autouse=True)
def _close_swim_clusters() -> Iterator[None]:
    yield
    SwimCluster.close_all()


@st.composite
def member_updates(draw: st.DrawFn) -> MemberUpdate:
    index = draw(st.sampled_from(NODE_INDEXES))
    info = member_info(index, generation=draw(st.integers(1, 3)))
    if draw(st.booleans()):  # Same id and generation, other fields: only the tie-break tells them apart.
        info = info.__class__(**{**info.__dict__, "peer_port": draw(st.sampled_from([7946, 7947]))})
    state = draw(st.sampled_from(list(State)))
    return MemberUpdate(info, state, draw(st.integers(0, 4)), reporter_id=draw(st.sampled_from(["a", "b", "c", ""])),
                        lamport=draw(st.integers(0, 3)), leaving=draw(st.booleans()))


same_member_updates = st.integers(1, 3).flatmap(
    lambda index: st.lists(member_updates().filter(lambda u: u.node_id == f"node-{index:02d}"), min_size=3,
                           max_size=3))


@given(same_member_updates)
def test_merge_is_commutative_associative_idempotent(updates: list[MemberUpdate]) -> None:
    a, b, c = updates
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a
    assert merge(a, b) in (a, b)


@given(st.lists(member_updates(), max_size=30), st.randoms(use_true_random=False))
def test_merge_all_ignores_order_and_repetition(updates: list[MemberUpdate], rnd: random.Random) -> None:
    expected = merge_all(updates)
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    assert merge_all(shuffled) == expected
    assert merge_all(updates + shuffled) == expected
    assert merge_all(updates, into=expected) == expected


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(member_updates(), max_size=30), st.randoms(use_true_random=False))
def test_a_node_holds_the_merge_of_what_it_heard(updates: list[MemberUpdate], rnd: random.Random) -> None:
    expected = merge_all(updates)
    views = []
    for _ in range(2):
        swim = Swim(SwimConfig.lan(), member_info(0), random.Random(0), 0)
        order = list(updates)
        rnd.shuffle(order)
        now_ms = 0
        while order:  # Gossip messages of random sizes, at increasing times.
            size = rnd.randint(1, 5)
            chunk, order = order[:size], order[size:]
            now_ms += rnd.randint(0, 5)
            swim.on_message(now_ms, "node-09", Gossip(tuple(chunk)))
        held = {u.node_id: u for u in (swim.record(m.info.node_id) for m in swim.members()) if u is not None}
        del held["node-00"]
        assert held == expected
        assert swim.self_state() is State.ALIVE and swim.incarnation == 0  # Nothing generated is about it.
        views.append(held)
    assert views[0] == views[1]


ACTIONS = st.one_of(
    st.tuples(st.just("run"), st.integers(100, 4_000)),
    st.tuples(st.just("kill"), st.integers(0, 4)),
    st.tuples(st.just("restart"), st.integers(0, 4)),
    st.tuples(st.just("pause"), st.integers(0, 4), st.integers(100, 3_000)),
    st.tuples(st.just("partition"), st.integers(1, 4)),
    st.tuples(st.just("heal"),),
    st.tuples(st.just("start_leaving"), st.integers(0, 4)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**16), st.floats(0.0, 0.2), st.lists(ACTIONS, min_size=1, max_size=12))
def test_any_fault_schedule_heals_to_one_view(seed: int, loss: float, actions: list[tuple[object, ...]]) -> None:
    cluster = SwimCluster(5, SwimConfig.local(dead_grace_ms=3_000), seed=seed, loss=loss, latency_ms=(1, 4))
    ids = list(cluster.processes)
    for action in actions:
        kind = action[0]
        if kind == "run":
            cluster.run_for(int(action[1]))  # type: ignore[call-overload]
        elif kind == "kill" and len(cluster.running()) > 1:
            cluster.kill(ids[int(action[1])])  # type: ignore[call-overload]
        elif kind == "restart" and cluster.processes[ids[int(action[1])]].down:  # type: ignore[call-overload]
            cluster.restart(ids[int(action[1])])  # type: ignore[call-overload]
        elif kind == "pause":
            cluster.pause(ids[int(action[1])], int(action[2]))  # type: ignore[call-overload]
        elif kind == "partition":
            cut = int(action[1])  # type: ignore[call-overload]
            cluster.partition(ids[:cut], ids[cut:])
        elif kind == "heal":
            cluster.heal()
        elif kind == "start_leaving":
            cluster.start_leaving(ids[int(action[1])])  # type: ignore[call-overload]
    cluster.heal()
    cluster.loss = 0.0
    cluster.run_for(3_000)  # Let pauses end.

    def restarted_and_converged() -> bool:
        for node_id in ids:
            process = cluster.processes[node_id]
            # A node the cluster removed (it was away past dead_grace_ms) learns so after the
            # heal and restarts as its next generation, as the node layer does (a leaving
            # node, too: here it never finishes handing over).
            if process.down or process.swim.self_state() is not State.ALIVE:
                cluster.restart(node_id)
        return cluster.converged()

    assert cluster.run_until_true(restarted_and_converged, 60_000, step_ms=200), {
        o: [(m.info.node_id, m.state.value, m.generation) for m in cluster.swim(o).members()] for o in ids}
    for at_ms, observer, about, old, new in cluster.trace:
        if observer == about:  # A node never believes itself suspect or dead.
            assert new in ("alive", "leaving", "left", "removed"), (at_ms, observer, old, new)
