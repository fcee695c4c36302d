"""sim/chaos_plan.py: the chaos runner's fault plan is seeded, fills the run, and puts one
of each essential fault first so even a short run sees kill -9, pause, partition and wipe."""

from __future__ import annotations

import pytest

from pacsnode.sim.chaos_plan import ESSENTIAL, KINDS, SCENARIOS, plan_faults

NODES = ["c1", "c2", "c3", "c4", "c5"]


def test_same_seed_same_plan_and_another_seed_another() -> None:
    assert plan_faults(3, NODES, 120) == plan_faults(3, NODES, 120)
    assert plan_faults(3, NODES, 120) != plan_faults(4, NODES, 120)


def test_the_essential_faults_come_first_and_the_plan_fills_the_duration() -> None:
    for seed in range(20):
        plan = plan_faults(seed, NODES, 120, gap_s=4)
        assert {f.kind for f in plan[:len(ESSENTIAL)]} == set(ESSENTIAL)
        assert sum(f.duration_s + 4 for f in plan) >= 120
        assert sum(f.duration_s + 4 for f in plan[:-1]) < 120


def test_every_kind_is_well_formed() -> None:
    seen = set()
    for seed in range(30):
        for fault in plan_faults(seed, NODES, 300, dead_grace_s=10):
            seen.add(fault.kind)
            if fault.kind in ("partition", "one-way"):
                assert fault.group_a and fault.group_b and not set(fault.group_a) & set(fault.group_b)
                assert set(fault.group_a) | set(fault.group_b) == set(NODES)
                assert not fault.target
            else:
                assert fault.target in NODES and not fault.group_a
            if fault.kind == "long-kill":
                assert fault.duration_s > 10  # Past the dead grace: the node is removed.
            assert fault.describe()
    assert seen == set(KINDS)


def test_scenarios_restrict_the_kinds_and_small_clusters_skip_long_kills() -> None:
    for name, kinds in SCENARIOS.items():
        assert {f.kind for f in plan_faults(1, NODES, 200, scenario=name)} <= set(kinds)
    assert "long-kill" not in {f.kind for s in range(10) for f in plan_faults(s, ["a", "b", "c"], 300)}
    with pytest.raises(ValueError, match="unknown chaos scenario"):
        plan_faults(1, NODES, 60, scenario="meteor")
    with pytest.raises(ValueError, match="at least 2 nodes"):
        plan_faults(1, ["a"], 60)


def test_chaos_settings_a_run_cannot_have_are_refused_before_anything_starts() -> None:
    from pacsnode.sim.chaos import ChaosSettings

    ChaosSettings().check()
    for bad in (dict(nodes=1), dict(sites=6), dict(write_quorum=4), dict(duration_s=0), dict(scenario="meteor"),
                dict(store_threads=-1)):
        with pytest.raises(ValueError):
            ChaosSettings(**bad).check()  # type: ignore[arg-type]


def test_a_site_cut_cuts_one_whole_site_from_the_others() -> None:
    nodes = [f"c{i}" for i in range(1, 7)]
    sites = {node: f"site{i % 3 + 1}" for i, node in enumerate(nodes)}
    cuts = [f for seed in range(10) for f in plan_faults(seed, nodes, 200, scenario="sites", sites=sites)
            if f.kind == "site-cut"]
    assert cuts
    for fault in cuts:
        assert len({sites[n] for n in fault.group_a}) == 1
        assert set(fault.group_a) == {n for n in nodes if sites[n] == sites[fault.group_a[0]]}
        assert set(fault.group_b) == set(nodes) - set(fault.group_a)
    # One site: no site to cut, only the scenario's other kinds.
    assert {f.kind for f in plan_faults(1, nodes, 200, scenario="sites")} == {"kill"}


def test_chaos_wan_settings_are_checked_and_replayed() -> None:
    from pacsnode.sim.chaos import ChaosSettings

    for bad in (dict(wan_delay_ms=10, wan_jitter_ms=20), dict(lan_delay_ms=-1), dict(scenario="sites", sites=1)):
        with pytest.raises(ValueError):
            ChaosSettings(nodes=6, **bad).check()  # type: ignore[arg-type]
    wan = ChaosSettings(nodes=6, sites=3, scenario="sites", wan_delay_ms=40, wan_jitter_ms=10, lan_delay_ms=0.2)
    wan.check()
    assert "--wan-delay-ms 40 --wan-jitter-ms 10 --lan-delay-ms 0.2" in wan.replay()


