"""The chaos runner on real processes, short: 4 nodes, 45 s of faults (kill -9, SIGSTOP,
partition, wipe in a seeded order) under pynetdicom and storescu load, then the final
checks (every acknowledged instance at its N owners and byte-identical through every
node; every instance whose delete was acknowledged gone from every node). The long
runs are by hand: `pacsnode sim chaos --nodes 5 --duration 120 --seed 3`."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from pacsnode.sim import chaos_clients
from pacsnode.sim.chaos import ChaosCluster, ChaosSettings, DeleteVerdict, OpLog, Workload, final_checks
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
    counts = result["final_counts"]
    assert result["retrieve_checked_instances"] == counts["present"] * 4
    # Deletes ran beside the stores (every 2 s through a random live node); none came back.
    assert result["ops"]["delete"]["by_verdict"]["deleted"] > 0 and counts["deleted"] > 0
    assert counts["back"] == 0 and counts["lost"] == 0
    assert counts["present"] + counts["deleted"] + counts["unclear"] == counts["acked"]
    stores = result["ops"]["store"]
    # Stores through a node that stayed up are the ones a modality would see fail. Those
    # whose study had fewer than W owners reachable from the entry node (one side of the
    # 2/2 partition) are refused honestly (0xA701, never a false Success: the final checks
    # above); of the others, some may miss a replica deadline on a loaded machine or land
    # while the nodes are still re-learning each other after a fault heals; most must not.
    assert stores["ok_quorum_reachable"] >= 0.95 * stores["quorum_reachable"], stores
    assert stores["quorum_reachable"] > 0.8 * stores["through_up_node"], stores
    if have_dcmtk:
        assert stores["by_client"]["storescu"]["acked"] > 0
    assert result["ops"]["get"]["ok"] > 0 and result["ops"]["find"]["ok"] > 0


def test_the_delete_checker_passes_real_deletes_and_catches_one_back(tmp_path: Path) -> None:
    """The chaos runner's delete checker on 3 real nodes, no faults: an instance deleted
    with Admin.Delete and a study deleted with `pacsnode delete` are gone from every
    node's store, C-GET and C-FIND, the rest is all there; and an instance recorded as
    deleted that is in fact still stored is reported back, by every way it shows."""
    settings = ChaosSettings(nodes=3, store_threads=0, storescu_every_s=0, read_every_s=0, delete_every_s=0,
                             settle_timeout_s=60)
    (tmp_path / "nodes").mkdir()
    cluster = ChaosCluster(tmp_path / "nodes", settings)
    oplog = OpLog(time.monotonic(), tmp_path / "ops.jsonl")
    workload = Workload(cluster, oplog, tmp_path / "data", settings)
    try:
        cluster.start_all()
        rng = random.Random(0)
        for index in range(3):
            entries = workload._study(rng, f"study{index}")
            stored = chaos_clients.store_files(cluster.nodes["c1"].dicom_port, [
                (e["path"], e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries])
            assert set(stored.statuses.values()) == {0}, stored
            for entry in entries:
                oplog.ack(entry["sop_uid"])
        acked = oplog.acked_studies()
        first, second, third = sorted(acked)
        assert workload.delete("c2", first, acked[first][:1], whole=False, via="rpc") is DeleteVerdict.DELETED
        assert workload.delete("c3", second, acked[second], whole=True, via="cli") is DeleteVerdict.DELETED
        result: dict[str, Any] = {}
        final_checks(cluster, oplog, workload, settings, result)
        assert oplog.violations == []
        assert result["final_counts"] == {"acked": 12, "present": 7, "lost": 0, "deleted": 5, "back": 0,
                                          "unclear": 0}
        assert result["retrieve_checked_instances"] == 7 * 3

        # Recorded as deleted, still stored: the checker must see it on every node, every way.
        still_there = acked[third][0]
        oplog.begin_delete([still_there])
        oplog.end_delete([still_there], DeleteVerdict.DELETED)
        result = {}
        final_checks(cluster, oplog, workload, dataclasses.replace(settings, settle_timeout_s=2), result)
        assert result["final_counts"]["back"] == 1 and result["final_counts"]["lost"] == 0
        how = set(result["deleted_back"][still_there.sop_uid])
        assert {f"C-GET at {n}" for n in cluster.ids} <= how and {f"C-FIND at {n}" for n in cluster.ids} <= how
        assert {f"held by {n}" for n in cluster.owners(third)} <= how
        assert oplog.violations
    finally:
        cluster.close()
        oplog.close()
