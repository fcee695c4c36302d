"""Signed member records (node/member_signing.py) and ring/swim.py's verifier hook: who may
say what about a member, checked against the cluster CA; a refused record changes nothing."""

from __future__ import annotations

import datetime
import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacsnode.node import ca, peer_wire
from pacsnode.node.member_signing import MemberSigner, MemberVerifier
from pacsnode.node.swim_membership import SwimMembership
from pacsnode.node.tls import TlsFiles
from pacsnode.ring.swim import (Ack, DeadBootRecord, Gossip, JoinReply, JoinRequest, MemberUpdate, Ping, PushPullReply,
                                State, Swim, SwimConfig)
from pacsnode.sim.swim_cluster import SwimCluster, member_info

CLUSTER = "signing-test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca.init_ca(root / "ca")
    ca.init_ca(root / "other-ca")
    dirs = {}
    for index in range(4):
        name = f"node-{index:02d}"
        ca.issue(root / "ca", root / name, name)
        dirs[name] = root / name
    ca.issue(root / "other-ca", root / "stranger", "node-01")  # node-01's name, another CA.
    ca.issue(root / "ca", root / "ops", "ops", admin=True)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    ca.issue(root / "ca", root / "expired", "node-01", valid_days=1, not_before=past)
    for name in ("stranger", "ops", "expired"):
        dirs[name] = root / name
    dirs["ca"] = root / "ca"
    return dirs


def signer(pki: dict[str, Path], name: str, cluster: str = CLUSTER) -> MemberSigner:
    return MemberSigner(cluster, TlsFiles(pki[name]))


def verifier(pki: dict[str, Path]) -> MemberVerifier:
    return MemberVerifier(CLUSTER, (pki["ca"] / "ca.pem").read_bytes())


def record(index: int, state: State = State.ALIVE, incarnation: int = 0, reporter: str = "") -> MemberUpdate:
    info = member_info(index)
    return MemberUpdate(info, state, incarnation, reporter_id=reporter or info.node_id)


def test_a_signed_record_survives_the_wire_and_verifies(pki: dict[str, Path]) -> None:
    signed = signer(pki, "node-01").sign(record(1))
    decoded = peer_wire.update_from_wire(peer_wire.update_to_wire(signed))
    assert decoded == signed
    assert verifier(pki)(decoded) is None


def test_who_may_say_what(pki: dict[str, Path]) -> None:
    check = verifier(pki)
    node0, node1 = signer(pki, "node-00"), signer(pki, "node-01")
    # The member itself: alive, leaving, left, refutations.
    for state in (State.ALIVE, State.LEAVING, State.LEFT):
        assert check(node1.sign(record(1, state, 5))) is None
        assert check(node0.sign(record(1, state, 5, reporter="node-00"))) == (
            f"only node-01 may say it is {state.value}, not node-00")
    # Any node, under its own name: suspect, dead, removed.
    for state in (State.SUSPECT, State.DEAD, State.REMOVED):
        assert check(node0.sign(record(1, state, 0, reporter="node-00"))) is None
        forged = node0.sign(record(1, state, 0, reporter="node-02"))  # Speaking as node-02.
        assert check(forged) == "reporter 'node-02' but signed by node-00"
    assert check(record(1)) == "unsigned"
    changed = replace(node1.sign(record(1, State.ALIVE, 0)), incarnation=9)
    assert check(changed) == "bad signature (claims node-01)"
    moved = node1.sign(record(1))
    moved = replace(moved, info=replace(moved.info, peer_host="203.0.113.9"))
    assert check(moved) == "bad signature (claims node-01)"
    other_cluster = signer(pki, "node-01", cluster="another-cluster").sign(record(1))
    assert check(other_cluster) == "bad signature (claims node-01)"
    assert "not issued by the cluster CA" in (check(signer(pki, "stranger").sign(record(1))) or "")
    assert check(signer(pki, "expired").sign(record(1))) == "certificate of node-01 is not valid now"
    assert "admin certificate" in (check(signer(pki, "ops").sign(record(1, State.REMOVED, 0, "ops"))) or "")
    assert check(replace(node1.sign(record(1)), certificate=b"junk")) == "not a certificate"


