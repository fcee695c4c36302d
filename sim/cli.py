"""`python -m pacsnode.sim ...` (and `pacsnode sim ...` once cli/main.py hooks it up).

    python -m pacsnode.sim list
    python -m pacsnode.sim run --scenario kill-one --nodes 100 --sites 3 --seed 7
    python -m pacsnode.sim sweep --nodes 10,30,100,300 --seeds 50 --out report/
    python -m pacsnode.sim report --out report/        # re-render report.md and plots
    python -m pacsnode.sim routing --nodes 10,30,100   # peers asked per one-study retrieve

`run` prints what it measured and every checker's verdict, and exits 1 when a check
failed (the output ends with the command that replays the run: same seed, same run).
`sweep` runs every scenario for every cluster size and seed, `--jobs` at a time in
worker processes, appending each result to <out>/results.jsonl as it finishes (a sweep
that is stopped can be resumed: runs already there are skipped), then writes
<out>/summary.json, <out>/report.md and, when matplotlib is importable, <out>/*.png.

To hook it into cli/main.py:

    from pacsnode.sim import cli as sim_cli
    sim_cli.add_parser(subparsers)          # where the other subcommands are added
    ...
    if args.command == "sim": return sim_cli.main(args)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

from pacsnode.sim.scenarios import SCENARIOS

# Runs one sweep worker process makes before it is replaced by a fresh one (its imports
# cost about a second of CPU; a 10-node run 4-6 s): bounds what one run could leave behind
# for the next (memory, caches) while paying the start-up once per many runs.
SWEEP_RUNS_PER_WORKER = 25


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `sim` (with its own subcommands) to an argparse subparsers object."""
    parser = subparsers.add_parser("sim", help="deterministic many-node simulation on a virtual clock",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="sim_command", required=True)
    commands.add_parser("list", help="list the scenarios")

    run = commands.add_parser("run", help="one scenario, one seed")
    run.add_argument("--scenario", default="kill-one", choices=sorted(SCENARIOS))
    run.add_argument("--nodes", type=int, default=10)
    run.add_argument("--sites", type=int, default=3)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--load", type=int, default=None, help="initial instances (default: by cluster size)")
    run.add_argument("--rate", type=float, default=4.0, help="client operations per second during the run")
    run.add_argument("--conflicts", type=float, default=0.0,
                     help="fraction of stores that re-send an acknowledged SOP Instance UID with other bytes")
    run.add_argument("--duplicates", type=float, default=0.0,
                     help="fraction of stores that re-send an acknowledged instance unchanged")
    run.add_argument("--read-quorum", type=int, default=None,
                     help="R for requests that name a study (default: SimConfig's, 2)")
    run.add_argument("--scatter-read-quorum", type=int, default=None,
                     help="R per token range for queries with no study key (default: SimConfig's, 2)")
    run.add_argument("--write-quorum-mode", default="strict", choices=("strict", "sloppy"),
                     help="what counts toward W: owners' copies only, or stand-ins' hints too (default: strict)")
    run.add_argument("--site-copies", type=int, default=0,
                     help="N copies in every site with the local write scope (issue 15); 0: --replicas N over "
                     "the sites, global scope (default: 0)")
    run.add_argument("--token-salts", action="store_true",
                     help="each node's token salt chosen as it is added, as a real node's first start does "
                     "(default: salt 0, the random tokens the seeded scenarios were written against)")
    run.add_argument("--json", type=Path, default=None, help="also write the full result here")
    run.add_argument("--verbose", action="store_true", help="show the nodes' own log lines (WARNING and up)")

    sweep = commands.add_parser("sweep", help="every scenario x cluster size x seed, with a report")
    sweep.add_argument("--nodes", default="10,30,100,300", help="cluster sizes, comma-separated")
    sweep.add_argument("--seeds", default="50",
                       help="seeds per size: one number for all sizes, or one per size (e.g. 20,8,2,1)")
    sweep.add_argument("--first-seed", type=int, default=0)
    sweep.add_argument("--sites", type=int, default=3)
    sweep.add_argument("--scenarios", default="all", help="comma-separated names, or 'all'")
    sweep.add_argument("--out", type=Path, default=Path("report"))
    sweep.add_argument("--jobs", type=int, default=max(1, multiprocessing.cpu_count()))
    sweep.add_argument("--budget-s", type=float, default=None,
                       help="start no new run after this many seconds of wall time (the report covers what ran)")
    sweep.add_argument("--load", type=int, default=None)
    sweep.add_argument("--site-copies", type=int, default=0,
                       help="N copies in every site with the local write scope (default: 0: none)")
    sweep.add_argument("--read-quorum", type=int, default=None,
                       help="R for requests that name a study (default: SimConfig's, 2)")
    sweep.add_argument("--scatter-read-quorum", type=int, default=None,
                       help="R per token range for queries with no study key (default: SimConfig's, 2)")
    sweep.add_argument("--token-salts", action="store_true",
                       help="token salts chosen as nodes are added (default: salt 0)")
    sweep.add_argument("--write-quorum-mode", default="strict", choices=("strict", "sloppy"),
                       help="what counts toward W: owners' copies only, or stand-ins' hints too (default: strict)")

    chaos = commands.add_parser(
        "chaos", help="real processes, real DICOM clients, real faults (kill -9, pause, wipe, partitions)",
        description="Start --nodes pacsnode processes on 127.0.0.1 with their peer traffic through a fault "
                    "proxy, store and read with pynetdicom and dcmtk's storescu while faults are injected one at "
                    "a time, then heal and check that every acknowledged instance is at its N owners and "
                    "retrievable byte-identical from every node. Exits 1 on any violation. See docs/sim.md.")
    from pacsnode.sim.chaos import ChaosSettings
    from pacsnode.sim.chaos_plan import SCENARIOS as CHAOS_SCENARIOS
    defaults = ChaosSettings()
    chaos.add_argument("--nodes", type=int, default=defaults.nodes, help=f"(default: {defaults.nodes})")
    chaos.add_argument("--duration", type=float, default=defaults.duration_s,
                       help=f"seconds of faults under load; the final checks come after (default: {defaults.duration_s:g})")
    chaos.add_argument("--seed", type=int, default=defaults.seed, help="fault plan and clients' choices (default: 0)")
    chaos.add_argument("--scenario", default=defaults.scenario, choices=sorted(CHAOS_SCENARIOS),
                       help=f"which faults (default: {defaults.scenario}; see sim/chaos_plan.py)")
    chaos.add_argument("--sites", type=int, default=defaults.sites, help=f"(default: {defaults.sites})")
    chaos.add_argument("--wan-delay-ms", type=float, default=defaults.wan_delay_ms,
                       help="one-way latency of links between sites, e.g. 40 (default: 0)")
    chaos.add_argument("--wan-jitter-ms", type=float, default=defaults.wan_jitter_ms,
                       help="plus or minus this on links between sites, e.g. 10 (default: 0)")
    chaos.add_argument("--lan-delay-ms", type=float, default=defaults.lan_delay_ms,
                       help="one-way latency of links within a site, e.g. 0.2 (default: 0)")
    chaos.add_argument("--profile", default=defaults.profile, choices=("lan", "local", "wan"),
                       help=f"the nodes' membership timer profile (default: {defaults.profile})")
    chaos.add_argument("--replicas", type=int, default=defaults.replication_factor,
                       help=f"N (default: {defaults.replication_factor})")
    chaos.add_argument("--site-copies", type=int, default=defaults.site_copies,
                       help="N copies in every site (--site-replicas SITEk=N on every node; --replicas unused); "
                       "0: none (default: 0)")
    chaos.add_argument("--write-quorum-scope", default=defaults.write_quorum_scope, choices=("auto", "local", "global"),
                       help=f"(default: {defaults.write_quorum_scope}: local with --site-copies)")
    chaos.add_argument("--write-quorum", type=int, default=defaults.write_quorum,
                       help=f"W (default: {defaults.write_quorum})")
    chaos.add_argument("--write-quorum-mode", default=defaults.write_quorum_mode, choices=("strict", "sloppy"),
                       help=f"what counts toward W (default: {defaults.write_quorum_mode})")
    chaos.add_argument("--dead-grace", type=int, default=defaults.dead_grace_s,
                       help=f"seconds dead before removal (default: {defaults.dead_grace_s})")
    chaos.add_argument("--store-threads", type=int, default=defaults.store_threads,
                       help=f"pynetdicom storers (default: {defaults.store_threads})")
    chaos.add_argument("--storescu-every", type=float, default=defaults.storescu_every_s,
                       help=f"seconds between dcmtk storescu studies, 0 for none (default: {defaults.storescu_every_s:g})")
    chaos.add_argument("--delete-every", type=float, default=defaults.delete_every_s,
                       help="seconds between deletes of an acknowledged study or instance through a random live "
                            f"node, 0 for none (default: {defaults.delete_every_s:g})")
    chaos.add_argument("--settle-timeout", type=float, default=defaults.settle_timeout_s,
                       help=f"seconds to wait for convergence after healing (default: {defaults.settle_timeout_s:g})")
    chaos.add_argument("--work-dir", type=Path, default=None,
                       help="node data, logs, ops.jsonl and chaos-result.json (default: a temporary directory, "
                            "removed after a clean run)")
    chaos.add_argument("--keep", action="store_true", help="keep the work dir after a clean run")
    chaos.add_argument("--json", type=Path, default=None, help="also write the full result here")
    chaos.add_argument("--verbose", action="store_true", help="show the runner's log lines")

    routing = commands.add_parser("routing", help="peers asked and latency of one-study retrieves, by cluster size")
    routing.add_argument("--nodes", default="10,30,100", help="cluster sizes, comma-separated")
    routing.add_argument("--seed", type=int, default=0)
    routing.add_argument("--studies", type=int, default=10)
    routing.add_argument("--read-quorum", default="1,2", help="R values to compare, comma-separated")

    report = commands.add_parser("report", help="re-render the report of a sweep directory")
    report.add_argument("--out", type=Path, default=Path("report"))


