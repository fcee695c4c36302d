"""replication/repair.py: which ranges a node marks pending (reads avoid it there) when the
ring changes. Found by the simulator's read-your-writes check (kill-two-sites-apart, 10
nodes, seed 13): two owners of a study were removed one after the other; the two new
owners answered a STUDY-level C-FIND with no instance of the study, 1.5 s after the
removal, as Success. One had been an owner "at the range's end" of a range that grew when
the removed node's vnode merged into it; the other's pending range was reshaped by the
second removal and dropped."""

from __future__ import annotations

from typing import Any

from pacsnode.replication.planning import RangeSet
from pacsnode.replication.repair import Repairer, RepairSettings
from pacsnode.ring.placement import Member, Ring
from pacsnode.ring.tokens import study_token

N = 3
NODES = tuple(f"n{i}" for i in range(8))


def _ring(*node_ids: str) -> Ring:
    return Ring("test", tuple(Member(node_id=n, site="a", vnodes=16) for n in node_ids))


class _Membership:
    def __init__(self, ring: Ring) -> None:
        self.current = ring

    def ring(self) -> Ring:
        return self.current

    def is_alive(self, node_id: str) -> bool:
        return True


class _Store:
    def is_empty(self) -> bool:
        return False


def _repairer(self_id: str, membership: _Membership) -> Repairer:
    nothing: Any = None
    return Repairer(self_id, membership, nothing, _Store(), RepairSettings(replication_factor=N))  # type: ignore[arg-type]


def _owned_before(ring: Ring, node_id: str) -> RangeSet:
    return RangeSet(o.token_range for o in ring.ranges(N) if node_id in o.owners)


def _gained_tokens(old: Ring, new: Ring, node_id: str) -> list[int]:
    """Study tokens `node_id` owns in `new` but did not in `old` (sampled)."""
    before = _owned_before(old, node_id)
    tokens = [study_token(f"1.2.3.{i}") for i in range(4_000)]
    return [t for t in tokens if node_id in new.preference_list(t, N) and t not in before]


def test_every_token_gained_is_pending_after_one_removal() -> None:
    old = _ring(*NODES)
    new = _ring(*(n for n in NODES if n != "n3"))
    for node_id in [n for n in NODES if n != "n3"]:
        membership = _Membership(old)
        repairer = _repairer(node_id, membership)
        repairer._note_ring(old, N)  # The first ring: nothing pending (the store is not empty).
        membership.current = new
        repairer._note_ring(new, N)
        gained = _gained_tokens(old, new, node_id)
        assert all(t in repairer.pending() for t in gained), node_id


def test_pending_survives_a_second_change_that_reshapes_the_range() -> None:
    first = _ring(*NODES)
    second = _ring(*(n for n in NODES if n != "n3"))
    third = _ring(*(n for n in NODES if n not in ("n3", "n5")))
    for node_id in [n for n in NODES if n not in ("n3", "n5")]:
        membership = _Membership(first)
        repairer = _repairer(node_id, membership)
        repairer._note_ring(first, N)
        membership.current = second
        repairer._note_ring(second, N)
        membership.current = third
        repairer._note_ring(third, N)
        # Nothing was filled in between: every token gained since the first ring is pending.
        gained = _gained_tokens(first, third, node_id)
        assert all(t in repairer.pending() for t in gained), node_id


def test_a_ring_change_marks_pending_at_once() -> None:
    """Not at the next pass: a pass in flight may take seconds to notice the change."""
    old = _ring(*NODES)
    new = _ring(*(n for n in NODES if n != "n3"))
    node_id = next(n for n in NODES if n != "n3" and _gained_tokens(old, new, n))
    membership = _Membership(old)
    repairer = _repairer(node_id, membership)
    repairer.ring_changed()
    membership.current = new
    repairer.ring_changed()
    assert all(t in repairer.pending() for t in _gained_tokens(old, new, node_id))