def swim(pki: dict[str, Path], index: int) -> Swim:
    name = f"node-{index:02d}"
    return Swim(SwimConfig.local(), member_info(index), random.Random(index), 0,
                signer=signer(pki, name).sign, verifier=verifier(pki))


def test_a_forged_record_changes_nothing_and_is_listed(pki: dict[str, Path]) -> None:
    node0, node1 = swim(pki, 0), swim(pki, 1)
    node0.on_message(1, "node-01", PushPullReply((node1.me,)))
    assert node0.state_of("node-01") is State.ALIVE and not node0.drain_rejected()
    attacker = signer(pki, "node-02")
    # node-02's certificate: node-01 alive at a new address, higher incarnation (a hijack).
    hijack = attacker.sign(replace(record(1, State.ALIVE, 7, reporter="node-02"),
                                   info=replace(member_info(1), peer_host="203.0.113.9")))
    left = attacker.sign(record(1, State.LEFT, 8, reporter="node-02"))
    dead_as_other = attacker.sign(record(1, State.DEAD, 0, reporter="node-03"))
    unsigned_removed = record(1, State.REMOVED, 0, reporter="node-02")
    left_about_node0 = attacker.sign(record(0, State.LEFT, 3, reporter="node-02"))
    node0.on_message(2, "node-02", Gossip((hijack, left, dead_as_other, unsigned_removed, left_about_node0)))
    assert node0.record("node-01") == node1.me  # Unchanged: same incarnation, address and signature.
    assert node0.self_state() is State.ALIVE and node0.incarnation == 0
    rejected = node0.drain_rejected()
    assert [(r.node_id, r.state) for r in rejected] == [
        ("node-01", State.ALIVE), ("node-01", State.LEFT), ("node-01", State.DEAD), ("node-01", State.REMOVED),
        ("node-00", State.LEFT)]
    assert node0.statistics().updates_rejected == 5
    # A join as another node is refused; the same record unsigned too.
    reply = node0.on_message(3, "node-02", JoinRequest(attacker.sign(record(3, State.ALIVE, 0, "node-02"))))
    assert not reply[0].message.accepted and node0.state_of("node-03") is None  # type: ignore[union-attr]
    assert [r.reason for r in node0.drain_rejected()] == ["only node-03 may say it is alive, not node-02"]
    # What node-02 may say: that node-01 is dead, under its own name; node-01 refutes it, signed.
    dead = attacker.sign(record(1, State.DEAD, 0, reporter="node-02"))
    node0.on_message(4, "node-02", Gossip((dead,)))
    assert node0.state_of("node-01") is State.DEAD
    node1.on_message(4, "node-00", Gossip((dead,)))
    assert node1.incarnation == 1
    node0.on_message(5, "node-01", Gossip((node1.me,)))
    assert node0.state_of("node-01") is State.ALIVE and not node0.drain_rejected()


def test_a_signed_cluster_joins_detects_a_death_and_converges(pki: dict[str, Path]) -> None:
    def hooks(node_id: str) -> dict[str, object]:
        return {"signer": signer(pki, node_id).sign, "verifier": verifier(pki)}

    cluster = SwimCluster(4, SwimConfig.local(), seed=3, swim_hooks=hooks)
    try:
        converge_and_detect(cluster)
    finally:
        cluster.close()


def converge_and_detect(cluster: SwimCluster) -> None:
    ids = list(cluster.processes)
    assert cluster.run_until_true(lambda: all(cluster.view(a, b) is State.ALIVE for a in ids for b in ids), 10_000)
    cluster.kill("node-03")
    assert cluster.run_until_true(
        lambda: all(cluster.view(a, "node-03") is State.DEAD for a in ids[:3]), 60_000)
    for node_id in ids[:3]:
        swim_ = cluster.swim(node_id)
        assert swim_.statistics().updates_rejected == 0
        assert all(swim_.record(other).signature for other in ids)  # type: ignore[union-attr]


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(signature=st.binary(max_size=300), certificate=st.binary(max_size=600), genuine_certificate=st.booleans(),
       state=st.sampled_from(list(State)))