def test_a_delete_is_judged_by_its_typed_outcome_and_only_deleted_counts_as_deleted() -> None:
    from pathlib import Path
    import tempfile

    from pacsnode.proto import pacsnode_pb2 as pb
    from pacsnode.sim.chaos import CLI_DELETE_EXIT_OUTCOMES, DeleteVerdict, OpLog, Sent, delete_verdict

    assert delete_verdict(pb.DELETE_OUTCOME_DELETED) is DeleteVerdict.DELETED
    assert delete_verdict(pb.DELETE_OUTCOME_NOT_FOUND) is DeleteVerdict.NOT_DELETED
    assert delete_verdict(pb.DELETE_OUTCOME_NOT_JOINED) is DeleteVerdict.NOT_DELETED
    for maybe in (pb.DELETE_OUTCOME_INCOMPLETE, pb.DELETE_OUTCOME_QUORUM_FAILED, pb.DELETE_OUTCOME_UNSPECIFIED, None):
        assert delete_verdict(maybe) is DeleteVerdict.UNCLEAR  # Timeouts and failed calls are None.
    assert 1 not in CLI_DELETE_EXIT_OUTCOMES  # `pacsnode delete` exits 1 for several outcomes: unclear.

    with tempfile.TemporaryDirectory() as tmp:
        oplog = OpLog(0.0, Path(tmp) / "ops.jsonl")
        sents = [Sent(f"p{i}", "1.2.3", f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1")
                 for i in range(4)]
        for sent in sents:
            oplog.sending(sent)
            oplog.ack(sent.sop_uid)
        oplog.begin_delete(sents[:3])
        assert [s.sop_uid for s in oplog.acked_studies()["1.2.3"]] == ["1.2.3.3"]  # In flight: not read as present.
        oplog.end_delete(sents[:1], DeleteVerdict.DELETED)
        oplog.end_delete(sents[1:2], DeleteVerdict.UNCLEAR)
        oplog.end_delete(sents[2:3], DeleteVerdict.NOT_DELETED)
        assert sorted(s.sop_uid for s in oplog.acked_studies()["1.2.3"]) == ["1.2.3.2", "1.2.3.3"]
        assert [s.sop_uid for s in oplog.deleted_studies()["1.2.3"]] == ["1.2.3.0"]
        assert oplog.unclear == {"1.2.3.1"}
        oplog.close()


def test_health_does_not_count_a_copy_on_its_way_as_a_hint_held_back() -> None:
    """Stop 22: 'c4 held 4 hints 45 s after the cut' were the remote copies of the study being
    stored through c4 at that instant (local write scope), not hints held back."""
    from pacsnode.proto import pacsnode_pb2 as pb
    from pacsnode.sim.chaos import HINT_IN_FLIGHT_MS, local_health_problem

    now_ms = 1_800_000_000_000
    fresh = pb.LocalStats(hint_count=6, hints_by_owner=[
        pb.HintSummary(owner_id="c3", hint_count=3, oldest_stored_at_ms=now_ms - 300),
        pb.HintSummary(owner_id="c6", hint_count=3, oldest_stored_at_ms=now_ms - 900)])
    assert local_health_problem(fresh, now_ms) is None
    stale = pb.LocalStats(hint_count=6, hints_by_owner=[
        pb.HintSummary(owner_id="c3", hint_count=3, oldest_stored_at_ms=now_ms - 300),
        pb.HintSummary(owner_id="c6", hint_count=3, oldest_stored_at_ms=now_ms - HINT_IN_FLIGHT_MS - 1)])
    assert "3 older than" in (local_health_problem(stale, now_ms) or "")
    tombstones = pb.LocalStats(hint_count=2)  # Hints with no age in the summary still count.
    assert local_health_problem(tombstones, now_ms) is not None
    assert local_health_problem(pb.LocalStats(under_replicated_study_count=1), now_ms) is not None
    assert local_health_problem(pb.LocalStats(), now_ms) is None
