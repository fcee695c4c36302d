"""Balance within a site under per-site copies: fullest node / mean replicated ownership.

    .venv/bin/python bench/site_balance.py --vnodes 64 256 --sizes 3 8 24 48 --copies 1 2 3

Three sites of equal size, all nodes of equal weight; the worst over `--clusters` cluster
ids (tokens are hashes of the cluster id, so each cluster id is one draw). Pure ring code:
no node is started. Figures are in docs/sites.md.
"""

from __future__ import annotations

import argparse

from pacsnode.ring.placement import Member, Ring, SiteReplicas


def worst_ratio(per_site: int, copies: int, vnodes: int, clusters: int) -> float:
    worst = 0.0
    for cluster in range(clusters):
        members = [
            Member(f"{site}-n{i}", site=site, vnodes=vnodes)
            for site in ("a", "b", "c")
            for i in range(per_site)
        ]
        held = Ring(f"balance-{cluster}", members).ownership(
            SiteReplicas.of({"a": copies, "b": copies, "c": copies})
        )
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
    args = parser.parse_args()
    print("| nodes per site | copies per site | " + " | ".join(f"{v} vnodes" for v in args.vnodes) + " |")
    print("|---|---|" + "---|" * len(args.vnodes))
    for per_site in args.sizes:
        for copies in args.copies:
            if copies > per_site:
                continue
            ratios = [worst_ratio(per_site, copies, v, args.clusters) for v in args.vnodes]
            print(f"| {per_site} | {copies} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