def main(args: argparse.Namespace) -> int:
    if args.sim_command == "list":
        from pacsnode.sim import scenarios
        print(scenarios.__doc__)
        return 0
    if args.sim_command == "run":
        return _run(args)
    if args.sim_command == "sweep":
        return _sweep(args)
    if args.sim_command == "chaos":
        return _chaos(args)
    if args.sim_command == "routing":
        from pacsnode.sim.routing import format_rows, measure
        _quiet_logging()
        rows = [measure(int(n), seed=args.seed, studies=args.studies, read_quorum=int(r))
                for n in str(args.nodes).split(",") if n for r in str(args.read_quorum).split(",") if r]
        print(format_rows(rows))
        return 0 if all(row["instances_missing"] == 0 for row in rows) else 1
    if args.sim_command == "report":
        from pacsnode.sim.report import write_report
        print(write_report(args.out))
        return 0
    raise SystemExit(f"unknown sim command {args.sim_command!r}")


def _quiet_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    if not verbose:
        logging.getLogger("pacsnode").setLevel(logging.CRITICAL)


def _run(args: argparse.Namespace) -> int:
    from pacsnode.sim.run import format_result, run_scenario
    from pacsnode.sim.workload import WorkloadMix
    _quiet_logging(args.verbose)
    result = run_scenario(args.scenario, nodes=args.nodes, sites=args.sites, seed=args.seed, load=args.load,
                          rate_per_s=args.rate, mix=WorkloadMix(conflict=args.conflicts, duplicate=args.duplicates),
                          config=_config(args.read_quorum, args.site_copies, args.sites, args.write_quorum_mode,
                                         args.token_salts, args.scatter_read_quorum))
    print(format_result(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


def _chaos(args: argparse.Namespace) -> int:
    from pacsnode.sim.chaos import ChaosSettings, format_result, run_chaos
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    settings = ChaosSettings(nodes=args.nodes, duration_s=args.duration, seed=args.seed, scenario=args.scenario,
                             sites=args.sites, wan_delay_ms=args.wan_delay_ms, wan_jitter_ms=args.wan_jitter_ms,
                             lan_delay_ms=args.lan_delay_ms, profile=args.profile, replication_factor=args.replicas, write_quorum=args.write_quorum,
                             site_copies=args.site_copies, write_quorum_scope=args.write_quorum_scope,
                             write_quorum_mode=args.write_quorum_mode,
                             dead_grace_s=args.dead_grace, store_threads=args.store_threads,
                             storescu_every_s=args.storescu_every, delete_every_s=args.delete_every,
                             settle_timeout_s=args.settle_timeout,
                             work_dir=args.work_dir, keep=args.keep)
    try:
        settings.check()
    except ValueError as error:
        print(f"pacsnode sim chaos: {error}", file=sys.stderr)
        return 2
    result = run_chaos(settings)
    print(format_result(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


def _task_list(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    sizes = [int(n) for n in str(args.nodes).split(",") if n]
    seeds = [int(s) for s in str(args.seeds).split(",") if s]
    if len(seeds) == 1:
        seeds = seeds * len(sizes)
    if len(seeds) != len(sizes):
        raise SystemExit("--seeds takes one number, or one per cluster size")
    names = sorted(SCENARIOS) if args.scenarios == "all" else [s for s in args.scenarios.split(",") if s]
    for name in names:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; see `python -m pacsnode.sim list`")
    tasks = []
    for size, count in zip(sizes, seeds):
        for seed in range(args.first_seed, args.first_seed + count):
            for name in names:
                if SCENARIOS[name].min_sites > args.sites:
                    continue
                tasks.append((name, size, args.sites, seed))
    # Small clusters first, seeds interleaved across scenarios: a budget cut keeps a balanced report.
    tasks.sort(key=lambda t: (t[1], t[3]))
    return tasks


def _config(read_quorum: int | None, site_copies: int = 0, sites: int = 1, write_quorum_mode: str = "strict",
            token_salts: bool = False, scatter_read_quorum: int | None = None) -> Any:
    """SimConfig for the CLI's options; None for the defaults. `site_copies` > 0: that many
    copies in each of the cluster's sites (named as SimCluster names them), local write scope."""
    from pacsnode.replication.coordinator import WriteQuorumMode, WriteScope
    from pacsnode.ring.placement import SiteReplicas
    from pacsnode.sim.cluster import SimConfig, site_names
    mode = WriteQuorumMode(write_quorum_mode)
    if read_quorum is None and scatter_read_quorum is None and not site_copies and mode is SimConfig().write_mode \
            and not token_salts:
        return None
    config = SimConfig(write_mode=mode) if read_quorum is None else SimConfig(read_quorum=read_quorum, write_mode=mode)
    config = dataclasses.replace(config, token_salts=token_salts)
    if scatter_read_quorum is not None:
        config = dataclasses.replace(config, scatter_read_quorum=scatter_read_quorum)
    if site_copies:
        config = dataclasses.replace(config, write_scope=WriteScope.LOCAL, replication_factor=SiteReplicas.of(
            {site: site_copies for site in site_names(sites)}))
    return config


def _worker(task: tuple[str, int, int, int, int | None, int | None, int, str, bool, int | None]) -> dict[str, Any]:
    from pacsnode.sim.run import run_scenario
    _quiet_logging()
    name, nodes, sites, seed, load, read_quorum, site_copies, write_quorum_mode, token_salts, scatter_read_quorum = task
    try:
        return run_scenario(name, nodes=nodes, sites=sites, seed=seed, load=load,
                            config=_config(read_quorum, site_copies, sites, write_quorum_mode, token_salts,
                                           scatter_read_quorum))
    except Exception as error:  # A crash of the harness (or of the real code) is a result too.
        return {"scenario": name, "nodes": nodes, "sites": sites, "seed": seed, "ok": False, "crashed": repr(error),
                "checks": [], "replay": f"python -m pacsnode.sim run --scenario {name} --nodes {nodes} "
                                       f"--sites {sites} --seed {seed}"}


def _sweep(args: argparse.Namespace) -> int:
    from pacsnode.sim.report import write_report
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = set()
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["scenario"], r["nodes"], r["sites"], r["seed"]))
    tasks = [t + (args.load, args.read_quorum, args.site_copies, args.write_quorum_mode, args.token_salts,
                  args.scatter_read_quorum)
             for t in _task_list(args) if t not in done]
    started = time.monotonic()
    print(f"sweep: {len(tasks)} runs to do ({len(done)} already in {results_path}), {args.jobs} at a time",
          flush=True)
    failures = 0
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, maxtasksperchild=SWEEP_RUNS_PER_WORKER) as pool, open(results_path, "a") as sink:
        pending = []
        submitted = 0
        while submitted < len(tasks) or pending:
            while submitted < len(tasks) and len(pending) < args.jobs * 2:
                if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                    print(f"sweep: budget of {args.budget_s:.0f} s used; {len(tasks) - submitted} runs not started",
                          flush=True)
                    tasks = tasks[:submitted]
                    break
                pending.append(pool.apply_async(_worker, (tasks[submitted],)))
                submitted += 1
            still = []
            for job in pending:
                if job.ready():
                    result = job.get()
                    sink.write(json.dumps(result) + "\n")
                    sink.flush()
                    verdict = "ok" if result.get("ok") else "FAIL"
                    failures += 0 if result.get("ok") else 1
                    print(f"  {verdict:4} {result['scenario']:22} n={result['nodes']:<4} seed={result['seed']:<3} "
                          f"{result.get('wall_s', 0):7.1f} s" + ("" if result.get("ok") else
                                                                   f"   replay: {result['replay']}"), flush=True)
                else:
                    still.append(job)
            pending = still
            if pending:
                time.sleep(0.2)
    print(write_report(out))
    return 0 if failures == 0 else 1


def entry(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacsnode.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(entry())
