"""replication/ownership.py: who refuses a write as NOT_OWNER, and when a ring mismatch
starts a push-pull (issue 9, item 4). Pure functions: table-driven."""

from __future__ import annotations

import pytest

from pacsnode.replication.ownership import RingSync, refuses_not_owner
from pacsnode.ring.placement import Member, Ring


def _ring(*node_ids: str) -> Ring:
    return Ring("test", tuple(Member(node_id=n, site="a", vnodes=16) for n in node_ids))


OLD = _ring("n1", "n2", "n3", "n4")
NEW = _ring("n1", "n2", "n3", "n4", "n5")  # n5 joined.
STUDY = next(f"1.2.3.{i}" for i in range(10_000)
             if "n5" in NEW.owners_of_study(f"1.2.3.{i}", 3))  # A study n5 takes over.
LOSER = next(n for n in OLD.owners_of_study(STUDY, 3) if n not in NEW.owners_of_study(STUDY, 3))
KEEPER = next(n for n in NEW.owners_of_study(STUDY, 3) if n != "n5")


@pytest.mark.parametrize(("receiver_ring", "receiver", "hint_for", "sender_version", "refused"), [
    # The old owner has the new ring; a sender on the old ring still sends it a primary copy.
    (NEW, LOSER, "", OLD.version, True),
    # ... but the same copy as a hint is always taken.
    (NEW, LOSER, "n9", OLD.version, False),
    # Same ring on both sides: the sender's plan is the receiver's, never refused.
    (NEW, LOSER, "", NEW.version, False),
    # A sender that does not say (version 0): not refused.
    (NEW, LOSER, "", 0, False),
    # An owner under its own ring takes it whatever the sender's ring.
    (NEW, KEEPER, "", OLD.version, False),
    # The joiner (a pending owner) owns it under the new ring: takes it from a sender on another ring.
    (NEW, "n5", "", OLD.version, False),
    # The receiver is behind (old ring) and the study is not its under the old ring: refused,
    # and the sender keeps the copy as a hint until the views agree.
    (OLD, "n5", "", NEW.version, True),
    # No view at all yet: cannot judge, taken.
    (_ring(), "n1", "", OLD.version, False),
])
def test_refuses_not_owner(receiver_ring: Ring, receiver: str, hint_for: str, sender_version: int,
                           refused: bool) -> None:
    assert refuses_not_owner(receiver_ring, receiver, STUDY, hint_for=hint_for, sender_ring_version=sender_version,
                             replication_factor=3) is refused


def test_a_leaving_node_refuses_primary_copies_from_a_sender_that_has_not_heard() -> None:
    without = _ring("n1", "n2", "n3")  # n4 is leaving: its tokens are gone from its own ring.
    assert refuses_not_owner(without, "n4", STUDY, hint_for="", sender_ring_version=OLD.version,
                             replication_factor=3)


def test_fewer_nodes_than_n_every_node_owns_everything() -> None:
    two = _ring("n1", "n2")
    assert not refuses_not_owner(two, "n2", STUDY, hint_for="", sender_ring_version=OLD.version,
                                 replication_factor=3)


def test_ring_sync_rate_limits_per_peer_and_in_all() -> None:
    sync = RingSync(peer_interval_ms=30_000, gap_ms=1_000)
    due = lambda peer, at, theirs=2: sync.due(peer, at, ring_version=1, sender_ring_version=theirs)  # noqa: E731
    assert not due("a", 0, theirs=1)  # Same ring: nothing to do.
    assert not due("a", 0, theirs=0)  # No version in the envelope.
    assert due("a", 0)
    assert not due("b", 500)  # Within the gap, whoever it is.
    assert due("b", 1_000)
    assert not due("a", 20_000)  # Within a's interval.
    assert due("a", 30_000)
    assert (sync.started, sync.skipped) == (3, 2)


def test_ring_sync_forgets_peers_beyond_its_bound() -> None:
    sync = RingSync(peer_interval_ms=60_000, gap_ms=0, peers_max=3)
    for index, peer in enumerate(("a", "b", "c")):
        assert sync.due(peer, index, ring_version=1, sender_ring_version=2)
    assert sync.due("d", 10, ring_version=1, sender_ring_version=2)  # Cleared, then d.
    assert sync.due("a", 11, ring_version=1, sender_ring_version=2)  # a was forgotten: sooner, never never.


def test_the_wire_outcome_maps_to_the_not_owner_reason() -> None:
    from pacsnode.node.grpc_transport import _REFUSALS
    from pacsnode.proto import pacsnode_pb2 as pb
    from pacsnode.replication.transport import RefusalReason

    assert pb.STORE_OUTCOME_REFUSED_NOT_OWNER == 8
    assert _REFUSALS[pb.STORE_OUTCOME_REFUSED_NOT_OWNER] is RefusalReason.NOT_OWNER
