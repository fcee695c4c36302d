"""Table-driven cases for ring placement and the rebalance planner (pure, fast)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from pacsnode.ring.placement import Member, Ring, StandIn, TokenRange
from pacsnode.ring.rebalance import plan_transfers
from pacsnode.ring.tokens import TOKEN_SPACE, study_token, vnode_token

CLUSTER = "pacsnode"


def nodes(count: int, vnodes: int = 64, **fields: str) -> list[Member]:
    return [Member(f"node-{i}", vnodes=vnodes, **fields) for i in range(1, count + 1)]


# -- Member and TokenRange ------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"node_id": ""},
        {"node_id": "a", "site": ""},
        {"node_id": "a", "vnodes": 0},
        {"node_id": "a\x00b"},
        {"node_id": "a", "host": "\x00a"},
    ],
)
def test_member_rejects_bad_fields(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Member(**fields)  # type: ignore[arg-type]


def test_member_without_host_is_its_own_machine() -> None:
    assert Member("a").machine != Member("b").machine
    assert Member("a", host="m").machine == Member("b", host="m").machine
    assert Member("a", site="x", host="m").machine != Member("b", site="y", host="m").machine


@pytest.mark.parametrize(
    ("start", "end", "token", "inside"),
    [
        (10, 20, 10, False),  # start is exclusive
        (10, 20, 11, True),
        (10, 20, 20, True),  # end is inclusive
        (10, 20, 21, False),
        (20, 10, 25, True),  # wraps through zero
        (20, 10, 0, True),
        (20, 10, 10, True),
        (20, 10, 15, False),
        (20, 10, 20, False),
        (7, 7, 7, True),  # start == end: the whole ring
        (7, 7, 0, True),
    ],
)
def test_token_range_contains(start: int, end: int, token: int, inside: bool) -> None:
    assert TokenRange(start, end).contains(token) is inside


@pytest.mark.parametrize(
    ("start", "end", "size"),
    [
        (10, 20, 10),
        (TOKEN_SPACE - 5, 5, 10),
        (7, 7, TOKEN_SPACE),
        (0, TOKEN_SPACE - 1, TOKEN_SPACE - 1),
    ],
)
def test_token_range_size(start: int, end: int, size: int) -> None:
    assert TokenRange(start, end).size == size


def test_token_range_rejects_out_of_space_bounds() -> None:
    with pytest.raises(ValueError):
        TokenRange(0, TOKEN_SPACE)


# -- Ring construction and identity --------------------------------------------------


def test_ring_rejects_duplicate_node_ids() -> None:
    with pytest.raises(ValueError, match="twice"):
        Ring(CLUSTER, [Member("a"), Member("a", site="other")])


def test_ring_tokens_are_the_sorted_vnode_tokens() -> None:
    ring = Ring(CLUSTER, [Member("a", vnodes=3), Member("b", vnodes=2)])
    expected = sorted(
        vnode_token(CLUSTER, node, i) for node, v in (("a", 3), ("b", 2)) for i in range(v)
    )
    assert ring.tokens == tuple(expected)


def test_version_is_pinned() -> None:
    """Peers on different software versions compare ring versions: the hash must not drift."""
    ring = Ring(
        CLUSTER,
        [
            Member("node-1", site="a"),
            Member("node-2", site="a", host="m1"),
            Member("node-3", site="b"),
            Member("node-4", site="b", host="m1"),
            Member("node-5", site="c", vnodes=32),
        ],
    )
    assert ring.version == 0x6E5BAF0816BC84DF


@pytest.mark.parametrize(
    "other",
    [
        Ring("another-cluster", nodes(3)),
        Ring(CLUSTER, nodes(4)),
        Ring(CLUSTER, [*nodes(2), Member("node-3", site="b")]),
        Ring(CLUSTER, [*nodes(2), Member("node-3", host="m")]),
        Ring(CLUSTER, [*nodes(2), Member("node-3", vnodes=63)]),
    ],
)
def test_any_change_of_membership_changes_equality_and_version(other: Ring) -> None:
    ring = Ring(CLUSTER, nodes(3))
    assert ring != other
    assert ring.version != other.version


def test_with_member_and_without() -> None:
    ring = Ring(CLUSTER, nodes(3))
    assert ring.with_member(Member("node-4")) == Ring(CLUSTER, nodes(4))
    assert ring.with_member(Member("node-4")).without("node-4") == ring
    assert ring.with_member(Member("node-1", site="b")).member("node-1").site == "b"
    assert ring.without("absent") == ring


# -- preference lists ---------------------------------------------------------------


def test_empty_ring_owns_nothing() -> None:
    ring = Ring(CLUSTER, [])
    assert ring.preference_list(123, 3) == ()
    assert ring.ranges(3) == ()
    assert ring.ownership(3) == {}
    assert ring.effective_replicas(3) == 0


@pytest.mark.parametrize("bad", [0, -1])
def test_replica_count_must_be_positive(bad: int) -> None:
    ring = Ring(CLUSTER, nodes(3))
    with pytest.raises(ValueError):
        ring.preference_list(0, bad)
    with pytest.raises(ValueError):
        ring.effective_replicas(bad)


@pytest.mark.parametrize("token", [-1, TOKEN_SPACE])
def test_token_must_be_in_the_space(token: int) -> None:
    with pytest.raises(ValueError):
        Ring(CLUSTER, nodes(3)).preference_list(token, 3)


def test_first_owner_is_first_vnode_at_or_after_the_token() -> None:
    ring = Ring(CLUSTER, nodes(5, vnodes=4))
    owner_at = {
        vnode_token(CLUSTER, f"node-{i}", v): f"node-{i}" for i in range(1, 6) for v in range(4)
    }
    tokens = sorted(owner_at)
    cases = [
        (tokens[3], owner_at[tokens[3]]),  # exactly on a vnode token: that vnode (end inclusive)
        (tokens[3] + 1, owner_at[tokens[4]]),  # just past it: the next vnode
        (tokens[-1] + 1, owner_at[tokens[0]]),  # past the last token: wraps to the first
        (0, owner_at[tokens[0]]),
    ]
    for token, owner in cases:
        assert ring.preference_list(token, 1) == (owner,)
        assert ring.preference_list(token, 3)[0] == owner


@pytest.mark.parametrize(
    ("count", "n", "expected"), [(1, 3, 1), (2, 3, 2), (3, 3, 3), (5, 3, 3), (5, 1, 1), (5, 7, 5)]
)
def test_effective_replicas(count: int, n: int, expected: int) -> None:
    ring = Ring(CLUSTER, nodes(count, vnodes=8))
    assert ring.effective_replicas(n) == expected
    for token in (0, 1 << 63, TOKEN_SPACE - 1):
        owners = ring.preference_list(token, n)
        assert len(owners) == len(set(owners)) == expected


def test_owners_of_study_places_by_study_token() -> None:
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    ring = Ring(CLUSTER, nodes(10))
    assert ring.owners_of_study(uid, 3) == ring.preference_list(study_token(uid), 3)


def test_placement_is_pinned() -> None:
    """Data already on disk was placed by this rule: a change here would strand it."""
    ring = Ring(
        CLUSTER,
        [
            Member("node-1", site="a"),
            Member("node-2", site="a", host="m1"),
            Member("node-3", site="b"),
            Member("node-4", site="b", host="m1"),
            Member("node-5", site="c", vnodes=32),
        ],
    )
    assert ring.owners_of_study("1.2.840.113619.2.55.3.604688119.969.1268071029.320", 3) == (
        "node-2",
        "node-3",
        "node-5",
    )
    assert ring.owners_of_study("1.2.3", 3) == ("node-3", "node-1", "node-5")


def _sites(ring: Ring, owners: tuple[str, ...]) -> set[str]:
    return {ring.member(owner).site for owner in owners}


@pytest.mark.parametrize(
    ("layout", "n", "sites_expected"),
    [
        ({"a": 3, "b": 3, "c": 3}, 3, 3),  # 3 sites, 3 copies: one per site
        ({"a": 4, "b": 4}, 3, 2),  # 2 sites, 3 copies: both sites
        ({"a": 8, "b": 1}, 3, 2),  # a lone node in a small site still gets a copy of every key
        ({"a": 2, "b": 2, "c": 2, "d": 2}, 3, 3),  # more sites than copies: all distinct
        ({"a": 2, "b": 2, "c": 2}, 2, 2),
        ({"a": 5}, 3, 1),
    ],
)
def test_copies_spread_over_sites(layout: dict[str, int], n: int, sites_expected: int) -> None:
    members = [
        Member(f"{site}-{i}", site=site, vnodes=16)
        for site, count in layout.items()
        for i in range(count)
    ]
    ring = Ring(CLUSTER, members)
    for owned in ring.ranges(n):
        assert len(_sites(ring, owned.owners)) == sites_expected
        assert len(owned.owners) == n


def test_copies_spread_over_hosts_within_a_site() -> None:
    """Two machines with two nodes each: two copies never share a machine."""
    members = [Member(f"node-{i}", host=f"machine-{i % 2}", vnodes=16) for i in range(4)]
    ring = Ring(CLUSTER, members)
    for owned in ring.ranges(2):
        assert {ring.member(o).host for o in owned.owners} == {"machine-0", "machine-1"}
    for owned in ring.ranges(3):  # More copies than machines: the third may share one.
        assert len(owned.owners) == 3


def test_sites_outrank_hosts() -> None:
    """Site b has one node on the same host name as a's: sites still come first."""
    members = [
        Member("a1", site="a", host="m1", vnodes=16),
        Member("a2", site="a", host="m2", vnodes=16),
        Member("b1", site="b", host="m1", vnodes=16),
    ]
    ring = Ring(CLUSTER, members)
    for owned in ring.ranges(2):
        assert "b1" in owned.owners


