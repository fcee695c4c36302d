"""Local health (node/health.py), the executor's counts (node/executor.py) and what
membership does while the node is unhealthy (node/swim_membership.py)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from pacsnode.node.executor import CountedExecutor
from pacsnode.node.health import HealthReason, LocalHealth, WatchedReplica, WriteWatch
from pacsnode.node.swim_membership import SwimMembership, swim_config
from pacsnode.ring import swim
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.swim import MemberUpdate, State

STALL_MS = 1_000


# --------------------------------------------------------------------------- LocalHealth
@pytest.mark.parametrize(
    "oldest_write_started_ms, probe_sent_ms, now_ms, reason",
    [
        (None, None, 50_000, HealthReason.HEALTHY),  # Nothing running.
        (49_500, None, 50_000, HealthReason.HEALTHY),  # A write running 500 ms: fine.
        (49_000, None, 50_000, HealthReason.WRITE_STALLED),  # 1000 ms: at the bound.
        (None, 49_100, 50_000, HealthReason.HEALTHY),  # A probe waiting 900 ms.
        (None, 48_000, 50_000, HealthReason.EXECUTOR_STALLED),
        (10_000, 48_000, 50_000, HealthReason.WRITE_STALLED),  # Both: the write is named.
    ],
)
def test_assessment(oldest_write_started_ms: int | None, probe_sent_ms: int | None, now_ms: int,
                    reason: HealthReason) -> None:
    health = LocalHealth(STALL_MS)
    if probe_sent_ms is not None:
        health.probe_sent(probe_sent_ms)
    report = health.assess(now_ms, oldest_write_started_ms)
    assert report.reason is reason
    assert report.healthy == (reason is HealthReason.HEALTHY)
    assert (report.detail == "") == report.healthy


def test_unhealthy_then_healthy_again_as_soon_as_the_store_answers() -> None:
    health = LocalHealth(STALL_MS)
    health.probe_sent(0)
    assert health.assess(500, None).healthy
    first = health.assess(1_200, None)
    assert not first.healthy and first.probe_wait_ms == 1_200 and first.unhealthy_for_ms == 0
    later = health.assess(4_200, None)
    assert later.unhealthy_for_ms == 3_000
    health.probe_answered()
    assert not health.probe_outstanding
    assert health.assess(4_300, None).healthy
    assert health.transitions == 2
    assert health.assess(4_300, None).unhealthy_for_ms == 0


def test_a_bad_bound_is_refused() -> None:
    with pytest.raises(ValueError):
        LocalHealth(0)


# --------------------------------------------------------------------------- WriteWatch, WatchedReplica
class BlockingReplica:
    """A store whose writes wait for `release` (a disk that does not return)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def put_stored(self, stored: object, *, hint_for: str = "") -> str:
        self.entered.set()
        self.release.wait(10)
        return "stored"

    def read_stored(self, study_instance_uid: str, sop_instance_uid: str) -> None:
        return None

    def statistics(self) -> str:
        return "inner"


def test_a_write_that_does_not_return_is_seen_and_forgotten_when_it_does() -> None:
    watch = WriteWatch()
    clock = [1_000]
    inner = BlockingReplica()
    replica = WatchedReplica(inner, watch, lambda: clock[0])  # type: ignore[arg-type]
    health = LocalHealth(STALL_MS)
    writer = threading.Thread(target=replica.put_stored, args=(object(),))
    writer.start()
    assert inner.entered.wait(5)
    assert watch.in_flight == 1 and watch.oldest_started_ms() == 1_000
    assert health.assess(1_999, watch.oldest_started_ms()).healthy
    stalled = health.assess(2_000, watch.oldest_started_ms())
    assert stalled.reason is HealthReason.WRITE_STALLED and stalled.oldest_write_age_ms == 1_000
    inner.release.set()
    writer.join(5)
    assert watch.in_flight == 0 and watch.oldest_started_ms() is None
    assert health.assess(2_100, watch.oldest_started_ms()).healthy
    # Reads pass through unwatched, and so does anything else the store offers.
    assert replica.read_stored("1.2", "1.2.3") is None and replica.statistics() == "inner"


# --------------------------------------------------------------------------- CountedExecutor
def test_the_executor_counts_running_and_queued_tasks() -> None:
    executor = CountedExecutor(2, thread_name_prefix="test-counted")
    gate = threading.Event()
    try:
        futures = [executor.submit(gate.wait, 10) for _ in range(5)]
        deadline = time.monotonic() + 5
        while executor.statistics().running < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = executor.statistics()
        assert (stats.running, stats.queued, stats.threads, stats.threads_max) == (2, 3, 2, 2)
        assert futures[-1].cancel()  # Never ran: no longer queued.
        assert executor.statistics().queued == 2
        gate.set()
        for future in futures[:-1]:
            future.result(5)
        stats = executor.statistics()
        assert (stats.running, stats.queued) == (0, 0)
    finally:
        gate.set()
        executor.shutdown(wait=True)


# --------------------------------------------------------------------------- membership while unhealthy
def _membership() -> SwimMembership:
    me = MemberInfo(node_id="me", peer_host="127.0.0.1", peer_port=7001, generation=1)
    return SwimMembership("test", me, [], config=swim_config("local", 600_000), rng=random.Random(1))


def _accusation(membership: SwimMembership, state: State) -> MemberUpdate:
    me = membership.swim.record("me")
    assert me is not None
    return MemberUpdate(me.info, state, membership.incarnation, reporter_id="peer")


def test_an_unhealthy_node_does_not_ack_probes_nor_refute_and_refutes_once_healthy() -> None:
    membership = _membership()
    assert isinstance(membership.receive("peer", swim.Ping(1, "me")), swim.Ack)
    incarnation = membership.incarnation

    membership.set_local_health(False, "store-write-stalled")
    suspect = _accusation(membership, State.SUSPECT)
    assert membership.receive("peer", swim.Ping(2, "me", (suspect,))) is None  # No ack.
    membership.receive("peer", swim.Gossip((suspect,)))
    membership.receive("peer", swim.PushPullRequest((suspect,)))
    assert membership.incarnation == incarnation  # Not refuted.
    assert membership.swim.statistics().suspicions_refuted == 0
    assert membership.probes_unanswered == 1

    membership.set_local_health(True)
    assert membership.incarnation > incarnation  # Refuted at once, as usual.
    assert membership.self_state() is State.ALIVE
    assert isinstance(membership.receive("peer", swim.Ping(3, "me")), swim.Ack)


def test_news_about_others_is_still_heard_while_unhealthy() -> None:
    membership = _membership()
    membership.set_local_health(False, "store-executor-stalled")
    other = MemberUpdate(MemberInfo(node_id="other", peer_host="127.0.0.1", peer_port=7002, generation=1),
                         State.ALIVE, 0, reporter_id="other")
    assert membership.receive("peer", swim.Ping(1, "me", (other,))) is None
    assert membership.member("other") is not None
    membership.set_local_health(True)
    assert membership.incarnation == 0  # Nothing to refute: nobody accused us.
