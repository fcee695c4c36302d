"""CPU seconds of one simulated run, per scenario and seed (docs/sim.md "Cost").

    .venv/bin/python bench/sim_run_cost.py kill-one:0 partition-halves:1 [--nodes 10]

Runs `pacsnode.sim.run.run_scenario` in this process for each SCENARIO:SEED and prints
its CPU time (`time.process_time()`, less sensitive than wall time to the other work on a
shared machine; note the load beside it), wall time, verdict and trace hash (the same
hash before and after a speed-up says the runs are the same). To compare two trees, run
this file with each tree's package first on the path.
"""

from __future__ import annotations

import argparse
import logging
import time

from pacsnode.sim.run import run_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="SCENARIO:SEED")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("pacsnode").setLevel(logging.CRITICAL)  # As `sim run` without --verbose.
    total = 0.0
    for spec in args.runs:
        name, seed = spec.split(":")
        cpu, wall = time.process_time(), time.perf_counter()
        result = run_scenario(name, nodes=args.nodes, sites=args.sites, seed=int(seed))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        total += cpu
        print(f"{name}:{seed} cpu {cpu:.2f} s wall {wall:.2f} s ok={result['ok']} trace={result['trace_hash']}",
              flush=True)
    print(f"runs cpu {total:.2f} s")


if __name__ == "__main__":
    main()