# -- ranges and ownership ------------------------------------------------------------


def test_ranges_tile_the_ring_once() -> None:
    ring = Ring(CLUSTER, nodes(7, vnodes=8))
    owned = ring.ranges(3)
    assert sum(r.token_range.size for r in owned) == TOKEN_SPACE
    assert owned[0].token_range.wraps
    assert not any(r.token_range.wraps for r in owned[1:])
    for previous, current in pairwise(owned):
        assert previous.token_range.end == current.token_range.start
    for r in owned:
        assert ring.preference_list(r.token_range.end, 3) == r.owners
        assert ring.preference_list((r.token_range.start + 1) % TOKEN_SPACE, 3) == r.owners


def test_single_vnode_ring_is_one_whole_range() -> None:
    ring = Ring(CLUSTER, [Member("solo", vnodes=1)])
    (only,) = ring.ranges(3)
    assert only.token_range.size == TOKEN_SPACE
    assert only.owners == ("solo",)
    assert ring.ownership(3) == {"solo": 1.0}


@pytest.mark.parametrize(("count", "n"), [(1, 3), (2, 3), (3, 3), (10, 3), (10, 1), (10, 5)])
def test_ownership_sums_to_effective_replicas(count: int, n: int) -> None:
    ring = Ring(CLUSTER, nodes(count, vnodes=16))
    assert sum(ring.ownership(n).values()) == pytest.approx(ring.effective_replicas(n))
    assert sum(ring.primary_ownership().values()) == pytest.approx(1.0)
    assert set(ring.ownership(n)) == set(ring.node_ids)


