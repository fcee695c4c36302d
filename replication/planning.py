"""Pure planning for reads: which replica serves which token ranges. No I/O."""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.query import wants_patient_counts
from pacsnode.ring.placement import Replication, Ring, TokenRange
from pacsnode.ring.tokens import TOKEN_SPACE, study_token


class RangeSet:
    """Fast membership test of a token in a union of ring ranges (start exclusive, end inclusive)."""

    def __init__(self, ranges: Iterable[TokenRange]) -> None:
        intervals: list[tuple[int, int]] = []  # Inclusive [low, high] pieces, no wrap.
        for token_range in ranges:
            start, end = token_range.start, token_range.end
            if start == end:  # The whole ring.
                intervals.append((0, TOKEN_SPACE - 1))
            elif start < end:
                intervals.append((start + 1, end))
            else:  # Wraps past the top of the ring.
                if start + 1 <= TOKEN_SPACE - 1:
                    intervals.append((start + 1, TOKEN_SPACE - 1))
                intervals.append((0, end))
        intervals.sort()
        merged: list[tuple[int, int]] = []
        for low, high in intervals:
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        self._lows = [low for low, _high in merged]
        self._highs = [high for _low, high in merged]

    def intervals(self) -> list[tuple[int, int]]:
        """The set as sorted, disjoint, inclusive [low, high] token intervals."""
        return list(zip(self._lows, self._highs))

    def __contains__(self, token: int) -> bool:
        index = bisect.bisect_right(self._lows, token) - 1
        return index >= 0 and token <= self._highs[index]

    def overlaps(self, low: int, high: int) -> bool:
        """Whether any token of the inclusive interval [low, high] is in the set (the last
        piece starting at or below `high` is the only one to look at: pieces are disjoint
        and sorted, so an earlier one reaching `low` means this one does too)."""
        index = bisect.bisect_right(self._lows, high) - 1
        return index >= 0 and self._highs[index] >= low

    def __bool__(self) -> bool:
        return bool(self._lows)


def coverage_plan(
    ring: Ring,
    n: Replication,
    self_id: str,
    is_alive: Callable[[str], bool],
    *,
    site_of: Callable[[str], str] | None = None,
    exclude: Sequence[str] = (),
) -> tuple[dict[str, list[TokenRange]], list[TokenRange]]:
    """One live replica per token range: self when it is an owner, else the first live
    owner in our site, else the first live owner. Returns (ranges per node, uncovered)."""
    plan: dict[str, list[TokenRange]] = {}
    uncovered: list[TokenRange] = []
    my_site = site_of(self_id) if site_of else ""
    for owned in ring.ranges(n):
        candidates = [o for o in owned.owners if o not in exclude and is_alive(o)]
        if not candidates:
            uncovered.append(owned.token_range)
            continue
        if self_id in candidates:
            chosen = self_id
        else:
            same_site = [c for c in candidates if site_of is not None and site_of(c) == my_site]
            chosen = (same_site or candidates)[0]
        plan.setdefault(chosen, []).append(owned.token_range)
    return plan, uncovered


def read_order(
    owners: Sequence[str],
    self_id: str,
    is_alive: Callable[[str], bool],
    site_of: Callable[[str], str] | None = None,
    slow: Callable[[str], bool] | None = None,
) -> list[str]:
    """Where to read a study from: self, then live owners of our site, then other live
    owners, then live owners that just failed to answer this node (`slow`: a paused or
    cut-off peer that membership has not suspected yet), then owners believed down."""
    my_site = site_of(self_id) if site_of else ""
    alive = [o for o in owners if is_alive(o)]
    first = [o for o in alive if o == self_id]
    same_site = [o for o in alive if o != self_id and site_of is not None and site_of(o) == my_site]
    others = [o for o in alive if o not in first and o not in same_site]
    down = [o for o in owners if o not in alive]
    order = first + same_site + others
    if slow is not None:
        order = [o for o in order if not slow(o)] + [o for o in order if slow(o)]
    return order + down


@dataclass(frozen=True)
class Piece:
    """One unit of a read plan: a token range (a scatter) or one study (a request that
    names it), with the owners that can answer for it in preference order."""

    token_range: TokenRange
    owners: tuple[str, ...]
    study_instance_uid: str = ""


def study_keys(query: Query) -> tuple[str, ...] | None:
    """The StudyInstanceUIDs a query names (one value or a UID list), or None when it
    names none and must scatter. A study key below a PATIENT-level query is not matched
    there (PS3.4 C.6.1.1.2), so it does not narrow where to ask either."""
    if query.level == "PATIENT" or wants_patient_counts(query):
        return None
    condition = query.condition("StudyInstanceUID")
    if condition is None:
        return None
    uids = tuple(dict.fromkeys(v.strip() for v in condition.value.split("\\") if v.strip()))
    return uids or None


def study_range(study_instance_uid: str) -> TokenRange:
    """The range that holds exactly the study's token."""
    token = study_token(study_instance_uid)
    return TokenRange((token - 1) % TOKEN_SPACE, token)


def study_pieces(ring: Ring, n: Replication, uids: Sequence[str]) -> list[Piece]:
    return [Piece(study_range(uid), ring.owners_of_study(uid, n), uid) for uid in uids]


def range_pieces(ring: Ring, n: Replication) -> list[Piece]:
    return [Piece(owned.token_range, owned.owners) for owned in ring.ranges(n)]


def narrow_to_studies(query: Query, uids: Sequence[str]) -> Query:
    """`query` with its StudyInstanceUID key cut down to `uids` (what one owner is asked)."""
    conditions = tuple(
        Condition(c.keyword, c.vr, "\\".join(uids)) if c.keyword == "StudyInstanceUID" else c
        for c in query.conditions
    )
    return dataclasses.replace(query, conditions=conditions)


def next_reader(order: Sequence[str], excluded: set[str], is_alive: Callable[[str], bool]) -> str | None:
    """The live owner to ask next for a piece whose owners' read_order is `order` (self
    first, then our site), skipping `excluded`."""
    for node_id in order:
        if node_id not in excluded and is_alive(node_id):
            return node_id
    return None
