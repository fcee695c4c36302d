"""Bugs the simulator found in the real code, pinned to the seeds that showed them.

- Conflicting copies of one SOP Instance UID: replicas used to keep whichever copy
  reached them first, so they could disagree for ever (and anti-entropy re-fetched the
  loser on every pass). Found with `python -m pacsnode.sim run --scenario kill-one
  --nodes 6 --sites 3 --seed 1 --load 200 --conflicts 0.3`; fixed in 50f868f (the lowest
  version wins on every replica).
- Coordinator._pump_local deadlocked with an inline run_blocking: see test_sim_seams.py.
"""

from __future__ import annotations

import pytest

from pacsnode.sim.run import format_result, run_scenario
from pacsnode.sim.workload import WorkloadMix


@pytest.mark.parametrize(("scenario", "seed"), [("kill-one", 1), ("partition-halves", 4)])
def test_conflicting_writes_leave_every_replica_with_the_same_content(scenario: str, seed: int) -> None:
    result = run_scenario(scenario, nodes=6, sites=3, seed=seed, load=200, mix=WorkloadMix(conflict=0.3))
    assert result["ok"], format_result(result)  # replicas-agree among the checks.
