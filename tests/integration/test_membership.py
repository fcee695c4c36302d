"""SWIM membership on real processes (`--profile local`): five nodes on 127.0.0.1.

In order, on one cluster: a node stopped (SIGSTOP) for less than the suspicion timeout is
never declared dead; an IndirectPing is answered with the target's ack, or held open and
answered with a nack when the target is silent; peers that lie (another cluster id, stale incarnations and
generations, garbage on the peer port) change nothing; a node killed with kill -9 is dead
at every live node within Lifeguard's bound, removed after the grace period, and every
study is back at N copies on the survivors; a node that leaves hands its ranges over and
is `left` everywhere; with three nodes left, the 75% rail keeps a dead node in the ring
until the operator removes it. Detection, removal and repair times are printed (pytest -s).
"""

from __future__ import annotations

import datetime
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from pacsnode.cli.status import ask, collect
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.ring.swim import SwimConfig, suspicion_timeout_ms
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, wait_until

from . import clients
from .test_cluster import FAST, start_cluster
from .test_rebalance import placement_is_exact

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

NAMES = ("m1", "m2", "m3", "m4", "m5")
DEAD_GRACE_S = 4
EXTRA = ["--dead-grace-s", str(DEAD_GRACE_S), "--anti-entropy-interval-ms", "2000"]
LOCAL = SwimConfig.local()
# Lifeguard's bound for n=5: a probe round or so to notice, plus the longest a suspicion
# can last (the timer starts at suspicion_max_timeout_mult x the base and only shrinks).
DETECTION_BOUND_S = (4 * LOCAL.probe_interval_ms + suspicion_timeout_ms(
    LOCAL.suspicion_mult, len(NAMES), LOCAL.probe_interval_ms) * LOCAL.suspicion_max_timeout_mult) / 1000
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def states(node: NodeProcess) -> dict[str, tuple[str, int, int]]:
    """node_id -> (state, incarnation, generation) as `node` sees the cluster."""
    reply = ask(node.peer_address, "pacsnode", 3)
    return {s.member.node_id: (pb.MemberState.Name(s.member.state).removeprefix("MEMBER_STATE_").lower(),
                               s.member.incarnation, s.member.generation) for s in reply.members}


def state_of(node: NodeProcess, node_id: str) -> str:
    try:
        return states(node).get(node_id, ("unknown", 0, 0))[0]
    except grpc.RpcError:
        return "unreachable"


def all_see(observers: list[NodeProcess], node_id: str, state: str) -> bool:
    return all(state_of(o, node_id) == state for o in observers)


def transitions(node: NodeProcess, about: str, new_state: str | None = None, since: float = 0.0) -> list[float]:
    """Wall-clock times at which `node` logged `membership.state node=<about> ... new=<state>`."""
    times = []
    for line in node.log_text().splitlines():
        if "membership.state" not in line or f" node={about} " not in line:
            continue
        if new_state is not None and f" new={new_state} " not in line:
            continue
        match = _LOG_TIME.match(line)
        if match:  # The node logs UTC (logging.Formatter.converter = time.gmtime).
            at = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(
                tzinfo=datetime.timezone.utc).timestamp()
            if at >= since:
                times.append(at)
    return times


def envelope(cluster_id: str = "pacsnode", sender_id: str = "liar") -> pb.Envelope:
    return pb.Envelope(cluster_id=cluster_id, protocol_version=PROTOCOL_VERSION, sender_id=sender_id,
                       sent_at_ms=int(time.time() * 1000))


def gossip(target: NodeProcess, updates: list[pb.MemberUpdate], cluster_id: str = "pacsnode") -> None:
    """A gossip message (a Ping with sequence number 0) carrying `updates`, as any peer may send."""
    with grpc.insecure_channel(target.peer_address) as channel:
        pb_grpc.MembershipStub(channel).Ping(pb.PingRequest(envelope=envelope(cluster_id), target_id=target.node_id,
                                                            sequence_number=0, updates=updates), timeout=5)


