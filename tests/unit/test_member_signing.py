"""Signed member records (node/member_signing.py) and ring/swim.py's verifier hook: who may
say what about a member, checked against the cluster CA; a refused record changes nothing."""

from __future__ import annotations

import datetime
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacsnode.node import ca, peer_wire
from pacsnode.node.member_signing import MemberSigner, MemberVerifier
from pacsnode.node.tls import TlsFiles
from pacsnode.ring.swim import Gossip, JoinRequest, MemberUpdate, PushPullReply, State, Swim, SwimConfig
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