def test_weight_is_vnodes() -> None:
    ring = Ring(CLUSTER, [*nodes(9), Member("big", vnodes=256)])
    primary = ring.primary_ownership()
    assert primary["big"] > 2.5 * max(share for node, share in primary.items() if node != "big")


@pytest.mark.parametrize("count", [3, 5, 10, 20, 30, 48])
def test_replicated_ownership_balance_v64(count: int) -> None:
    """Fullest node <= 1.25x the mean at V=64, N=3 (DESIGN: about 1.2x up to ~48 nodes).

    Random tokens make this a property of the cluster id, not a guarantee: over 150 cluster
    ids ("cluster-0".."cluster-149") with these node ids, max/mean exceeded 1.25 for 1.3%
    of them at 20 nodes and 4% at 48 nodes (p99 about 1.27), and "default" exceeds it at
    13 of the sizes 3..48 (1.31 at 45). This test pins the cluster id "pacsnode".
    """
    ring = Ring(CLUSTER, nodes(count))
    ownership = ring.ownership(3)
    mean = sum(ownership.values()) / count
    assert max(ownership.values()) <= 1.25 * mean


# -- stand-ins -----------------------------------------------------------------------


def test_no_stand_ins_when_owners_are_available() -> None:
    ring = Ring(CLUSTER, nodes(6, vnodes=8))
    owners = ring.preference_list(42, 3)
    assert ring.stand_ins(42, 3, set()) == ()
    assert ring.stand_ins(42, 3, {"not-an-owner"} - set(owners)) == ()


