"""The chaos runner's judgement of which stores should have succeeded: a store can meet W
only when W copies can be made from the entry node, given the runner's own faults."""

from __future__ import annotations

from pacsnode.sim.chaos import ChaosSettings, write_quorum_reachable

ONE_SITE = {n: "site1" for n in ("c1", "c2", "c3", "c4")}


def test_strict_counts_only_the_studys_owners_the_entry_can_reach() -> None:
    settings = ChaosSettings(nodes=4)  # N=3, W=2, strict, one site.
    owners = {"c1", "c3", "c4"}
    # A 2/2 partition c1,c2 | c3,c4: through c1 only one owner (c1) is reachable ...
    assert not write_quorum_reachable("c1", owners, {"c1", "c2"}, ONE_SITE, settings)
    # ... through c3 two (c3, c4) are; through c2 only c1, a stand-in's hint does not count.
    assert write_quorum_reachable("c3", owners, {"c3", "c4"}, ONE_SITE, settings)
    assert not write_quorum_reachable("c2", owners, {"c1", "c2"}, ONE_SITE, settings)
    # No fault: every store can meet W, also through a node that owns nothing of it.
    assert write_quorum_reachable("c2", owners, set(ONE_SITE), ONE_SITE, settings)


def test_sloppy_counts_any_reachable_node() -> None:
    settings = ChaosSettings(nodes=4, write_quorum_mode="sloppy")
    assert write_quorum_reachable("c2", {"c1", "c3", "c4"}, {"c1", "c2"}, ONE_SITE, settings)
    assert not write_quorum_reachable("c2", {"c1", "c3", "c4"}, {"c2"}, ONE_SITE, settings)


def test_local_scope_counts_in_the_entry_site_capped_at_its_copies() -> None:
    sites = {"c1": "site1", "c2": "site2", "c3": "site1", "c4": "site2"}
    settings = ChaosSettings(nodes=4, sites=2, site_copies=1)  # auto -> local, one copy per site.
    owners = {"c1", "c2"}
    # Site 1's one copy is on c1: through c3 with c1 reachable, W (capped at 1) is met,
    # even with the other site cut off.
    assert write_quorum_reachable("c3", owners, {"c1", "c3"}, sites, settings)
    assert not write_quorum_reachable("c3", owners, {"c3", "c2"}, sites, settings)
    # Global scope with the same placement needs two owners, wherever they are.
    settings = ChaosSettings(nodes=4, sites=2, site_copies=1, write_quorum_scope="global")
    assert not write_quorum_reachable("c3", owners, {"c1", "c3"}, sites, settings)
    assert write_quorum_reachable("c3", owners, {"c1", "c2", "c3"}, sites, settings)
