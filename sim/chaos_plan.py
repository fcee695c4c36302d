"""The chaos runner's fault plan: which fault, on whom, for how long. Pure and seeded.

One fault at a time; the runner heals it, waits (up to a bound) for the cluster to be
healthy again, measures how long that took, and starts the next. The order puts one of
each essential kind first (kill -9, pause, partition, wipe, in a seeded order), so even a
short run sees them all; then the other kinds; then random picks.

    kill       kill -9 one node; restart it after `duration_s` (its synced data survives)
    long-kill  kill -9 for longer than the dead grace: it is removed, the survivors
               re-replicate, and it rejoins when restarted
    pause      SIGSTOP one node for `duration_s`, then SIGCONT
    restart    SIGTERM and start again at once (a clean restart, e.g. an upgrade)
    wipe       kill -9, delete its data directory, start it empty (a lost disk)
    partition  cut the nodes into two groups, both ways
    one-way    block connections from one group to the other only
    isolate    cut one node off from every other node
    slow       add 100 ms to every chunk on one node's links, both ways
    site-cut   cut one whole site off from every other site, both ways (needs >= 2 sites)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

KINDS = ("kill", "long-kill", "pause", "restart", "wipe", "partition", "one-way", "isolate", "slow")
SITE_KINDS = ("site-cut",)  # Only in scenarios run with two sites or more.
ESSENTIAL = ("kill", "pause", "partition", "wipe")

SCENARIOS: dict[str, tuple[str, ...]] = {
    "mixed": KINDS,
    "kill": ("kill", "long-kill", "restart"),
    "pause": ("pause",),
    "partition": ("partition", "one-way", "isolate"),
    "wipe": ("wipe",),
    "slow": ("slow",),
    "sites": ("site-cut", "kill"),  # With --sites 3 and WAN delays: issue 15's site-alone run.
}

# Durations (seconds) by kind; long-kill's is dead grace plus this range.
DURATIONS: dict[str, tuple[float, float]] = {
    "kill": (3, 12),
    "long-kill": (5, 10),
    "pause": (1, 6),
    "restart": (0, 0),
    "wipe": (2, 6),
    "partition": (4, 15),
    "one-way": (4, 12),
    "isolate": (4, 15),
    "slow": (5, 10),
    "site-cut": (8, 20),
}


@dataclass(frozen=True)
class Fault:
    kind: str
    duration_s: float
    target: str = ""                                   # kill, long-kill, pause, restart, wipe, isolate, slow
    group_a: tuple[str, ...] = field(default=())       # partition, one-way (a -> b is blocked for one-way)
    group_b: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        if self.group_a:
            arrow = "-/->" if self.kind == "one-way" else "-/-"
            return f"{self.kind} {','.join(self.group_a)} {arrow} {','.join(self.group_b)} for {self.duration_s:.1f} s"
        return f"{self.kind} {self.target} for {self.duration_s:.1f} s"


def plan_faults(seed: int, node_ids: list[str], duration_s: float, *, scenario: str = "mixed",
                dead_grace_s: float = 10.0, gap_s: float = 4.0,
                sites: dict[str, str] | None = None) -> list[Fault]:
    """Enough faults to fill `duration_s` (each costs its duration plus about `gap_s`).

    `sites` maps node id to site; a site-cut needs two sites or more.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown chaos scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    if len(node_ids) < 2:
        raise ValueError("chaos needs at least 2 nodes")
    rng = random.Random(f"chaos:{seed}")
    site_groups = _site_groups(node_ids, sites or {})
    allowed = [k for k in SCENARIOS[scenario] if not (k == "long-kill" and len(node_ids) < 4)
               and not (k in SITE_KINDS and len(site_groups) < 2)]
    if not allowed:
        raise ValueError(f"scenario {scenario!r} needs at least 4 nodes")
    first = [k for k in ESSENTIAL if k in allowed]
    rng.shuffle(first)
    rest = [k for k in allowed if k not in first]
    rng.shuffle(rest)
    order = first + rest
    faults: list[Fault] = []
    spent = 0.0
    while spent < duration_s:
        kind = order[len(faults)] if len(faults) < len(order) else rng.choice(allowed)
        fault = _make(rng, kind, sorted(node_ids), dead_grace_s, site_groups)
        faults.append(fault)
        spent += fault.duration_s + gap_s
    return faults


def _site_groups(node_ids: list[str], sites: dict[str, str]) -> list[tuple[str, ...]]:
    """The nodes of each site, sites in name order (one group when no sites are given)."""
    by_site: dict[str, list[str]] = {}
    for node_id in sorted(node_ids):
        by_site.setdefault(sites.get(node_id, "default"), []).append(node_id)
    return [tuple(by_site[site]) for site in sorted(by_site)]


def _make(rng: random.Random, kind: str, node_ids: list[str], dead_grace_s: float,
          site_groups: list[tuple[str, ...]]) -> Fault:
    low, high = DURATIONS[kind]
    duration = round(rng.uniform(low, high), 1)
    if kind == "long-kill":
        duration = round(dead_grace_s + duration, 1)
    if kind in ("partition", "one-way"):
        shuffled = list(node_ids)
        rng.shuffle(shuffled)
        cut = rng.randint(1, len(shuffled) - 1) if kind == "one-way" else len(shuffled) // 2
        return Fault(kind, duration, group_a=tuple(sorted(shuffled[:cut])), group_b=tuple(sorted(shuffled[cut:])))
    if kind == "site-cut":
        alone = rng.choice(site_groups)
        others = tuple(sorted(n for n in node_ids if n not in alone))
        return Fault(kind, duration, group_a=alone, group_b=others)
    return Fault(kind, duration, target=rng.choice(node_ids))
