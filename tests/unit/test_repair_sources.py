"""replication/repair.py: where a repair pulls from (issue 15 item 6, re-replication fan-in).

A range's sources are asked in order and the first that holds what this node lacks sends
it; the later ones then compare equal. So the order decides which link the bytes cross:
this node's site first, then the other sites nearest first, by the round trip the
repairer measured on its own digest calls. Before, the order was the ring's (the first
copy of each site first), and with two copies per site 63-81% of a rebuild after a node
loss crossed sites although a copy was in the same site.

The simulator's figure (production repairer, virtual time) is the second test: with two
copies per site, a lost node's ranges are rebuilt from its own site only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pacsnode.replication.coordinator import WriteScope
from pacsnode.replication.repair import Repairer, RepairSettings
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.placement import Member, Ring, SiteReplicas, TokenRange
from pacsnode.sim.cluster import SimConfig, site_names
from pacsnode.sim.run import format_result, run_scenario

SITES = {"a1": "a", "a2": "a", "b1": "b", "b2": "b", "c1": "c", "c2": "c"}
ROUND_TRIP_S = {"a": 0.001, "b": 0.120, "c": 0.040}  # Seen from site a: c is nearer than b.


class _Membership:
    def __init__(self) -> None:
        self._ring = Ring("test", tuple(Member(node_id=n, site=s) for n, s in SITES.items()))

    def ring(self) -> Ring:
        return self._ring

    def is_alive(self, node_id: str) -> bool:
        return True

    def member(self, node_id: str) -> MemberInfo | None:
        return MemberInfo(node_id=node_id, peer_host="127.0.0.1", peer_port=1, site=SITES[node_id])


class _Transport:
    """Digest calls that take the round trip of the target's site; nothing differs."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def range_digest(self, target: str, token_range: TokenRange, *, timeout_ms: int) -> dict[int, Any]:
        self.asked.append(target)
        await asyncio.sleep(ROUND_TRIP_S[SITES[target]])
        return {}


class _Store:
    def segment_digests(self, intervals: list[tuple[int, int]]) -> dict[int, Any]:
        return {}


async def _now(function: Any, *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)


def test_sources_are_this_site_first_then_the_nearest_site() -> None:
    transport = _Transport()
    repairer = Repairer("a1", _Membership(), transport, _Store(),  # type: ignore[arg-type]
                        RepairSettings(replication_factor=SiteReplicas.of({"a": 2, "b": 2, "c": 2})),
                        run_blocking=_now)
    ring_order = ["b1", "c1", "a2", "b2", "c2"]  # First copies of each site, then second copies.
    # Nothing measured yet: this site first, the others in ring order.
    assert repairer.nearest_first(ring_order) == ["a2", "b1", "c1", "b2", "c2"]
    # One pass of digest calls measures every source's round trip.
    complete = asyncio.run(repairer.sync_range(TokenRange(0, 1_000), ring_order))
    assert complete and sorted(transport.asked) == sorted(ring_order)
    assert repairer.nearest_first(ring_order) == ["a2", "c1", "c2", "b1", "b2"]


def test_a_rebuild_with_two_copies_per_site_stays_in_its_site() -> None:
    """kill-one, 12 nodes (4 per site), 2 copies per site: every range of the lost node
    still has a copy in its site, so no copy kept in that site comes from another site (was
    77-81% of the bytes moved). Other sites' nodes may still pull across sites what only the
    lost node would have sent them (the hints it held as a coordinator), and pulls that the
    receiver did not keep (a delete reached it first) are anti-entropy racing the deletes;
    both are counted apart (sim/metrics.py movement)."""
    # python -m pacsnode.sim run --scenario kill-one --nodes 12 --sites 3 --site-copies 2 --seed 1 --load 150
    config = SimConfig(write_scope=WriteScope.LOCAL,
                       replication_factor=SiteReplicas.of({site: 2 for site in site_names(3)}))
    result = run_scenario("kill-one", nodes=12, sites=3, seed=1, load=150, config=config)
    assert result["ok"], format_result(result)
    moved = result["movement"]
    assert moved["moved_bytes"] - moved["deleted_bytes"] > 0, moved
    assert moved["into_site_cross_site_bytes"] == 0, moved
