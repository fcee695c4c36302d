"""Which token set a joining node takes: the one that balances its site best. Pure code.

A node's vnode tokens are hashes of (cluster id, node id, index, salt) (ring/tokens.py). With
random tokens the fullest node of a site holds up to ~1.5x the mean at 48 nodes with the
default 64 vnodes (docs/sites.md); 256 vnodes bring that to ~1.25x but make every
anti-entropy pass 4x as many digest calls. Instead, a node that joins for the first time
tries `TOKEN_SALT_CANDIDATES` salts against the ring it is joining and keeps the one after
which the fullest node of its site holds the least (relative to its weight), Cassandra's
`allocate_tokens_for_local_replication_factor` in its simplest form: best of K token sets,
greedy, one node at a time. The salt is persisted with the node's identity and gossiped
with its member record, so every node builds the same ring; a node never changes its salt,
so the movement property of the ring is untouched (a join takes keys only for the joiner).

Salt 0 is the token set of before salts: nodes whose data dir predates them keep it
(node/server.py), and a node joining a cluster whose seed does not report its members
with their salts (a node from before) takes it too, since such a node would compute the
joiner's tokens with salt 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from pacsnode.ring.placement import Member, Replication, Ring, SiteReplicas

TOKEN_SALT_CANDIDATES = 16  # Best of 16: fullest node <= ~1.15x the mean at 3-48 nodes per site, 64 vnodes.


def site_balance(cluster_id: str, members: Sequence[Member], site: str, replication: Replication) -> float:
    """Fullest member of `site` / the site's mean, ownership per vnode (weight); 1.0 when
    the site holds nothing or has one member."""
    if isinstance(replication, SiteReplicas):
        copies = replication.copies(site)
        if copies == 0:
            return 1.0
        site_members = [m for m in members if m.site == site]
        # A site's owners come from its own vnodes only: its ring alone gives the same ownership.
        ring = Ring(cluster_id, site_members)
        held = ring.ownership(ring.effective(SiteReplicas.of({site: copies})))
    else:
        ring = Ring(cluster_id, members)
        held = ring.ownership(ring.effective(replication))
        site_members = [m for m in members if m.site == site]
    if len(site_members) < 2:
        return 1.0
    per_weight = [held.get(m.node_id, 0.0) / m.vnodes for m in site_members]
    mean = sum(held.get(m.node_id, 0.0) for m in site_members) / sum(m.vnodes for m in site_members)
    return max(per_weight) / mean if mean > 0 else 1.0


def choose_token_salt(cluster_id: str, members: Sequence[Member], me: Member, replication: Replication,
                      candidates: int = TOKEN_SALT_CANDIDATES) -> int:
    """The salt in 1..candidates whose token set, added to `members` (the ring being joined,
    without `me`), leaves `me`'s site best balanced; the smallest such salt on a tie."""
    others = [m for m in members if m.node_id != me.node_id]
    best: tuple[float, int] | None = None
    for salt in range(1, candidates + 1):
        candidate = Member(node_id=me.node_id, site=me.site, host=me.host, vnodes=me.vnodes, token_salt=salt)
        score = site_balance(cluster_id, [*others, candidate], me.site, replication)
        if best is None or score < best[0]:
            best = (score, salt)
    assert best is not None
    return best[1]
