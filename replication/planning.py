"""Pure planning for reads: which replica serves which token ranges. No I/O."""

from __future__ import annotations

import bisect
from typing import Callable, Iterable, Sequence

from pacsnode.ring.placement import Ring, TokenRange
from pacsnode.ring.tokens import TOKEN_SPACE


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

    def __bool__(self) -> bool:
        return bool(self._lows)


def coverage_plan(
    ring: Ring,
    n: int,
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
) -> list[str]:
    """Where to read a study from: self, then live owners of our site, then other live
    owners, then owners believed down (they may be back)."""
    my_site = site_of(self_id) if site_of else ""
    alive = [o for o in owners if is_alive(o)]
    first = [o for o in alive if o == self_id]
    same_site = [o for o in alive if o != self_id and site_of is not None and site_of(o) == my_site]
    others = [o for o in alive if o not in first and o not in same_site]
    down = [o for o in owners if o not in alive]
    return first + same_site + others + down