def test_stand_ins_are_the_next_available_non_owners() -> None:
    ring = Ring(CLUSTER, nodes(8, vnodes=8))
    token = 1 << 62
    owners = ring.preference_list(token, 3)
    walk = ring.preference_list(token, 8)  # Single site: the walk order of all nodes.
    down = {owners[0], owners[2], walk[3]}
    expected = [node for node in walk[3:] if node not in down][:2]
    assert ring.stand_ins(token, 3, down) == (
        StandIn(expected[0], owners[0]),
        StandIn(expected[1], owners[2]),
    )


def test_stand_in_comes_from_the_owner_site_first() -> None:
    members = [Member(f"{site}-{i}", site=site, vnodes=8) for site in "ab" for i in range(4)]
    ring = Ring(CLUSTER, members)
    for owned in ring.ranges(2):
        token = owned.token_range.end
        for owner in owned.owners:
            (stand_in,) = ring.stand_ins(token, 2, {owner})
            assert stand_in.owner == owner
            assert ring.member(stand_in.node_id).site == ring.member(owner).site
            assert stand_in.node_id not in owned.owners


def test_fewer_stand_ins_when_the_ring_runs_out() -> None:
    ring = Ring(CLUSTER, nodes(4, vnodes=8))
    owners = ring.preference_list(7, 3)
    (only,) = ring.stand_ins(7, 3, set(owners))
    assert only.owner == owners[0]
    assert only.node_id not in owners


# -- rebalance planner ---------------------------------------------------------------


def test_first_node_plan_has_no_sources() -> None:
    plan = plan_transfers(Ring(CLUSTER, []), Ring(CLUSTER, [Member("solo", vnodes=4)]), 3)
    assert {t.target for t in plan} == {"solo"}
    assert all(t.sources == () for t in plan)
    assert sum(t.token_range.size for t in plan) == TOKEN_SPACE


def test_same_ring_plans_nothing() -> None:
    ring = Ring(CLUSTER, nodes(5, vnodes=8))
    assert plan_transfers(ring, ring, 3) == []


def test_rings_of_different_clusters_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_transfers(Ring("x", nodes(3)), Ring("y", nodes(3)), 3)


def test_sources_prefer_the_target_site_and_skip_unavailable() -> None:
    members = [Member(f"{site}-{i}", site=site, vnodes=8) for site in "ab" for i in range(3)]
    old = Ring(CLUSTER, members)
    new = old.without("a-0")
    plan = plan_transfers(old, new, 2, unavailable={"a-0"})
    assert plan
    for transfer in plan:
        assert "a-0" not in transfer.sources
        assert new.member(transfer.target).site == "a"  # a's copy stays in a
        assert new.member(transfer.sources[-1]).site == "b"  # a-0 was a's only old copy
    with_lost = plan_transfers(old, new, 2)
    assert all(t.sources[-1] == "a-0" for t in with_lost)  # a lost node is tried last


def test_join_prefers_the_displaced_owner_as_source() -> None:
    old = Ring(CLUSTER, nodes(5, vnodes=8))
    new = old.with_member(Member("node-6", vnodes=8))
    for transfer in plan_transfers(old, new, 3):
        old_owners = old.preference_list(transfer.token_range.end, 3)
        new_owners = new.preference_list(transfer.token_range.end, 3)
        (displaced,) = set(old_owners) - set(new_owners)
        assert transfer.sources[0] == displaced
        assert set(transfer.sources) == set(old_owners)
