"""The hybrid logical clock: versions only go up, and pass every version observed."""

from __future__ import annotations

from pacsnode.replication.hlc import HybridClock, Version, is_mark


def test_versions_increase_within_one_millisecond_and_when_the_wall_clock_goes_back() -> None:
    wall = [1_000]
    clock = HybridClock("a", wall=lambda: wall[0])
    first = clock.now()
    second = clock.now()
    wall[0] = 900  # The wall clock stepped back (NTP).
    third = clock.now()
    assert first < second < third
    assert (first.ms, first.logical) == (1_000, 0)
    assert (third.ms, third.logical) == (1_000, 2)
    wall[0] = 1_001
    assert clock.now() == Version(1_001, 0, "a")


def test_a_version_stamped_after_observing_one_is_greater_even_with_a_slow_wall_clock() -> None:
    ahead = HybridClock("a", wall=lambda: 50_000)
    behind = HybridClock("b", wall=lambda: 10_000)  # 40 s slow.
    written = ahead.now()
    naive = behind.now()
    assert naive < written  # Wall clocks alone would order the later delete first.
    behind.observe(written)
    delete = behind.now()
    assert delete > written
    assert (delete.ms, delete.logical) == (50_000, 1)


def test_marks_sort_like_versions_and_round_trip() -> None:
    versions = [Version(5, 2, "b"), Version(5, 10, "a"), Version(12, 0, "a"), Version(12, 0, "b")]
    marks = [v.mark() for v in versions]
    assert sorted(marks) == marks
    assert all(is_mark(m) for m in marks)
    assert [Version.from_mark(m) for m in marks] == versions
    assert not is_mark("0123456789abcdef0123456789abcdef")
