"""One simulation run: set up, load, fault, heal, settle, check, measure.

    result = run_scenario("kill-one", nodes=30, sites=3, seed=7)
    print(format_result(result))

Phases, all on the virtual clock:
1. the cluster starts (every node knows every other, `bootstrap="full"`) and settles;
2. the clients load the initial data (`load` instances, 8 at a time) and the cluster
   settles until every instance has its N copies;
3. a 15 s baseline with the clients running (availability baseline, gossip bytes);
4. the scenario's script: faults on a schedule, then heal; clients keep running;
5. the clients stop; the cluster settles until quiet (one ring everywhere, every
   instance at N copies, no pending ranges, no hint for a live owner: instance,
   tombstone or correction) or `settle_max_s`;
6. the checkers (sim/checkers.py), then the measurements (sim/metrics.py).

A failing run says so and prints the command that replays it (same seed, same run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import random
import time
from typing import Any

from pacsnode.ring.placement import SiteReplicas
from pacsnode.sim.checkers import CheckResult, run_checkers, study_copies
from pacsnode.sim.cluster import SimCluster, SimConfig
from pacsnode.sim.metrics import (
    ReplicationMonitor,
    availability,
    balance,
    detections,
    false_positives,
    movement,
    percentile,
    read_your_writes,
    spread_of,
    swim_bytes_sent,
)
from pacsnode.sim.network import LinkModel
from pacsnode.sim.scenarios import SCENARIOS, ScenarioContext
from pacsnode.sim.workload import Workload, WorkloadMix


def default_load(nodes: int) -> int:
    """Initial instances: enough for every node to hold some, without slowing big runs down."""
    return max(600, min(3_000, 30 * nodes))


GC_THRESHOLD = 50_000  # Allocations between young-generation collections during a run (Python's: 700).


def run_scenario(name: str, *, nodes: int, sites: int = 3, seed: int = 0, load: int | None = None,
                 rate_per_s: float = 4.0, settle_max_s: float = 400.0, config: SimConfig | None = None,
                 mix: WorkloadMix | None = None) -> dict[str, Any]:
    """Run scenario `name` once and return its result (JSON-ready).

    `mix`: what the clients do during the run (default: 60% stores, 30% reads, 10% finds,
    no re-sends); `WorkloadMix(conflict=0.1)` re-sends 10% of stores as an acknowledged
    SOP Instance UID with other bytes.
    """
    mix = mix or WorkloadMix()
    scenario = SCENARIOS[name]
    base = config or SimConfig()
    link = dataclasses.replace(base.link, **scenario.link)
    config = dataclasses.replace(base, link=link, **scenario.config)
    started = time.perf_counter()
    # Python's cycle collector, at its default threshold (700 allocations), ran about 400
    # times per run and took ~6% of its CPU (kill-one and churn, seeds 0 and 2); a run
    # allocates millions of short-lived objects, most freed by reference counting. Fewer
    # collections during the run, one before the checks (so a task destroyed while pending
    # is reported in time), and the threshold given back after.
    threshold = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *threshold[1:])
    cluster = SimCluster(nodes, sites=sites, seed=seed, config=config)
    try:
        result = cluster.loop.run_until_complete(_drive(cluster, name, seed, load if load is not None
                                                        else default_load(nodes), rate_per_s, settle_max_s,
                                                        base.link, mix))
    finally:
        cluster.close()
        gc.set_threshold(*threshold)
    result.update(scenario=name, nodes=nodes, sites=sites, seed=seed, trace_hash=cluster.trace.hexdigest(),
                  trace_events=cluster.trace.events, wall_s=round(time.perf_counter() - started, 2),
                  rings_built=cluster.rings.built)
    result["replay"] = f"python -m pacsnode.sim run --scenario {name} --nodes {nodes} --sites {sites} --seed {seed}" + \
        (f" --load {load}" if load is not None else "") + \
        (f" --rate {rate_per_s}" if rate_per_s != 4.0 else "") + \
        (f" --read-quorum {config.read_quorum}" if config.read_quorum != SimConfig().read_quorum else "") + \
        (f" --scatter-read-quorum {config.scatter_read_quorum}"
         if config.scatter_read_quorum != SimConfig().scatter_read_quorum else "") + \
        (f" --write-quorum-mode {config.write_mode.value}" if config.write_mode != SimConfig().write_mode else "") + \
        (f" --site-copies {min(c for _, c in config.replication_factor.per_site)}"
         if isinstance(config.replication_factor, SiteReplicas) else "") + \
        (f" --conflicts {mix.conflict}" if mix.conflict else "") + (f" --duplicates {mix.duplicate}" if mix.duplicate
                                                                      else "")
    result["mix"] = dataclasses.asdict(mix)
    return result


async def _drive(cluster: SimCluster, name: str, seed: int, load: int, rate_per_s: float,
                 settle_max_s: float, base_link: LinkModel, mix: WorkloadMix) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    workload = Workload(cluster, seed)
    monitor = ReplicationMonitor(cluster, workload)
    ctx = ScenarioContext(cluster, workload, random.Random(f"{seed}:scenario"))
    gossip_interval_ms = cluster.config.swim.gossip_interval_ms

    # 1-2. start, load, settle.
    await asyncio.sleep(5)
    await workload.load(load)
    await ctx.wait_for(lambda: monitor.under_replicated() == 0 and not any(
        cluster.process(n).repairer.pending() for n in cluster.live_ids()), 300)
    await asyncio.sleep(5)
    loaded_ms = cluster.now_ms()

    # 3. baseline with clients running.
    swim_before, live_before = swim_bytes_sent(cluster), len(cluster.live_ids())
    workload.start(rate_per_s, mix)
    await asyncio.sleep(15)
    baseline_end_ms = cluster.now_ms()
    gossip_rate = (swim_bytes_sent(cluster) - swim_before) / 15 / max(1, live_before)
    steady_balance = balance(cluster)

    # 4. the scenario; its link faults (loss, jitter) end with it.
    monitor.start()
    script = asyncio.ensure_future(scenario.script(ctx))
    while not ctx.fault_start_ms and not script.done():
        await asyncio.sleep(0.1)
    monitor.tracked = ctx.existing & set(workload.acked)
    await script
    if not ctx.fault_end_ms:
        ctx.end_fault()
    cluster.network.model = dataclasses.replace(base_link)
    await asyncio.sleep(10)
    await workload.stop()

    # 5. settle until quiet.
    settle_started = cluster.now_ms()
    quiet_ms = await _settle(cluster, monitor, settle_max_s)

    # 6. check, measure.
    gc.collect()
    checks = await run_checkers(cluster, workload, seed)
    await monitor.stop()
    end_ms = cluster.now_ms()

    result: dict[str, Any] = {
        "ok": all(c.ok is not False for c in checks),
        "checks": [dataclasses.asdict(c) for c in checks],
        "virtual_s": round(end_ms / 1000, 1),
        "instances_acked": len(workload.acked),
        "acked_bytes": workload.acked_bytes(),
        "settle_s": round(((quiet_ms or end_ms) - settle_started) / 1000, 1),
        "quiet": quiet_ms is not None,
        "notes": ctx.notes,
        "faults": [list(f) for f in cluster.faults],
        "gossip_bytes_per_s_per_node": round(gossip_rate, 1),
        "balance": steady_balance,
    }
    # Failure detection.
    found = detections(cluster, ctx.crashes, end_ms)
    result["detection"] = [{
        "victim": d.victim, "observers": d.observers,
        "first_suspect_s": _seconds(d.first_suspect_ms, d.crashed_ms),
        "all_dead_s": _seconds(d.all_dead_ms, d.crashed_ms),
        "observer_dead_s": [round(t / 1000, 3) for t in d.observer_dead_ms],
    } for d in found]
    fp = false_positives(cluster, since_ms=loaded_ms)
    victims = {(v, g) for v, g, _at in ctx.crashes}
    result["false_positives"] = dataclasses.asdict(fp)
    result["false_positive_window_s"] = round((end_ms - loaded_ms) / 1000, 1)
    _ = victims
    # Dissemination, in gossip rounds.
    changes = []
    for victim, generation, at_ms in ctx.crashes:
        changes.append(spread_of(cluster, victim, generation, frozenset({"suspect", "dead", "removed"}), at_ms,
                                 f"suspect {victim}", end_ms))
        changes.append(spread_of(cluster, victim, generation, frozenset({"removed"}), at_ms,
                                 f"removed {victim}", end_ms))
    for node_id, at_ms in ctx.joins:
        changes.append(spread_of(cluster, node_id, 1, frozenset({"alive"}), at_ms, f"join {node_id}", end_ms))
    for node_id, at_ms in ctx.leaves:
        changes.append(spread_of(cluster, node_id, cluster.nodes[node_id].generation, frozenset({"leaving", "left"}),
                                 at_ms, f"leave {node_id}", end_ms))
    for node_id, generation, at_ms in ctx.restarts:
        changes.append(spread_of(cluster, node_id, generation, frozenset({"alive"}), at_ms,
                                 f"restart {node_id} generation {generation}", end_ms))
    spreads = [c for c in changes if c is not None]
    result["spread"] = [{"change": s.change, "observers": s.observers,
                         "seconds": _seconds(s.all_ms, s.first_ms), "rounds": s.rounds(gossip_interval_ms)}
                        for s in spreads]
    result["rounds_bound"] = math.ceil(math.log2(max(2, cluster_size(cluster)))) + 3
    # Data movement and re-replication.
    if ctx.movement_kind:
        if ctx.movement_kind == "join":
            store = cluster.nodes[ctx.movement_node].store
            ideal = sum(len(s.blob) for s in _held(store, ctx.existing))
        else:
            # What it held, less what the clients deleted since (that need not move any more).
            gone = (set(workload.deleted) | workload.unclear) & set(ctx.movement_held)
            ideal = ctx.movement_held_bytes - sum(ctx.movement_held[sop] for sop in gone)
        moved = movement(cluster, ctx.movement_kind, ideal, ctx.existing, ctx.fault_start_ms, ctx.movement_node)
        result["movement"] = {**dataclasses.asdict(moved), "ratio": _round(moved.ratio, 3)}
    back = monitor.back_to_full_ms(ctx.fault_start_ms)
    result["rereplication_s"] = _seconds(back, ctx.fault_start_ms)
    removed_at = min((r.at_ms for r in cluster.transitions if r.new == "removed" and r.at_ms >= ctx.fault_start_ms),
                     default=None)
    result["rereplication_after_removal_s"] = _seconds(back, removed_at) if removed_at and back and back >= removed_at \
        else None
    result["under_replicated_peak"] = max((c for at, c in monitor.samples if at >= ctx.fault_start_ms), default=0)
    result["under_replicated_monotonic"] = monitor.monotonic_after(ctx.fault_start_ms)
    # Availability.
    window_end = ctx.fault_end_ms + 10_000
    result["availability"] = {
        "baseline": {kind: dataclasses.asdict(availability(workload.ops_between(loaded_ms, baseline_end_ms, kind,
                                                                                ended=True)))
                     for kind in ("store", "read", "find", "retrieve", "find-study")},
        "fault": {kind: dataclasses.asdict(availability(workload.ops_between(ctx.fault_start_ms, window_end, kind)))
                  for kind in ("store", "read", "find", "retrieve", "find-study")},
    }
    # Read your writes (issue 16 item 3): every client read of the run through an entry node that stayed up.
    result["read_your_writes"] = read_your_writes([op for op in workload.history if op.ended_ms])
    result["read_quorum"] = cluster.config.read_quorum
    result["scatter_read_quorum"] = cluster.config.scatter_read_quorum
    result["write_quorum_mode"] = cluster.config.write_mode.value
    # Hints left for owners that are gone from the ring (never re-targeted), and repair totals.
    result["hints_left"] = _hints_left(cluster)
    result["repair"] = {
        "pulled_instances": sum(1 for m in cluster.moves if m.via == "pull"),
        "pulled_bytes": sum(m.size_bytes for m in cluster.moves if m.via == "pull"),
        "pushed_instances": sum(1 for m in cluster.moves if m.via == "push"),
        "pushed_bytes": sum(m.size_bytes for m in cluster.moves if m.via == "push"),
        "copies_not_new": sum(1 for m in cluster.moves if m.outcome != "stored"),
    }
    processes = [node.process for node in cluster.nodes.values() if node.process is not None]
    result["ring_views"] = {  # Last boot of every node (issue 9 item 4: NOT_OWNER and push-pull on mismatch).
        "not_owner_refusals": sum(p.not_owner_refusals for p in processes),
        "writes_not_owner": sum(p.coordinator.stats.extra.get("writes_not_owner", 0) for p in processes),
        "writes_replanned": sum(p.coordinator.stats.extra.get("writes_replanned", 0) for p in processes),
        "mismatch_push_pulls": sum(p.ring_sync.started for p in processes),
        "instances_dropped": sum(p.repairer.stats.instances_dropped for p in processes),
    }
    result["traffic"] = {
        "messages": dict(sorted(cluster.network.traffic.messages.items())),
        "refused": cluster.network.traffic.refused,
        "deadlines": cluster.network.traffic.deadlines,
        "wan_bytes": cluster.network.traffic.wan_bytes,
    }
    return result


def cluster_size(cluster: SimCluster) -> int:
    return len([n for n in cluster.nodes.values() if not n.gone])


def _held(store: Any, existing: set[str]) -> list[Any]:
    return [s for s in (store.read_stored(study, sop) for _token, study, sop in store.keys() if sop in existing)
            if s is not None]


def _hints_left(cluster: SimCluster) -> dict[str, int]:
    """Hints still held on live nodes: instances, and the tombstones and corrections held
    for owners (counted among the instances' figures and on their own)."""
    live = cluster.live_ids()
    ring = cluster.process(live[0]).membership.ring() if live else None
    live_owner = other = tombstones = corrections = 0
    for node_id in live:
        store = cluster.nodes[node_id].store
        held = [(owner, count) for owner, (count, _size) in store.hint_owners().items()]
        for owner in store.tombstone_hint_owners():
            count = sum(1 for _ in store.tombstone_hints(owner))
            held.append((owner, count))
            tombstones += count
        for owner in store.correction_hint_owners():
            count = sum(1 for _ in store.correction_hints(owner))
            held.append((owner, count))
            corrections += count
        for owner, count in held:
            if ring is not None and owner in ring and owner in live:
                live_owner += count
            else:
                other += count
    return {"for_live_owners": live_owner, "for_owners_out_of_ring": other, "tombstones": tombstones,
            "corrections": corrections}


async def _settle(cluster: SimCluster, monitor: ReplicationMonitor, settle_max_s: float) -> int | None:
    """Run until quiet (checked every 5 s, twice in a row) or for `settle_max_s`."""
    deadline = cluster.loop.time() + settle_max_s
    quiet_since: int | None = None
    while cluster.loop.time() < deadline:
        await asyncio.sleep(5)
        if _quiet(cluster, monitor):
            if quiet_since is not None:
                return quiet_since
            quiet_since = cluster.now_ms()
        else:
            quiet_since = None
    return None


def _quiet(cluster: SimCluster, monitor: ReplicationMonitor) -> bool:
    if not cluster.converged():
        return False
    copies, target = study_copies(cluster, monitor.workload)
    if any(c.owners_missing or (not c.dead_owners and c.holders < target) for c in copies.values()):
        return False
    for node_id in cluster.live_ids():
        if cluster.process(node_id).repairer.pending():
            return False
    return _hints_left(cluster)["for_live_owners"] == 0


def _seconds(at_ms: int | None, since_ms: int | None) -> float | None:
    if at_ms is None or since_ms is None:
        return None
    return round((at_ms - since_ms) / 1000, 3)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ===================================================================== text


def format_result(result: dict[str, Any]) -> str:
    lines = [f"scenario {result['scenario']}: {result['nodes']} nodes, {result['sites']} sites, seed {result['seed']}"
             f" -- {'PASS' if result['ok'] else 'FAIL'}",
             f"  {result['virtual_s']} s simulated in {result['wall_s']} s; trace {result['trace_hash']} "
             f"({result['trace_events']} events)"]
    for check in result["checks"]:
        lines.append("  " + CheckResult(**check).line())
    for d in result["detection"]:
        times = d["observer_dead_s"]
        lines.append(f"  detection {d['victim']}: first suspect {d['first_suspect_s']} s, dead everywhere "
                     f"{d['all_dead_s']} s (observer p50 {percentile(times, 50)} s, p99 {percentile(times, 99)} s)")
    fp = result["false_positives"]
    lines.append(f"  false positives: {fp['declared_dead']} (observer, running member) held dead, "
                 f"{fp['members_declared_dead']} members; {fp['suspicions']} suspicions of running members, "
                 f"{fp['refutations']} refutations, over {result['false_positive_window_s']} s")
    for s in result["spread"]:
        lines.append(f"  spread {s['change']}: {s['seconds']} s = {s['rounds']} gossip rounds "
                     f"(bound {result['rounds_bound']}) over {s['observers']} observers")
    if "movement" in result:
        m = result["movement"]
        lines.append(f"  data moved ({m['kind']}): {m['moved_bytes']} bytes vs ideal {m['ideal_bytes']} "
                     f"= {m['ratio']}; {m['receivers']} receivers, largest {m['largest_receiver_fraction']:.2f}; "
                     f"{m['senders']} senders, largest {m['largest_sender_fraction']:.2f}; "
                     f"{m['cross_site_bytes']} bytes between sites; not kept (a newer tombstone at the receiver) "
                     f"{m['deleted_bytes']} bytes, {m['cross_site_deleted_bytes']} of them between sites; "
                     f"kept in {m['kind']} node's site from another site {m['into_site_cross_site_bytes']} bytes")
    lines.append(f"  back to N copies {result['rereplication_s']} s after the fault"
                 f" ({result['rereplication_after_removal_s']} s after removal); peak under-replicated "
                 f"{result['under_replicated_peak']}, monotonic {result['under_replicated_monotonic']}")
    for window in ("baseline", "fault"):
        parts = []
        for kind, a in result["availability"][window].items():
            counted = a["attempted"] - a["entry_down"]
            parts.append(f"{kind} {a['ok']}/{counted}" + (f" (+{a['entry_down']} to a down node)"
                                                            if a["entry_down"] else "")
                         + (f" p99 {a['latency_p99_ms']:.0f} ms" if a["latency_p99_ms"] is not None else ""))
        lines.append(f"  availability {window}: " + ", ".join(parts))
    ryw = result.get("read_your_writes")
    if ryw:
        lines.append("  read your writes (entry node up; R=" + str(result.get("read_quorum")) + ", scatter R="
                     + str(result.get("scatter_read_quorum")) + "): " + ", ".join(
            f"{kind} {c['success']} ok / {c['stale']} stale / {c['flagged']} flagged / {c['failed']} failed"
            for kind, c in ryw.items()))
    b = result["balance"]
    if b:
        lines.append(f"  balance: stored max/mean {_fmt(b['stored_max_over_mean'])}, ring ownership max/mean "
                     f"{_fmt(b['ownership_max_over_mean'])} ({b['studies']} studies)")
    lines.append(f"  gossip {result['gossip_bytes_per_s_per_node']} B/s per node; hints left {result['hints_left']}; "
                 f"settled in {result['settle_s']} s (quiet: {result['quiet']})")
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    if not result["ok"]:
        lines.append(f"  replay: {result['replay']}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


__all__ = ["LinkModel", "format_result", "run_scenario"]
