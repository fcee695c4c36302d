"""Turn a sweep's results.jsonl into summary.json, report.md and plots.

Every number in the report is computed here from the per-run results (sim/run.py), per
cluster size, and set against the measurable goals of research/distributed.md §7.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from pacsnode.sim.metrics import READ_KINDS, percentile

# Scenarios whose crashes measure failure detection on a clean LAN (no loss, no partition).
DETECTION_SCENARIOS = ("kill-one", "kill-two-sites-apart", "remove")
LOSS_SCENARIOS = {"join": "join", "kill-one": "loss", "remove": "loss", "leave": "leave", "wipe": "wipe"}


def load_results(out: Path) -> list[dict[str, Any]]:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    by_size: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_size[r["nodes"]].append(r)
    sizes = sorted(by_size)
    summary: dict[str, Any] = {"runs": len(results), "sizes": sizes, "per_size": {}, "failures": []}
    for r in results:
        if not r.get("ok"):
            failed = [c["name"] for c in r.get("checks", []) if c.get("ok") is False] or [r.get("crashed", "?")]
            summary["failures"].append({"scenario": r["scenario"], "nodes": r["nodes"], "seed": r["seed"],
                                        "failed": failed, "replay": r["replay"],
                                        "details": [c["detail"] for c in r.get("checks", []) if c.get("ok") is False]})
    total_lost = 0
    total_acked = 0
    for size in sizes:
        runs = [r for r in by_size[size] if "checks" in r and r.get("checks")]
        s: dict[str, Any] = {"runs": len(by_size[size]), "seeds": len({r["seed"] for r in by_size[size]}),
                             "scenarios": sorted({r["scenario"] for r in by_size[size]})}
        acked = sum(r.get("instances_acked", 0) for r in runs)
        lost = sum(c["violations"] for r in runs for c in r["checks"] if c["name"] == "acked-writes")
        total_lost += lost
        total_acked += acked
        s["acked_instances_checked"] = acked
        s["acked_lost_or_wrong"] = lost
        s["failed_runs"] = sum(1 for r in by_size[size] if not r.get("ok"))
        # Failure detection (clean LAN).
        all_dead = [d["all_dead_s"] for r in runs if r["scenario"] in DETECTION_SCENARIOS
                    for d in r.get("detection", []) if d["all_dead_s"] is not None]
        undetected = sum(1 for r in runs if r["scenario"] in DETECTION_SCENARIOS
                         for d in r.get("detection", []) if d["all_dead_s"] is None)
        observer = [t for r in runs if r["scenario"] in DETECTION_SCENARIOS
                    for d in r.get("detection", []) for t in d["observer_dead_s"]]
        first_suspect = [d["first_suspect_s"] for r in runs if r["scenario"] in DETECTION_SCENARIOS
                         for d in r.get("detection", []) if d["first_suspect_s"] is not None]
        s["detection"] = {"samples": len(all_dead), "undetected": undetected,
                          "all_dead_p50_s": percentile(all_dead, 50), "all_dead_p99_s": percentile(all_dead, 99),
                          "all_dead_max_s": max(all_dead) if all_dead else None,
                          "observer_p50_s": percentile(observer, 50), "observer_p99_s": percentile(observer, 99),
                          "first_suspect_p50_s": percentile(first_suspect, 50)}
        # False positives.
        fp = {}
        for scenario in ("pause-flap", "loss-10pct", "restart-storm", "kill-one"):
            chosen = [r for r in runs if r["scenario"] == scenario]
            if not chosen:
                continue
            hours = sum(r["false_positive_window_s"] for r in chosen) / 3600
            dead = sum(r["false_positives"]["members_declared_dead"] for r in chosen)
            fp[scenario] = {"runs": len(chosen), "cluster_hours": round(hours, 3),
                            "members_declared_dead": dead,
                            "observer_pairs_declared_dead": sum(r["false_positives"]["declared_dead"] for r in chosen),
                            "per_cluster_hour": round(dead / hours, 2) if hours else None,
                            "suspicions": sum(r["false_positives"]["suspicions"] for r in chosen),
                            "refutations": sum(r["false_positives"]["refutations"] for r in chosen)}
        s["false_positives"] = fp
        # Dissemination.
        spread: dict[str, Any] = {}
        for label, chosen in (("all", runs), ("loss-10pct", [r for r in runs if r["scenario"] == "loss-10pct"]),
                              ("clean", [r for r in runs if r["scenario"] in ("kill-one", "join", "leave", "remove")])):
            rounds = [c["rounds"] for r in chosen for c in r.get("spread", []) if c["rounds"] is not None]
            incomplete = sum(1 for r in chosen for c in r.get("spread", []) if c["rounds"] is None)
            bound = math.ceil(math.log2(max(2, size))) + 3
            within = sum(1 for x in rounds if x <= bound)
            spread[label] = {"changes": len(rounds) + incomplete, "never_everywhere": incomplete, "bound": bound,
                             "within_bound_fraction": round(within / (len(rounds) + incomplete), 4)
                             if rounds or incomplete else None,
                             "rounds_p50": percentile(rounds, 50), "rounds_p99": percentile(rounds, 99),
                             "rounds_max": max(rounds) if rounds else None}
        s["spread"] = spread
        # Data movement.
        moves: dict[str, Any] = {}
        for r in runs:
            m = r.get("movement")
            if not m or m.get("ratio") is None:
                continue
            entry = moves.setdefault(m["kind"], {"ratios": [], "receivers": [], "largest": []})
            entry["ratios"].append(m["ratio"])
            entry["receivers"].append(m["receivers"])
            entry["largest"].append(m["largest_receiver_fraction"])
        s["movement"] = {kind: {"runs": len(v["ratios"]), "ratio_mean": round(sum(v["ratios"]) / len(v["ratios"]), 4),
                                "ratio_max": max(v["ratios"]), "ratio_min": min(v["ratios"]),
                                "receivers_min": min(v["receivers"]), "largest_receiver_max": max(v["largest"])}
                         for kind, v in sorted(moves.items())}
        # Balance, bandwidth, re-replication.
        stored = [r["balance"]["stored_max_over_mean"] for r in runs if r.get("balance")
                  and r["balance"].get("stored_max_over_mean")]
        owned = [r["balance"]["ownership_max_over_mean"] for r in runs if r.get("balance")
                 and r["balance"].get("ownership_max_over_mean")]
        s["balance"] = {"stored_max_over_mean_p50": percentile(stored, 50), "stored_max_over_mean_max": max(stored)
                        if stored else None, "ownership_max_over_mean_p50": percentile(owned, 50),
                        "ownership_max_over_mean_max": max(owned) if owned else None,
                        "studies_p50": percentile([r["balance"]["studies"] for r in runs if r.get("balance")], 50)}
        gossip = [r["gossip_bytes_per_s_per_node"] for r in runs if "gossip_bytes_per_s_per_node" in r]
        s["gossip_bytes_per_s_per_node"] = {"p50": percentile(gossip, 50), "max": max(gossip) if gossip else None}
        rerep = {}
        for scenario in ("kill-one", "kill-two-sites-apart", "remove", "leave", "wipe"):
            chosen = [r for r in runs if r["scenario"] == scenario]
            from_fault = [r["rereplication_s"] for r in chosen if r.get("rereplication_s") is not None]
            after_removal = [r["rereplication_after_removal_s"] for r in chosen
                             if r.get("rereplication_after_removal_s") is not None]
            if chosen:
                rerep[scenario] = {"from_fault_p50_s": percentile(from_fault, 50),
                                   "from_fault_max_s": max(from_fault) if from_fault else None,
                                   "after_removal_p50_s": percentile(after_removal, 50),
                                   "after_removal_max_s": max(after_removal) if after_removal else None,
                                   "never": len(chosen) - len(from_fault),
                                   "monotonic_runs": sum(1 for r in chosen if r.get("under_replicated_monotonic"))}
        s["rereplication"] = rerep
        # Availability during each fault.
        avail: dict[str, Any] = {}
        for scenario in sorted({r["scenario"] for r in runs}):
            chosen = [r for r in runs if r["scenario"] == scenario]
            row: dict[str, Any] = {}
            for kind in ("store", "read", "find"):
                ok = sum(r["availability"]["fault"][kind]["ok"] for r in chosen)
                attempted = sum(r["availability"]["fault"][kind]["attempted"] - r["availability"]["fault"][kind]
                                ["entry_down"] for r in chosen)
                p99 = [r["availability"]["fault"][kind]["latency_p99_ms"] for r in chosen
                       if r["availability"]["fault"][kind]["latency_p99_ms"] is not None]
                base = [r["availability"]["baseline"][kind]["latency_p99_ms"] for r in chosen
                        if r["availability"]["baseline"][kind]["latency_p99_ms"] is not None]
                incomplete = sum(r["availability"]["fault"][kind]["statuses"].get("incomplete", 0) for r in chosen)
                row[kind] = {"ok": ok, "attempted": attempted, "rate": round(ok / attempted, 4) if attempted else None,
                             "p99_ms_max": max(p99) if p99 else None, "baseline_p99_ms_max": max(base) if base else None,
                             "incomplete": incomplete,
                             "longest_failure_run": max(r["availability"]["fault"][kind]["longest_failure_run"]
                                                        for r in chosen)}
            avail[scenario] = row
        s["availability"] = avail
        # Read your writes: every client read through an entry node that stayed up, whole run.
        ryw: dict[str, Any] = {}
        for scenario in sorted({r["scenario"] for r in runs if "read_your_writes" in r}):
            chosen = [r for r in runs if r["scenario"] == scenario and "read_your_writes" in r]
            ryw[scenario] = {kind: {key: sum(r["read_your_writes"][kind][key] for r in chosen)
                                    for key in chosen[0]["read_your_writes"][kind]} for kind in READ_KINDS}
        s["read_your_writes"] = ryw
        s["hints_out_of_ring_max"] = max((r.get("hints_left", {}).get("for_owners_out_of_ring", 0) for r in runs),
                                         default=0)
        s["wall_s_p50"] = percentile([r["wall_s"] for r in runs if "wall_s" in r], 50)
        s["wall_s_max"] = max((r["wall_s"] for r in runs if "wall_s" in r), default=None)
        summary["per_size"][str(size)] = s
    summary["acked_instances_checked"] = total_acked
    summary["acked_lost_or_wrong"] = total_lost
    summary["read_quorum"] = sorted({r["read_quorum"] for r in results if "read_quorum" in r})
    summary["scatter_read_quorum"] = sorted({r.get("scatter_read_quorum", 1) for r in results if "read_quorum" in r})
    totals: dict[str, dict[str, int]] = {}
    for r in results:
        for kind, counts in r.get("read_your_writes", {}).items():
            for key, value in counts.items():
                totals.setdefault(kind, {}).setdefault(key, 0)
                totals[kind][key] += value
    summary["read_your_writes"] = totals
    summary["stale_runs"] = [{"scenario": r["scenario"], "nodes": r["nodes"], "seed": r["seed"], "replay": r["replay"],
                              **{kind: r["read_your_writes"][kind]["stale"] for kind in READ_KINDS}}
                             for r in results if any(r.get("read_your_writes", {}).get(kind, {}).get("stale")
                                                     for kind in READ_KINDS)]
    return summary


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(summary: dict[str, Any]) -> str:
    sizes = summary["sizes"]
    per = summary["per_size"]
    lines = ["# Simulation sweep", "",
             (f"Rendered at commit {summary['commit']}. " if summary.get("commit") else "") +
             f"{summary['runs']} runs; {summary['acked_instances_checked']} acknowledged instances read back at the "
             f"end of their runs, {summary['acked_lost_or_wrong']} lost or wrong; "
             f"{len(summary['failures'])} runs with a failed check.", ""]
    lines += ["## Runs", "", "| nodes | runs | seeds | failed runs | acked checked | lost/wrong | wall p50 (s) | wall max (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        s = per[str(n)]
        lines.append(f"| {n} | {s['runs']} | {s['seeds']} | {s['failed_runs']} | {s['acked_instances_checked']} | "
                     f"{s['acked_lost_or_wrong']} | {_f(s['wall_s_p50'], 1)} | {_f(s['wall_s_max'], 1)} |")
    lines += ["", "## Failure detection (LAN profile, kill -9, no loss)",
              "Time from the crash until every live node holds the node dead; per-observer times too.", "",
              "| nodes | samples | all-dead p50 (s) | all-dead p99 (s) | max (s) | observer p50 (s) | observer p99 (s) "
              "| first suspicion p50 (s) |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        d = per[str(n)]["detection"]
        lines.append(f"| {n} | {d['samples']} | {_f(d['all_dead_p50_s'])} | {_f(d['all_dead_p99_s'])} | "
                     f"{_f(d['all_dead_max_s'])} | {_f(d['observer_p50_s'])} | {_f(d['observer_p99_s'])} | "
                     f"{_f(d['first_suspect_p50_s'])} |")
    lines += ["", "## False positives (running members held dead)", "",
              "| nodes | scenario | runs | cluster-hours | members held dead | per cluster-hour | (observer, member) "
              "pairs | suspicions | refutations |", "|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for scenario, f in per[str(n)]["false_positives"].items():
            lines.append(f"| {n} | {scenario} | {f['runs']} | {f['cluster_hours']} | {f['members_declared_dead']} | "
                         f"{_f(f['per_cluster_hour'])} | {f['observer_pairs_declared_dead']} | {f['suspicions']} | "
                         f"{f['refutations']} |")
    lines += ["", "## Dissemination (gossip rounds of 200 ms from the first node holding a change to every live node)",
              "", "| nodes | runs | changes | bound ⌈log2 N⌉+3 | within bound | p50 | p99 | max | never everywhere |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for label, sp in per[str(n)]["spread"].items():
            if not sp["changes"]:
                continue
            lines.append(f"| {n} | {label} | {sp['changes']} | {sp['bound']} | {_f(sp['within_bound_fraction'], 3)} | "
                         f"{_f(sp['rounds_p50'], 0)} | {_f(sp['rounds_p99'], 0)} | {_f(sp['rounds_max'], 0)} | "
                         f"{sp['never_everywhere']} |")
    lines += ["", "## Data moved vs the ideal",
              "Ideal: the bytes the new node ends up holding (join), the bytes the lost / leaving / wiped node held.",
              "", "| nodes | kind | runs | moved/ideal mean | min | max | receivers (min) | largest receiver (max) |",
              "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for kind, m in per[str(n)]["movement"].items():
            lines.append(f"| {n} | {kind} | {m['runs']} | {_f(m['ratio_mean'], 3)} | {_f(m['ratio_min'], 3)} | "
                         f"{_f(m['ratio_max'], 3)} | {m['receivers_min']} | {_f(m['largest_receiver_max'], 2)} |")
    lines += ["", "## Balance, gossip bandwidth", "",
              "| nodes | stored max/mean p50 | stored max/mean max | ring ownership max/mean p50 | max | studies p50 "
              "| gossip B/s per node p50 | max |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        b = per[str(n)]["balance"]
        g = per[str(n)]["gossip_bytes_per_s_per_node"]
        lines.append(f"| {n} | {_f(b['stored_max_over_mean_p50'], 3)} | {_f(b['stored_max_over_mean_max'], 3)} | "
                     f"{_f(b['ownership_max_over_mean_p50'], 3)} | {_f(b['ownership_max_over_mean_max'], 3)} | "
                     f"{_f(b['studies_p50'], 0)} | {_f(g['p50'], 0)} | {_f(g['max'], 0)} |")
    lines += ["", "## Time to re-replicate (every instance back at N live copies)", "",
              "| nodes | scenario | from the fault p50 (s) | max | after removal p50 (s) | max | never | monotonic runs |",
              "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for scenario, r in per[str(n)]["rereplication"].items():
            lines.append(f"| {n} | {scenario} | {_f(r['from_fault_p50_s'], 1)} | {_f(r['from_fault_max_s'], 1)} | "
                         f"{_f(r['after_removal_p50_s'], 1)} | {_f(r['after_removal_max_s'], 1)} | {r['never']} | "
                         f"{r['monotonic_runs']} |")
    lines += ["", "## Availability during each fault",
              "Operations started from the fault until 10 s after the heal; operations sent to a node that was "
              "down are left out (the client's own connection failed). find counts answered queries; "
              "'incomplete' answers missed an acknowledged study.", "",
              "| nodes | scenario | store ok | store p99 ms (baseline) | read ok | read p99 ms | find answered | "
              "find incomplete |", "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for scenario, a in per[str(n)]["availability"].items():
            st, rd, fd = a["store"], a["read"], a["find"]
            lines.append(f"| {n} | {scenario} | {st['ok']}/{st['attempted']} | {_f(st['p99_ms_max'], 0)} "
                         f"({_f(st['baseline_p99_ms_max'], 0)}) | {rd['ok']}/{rd['attempted']} | "
                         f"{_f(rd['p99_ms_max'], 0)} | {fd['ok']}/{fd['attempted']} | {fd['incomplete']} |")
    if summary.get("read_your_writes"):
        t = summary["read_your_writes"]
        lines += ["", "## Read your writes",
                  f"Every client read of the run through an entry node that stayed up (R = "
                  f"{', '.join(map(str, summary['read_quorum'])) or '?'}), checked against what was acknowledged "
                  "before it began: 'stale' said Success without an acknowledged study or instance, 'flagged' said "
                  "part could not be asked (never Success). retrieve = locate of one study (a C-GET), find-study = "
                  "STUDY-level C-FIND naming it (NumberOfStudyRelatedInstances), find = by PatientID (a scatter, "
                  f"R = {', '.join(map(str, summary.get('scatter_read_quorum', []))) or '?'} per range; runs from "
                  "before scatter_read_quorum asked 1).", "",
                  "| nodes | scenario | retrieve ok / stale / flagged / failed | find-study ok / stale / flagged / "
                  "failed | find ok / stale / flagged / failed |", "|---|---|---|---|---|"]
        for n in sizes:
            for scenario, row in per[str(n)].get("read_your_writes", {}).items():
                lines.append(f"| {n} | {scenario} | " + " | ".join(
                    f"{row[k]['success']} / {row[k]['stale']} / {row[k]['flagged']} / {row[k]['failed']}"
                    for k in READ_KINDS) + " |")
        lines.append("| all | all | " + " | ".join(
            f"{t[k]['success']} / **{t[k]['stale']}** / {t[k]['flagged']} / {t[k]['failed']}"
            for k in READ_KINDS if k in t) + " |")
        for stale in summary["stale_runs"][:20]:
            lines.append(f"- stale: {stale['scenario']} n={stale['nodes']} seed={stale['seed']} (retrieve "
                         f"{stale['retrieve']}, find-study {stale['find-study']}, find {stale['find']}): "
                         f"`{stale['replay']}`")
    if summary["failures"]:
        lines += ["", "## Failed runs", ""]
        for f in summary["failures"]:
            lines.append(f"- {f['scenario']} n={f['nodes']} seed={f['seed']}: {', '.join(f['failed'])} — "
                         f"{'; '.join(f['details'])[:300]} — `{f['replay']}`")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    sizes = summary["sizes"]
    per = summary["per_size"]
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label in (("all_dead_p50_s", "p50"), ("all_dead_p99_s", "p99"), ("all_dead_max_s", "max")):
        points = [(n, per[str(n)]["detection"][key]) for n in sizes if per[str(n)]["detection"][key] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.axhline(15, color="grey", linestyle=":", label="goal p99 at ≤10 (15 s)")
    ax.axhline(20, color="grey", linestyle="--", label="goal p99 at 100 (20 s)")
    ax.set_xscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("seconds until dead everywhere")
    ax.set_title("Failure detection (LAN profile)")
    ax.legend(fontsize=7)
    save(fig, "detection.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label in ("clean", "loss-10pct"):
        points = [(n, per[str(n)]["spread"][label]["rounds_p99"]) for n in sizes
                  if per[str(n)]["spread"][label]["rounds_p99"] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"p99, {label}")
    ax.plot(sizes, [math.ceil(math.log2(max(2, n))) + 3 for n in sizes], color="grey", linestyle="--",
            label="⌈log2 N⌉+3")
    ax.set_xscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("gossip rounds (200 ms)")
    ax.set_title("Spread of a membership change")
    ax.legend(fontsize=7)
    save(fig, "spread.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    kinds = sorted({k for n in sizes for k in per[str(n)]["movement"]})
    for kind in kinds:
        points = [(n, per[str(n)]["movement"][kind]["ratio_max"]) for n in sizes if kind in per[str(n)]["movement"]]
        ax.plot(*zip(*points), marker="o", label=f"{kind} (max)")
    ax.axhline(1.05, color="grey", linestyle="--", label="goal 1.05")
    ax.set_xscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("bytes moved / ideal")
    ax.set_title("Data movement")
    ax.legend(fontsize=7)
    save(fig, "movement.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    points = [(n, per[str(n)]["gossip_bytes_per_s_per_node"]["p50"]) for n in sizes
              if per[str(n)]["gossip_bytes_per_s_per_node"]["p50"] is not None]
    if points:
        axes[0].plot(*zip(*points), marker="o")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("nodes")
    axes[0].set_ylabel("SWIM bytes/s per node")
    axes[0].set_title("Gossip bandwidth (steady state)")
    for key, label in (("stored_max_over_mean_p50", "stored bytes"), ("ownership_max_over_mean_p50", "ring ownership")):
        points = [(n, per[str(n)]["balance"][key]) for n in sizes if per[str(n)]["balance"][key] is not None]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=label)
    axes[1].axhline(1.25, color="grey", linestyle="--", label="goal 1.25")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("nodes")
    axes[1].set_ylabel("fullest / mean")
    axes[1].set_title("Balance")
    axes[1].legend(fontsize=7)
    save(fig, "gossip_balance.png")
    return written


def _commit() -> str:
    """The git commit the report is rendered at (the runs should be at the same one)."""
    import subprocess
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def write_report(out: Path) -> str:
    results = load_results(out)
    summary = summarize(results)
    summary["commit"] = _commit()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    markdown = render_markdown(summary)
    images = plot(summary, out)
    if images:
        markdown += "\n## Plots\n\n" + "\n".join(f"![{name}]({name})" for name in images) + "\n"
    (out / "report.md").write_text(markdown)
    return f"report: {out / 'report.md'} ({len(results)} runs{', plots: ' + ', '.join(images) if images else ''})"