def record_of(node: NodeProcess, about: str) -> pb.MemberUpdate:
    reply = ask(node.peer_address, "pacsnode", 3)
    return next(s.member for s in reply.members if s.member.node_id == about)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("membership")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(root: Path) -> Iterator[list[NodeProcess]]:
    assert "--profile" in FAST and FAST[FAST.index("--profile") + 1] == "local"
    nodes = start_cluster(root, NAMES, EXTRA)
    yield nodes
    for node in nodes:
        node.resume()
        node.stop()


@pytest.fixture(scope="module")
def manifest(cluster: list[NodeProcess], root: Path) -> list[datagen.ManifestEntry]:
    spec = datagen.StudySetSpec(patients=10, series_per_study=1, instances_per_series=3, rows=32, cols=32, seed=51)
    entries = datagen.write_study_set(spec, root / "studies")
    (root / "studies" / "manifest.json").unlink(missing_ok=True)
    result, acked = clients.storescu(cluster[0].dicom_port, [root / "studies"], extra=["+sd", "+r"])
    assert len(acked) == len(entries), result.stdout[-2000:]
    assert wait_until(lambda: placement_is_exact(cluster, NAMES, entries), 30)
    return entries


def test_a_short_stop_is_never_taken_for_a_death(cluster: list[NodeProcess],
                                                 manifest: list[datagen.ManifestEntry]) -> None:
    paused = cluster[2]
    others = [n for n in cluster if n is not paused]
    started = time.time()
    pause_s = 0.5  # Under the base suspicion timeout (0.8 s), let alone the initial 4.8 s.
    for _ in range(3):
        paused.pause()
        time.sleep(pause_s)
        paused.resume()
        time.sleep(2.0)
    assert wait_until(lambda: all_see(others, paused.node_id, "alive"), 5)
    suspected = sum(len(transitions(o, paused.node_id, "suspect", started)) for o in others)
    dead = {o.node_id: transitions(o, paused.node_id, "dead", started) for o in others}
    print(f"\nSIGSTOP {pause_s} s x3: suspected {suspected} times, refuted; incarnation now "
          f"{states(others[0])[paused.node_id][1]}")
    assert not any(dead.values()), dead
    assert not transitions(paused, paused.node_id, since=started)  # It never doubted itself.


def test_an_indirect_ping_is_held_until_the_target_acks_or_the_relay_gives_up(
        cluster: list[NodeProcess], manifest: list[datagen.ManifestEntry]) -> None:
    relay, target = cluster[0], cluster[1]
    host, port = target.peer_address.split(":")

    def indirect_ping(target_id: str, address: pb.Address, sequence_number: int) -> tuple[pb.Ack, float]:
        started = time.monotonic()
        with grpc.insecure_channel(relay.peer_address) as channel:
            ack = pb_grpc.MembershipStub(channel).IndirectPing(pb.IndirectPingRequest(
                envelope=envelope(sender_id="prober"), target_id=target_id, target_address=address,
                sequence_number=sequence_number, probe_timeout_ms=300), timeout=2)
        return ack, time.monotonic() - started

    ack, _ = indirect_ping(target.node_id, pb.Address(host=host, port=int(port)), 77)
    assert (ack.sequence_number, ack.nack, ack.envelope.sender_id) == (77, False, relay.node_id)
    silent = socket.socket()  # Accepts connections (the backlog) but never answers: a stopped node.
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        ack, elapsed = indirect_ping("nobody", pb.Address(host="127.0.0.1", port=silent.getsockname()[1]), 78)
    finally:
        silent.close()
    assert (ack.sequence_number, ack.nack) == (78, True)
    assert 0.25 <= elapsed < 1.5, elapsed  # Held open for the relay's probe timeout, then a nack.


