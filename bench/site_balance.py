"""Balance within a site under per-site copies: fullest node / mean replicated ownership.

    .venv/bin/python bench/site_balance.py --vnodes 64 256 --sizes 3 8 24 48 --copies 1 2 3 [--chosen]

Three sites of equal size, all nodes of equal weight; the worst over `--clusters` cluster
ids (tokens are hashes of the cluster id, so each cluster id is one draw). Pure ring code:
no node is started. `--chosen`: the nodes join one at a time, round robin over the sites,
each taking the token salt ring/token_choice.py picks against the ring so far (what a node
does at its first start); without it every node has salt 0 (random tokens, as before salts).
Figures are in docs/sites.md.
"""

from __future__ import annotations

import argparse

from pacsnode.ring.placement import Member, Ring, SiteReplicas
from pacsnode.ring.token_choice import choose_token_salt


def joined(cluster_id: str, members: list[Member], policy: SiteReplicas) -> list[Member]:
    """`members` joined one at a time in order, each with the salt chosen against those before."""
    ring: list[Member] = []
    for member in members:
        salt = choose_token_salt(cluster_id, ring, member, policy)
        ring.append(Member(member.node_id, site=member.site, vnodes=member.vnodes, token_salt=salt))
    return ring


def worst_ratio(per_site: int, copies: int, vnodes: int, clusters: int, chosen: bool = False) -> float:
    worst = 0.0
    policy = SiteReplicas.of({"a": copies, "b": copies, "c": copies})
    for cluster in range(clusters):
        members = [
            Member(f"{site}-n{i}", site=site, vnodes=vnodes)
            for i in range(per_site)
            for site in ("a", "b", "c")
        ]
        if chosen:
            members = joined(f"balance-{cluster}", members, policy)
        held = Ring(f"balance-{cluster}", members).ownership(policy)
        for site in "abc":
            values = [held[m.node_id] for m in members if m.site == site]
            worst = max(worst, max(values) / (sum(values) / len(values)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vnodes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 8, 24, 48])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--chosen", action="store_true", help="token salts chosen at join (the default since stop 22)")
    args = parser.parse_args()
    print("| nodes per site | copies per site | " + " | ".join(f"{v} vnodes" for v in args.vnodes) + " |")
    print("|---|---|" + "---|" * len(args.vnodes))
    for per_site in args.sizes:
        for copies in args.copies:
            if copies > per_site:
                continue
            ratios = [worst_ratio(per_site, copies, v, args.clusters, args.chosen) for v in args.vnodes]
            print(f"| {per_site} | {copies} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
