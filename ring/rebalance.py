"""The rebalance planner: old ring -> new ring -> the transfers that make data follow.

There is no balancer: every node runs this same pure function on the same two rings and
gets the same plan, then pulls the transfers whose target is itself (DESIGN, "Repair and
rebalance"). The plan works on the ranges cut by the union of both rings' tokens: inside
each of them neither the old nor the new owner set changes, so a range is moved whole or
not at all, and it is one contiguous key scan on the source.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

from pacsnode.ring.placement import Ring, TokenRange


@dataclass(frozen=True, slots=True)
class Transfer:
    """One range that `target` now owns and did not, and the old owners to pull it from.

    `sources` are old owners of the range in the order to try them: those staying in the
    ring first (a node that left it is lost or, on `pacsnode leave`, pushes its ranges
    itself, so pulling from it is the last resort), then those in the target's site (WAN
    links are the scarce resource), then the owner the target displaced (Cassandra's
    consistent range movement: the one giving the range up has every write it took),
    then preference order. Empty when nobody held the range (the first node of a
    cluster), or when every old owner is unavailable.
    """

    token_range: TokenRange
    target: str
    sources: tuple[str, ...]

    @property
    def fraction(self) -> float:
        """The share of the key space this transfer moves (one copy of the range)."""
        return self.token_range.fraction


def plan_transfers(
    old: Ring, new: Ring, n: int, unavailable: Set[str] = frozenset()
) -> list[Transfer]:
    """Every (range, new owner) pair of `new` that `old` did not have, in token order.

    A join plans transfers to the joiner only, adding up to what it ends up owning; a
    loss or leave plans transfers to survivors covering exactly the ranges the departed
    node held. `unavailable` names nodes that cannot serve as sources (the lost node,
    peers known to be down); they are left out of `sources`.
    """
    if old.cluster_id != new.cluster_id:
        raise ValueError(f"rings of different clusters: {old.cluster_id!r}, {new.cluster_id!r}")
    boundaries = sorted(set(old.tokens) | set(new.tokens))
    plan: list[Transfer] = []
    for index, end in enumerate(boundaries):
        # Index 0 takes the last boundary as its start: the range that wraps through zero.
        token_range = TokenRange(boundaries[index - 1], end)
        old_owners = old.preference_list(end, n)
        new_owners = new.preference_list(end, n)
        for target in new_owners:
            if target not in old_owners:
                sources = _order_sources(old, new, old_owners, new_owners, target, unavailable)
                plan.append(Transfer(token_range, target, sources))
    return plan


def _order_sources(
    old: Ring,
    new: Ring,
    old_owners: tuple[str, ...],
    new_owners: tuple[str, ...],
    target: str,
    unavailable: Set[str],
) -> tuple[str, ...]:
    target_site = new.member(target).site
    candidates = [owner for owner in old_owners if owner not in unavailable]

    def preference(owner: str) -> tuple[bool, bool, bool, int]:
        return (
            owner not in new,
            old.member(owner).site != target_site,
            owner in new_owners,
            old_owners.index(owner),
        )

    return tuple(sorted(candidates, key=preference))