def test_lying_peers_change_nothing(cluster: list[NodeProcess], manifest: list[datagen.ManifestEntry]) -> None:
    victim = cluster[1]
    # A believable false accusation first: the accused refutes with a higher incarnation,
    # and nobody declares it dead.
    accused = record_of(cluster[0], victim.node_id)
    before_incarnation = accused.incarnation
    false = pb.MemberUpdate()
    false.CopyFrom(accused)
    false.state = pb.MEMBER_STATE_SUSPECT
    false.reporter_id = "liar"
    started = time.time()
    gossip(cluster[3], [false])
    assert wait_until(lambda: all(states(n)[victim.node_id][0] == "alive"
                                  and states(n)[victim.node_id][1] > before_incarnation for n in cluster), 5), \
        {n.node_id: states(n)[victim.node_id] for n in cluster}
    assert not any(transitions(n, victim.node_id, "dead", started) for n in cluster)
    time.sleep(1.0)  # Let the refutation settle everywhere before the view is taken.
    view = {n.node_id: states(n) for n in cluster}
    assert all(state == "alive" for v in view.values() for state, _, _ in v.values()), view
    refuted = view[cluster[0].node_id][victim.node_id]
    assert all(v[victim.node_id] == refuted for v in view.values()), view
    lies_from = time.time()

    # Another cluster id: refused before anything is read.
    dead = pb.MemberUpdate()
    dead.CopyFrom(record_of(cluster[0], victim.node_id))
    dead.state = pb.MEMBER_STATE_DEAD
    with pytest.raises(grpc.RpcError) as refused:
        gossip(cluster[0], [dead], cluster_id="someone-else")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Stale incarnations of a live node: dead and suspect at the incarnation it refuted.
    stale = []
    for state in (pb.MEMBER_STATE_DEAD, pb.MEMBER_STATE_SUSPECT, pb.MEMBER_STATE_ALIVE):
        update = pb.MemberUpdate()
        update.CopyFrom(dead)
        update.state = state
        update.incarnation = refuted[1] - 1
        update.peer_address.port = 1  # An address that would hurt if it were taken.
        stale.append(update)
    # A stale generation: an older boot of a live node, removed, and alive at another address.
    for state in (pb.MEMBER_STATE_REMOVED, pb.MEMBER_STATE_ALIVE):
        update = pb.MemberUpdate()
        update.CopyFrom(dead)
        update.state = state
        update.generation = dead.generation - 1
        update.incarnation = 99
        update.peer_address.port = 2
        stale.append(update)
    # Malformed records (no node id, no address, an unknown state) are skipped, not fatal.
    stale += [pb.MemberUpdate(node_id="", state=pb.MEMBER_STATE_DEAD),
              pb.MemberUpdate(node_id=victim.node_id, state=pb.MEMBER_STATE_DEAD),
              pb.MemberUpdate(node_id="ghost", peer_address=pb.Address(host="127.0.0.1", port=3), state=42)]
    for node in cluster:
        gossip(node, stale)
    # Garbage on every peer port.
    for node in cluster:
        host, port = node.peer_address.split(":")
        for garbage in (b"\x00" * 64, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(range(256)) * 4):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(garbage)
                sock.settimeout(1)
                try:
                    sock.recv(1024)
                except OSError:
                    pass
    time.sleep(2 * LOCAL.push_pull_interval_ms / 1000)  # Gossip and a push-pull round or two.
    for node in cluster:
        assert states(node)[victim.node_id] == refuted, node.node_id  # Same state, incarnation, generation...
        assert record_of(node, victim.node_id).peer_address.port == int(victim.peer_address.split(":")[1])  # ...address.
        assert "ghost" not in states(node)
        assert not transitions(node, victim.node_id, since=lies_from), node.node_id
        for about in NAMES:  # Nobody died, left or was removed over it.
            for state in ("dead", "left", "removed"):
                assert not transitions(node, about, state, since=lies_from), (node.node_id, about, state)
    assert all("membership.update.ignored" in n.log_text() for n in cluster)
    assert "peer.refused" in cluster[0].log_text()