def test_the_verifier_refuses_any_invented_proof(pki: dict[str, Path], signature: bytes, certificate: bytes,
                                                 genuine_certificate: bool, state: State) -> None:
    """Arbitrary signature and certificate bytes (or node-02's real certificate with an
    invented signature): refused with a reason, never an exception, never accepted."""
    if genuine_certificate:
        certificate = signer(pki, "node-02").sign(record(2)).certificate
    update = replace(record(2, state, 1, reporter="node-02"), signature=signature, certificate=certificate)
    reason = verifier(pki)(update)
    assert isinstance(reason, str) and reason


def _seed_holding_a_dead_later_boot(pki: dict[str, Path]) -> tuple[Swim, MemberUpdate]:
    """node-00, a seed that holds node-01's generation 2 DEAD (declared by node-02)."""
    seed = swim(pki, 0)
    second_boot = signer(pki, "node-01").sign(
        MemberUpdate(member_info(1, generation=2), State.ALIVE, 0, reporter_id="node-01"))
    seed.on_message(1, "node-01", PushPullReply((second_boot,)))
    dead = signer(pki, "node-02").sign(second_boot.restate(State.DEAD, reporter_id="node-02"))
    seed.on_message(2, "node-02", Gossip((dead,)))
    assert seed.record("node-01") == dead
    return seed, dead


def _forged_dead_boots(pki: dict[str, Path], dead: MemberUpdate) -> list[MemberUpdate]:
    """What a lying seed could send with a refusal: node-01 at a made-up generation."""
    far = replace(dead.info, generation=1_000_000)
    unsigned = MemberUpdate(far, State.DEAD, 0, reporter_id="node-02")
    tampered = replace(dead, info=far)  # node-02's genuine signature, another generation.
    under_another_name = signer(pki, "node-00").sign(unsigned)  # Reporter node-02, signed by node-00.
    other_ca = signer(pki, "stranger").sign(MemberUpdate(far, State.LEFT, 9, reporter_id="node-01"))
    alive_by_another = signer(pki, "node-00").sign(MemberUpdate(far, State.ALIVE, 0, reporter_id="node-00"))
    return [unsigned, tampered, under_another_name, other_ca, alive_by_another]


def test_a_dead_boot_record_that_comes_with_a_refusal_is_acted_on_only_when_it_verifies(
        pki: dict[str, Path]) -> None:
    """02e635c: a seed refusing a join for an older generation sends the newer boot's record,
    and the joiner (its data dir wiped) joins again above it. With signing on, that record is
    checked like every other peer record: a forged or unsigned one is refused (typed
    outcome, listed in `rejected`), so a lying seed cannot push the node to a generation of
    its choosing."""
    seed, dead = _seed_holding_a_dead_later_boot(pki)

    def wiped() -> tuple[Swim, JoinRequest]:
        node = swim(pki, 1)  # Generation 1: the data dir lost the count.
        (request,) = node.join(3, [seed.me.info.peer_address])
        assert isinstance(request.message, JoinRequest)
        return node, request.message

    joiner, request = wiped()
    (reply,) = seed.on_message(4, "node-01", request)
    refusal = reply.message
    assert isinstance(refusal, JoinReply) and not refusal.accepted and refusal.members == (dead,)
    joiner.on_message(5, "node-00", refusal)
    assert (joiner.dead_boot_record, joiner.dead_boot_generation) == (DeadBootRecord.TAKEN, 2)
    assert not joiner.drain_rejected()

    for forged in _forged_dead_boots(pki, dead):
        joiner, _ = wiped()
        joiner.on_message(5, "node-00", JoinReply(False, refusal.reason, (forged,)))
        assert (joiner.dead_boot_record, joiner.dead_boot_generation) == (DeadBootRecord.UNVERIFIED, 0), forged
        assert joiner.newer_boot_held == 0  # Nor does a forged live record silence it.
        assert [(r.node_id, r.state) for r in joiner.drain_rejected()] == [("node-01", forged.state)]
        assert joiner.generation == 1 and not joiner.joined


