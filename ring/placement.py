"""Placement: which nodes own a token, as a pure function of the membership.

Every node builds the same `Ring` from the same members (whatever order they arrive in),
so every node agrees, without talking, on where a study lives. A key's owner set comes
from walking the ring clockwise from the key's token and ranking the distinct nodes met:

1. the first node met in each site (so copies land in as many sites as possible),
2. then the first node met on each host not yet used (machines are a failure domain
   below the site),
3. then everyone else,

each tier in walk order, and taking the first N. This is the rule of Cassandra's
NetworkTopologyStrategy and Ceph's CRUSH failure domains, folded into one walk; it picks
the same nodes as greedy passes (distinct sites, then distinct hosts, then any), but the
(tier, position) form shows why Dynamo's movement property survives it: a joining node
only pushes later nodes down the ranking, so a join changes a key's owner set only by
swapping one old owner for the new node, and a loss only by swapping the lost node for one
survivor (tests/property/test_placement.py checks both).

Per-site copies (`SiteReplicas`, Cassandra's per-datacenter replication factors): where
the replication is given as N copies per named site instead of one N, each site is its
own ring. A site's owners come from walking only that site's vnodes clockwise from the
key: first the first node met on each host not yet used, then everyone else, taking the
site's N. A site's vnodes are a subsequence of the ring, so this is exactly the ring that
site alone would build: its balance depends only on its own members and vnodes, and a
join or loss in one site never moves a key's owners in another. A site not named gets no
copies. Owners are listed first copy of every site, then second copies, and so on, each
rank in walk order.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Set
from dataclasses import dataclass
from typing import NamedTuple

from pacsnode.ring.tokens import TOKEN_SPACE, study_token, token_of, vnode_token

DEFAULT_SITE = "default"
DEFAULT_VNODES = 64  # Random tokens: fullest node ~1.2x the mean up to ~48 nodes (DESIGN).


@dataclass(frozen=True, slots=True, order=True)
class Member:
    """One node as placement sees it: its identity, failure domains and weight.

    `host` is the machine the node runs on. Left empty, the node counts as a machine of
    its own, which is right for the usual one-node-per-machine deployment. Hosts are
    compared within a site, so two sites may both have a host called "rack1-a".
    `vnodes` is the weight: a node with twice the disk gets twice the vnodes.
    `token_salt` picks which token set the node has (ring/token_choice.py); 0 is the set
    every node had before salts, which nodes from then keep.
    """

    node_id: str
    site: str = DEFAULT_SITE
    host: str = ""
    vnodes: int = DEFAULT_VNODES
    token_salt: int = 0

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("a member needs a non-empty node_id")
        if not self.site:
            raise ValueError(f"member {self.node_id!r} needs a non-empty site")
        if "\x00" in self.node_id + self.site + self.host:
            # NUL separates fields in vnode tokens and marks unknown hosts in `machine`.
            raise ValueError(f"member {self.node_id!r} has a NUL character in a field")
        if self.vnodes < 1:
            raise ValueError(f"member {self.node_id!r} needs vnodes >= 1, got {self.vnodes}")
        if self.token_salt < 0:
            raise ValueError(f"member {self.node_id!r} needs token_salt >= 0, got {self.token_salt}")

    @property
    def machine(self) -> tuple[str, str]:
        """The host failure domain: (site, host), or (site, node id) when host is unknown."""
        return (self.site, self.host or "\x00" + self.node_id)


@dataclass(frozen=True, slots=True)
class TokenRange:
    """An arc of the ring, start exclusive and end inclusive as in Cassandra.

    A range whose start is greater than its end wraps through zero. A range whose start
    equals its end is the whole ring (a ring with a single token has one such range).
    Store keys begin with the study token, so one range is one contiguous key scan.
    """

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < TOKEN_SPACE and 0 <= self.end < TOKEN_SPACE):
            raise ValueError(f"range bounds must be in [0, 2**64): {self}")

    @property
    def size(self) -> int:
        """How many tokens the range holds (2**64 for the whole ring)."""
        return (self.end - self.start) % TOKEN_SPACE or TOKEN_SPACE

    @property
    def fraction(self) -> float:
        """The share of the key space the range holds, in [0, 1]."""
        return self.size / TOKEN_SPACE

    @property
    def wraps(self) -> bool:
        """Whether the range crosses zero: its keys are two scans, (start, max] and [0, end]."""
        return self.start >= self.end

    def contains(self, token: int) -> bool:
        """Whether `token` falls in (start, end], wrapping through zero."""
        if self.start < self.end:
            return self.start < token <= self.end
        return token > self.start or token <= self.end


@dataclass(frozen=True, slots=True)
class SiteReplicas:
    """How many copies of every key each named site holds: `--site-replicas SITE=N`.

    Stored as sorted (site, copies) pairs, so that two equal specs hash alike and the
    ring can cache owner sets under it as it does under a plain N.
    """

    per_site: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        sites = [site for site, _ in self.per_site]
        if not self.per_site:
            raise ValueError("site replicas need at least one site")
        if len(sites) != len(set(sites)):
            raise ValueError(f"a site is named twice in the site replicas: {sites}")
        for site, copies in self.per_site:
            if not site or "\x00" in site:
                raise ValueError(f"site replicas need a non-empty site name, got {site!r}")
            if copies < 1:
                raise ValueError(f"site {site!r} needs >= 1 copies, got {copies}")
        if list(self.per_site) != sorted(self.per_site):
            object.__setattr__(self, "per_site", tuple(sorted(self.per_site)))

    @classmethod
    def of(cls, copies: dict[str, int]) -> SiteReplicas:
        return cls(tuple(sorted(copies.items())))

    @property
    def total(self) -> int:
        """Copies in all: the sum of the per-site counts."""
        return sum(copies for _, copies in self.per_site)

    def copies(self, site: str) -> int:
        """How many copies `site` holds (0 for a site not named)."""
        return next((copies for name, copies in self.per_site if name == site), 0)

    def __str__(self) -> str:
        return ",".join(f"{site}={copies}" for site, copies in self.per_site)


Replication = int | SiteReplicas
"""A plain N (copies spread over sites, then hosts) or N copies per site."""


def replica_total(n: Replication) -> int:
    """How many copies `n` asks for in all: N, or the sum of the per-site counts."""
    return n.total if isinstance(n, SiteReplicas) else n


def copies_among(n: Replication, sites: Iterable[str]) -> int:
    """How many copies a key gets among members in `sites` (one item per member):
    min(N, members), or per site min(its N, its members) summed."""
    sites = list(sites)
    if isinstance(n, SiteReplicas):
        return sum(min(copies, sites.count(site)) for site, copies in n.per_site)
    return min(n, len(sites))


def parse_site_replicas(items: Iterable[str]) -> SiteReplicas:
    """`SITE=N` items (a `--site-replicas` flag each, or one item `A=2,B=1`). ValueError when malformed."""
    copies: dict[str, int] = {}
    for item in items:
        for part in str(item).split(","):
            site, sep, count = part.strip().rpartition("=")
            if not sep or not site.strip() or not count.strip().isdigit():
                raise ValueError(f"site replicas must look like SITE=N, got {part.strip()!r}")
            if site.strip() in copies:
                raise ValueError(f"site {site.strip()!r} is named twice in the site replicas")
            copies[site.strip()] = int(count)
    return SiteReplicas.of(copies)


class OwnedRange(NamedTuple):
    """A token range and its owner set, in preference order."""

    token_range: TokenRange
    owners: tuple[str, ...]


class StandIn(NamedTuple):
    """A node that holds hints for an owner that cannot take a write (sloppy quorum)."""

    node_id: str
    owner: str


class Ring:
    """The token ring of one membership: immutable, and equal on every process.

    Each member contributes `vnodes` tokens, `vnode_token(cluster_id, node_id, i, token_salt)`; the
    vnode at token t owns the range (previous token, t]. Two rings are equal when they
    have the same cluster id and the same members, and then `version` is equal too.

    Preference lists are computed once per (vnode, n) and cached, because every stored
    instance asks for one: a cached lookup is one bisect and one list index. The cache is
    private and derived, so the ring stays immutable to its callers.
    """

    __slots__ = (
        "_cluster_id",
        "_members",
        "_by_id",
        "_tokens",
        "_vnode_member",
        "_member_machine",
        "_site_positions",
        "_machine_count",
        "_site_index",
        "_site_machine_count",
        "_version",
        "_cache",
    )

    def __init__(self, cluster_id: str, members: Iterable[Member]) -> None:
        ordered = tuple(sorted(members))
        by_id: dict[str, Member] = {}
        for member in ordered:
            if member.node_id in by_id:
                raise ValueError(f"node id {member.node_id!r} appears twice in the membership")
            by_id[member.node_id] = member
        self._cluster_id = cluster_id
        self._members = ordered
        self._by_id = by_id

        # Ties between equal tokens (2**-64 per pair) break by node id, so the order, and
        # which vnode owns the shared token, is the same everywhere.
        vnodes = sorted(
            (vnode_token(cluster_id, member.node_id, index, member.token_salt), member_index)
            for member_index, member in enumerate(ordered)
            for index in range(member.vnodes)
        )
        self._tokens = [token for token, _ in vnodes]
        self._vnode_member = [member_index for _, member_index in vnodes]

        site_ids: dict[str, int] = {}
        machine_ids: dict[tuple[str, str], int] = {}
        member_site = [site_ids.setdefault(m.site, len(site_ids)) for m in ordered]
        self._member_machine = [
            machine_ids.setdefault(m.machine, len(machine_ids)) for m in ordered
        ]
        self._machine_count = len(machine_ids)
        self._site_index = site_ids
        self._site_machine_count = [0] * len(site_ids)
        for site, _ in machine_ids:
            self._site_machine_count[site_ids[site]] += 1
        # Each site's vnode indices, in ring order: where its first node after a key is.
        self._site_positions: list[list[int]] = [[] for _ in site_ids]
        for position, member_index in enumerate(self._vnode_member):
            self._site_positions[member_site[member_index]].append(position)
        self._version = _membership_version(cluster_id, ordered)
        self._cache: dict[Replication, list[tuple[str, ...] | None]] = {}

    # -- identity -------------------------------------------------------------------

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    @property
    def members(self) -> tuple[Member, ...]:
        """The members, sorted by node id (the canonical order)."""
        return self._members

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(member.node_id for member in self._members)

    @property
    def version(self) -> int:
        """A 64-bit hash of cluster id and members: peers compare it to spot another view."""
        return self._version

    @property
    def tokens(self) -> tuple[int, ...]:
        """All vnode tokens in ring order; each is the inclusive end of one range."""
        return tuple(self._tokens)

    def member(self, node_id: str) -> Member:
        """The member with this node id; KeyError if it is not in the ring."""
        return self._by_id[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def __len__(self) -> int:
        return len(self._members)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._cluster_id == other._cluster_id and self._members == other._members

    def __hash__(self) -> int:
        return hash((self._cluster_id, self._members))

    def __repr__(self) -> str:
        return (
            f"Ring(cluster_id={self._cluster_id!r}, members={len(self._members)}, "
            f"vnodes={len(self._tokens)}, version={self._version:016x})"
        )

    def with_member(self, member: Member) -> Ring:
        """This ring plus `member` (replacing a member with the same node id)."""
        kept = (m for m in self._members if m.node_id != member.node_id)
        return Ring(self._cluster_id, (*kept, member))

    def without(self, node_id: str) -> Ring:
        """This ring less the member `node_id` (unchanged if it is not a member)."""
        return Ring(self._cluster_id, (m for m in self._members if m.node_id != node_id))

    # -- placement ------------------------------------------------------------------

    def effective_replicas(self, n: Replication) -> int:
        """How many copies a key really gets: N, or the member count when that is smaller.

        With per-site copies, the sum over named sites of min(site's N, site's members).
        """
        _check_replicas(n)
        if isinstance(n, SiteReplicas):
            return sum(
                min(copies, len(self._site_members(site))) for site, copies in n.per_site
            )
        return min(n, len(self._members))

    def effective(self, n: Replication) -> Replication:
        """The replication keys really get on this ring, to hand to the placement methods.

        A plain N is capped at the member count (`effective_replicas`). Per-site copies are
        returned as they are: each site's walk already stops at that site's members, so a
        site with fewer nodes than its N holds one copy on each.
        """
        _check_replicas(n)
        if isinstance(n, SiteReplicas):
            return n
        return min(n, len(self._members))

    def site_members(self, site: str) -> tuple[str, ...]:
        """The node ids of the members in `site`, sorted."""
        return tuple(self._members[index].node_id for index in self._site_members(site))

    def preference_list(self, token: int, n: Replication) -> tuple[str, ...]:
        """The owner set of `token`: min(n, members) distinct node ids, in preference order.

        The first entry is the first node clockwise from the token (the vnode with the
        smallest token >= `token`, wrapping); the others follow the site/host ranking of
        the module docstring, so the first k entries are as spread out as k can be.
        """
        _check_replicas(n)
        if not 0 <= token < TOKEN_SPACE:
            raise ValueError(f"token must be in [0, 2**64), got {token}")
        if not self._tokens:
            return ()
        return self._owners_of_vnode(self._vnode_of(token), n)

    def owners_of_study(self, study_instance_uid: str, n: Replication) -> tuple[str, ...]:
        """The owner set of a study: every instance of it lives on these nodes."""
        return self.preference_list(study_token(study_instance_uid), n)

    def stand_ins(self, token: int, n: Replication, unavailable: Set[str]) -> tuple[StandIn, ...]:
        """Who holds hints for the owners of `token` that are in `unavailable`.

        Dynamo's sloppy quorum: walking on past the owner set, each unavailable owner
        (in preference order) gets the next available node that is not an owner, from the
        owner's own site when there is one, so that one node down does not send its
        site's copy over the WAN. Fewer stand-ins come back when too few nodes are left.
        Rare path: computed on demand, not cached.
        """
        owners = self.preference_list(token, n)
        missing = [owner for owner in owners if owner in unavailable]
        if not missing:
            return ()
        taken = set(owners)
        candidates = [
            node_id
            for node_id in self._walk(self._vnode_of(token))
            if node_id not in taken and node_id not in unavailable
        ]
        result: list[StandIn] = []
        for owner in missing:
            site = self._by_id[owner].site
            chosen = next(
                (c for c in candidates if self._by_id[c].site == site),
                candidates[0] if candidates else None,
            )
            if chosen is None:
                break
            candidates.remove(chosen)
            result.append(StandIn(chosen, owner))
        return tuple(result)

    def ranges(self, n: Replication) -> tuple[OwnedRange, ...]:
        """Every non-empty range of the ring in token order, with its owner set.

        The first range wraps: it ends at the smallest token and starts at the largest.
        Together they cover the ring exactly once.
        """
        _check_replicas(n)
        return tuple(
            OwnedRange(token_range, self._owners_of_vnode(index, n))
            for index, token_range in self._vnode_ranges()
        )

    def ownership(self, n: Replication) -> dict[str, float]:
        """Replicated ownership: for each node, the share of keys it holds a copy of.

        The values sum to `effective_replicas(n)`; a balanced ring gives each node
        effective_replicas(n) / members. This, not primary ownership, is what fills disks.
        """
        _check_replicas(n)
        held = dict.fromkeys(self.node_ids, 0)
        for index, token_range in self._vnode_ranges():
            for node_id in self._owners_of_vnode(index, n):
                held[node_id] += token_range.size
        return {node_id: size / TOKEN_SPACE for node_id, size in held.items()}

    def primary_ownership(self) -> dict[str, float]:
        """For each node, the share of keys for which it is the first owner; sums to 1."""
        return self.ownership(1)

    # -- internals ------------------------------------------------------------------

    def _vnode_of(self, token: int) -> int:
        """Index of the vnode whose range holds `token`: first token >= it, wrapping."""
        index = bisect_left(self._tokens, token)
        return 0 if index == len(self._tokens) else index

    def _vnode_ranges(self) -> Iterable[tuple[int, TokenRange]]:
        """(vnode index, its range) for each vnode with a non-empty range."""
        tokens = self._tokens
        for index, end in enumerate(tokens):
            start = tokens[index - 1]  # index 0 takes the last token: the wrapping range.
            if start == end and len(tokens) > 1:
                continue  # A token shared by two vnodes: the later one owns nothing.
            yield index, TokenRange(start, end)

    def _owners_of_vnode(self, vnode: int, n: Replication) -> tuple[str, ...]:
        per_vnode = self._cache.get(n)
        if per_vnode is None:
            per_vnode = self._cache.setdefault(n, [None] * len(self._tokens))
        owners = per_vnode[vnode]
        if owners is None:
            if isinstance(n, SiteReplicas):
                owners = self._rank_site_owners(vnode, n)
            else:
                owners = self._rank_owners(vnode, n)
            per_vnode[vnode] = owners
        return owners

    def _site_members(self, site: str) -> list[int]:
        index = self._site_index.get(site)
        if index is None:
            return []
        return sorted({self._vnode_member[p] for p in self._site_positions[index]})

    def _rank_site_owners(self, start: int, spec: SiteReplicas) -> tuple[str, ...]:
        """Each named site's owners from its own ring, interleaved by rank (module docstring).

        Walking a site's vnode positions from the key is walking the ring that site alone
        would build. Within the site: first the first node met on each host not yet used,
        then the others, in walk order; the walk stops once enough new-host nodes are
        found, or once every host of the site is met and enough nodes in all.
        """
        member_of = self._vnode_member
        machine_of = self._member_machine
        count = len(member_of)
        ranked: list[tuple[int, int, int]] = []  # (rank in site, distance from key, member)
        for site, copies in spec.per_site:
            site_index = self._site_index.get(site)
            if site_index is None:
                continue
            positions = self._site_positions[site_index]
            machines = self._site_machine_count[site_index]
            seen: set[int] = set()
            seen_machines: set[int] = set()
            tier_1: list[tuple[int, int]] = []
            tier_2: list[tuple[int, int]] = []
            first = bisect_left(positions, start)
            for step in range(len(positions)):
                position = positions[(first + step) % len(positions)]
                member = member_of[position]
                if member in seen:
                    continue
                seen.add(member)
                found = ((position - start) % count, member)
                if machine_of[member] not in seen_machines:
                    seen_machines.add(machine_of[member])
                    tier_1.append(found)
                    if len(tier_1) >= copies:
                        break
                else:
                    tier_2.append(found)
                if len(seen_machines) == machines and len(tier_1) + len(tier_2) >= copies:
                    break
            for rank, (distance, member) in enumerate((tier_1 + tier_2)[:copies]):
                ranked.append((rank, distance, member))
        return self._node_ids_of([member for _, _, member in sorted(ranked)])

    def _rank_owners(self, start: int, n: int) -> tuple[str, ...]:
        """Rank the distinct nodes met walking from vnode `start` by (tier, position); keep n.

        Tier 0, the first node of each site, comes from one bisect per site rather than
        from the walk, so a small site far down the ring (a lone disaster-recovery node
        among hundreds) costs nothing. The walk then only ranks tiers 1 and 2, and stops
        once no later node can make the top n: when enough tier-1 nodes are found, or when
        every host has been met and enough nodes in all are found.
        """
        want = min(n, len(self._members))
        member_of = self._vnode_member
        count = len(member_of)
        firsts: list[tuple[int, int]] = []
        for positions in self._site_positions:
            index = bisect_left(positions, start)
            position = positions[index] if index < len(positions) else positions[0]
            firsts.append(((position - start) % count, member_of[position]))
        tier_0 = [member for _, member in sorted(firsts)]
        if len(tier_0) >= want:
            return self._node_ids_of(tier_0[:want])

        machine_of = self._member_machine
        seen = set(tier_0)
        seen_machines = {machine_of[member] for member in tier_0}
        tier_1: list[int] = []
        tier_2: list[int] = []
        still_wanted = want - len(tier_0)
        position = start
        for _ in range(count):
            member = member_of[position]
            position = position + 1 if position + 1 < count else 0
            if member in seen:
                continue
            seen.add(member)
            if machine_of[member] not in seen_machines:
                seen_machines.add(machine_of[member])
                tier_1.append(member)
                if len(tier_1) >= still_wanted:
                    break
            else:
                tier_2.append(member)
            if (
                len(seen_machines) == self._machine_count
                and len(tier_1) + len(tier_2) >= still_wanted
            ):
                break
        return self._node_ids_of((tier_0 + tier_1 + tier_2)[:want])

    def _node_ids_of(self, members: list[int]) -> tuple[str, ...]:
        return tuple(self._members[member].node_id for member in members)

    def _walk(self, start: int) -> list[str]:
        """Every member once, in the order a clockwise walk from vnode `start` meets them."""
        order: dict[int, None] = {}
        count = len(self._vnode_member)
        for step in range(count):
            order.setdefault(self._vnode_member[(start + step) % count], None)
            if len(order) == len(self._members):
                break
        return [self._members[member].node_id for member in order]


def _check_replicas(n: Replication) -> None:
    if isinstance(n, SiteReplicas):
        return  # Checked when it was made.
    if n < 1:
        raise ValueError(f"replica count n must be >= 1, got {n}")


def _membership_version(cluster_id: str, members: tuple[Member, ...]) -> int:
    """mmh3 of a length-prefixed encoding: no two memberships share an encoding."""
    fields: list[str] = ["pacsnode.ring.v1", cluster_id]
    for member in members:
        # The salt rides in the vnodes field, absent when 0: a ring without salts keeps its version.
        weight = f"{member.vnodes}/salt{member.token_salt}" if member.token_salt else str(member.vnodes)
        fields += [member.node_id, member.site, member.host, weight]
    encoded = b"".join(
        len(raw).to_bytes(4, "big") + raw for raw in (field.encode() for field in fields)
    )
    return token_of(encoded)
