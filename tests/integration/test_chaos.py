"""The chaos runner on real processes, short: 4 nodes, 45 s of faults (kill -9, SIGSTOP,
partition, wipe in a seeded order) under pynetdicom and storescu load, then the final
checks (every acknowledged instance at its N owners and byte-identical through every
node). The long runs are by hand: `pacsnode sim chaos --nodes 5 --duration 120 --seed 3`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pacsnode.sim.process import pacsnode_command

from . import clients


def test_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    have_dcmtk = clients.have_dcmtk()
    out = tmp_path / "result.json"
    command = pacsnode_command() + ["sim", "chaos", "--nodes", "4", "--duration", "45", "--seed", "1",
                                    "--store-threads", "1", "--work-dir", str(tmp_path / "run"), "--json", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["violations"] == []
    kinds = {f["kind"] for f in result["faults"] if not f["skipped"]}
    assert {"kill", "pause", "partition"} <= kinds, result["faults"]
    # The faults were real: the killed node was seen dead by every other node.
    kill = next(f for f in result["faults"] if f["kind"] == "kill")
    assert kill["dead_everywhere_s"] is not None
    assert result["acked_instances"] > 100
    assert result["retrieve_checked_instances"] == result["acked_instances"] * 4
    stores = result["ops"]["store"]
    # Stores through a node that stayed up are the ones a modality would see fail. Some
    # may fail honestly (0xA701, never a false Success) when the faults leave fewer than W
    # reachable nodes or a loaded machine misses a replica deadline; most must not.
    assert stores["ok_through_up_node"] >= 0.95 * stores["through_up_node"], stores
    if have_dcmtk:
        assert stores["by_client"]["storescu"]["acked"] > 0
    assert result["ops"]["get"]["ok"] > 0 and result["ops"]["find"]["ok"] > 0
