"""The shortcuts over token ranges agree with the plain definitions they replace.

`intervals_of` is `RangeSet([r]).intervals()` computed directly, and `RangeSet.overlaps`
is "some piece of the set meets [low, high]" found with one bisect; both run per range on
every anti-entropy pass and read, so they were rewritten for speed and checked here
against the slow forms, including the ring's edges (wrap, whole ring, the top token).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pacsnode.replication.planning import RangeSet
from pacsnode.replication.repair import intervals_of
from pacsnode.ring.placement import TokenRange
from pacsnode.ring.tokens import TOKEN_SPACE

edges = st.sampled_from([0, 1, 2, TOKEN_SPACE // 2, TOKEN_SPACE - 2, TOKEN_SPACE - 1])
tokens = st.one_of(edges, st.integers(min_value=0, max_value=TOKEN_SPACE - 1))
token_ranges = st.builds(TokenRange, start=tokens, end=tokens)


@given(token_ranges)
def test_intervals_of_is_the_range_sets_intervals(token_range: TokenRange) -> None:
    assert intervals_of(token_range) == RangeSet([token_range]).intervals()


@given(st.lists(token_ranges, max_size=6), tokens, tokens)
def test_overlaps_is_some_piece_meeting_the_interval(ranges: list[TokenRange], a: int, b: int) -> None:
    low, high = min(a, b), max(a, b)
    range_set = RangeSet(ranges)
    expected = any(not (high < p_low or p_high < low) for p_low, p_high in range_set.intervals())
    assert range_set.overlaps(low, high) == expected
