"""The same seed replays to the same run: the same trace hash, in this process or another.

The trace hash covers every delivered message (time, sender, receiver, kind), every
membership transition on every node, every fault and every client operation's outcome.
Another process gets another PYTHONHASHSEED (string hashing, set order) and other
memory addresses (the default hash of tasks): neither may change the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pacsnode.sim.run import run_scenario

SCENARIO = "restart-storm"
NODES = 6
SEED = 11


def _stable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "wall_s"}


@pytest.fixture(scope="module")
def first() -> dict[str, Any]:
    """The run of SEED in this process, made once: both tests compare against it (read only)."""
    return run_scenario(SCENARIO, nodes=NODES, sites=3, seed=SEED)


def test_same_seed_same_run_in_process(first: dict[str, Any]) -> None:
    second = run_scenario(SCENARIO, nodes=NODES, sites=3, seed=SEED)
    assert first["ok"], first["checks"]
    assert first["trace_hash"] == second["trace_hash"]
    assert _stable(first) == _stable(second)
    other = run_scenario(SCENARIO, nodes=NODES, sites=3, seed=SEED + 1)
    assert other["trace_hash"] != first["trace_hash"]


def test_same_seed_same_trace_in_other_processes(tmp_path: Path, first: dict[str, Any]) -> None:
    hashes = set()
    for hash_seed in ("1", "4242"):
        out = tmp_path / f"run-{hash_seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        completed = subprocess.run(
            [sys.executable, "-m", "pacsnode.sim", "run", "--scenario", SCENARIO, "--nodes", str(NODES),
             "--sites", "3", "--seed", str(SEED), "--json", str(out)],
            env=env, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        hashes.add(json.loads(out.read_text())["trace_hash"])
    assert len(hashes) == 1
    assert hashes == {first["trace_hash"]}