def test_the_node_shell_rejoins_above_a_verified_dead_boot_and_logs_a_forged_one(
        pki: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """The same through node/swim_membership.py, what `pacsnode start` runs: a verified record
    makes the node join again one generation above it (persisted through next_generation);
    a forged one changes nothing and is logged."""
    seed, dead = _seed_holding_a_dead_later_boot(pki)

    def shell() -> tuple[SwimMembership, list[int]]:
        asked: list[int] = []
        membership = SwimMembership(CLUSTER, member_info(1), [seed.me.info.peer_address], config=SwimConfig.local(),
                                    rng=random.Random(1), next_generation=lambda at_least: asked.append(at_least)
                                    or at_least, signer=signer(pki, "node-01").sign, verifier=verifier(pki))
        membership.swim.join(0, membership.seeds)  # As start() does; nothing is sent without a carrier.
        return membership, asked

    membership, asked = shell()
    (reply,) = seed.on_message(4, "node-01", JoinRequest(membership.swim.me))
    assert isinstance(reply.message, JoinReply)
    membership.receive("node-00", reply.message)
    assert asked == [3] and membership.generation == 3 and membership.counters.rejoins == 1

    for forged in _forged_dead_boots(pki, dead):
        membership, asked = shell()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pacsnode"):
            membership.receive("node-00", JoinReply(False, reply.message.reason, (forged,)))
        assert asked == [] and membership.generation == 1 and membership.counters.rejoins == 0
        assert membership.counters.updates_rejected == 1
        messages = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("membership.join.dead_boot_record outcome=unverified node=node-01 generation=1")
                   for m in messages), messages


def test_a_refusal_for_a_live_later_boot_silences_probes_for_it_only_when_its_record_verifies(
        pki: dict[str, Path]) -> None:
    """d4d3ab4, signed: the seed holds node-01's generation 2 alive (the wiped node came back
    at its address before anyone held that boot dead). The joiner leaves pings for its id
    unanswered only on a record that verifies."""
    seed = swim(pki, 0)
    second_boot = signer(pki, "node-01").sign(
        MemberUpdate(member_info(1, generation=2), State.ALIVE, 0, reporter_id="node-01"))
    seed.on_message(1, "node-01", PushPullReply((second_boot,)))
    joiner = swim(pki, 1)
    (request,) = joiner.join(2, [seed.me.info.peer_address])
    assert isinstance(request.message, JoinRequest)
    (reply,) = seed.on_message(3, "node-01", request.message)
    assert isinstance(reply.message, JoinReply) and reply.message.members == (second_boot,)
    joiner.on_message(4, "node-00", reply.message)
    assert joiner.newer_boot_held == 2 and joiner.dead_boot_generation == 0 and not joiner.drain_rejected()
    assert joiner.on_message(5, "node-00", Ping(7, "node-01", ())) == []  # Meant for generation 2.
    assert joiner.statistics().pings_for_a_newer_boot == 1

    forged = replace(second_boot, info=replace(second_boot.info, generation=3))  # Signature no longer matches.
    other = swim(pki, 1)
    other.join(2, [seed.me.info.peer_address])
    other.on_message(4, "node-00", JoinReply(False, reply.message.reason, (forged,)))
    assert other.newer_boot_held == 0 and other.dead_boot_record is DeadBootRecord.UNVERIFIED
    (ack,) = other.on_message(5, "node-00", Ping(7, "node-01", ()))
    assert isinstance(ack.message, Ack)
