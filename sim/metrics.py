"""What a simulation run measures (research/distributed.md §4.5), from its records.

Everything here reads what the run left behind: the membership transitions every node's
Swim reported (`SimCluster.transitions`), the repairers' copies (`SimCluster.moves`), the
network's counters, the clients' history, and the under-replication samples a
`ReplicationMonitor` takes once a second. Times are virtual milliseconds.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pacsnode.replication.model import StoreOutcome
from pacsnode.ring.placement import copies_among
from pacsnode.sim.cluster import SimCluster
from pacsnode.sim.workload import OpRecord, Workload

DOWN_STATES = frozenset({"suspect", "dead", "left", "removed"})
GONE_STATES = frozenset({"dead", "left", "removed"})


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


# ===================================================================== under-replication over time


class ReplicationMonitor:
    """Samples, every `interval_s`, how many instances have fewer live copies than wanted."""

    def __init__(self, cluster: SimCluster, workload: Workload, interval_s: float = 1.0) -> None:
        self.cluster = cluster
        self.workload = workload
        self.interval_s = interval_s
        self.samples: list[tuple[int, int]] = []  # (at_ms, under-replicated instances)
        self.tracked: set[str] | None = None  # Count only these (the instances there when the fault began).
        self._task: asyncio.Task[None] | None = None

    def under_replicated(self, sops: Iterable[str] | None = None) -> int:
        """Instances with fewer than min(N, live ring members) copies on running nodes.

        A copy counts while its node runs, in the ring or not (a leaving node's copies
        count until it exits); a crashed node's copies do not.
        """
        cluster = self.cluster
        live = cluster.live_ids()
        if not live:
            return len(self.workload.acked)
        ring = cluster.process(live[0]).membership.ring()
        target = copies_among(cluster.config.replication_factor, [ring.member(n).site for n in live if n in ring])
        running = set(cluster.running_ids())
        holders = cluster.replicas.holders
        acked = self.workload.acked  # A tracked instance a delete named since is no longer counted.
        deleted = self.workload.ever_deleted if sops is not None else set()
        return sum(1 for sop in (acked if sops is None else sops)
                   if sop in acked and sop not in deleted and len(holders.get(sop, set()) & running) < target)

    def start(self) -> None:
        self._task = self.cluster.loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self.samples.append((self.cluster.now_ms(), self.under_replicated(self.tracked)))
            await asyncio.sleep(self.interval_s)

    def back_to_full_ms(self, since_ms: int) -> int | None:
        """First sample at or after `since_ms` from which every later sample is 0."""
        result = None
        for at_ms, count in self.samples:
            if at_ms < since_ms:
                continue
            if count == 0:
                result = at_ms if result is None else result
            else:
                result = None
        return result

    def monotonic_after(self, since_ms: int) -> bool:
        """Whether the under-replicated count never rose after its peak following `since_ms`."""
        counts = [c for at, c in self.samples if at >= since_ms]
        if not counts:
            return True
        peak = counts.index(max(counts))
        return all(b <= a for a, b in zip(counts[peak:], counts[peak + 1:]))


# ===================================================================== failure detection


@dataclass
class Detection:
    victim: str
    generation: int
    crashed_ms: int
    first_suspect_ms: int | None  # After the crash, by anyone.
    all_dead_ms: int | None  # Every observer holds it dead (or removed).
    observer_dead_ms: list[int] = field(default_factory=list)  # Per observer, from the crash.
    observers: int = 0


def detections(cluster: SimCluster, crashes: Sequence[tuple[str, int, int]], until_ms: int) -> list[Detection]:
    """For each (victim, generation, crashed_ms): when others suspected it and held it dead."""
    results = []
    for victim, generation, crashed_ms in crashes:
        restarted = min((start for node, gen, start, _end in cluster.spans()
                         if node == victim and gen > generation and start is not None), default=None)
        end_ms = until_ms if restarted is None else min(until_ms, restarted)
        observers = [node_id for node_id, gen, start, end in cluster.spans()
                     if node_id != victim and start is not None and start <= crashed_ms and (end is None or end >= end_ms)
                     and not any(v == node_id for v, _g, _c in crashes)]
        first_down: dict[str, int] = {}
        first_suspect = None
        for record in cluster.transitions:
            if record.subject != victim or record.generation != generation or record.at_ms < crashed_ms:
                continue
            if record.at_ms > end_ms:
                break
            if record.new in DOWN_STATES and first_suspect is None:
                first_suspect = record.at_ms
            if record.new in GONE_STATES and record.observer not in first_down:
                first_down[record.observer] = record.at_ms
        times = [first_down[o] - crashed_ms for o in observers if o in first_down]
        all_dead = max(first_down[o] for o in observers) if observers and all(o in first_down for o in observers) \
            else None
        results.append(Detection(victim, generation, crashed_ms, first_suspect, all_dead, times, len(observers)))
    return results


# ===================================================================== false positives


@dataclass
class FalsePositives:
    declared_dead: int  # (observer, member) pairs: a running member held dead.
    members_declared_dead: int  # Distinct running members that anyone held dead.
    suspicions: int  # Running members held suspect (and refuted, usually).
    refutations: int


def false_positives(cluster: SimCluster, since_ms: int = 0) -> FalsePositives:
    dead_pairs = 0
    members = set()
    suspicions = 0
    for record in cluster.transitions:
        if record.at_ms < since_ms or record.new not in ("dead", "suspect"):
            continue
        if not cluster.alive_at(record.subject, record.generation, record.at_ms):
            continue
        if record.new == "dead":
            dead_pairs += 1
            members.add((record.subject, record.generation))
        else:
            suspicions += 1
    refutations = 0
    for node in cluster.nodes.values():
        if node.process is not None and node.process.alive:
            refutations += node.process.swim.statistics().suspicions_refuted
    return FalsePositives(dead_pairs, len(members), suspicions, refutations)


# ===================================================================== dissemination


@dataclass
class Spread:
    change: str  # e.g. "suspect node-004", "join node-010"
    first_ms: int
    all_ms: int | None
    observers: int

    def rounds(self, gossip_interval_ms: int) -> int | None:
        if self.all_ms is None:
            return None
        return math.ceil((self.all_ms - self.first_ms) / gossip_interval_ms)


def spread_of(cluster: SimCluster, subject: str, generation: int, states: frozenset[str], after_ms: int,
              label: str, until_ms: int) -> Spread | None:
    """How long a change about `subject` took from the first node holding it to every live node."""
    observers = [node_id for node_id, gen, start, end in cluster.spans()
                 if node_id != subject and start is not None and start <= after_ms and (end is None or end >= until_ms)]
    first: dict[str, int] = {}
    for record in cluster.transitions:
        if record.at_ms < after_ms or record.subject != subject or record.observer == subject:
            continue
        if record.at_ms > until_ms:
            break
        # Reached: the change itself, or anything about a later boot of the member (which supersedes it).
        reached = (record.generation == generation and record.new in states) or record.generation > generation
        if reached and record.observer not in first:
            first[record.observer] = record.at_ms
    if not first:
        return None
    first_ms = min(first.values())
    done = all(o in first for o in observers)
    return Spread(label, first_ms, max(first[o] for o in observers) if done and observers else None, len(observers))


# ===================================================================== data movement


@dataclass
class Movement:
    kind: str  # loss | join | leave | wipe
    ideal_bytes: int
    moved_bytes: int
    receivers: int
    largest_receiver_fraction: float
    senders: int = 0  # Distinct nodes the copies came from (fan-in of the rebuild).
    largest_sender_fraction: float = 0.0
    cross_site_bytes: int = 0  # Of moved_bytes, copied between nodes of different sites.
    # Of moved_bytes, copies the receiver did not keep: it held a newer tombstone (a delete
    # that reached it before the source), so the pull was for nothing.
    deleted_bytes: int = 0
    cross_site_deleted_bytes: int = 0  # Of those, copied between sites.
    # Copies kept by nodes of the site of the node lost (joined, left, wiped) that came from
    # another site: with 2+ copies per site a same-site source holds them (a rebuild's WAN cost).
    into_site_cross_site_bytes: int = 0

    @property
    def ratio(self) -> float | None:
        return self.moved_bytes / self.ideal_bytes if self.ideal_bytes else None


def movement(cluster: SimCluster, kind: str, ideal_bytes: int, existing: set[str], since_ms: int,
             node_id: str = "") -> Movement:
    """Bytes the repairers copied (pulled or handed over) of instances that existed at `since_ms`.

    Every copy that crossed the network counts, also one the receiver turned out to hold
    already (a duplicate): that is bytes moved for nothing.
    """
    per_node: dict[str, int] = defaultdict(int)
    per_source: dict[str, int] = defaultdict(int)
    cross_site = deleted = cross_site_deleted = into_site = 0
    site = cluster.nodes[node_id].site if node_id in cluster.nodes else None
    for move in cluster.moves:
        if move.at_ms >= since_ms and move.sop_instance_uid in existing:
            per_node[move.node_id] += move.size_bytes
            per_source[move.source] += move.size_bytes
            crossed = bool(move.source) and cluster.nodes[move.source].site != cluster.nodes[move.node_id].site
            if crossed:
                cross_site += move.size_bytes
            if move.outcome == StoreOutcome.DELETED:
                deleted += move.size_bytes
                cross_site_deleted += move.size_bytes if crossed else 0
            elif crossed and cluster.nodes[move.node_id].site == site:
                into_site += move.size_bytes
    moved = sum(per_node.values())
    largest = max(per_node.values(), default=0)
    largest_source = max(per_source.values(), default=0)
    return Movement(kind, ideal_bytes, moved, len(per_node), largest / moved if moved else 0.0,
                    len(per_source), largest_source / moved if moved else 0.0, cross_site, deleted,
                    cross_site_deleted, into_site)


# ===================================================================== availability


@dataclass
class Availability:
    attempted: int
    ok: int
    entry_down: int  # Sent to a node that was down (the client's own connection failed).
    longest_failure_run: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    statuses: dict[str, int]

    @property
    def rate(self) -> float | None:
        counted = self.attempted - self.entry_down
        return self.ok / counted if counted else None


def availability(ops: Sequence[OpRecord]) -> Availability:
    statuses: dict[str, int] = defaultdict(int)
    longest = run = 0
    for op in sorted(ops, key=lambda o: o.started_ms):
        statuses[op.status.split(":")[0]] += 1
        if op.status in ("entry-down", "entry-crashed"):
            continue
        run = 0 if op.ok else run + 1
        longest = max(longest, run)
    latencies = [op.latency_ms for op in ops if op.ok]
    entry_down = sum(1 for op in ops if op.status in ("entry-down", "entry-crashed"))
    return Availability(len(ops), sum(1 for op in ops if op.ok), entry_down, longest,
                        percentile(latencies, 50), percentile(latencies, 99), dict(sorted(statuses.items())))


# ===================================================================== read your writes


READ_KINDS = ("retrieve", "find-study", "find")


def read_your_writes(ops: Sequence[OpRecord]) -> dict[str, dict[str, int]]:
    """Per read kind, over the ops whose entry node stayed up (`OpRecord.entry_up`): how
    many answered complete ("success"), said Success without an acknowledged study or
    instance ("stale"; a PatientID find's "incomplete"), said part could not be asked
    ("flagged", never Success), or failed otherwise. `through_down_entry`: the rest."""
    counts: dict[str, dict[str, int]] = {}
    for kind in READ_KINDS:
        c = {"attempted": 0, "success": 0, "stale": 0, "flagged": 0, "failed": 0, "through_down_entry": 0}
        for op in ops:
            if op.kind != kind:
                continue
            if not op.entry_up:
                c["through_down_entry"] += 1
                continue
            c["attempted"] += 1
            status = "stale" if op.status == "incomplete" else op.status
            c[status if status in ("success", "stale", "flagged") else "failed"] += 1
        counts[kind] = c
    return counts


# ===================================================================== balance and bandwidth


def balance(cluster: SimCluster) -> dict[str, Any]:
    """max/mean of stored bytes over live ring members, and of key-space ownership."""
    live = cluster.live_ids()
    if not live:
        return {}
    ring = cluster.process(live[0]).membership.ring()
    members = [n for n in live if n in ring]
    stored = [cluster.nodes[n].store.bytes_stored() for n in members]
    mean = sum(stored) / len(stored) if stored else 0
    ownership = ring.ownership(cluster.config.replication_factor)
    owned = [ownership[n] for n in members]
    return {
        "stored_max_over_mean": max(stored) / mean if mean else None,
        "ownership_max_over_mean": max(owned) / (sum(owned) / len(owned)) if owned else None,
        "studies": len({s for s in cluster.replicas.study_of.values()}),
    }


def swim_bytes_sent(cluster: SimCluster) -> int:
    return sum(cluster.network.traffic.swim_bytes_sent.values())
