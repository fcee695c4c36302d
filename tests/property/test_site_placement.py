"""Properties of per-site placement (`SiteReplicas`, `--site-replicas SITE=N`).

Each site is its own ring: a site's owners of a key are the owners the ring of that
site's members alone gives, a join or loss in one site never moves another site's owners,
and within a site the fullest node holds <= 1.25x the mean at 3-48 nodes per site with
the default 64 vnodes once each node took the token salt ring/token_choice.py chooses at
its join (with salt 0, random tokens, 64 vnodes give up to 1.53x: docs/sites.md).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacsnode.ring.placement import Member, Ring, SiteReplicas
from pacsnode.ring.token_choice import choose_token_salt
from pacsnode.ring.tokens import token_of
from tests.property.test_placement import clusters, joins, keys_of, member_lists, tokens

SITES = ("site-a", "site-b", "site-c")

site_specs = st.dictionaries(
    st.sampled_from(SITES), st.integers(min_value=1, max_value=4), min_size=1
).map(SiteReplicas.of)


def site_ring(ring: Ring, site: str) -> Ring:
    return Ring(ring.cluster_id, (m for m in ring.members if m.site == site))


@settings(max_examples=60, deadline=None)
@given(clusters, member_lists(), site_specs, st.lists(tokens, max_size=20))
def test_each_site_gets_its_copies_from_its_own_ring(
    cluster_id: str, members: list[Member], spec: SiteReplicas, extra: list[int]
) -> None:
    ring = Ring(cluster_id, members)
    for token in keys_of(ring, extra):
        owners = ring.preference_list(token, spec)
        assert len(owners) == len(set(owners)) == ring.effective_replicas(spec)
        for site in SITES:
            in_site = tuple(o for o in owners if ring.member(o).site == site)
            copies = spec.copies(site)
            if not copies:
                assert in_site == ()
                continue
            alone = site_ring(ring, site)
            if not len(alone):
                assert in_site == ()
                continue
            # The site alone, with a plain N, ranks the same nodes (one site: hosts first).
            assert set(in_site) == set(alone.preference_list(token, copies))
            machines = {alone.member(o).machine for o in alone.node_ids}
            assert len({ring.member(o).machine for o in in_site}) == min(copies, len(machines))
        # First copies of every site come before any second copy.
        ranks = []
        for owner in owners:
            site = ring.member(owner).site
            ranks.append(sum(1 for o in owners[: owners.index(owner)] if ring.member(o).site == site))
        assert ranks == sorted(ranks)


@settings(max_examples=60, deadline=None)
@given(joins(), site_specs, st.lists(tokens, max_size=20))
def test_a_join_moves_keys_only_in_the_joiners_site(
    change: tuple[Ring, Ring, str], spec: SiteReplicas, extra: list[int]
) -> None:
    old, new, joiner = change
    site = new.member(joiner).site
    for token in keys_of(old, extra) + keys_of(new, []):
        before = old.preference_list(token, spec)
        after = new.preference_list(token, spec)
        for other in SITES:
            b = {o for o in before if old.member(o).site == other}
            a = {o for o in after if new.member(o).site == other}
            if other != site:
                assert a == b
            elif a != b:
                assert a - b == {joiner}
                assert len(b - a) == (1 if len(b) == spec.copies(site) else 0)


@settings(max_examples=40, deadline=None)
@given(clusters, member_lists(), site_specs, tokens, st.data())
def test_site_stand_ins_are_distinct_available_non_owners(
    cluster_id: str, members: list[Member], spec: SiteReplicas, token: int, data: st.DataObject
) -> None:
    ring = Ring(cluster_id, members)
    owners = ring.preference_list(token, spec)
    unavailable = data.draw(st.sets(st.sampled_from([m.node_id for m in members])))
    chosen = [s.node_id for s in ring.stand_ins(token, spec, unavailable)]
    assert len(chosen) == len(set(chosen))
    assert not set(chosen) & (set(owners) | unavailable)


def test_ownership_sums_to_the_copies_and_unnamed_sites_hold_nothing() -> None:
    members = [Member(f"{s}-{i}", site=s, vnodes=16) for s in ("a", "b", "c") for i in range(4)]
    ring = Ring("sums", members)
    spec = SiteReplicas.of({"a": 2, "b": 1})
    held = ring.ownership(spec)
    assert sum(held.values()) == pytest.approx(3)
    assert sum(v for k, v in held.items() if k.startswith("a-")) == pytest.approx(2)
    assert all(v == 0 for k, v in held.items() if k.startswith("c-"))
    assert ring.effective_replicas(SiteReplicas.of({"a": 9, "zz": 1})) == 4


def test_site_replicas_reject_bad_specs() -> None:
    for bad in ({}, {"a": 0}, {"": 1}):
        with pytest.raises(ValueError):
            SiteReplicas.of(bad)
    assert SiteReplicas((("b", 1), ("a", 2))) == SiteReplicas.of({"a": 2, "b": 1})
    assert str(SiteReplicas.of({"b": 1, "a": 2})) == "a=2,b=1"


def _joined_one_at_a_time(cluster_id: str, per_site: int, policy: SiteReplicas) -> list[Member]:
    members: list[Member] = []
    for i in range(per_site):
        me = Member(f"n{i}", site="a")
        members.append(Member(me.node_id, site="a", token_salt=choose_token_salt(cluster_id, members, me, policy)))
    return members


def _fullest_over_mean(members: list[Member], policy: SiteReplicas) -> float:
    held = Ring("balance", members).ownership(policy)
    return max(held.values()) / (sum(held.values()) / len(held))


# 48 nodes one at a time is ~50 Ring builds per join: 1 and 3 copies there, all at 3-24.
@pytest.mark.parametrize(("per_site", "copies"), [(3, 1), (3, 2), (3, 3), (8, 1), (8, 2), (8, 3),
                                                  (24, 1), (24, 2), (24, 3), (48, 1), (48, 3)])
def test_fullest_node_of_a_site_holds_at_most_1_25x_the_mean_with_chosen_salts(per_site: int, copies: int) -> None:
    # One site is enough: a site's owners are those of its own ring (test above), so
    # other sites cannot change its balance. Tokens are hashes: the result is fixed.
    policy = SiteReplicas.of({"a": copies})
    members = _joined_one_at_a_time("balance", per_site, policy)
    assert all(m.vnodes == 64 for m in members)  # The default.
    assert _fullest_over_mean(members, policy) <= 1.25


def test_salt_0_is_the_token_set_of_before_salts() -> None:
    """A node from before salts (salt 0) keeps its tokens and the ring its version."""
    old = Ring("c", [Member("x", site="a"), Member("y", site="b")])
    assert old.tokens == tuple(sorted(token_of(b"\x00".join((b"c", node.encode(), str(i).encode())))
                                      for node in ("x", "y") for i in range(64)))
    assert Ring("c", [Member("x", site="a", token_salt=0), Member("y", site="b")]).version == old.version
    salted = Ring("c", [Member("x", site="a", token_salt=3), Member("y", site="b")])
    assert salted.version != old.version and set(salted.tokens) != set(old.tokens)