def test_kill_9_dead_everywhere_then_removed_then_n_copies_again(cluster: list[NodeProcess],
                                                                  manifest: list[datagen.ManifestEntry]) -> None:
    victim = cluster[4]
    survivors = [n for n in cluster if n is not victim]
    killed_at = time.time()
    victim.kill()
    assert wait_until(lambda: all_see(survivors, victim.node_id, "dead"), DETECTION_BOUND_S + 2)
    detection = {n.node_id: min(transitions(n, victim.node_id, "dead", killed_at)) - killed_at for n in survivors}
    print(f"\nkill -9 {victim.node_id}: dead at " + ", ".join(f"{k} {v:.2f} s" for k, v in detection.items())
          + f" (bound {DETECTION_BOUND_S:.1f} s)")
    assert all(0 < t <= DETECTION_BOUND_S for t in detection.values()), detection
    # Dead keeps its tokens until the grace period is over.
    assert wait_until(lambda: all_see(survivors, victim.node_id, "removed"), DEAD_GRACE_S + 5)
    removal = {n.node_id: min(transitions(n, victim.node_id, "removed", killed_at)) - killed_at for n in survivors}
    first_dead = killed_at + min(detection.values())
    print(f"removed at " + ", ".join(f"{k} {v:.2f} s" for k, v in removal.items())
          + f" after the kill (grace {DEAD_GRACE_S} s)")
    assert all(v >= min(detection.values()) + DEAD_GRACE_S - 0.2 for v in removal.values()), removal
    removed_at = killed_at + min(removal.values())
    assert removed_at >= first_dead
    names = tuple(n.node_id for n in survivors)
    assert wait_until(lambda: placement_is_exact(survivors, names, manifest), 60), \
        {n["node_id"]: n["local_instances"] for n in collect(survivors[0].peer_address)["nodes"]}
    repaired_s = time.time() - removed_at
    print(f"every study back at 3 copies on {len(survivors)} nodes {repaired_s:.1f} s after the removal "
          f"({time.time() - killed_at:.1f} s after the kill)")
    status = collect(survivors[0].peer_address)
    assert status["effective_replication_factor"] == 3
    assert sum(n.get("under_replicated_studies") or 0 for n in status["nodes"] if n["reachable"]) == 0


def test_leave_hands_over_and_is_left_everywhere(cluster: list[NodeProcess],
                                                 manifest: list[datagen.ManifestEntry]) -> None:
    running = [n for n in cluster if n.alive]
    leaver = running[-1]
    stayers = [n for n in running if n is not leaver]
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "pacsnode.cli.main", "leave", "--node", leaver.peer_address],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_until(lambda: not leaver.alive, 30), "the leaving node did not exit"
    assert wait_until(lambda: all_see(stayers, leaver.node_id, "left"), 10)
    names = tuple(n.node_id for n in stayers)
    assert placement_is_exact(stayers, names, manifest)
    print(f"\nleave {leaver.node_id}: handed over and left in {time.time() - started:.1f} s")
    for node in stayers:  # It went leaving -> left, never suspect or dead.
        assert transitions(node, leaver.node_id, "leaving", started)
        assert not transitions(node, leaver.node_id, "dead", started)


def test_the_ring_rail_holds_a_removal_and_the_operator_can_still_remove(
        cluster: list[NodeProcess], manifest: list[datagen.ManifestEntry]) -> None:
    running = [n for n in cluster if n.alive]
    assert len(running) == 3  # After the kill and the leave above.
    victim = running[-1]
    survivors = [n for n in running if n is not victim]
    killed_at = time.time()
    victim.kill()
    assert wait_until(lambda: all_see(survivors, victim.node_id, "dead"), DETECTION_BOUND_S + 2)
    # Removing it would leave 2 of 3 ring members (under 75%): dead past the grace, still in the ring.
    time.sleep(DEAD_GRACE_S + 1.5)
    assert all_see(survivors, victim.node_id, "dead")
    assert all(f"membership.remove.held node={victim.node_id} rail=ring" in n.log_text() for n in survivors)
    result = subprocess.run([sys.executable, "-m", "pacsnode.cli.main", "remove", victim.node_id,
                             "--node", survivors[0].peer_address], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_until(lambda: all_see(survivors, victim.node_id, "removed"), 5)
    names = tuple(n.node_id for n in survivors)
    assert wait_until(lambda: placement_is_exact(survivors, names, manifest), 60)  # N=3 capped at 2 nodes.
    print(f"\nrail held {victim.node_id} dead past the grace; `pacsnode remove`, then every study on both "
          f"survivors {time.time() - killed_at:.1f} s after the kill")
