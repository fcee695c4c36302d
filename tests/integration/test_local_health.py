"""Local health (issue 9, must have 3): a node whose own store path is stuck says so in
`pacsnode status`, does not ack probes and does not refute suspicion, so its peer routes
around it; once its store answers again it is healthy and alive again.

Node x runs in this process (its store can then be made stuck for real: a write that
does not return, and an executor with every thread held); node y is a real
`pacsnode start` process. Both are real nodes over real gRPC and DICOM.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from pacsnode.cli.status import collect, render
from pacsnode.node.config import NodeConfig
from pacsnode.node.server import Node
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, free_port, wait_until

from . import clients

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

CLUSTER = ["--replication-factor", "2", "--write-quorum", "1", "--profile", "local"]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Node, NodeProcess]]:
    y = NodeProcess(tmp_path / "y", node_id="y", extra_args=CLUSTER).start()
    x: Node | None = None
    try:
        x = Node(NodeConfig(node_id="x", data_dir=tmp_path / "x", host="127.0.0.1", dicom_port=free_port(),
                            peer_port=free_port(), seeds=(y.peer_address,), profile="local", replication_factor=2,
                            write_quorum=1, store_stall_ms=1_000, health_probe_interval_ms=100))
        x.start()
        yield x, y
    finally:
        if x is not None:
            x.stop()
        y.stop(timeout_s=15)


def view(address: str, node_id: str) -> dict[str, Any]:
    try:
        return next(n for n in collect(address, timeout_s=3)["nodes"] if n["node_id"] == node_id)
    except Exception as error:  # Not answering (yet): no view.
        return {"error": str(error)}


def ping(x: Node, sequence_number: int) -> grpc.StatusCode:
    envelope = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="y")
    with grpc.insecure_channel(f"127.0.0.1:{x.peer_server.port}") as channel:
        try:
            pb_grpc.MembershipStub(channel).Ping(pb.PingRequest(envelope=envelope, target_id="x",
                                                                sequence_number=sequence_number), timeout=3)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            assert error.code() != grpc.StatusCode.UNAVAILABLE or "unhealthy" in (error.details() or "")
            return error.code()  # type: ignore[no-any-return]


def routed_around(y: NodeProcess) -> bool:
    return view(y.peer_address, "x").get("state") in ("suspect", "dead")


def alive_again(y: NodeProcess) -> bool:
    return view(y.peer_address, "x").get("state") == "alive"


def test_a_stuck_store_makes_the_node_unhealthy_and_routed_around_until_it_answers(
        nodes: tuple[Node, NodeProcess], tmp_path: Path) -> None:
    x, y = nodes
    x_address = f"127.0.0.1:{x.peer_server.port}"
    assert wait_until(lambda: alive_again(y) and view(x_address, "y").get("state") == "alive", 30)
    assert view(x_address, "x")["healthy"] is True
    assert ping(x, 1) == grpc.StatusCode.OK
    incarnation = x.membership.incarnation

    # 1. A local write that does not return (a disk stuck in fsync): the node's own store
    # behind a replica whose put_stored waits, injected where the node reads its replica.
    inner = x.replica.inner
    release = threading.Event()

    class StuckReplica:
        def put_stored(self, stored: Any, *, hint_for: str = "") -> str:
            release.wait(60)
            return inner.put_stored(stored, hint_for=hint_for)

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    x.replica.inner = StuckReplica()
    try:
        manifest = datagen.write_study_set(datagen.StudySetSpec(patients=1, instances_per_series=2, rows=8, cols=8,
                                                                seed=77, modalities=("CT",)), tmp_path / "data")
        statuses = clients.send_files(x.config.dicom_port, [Path(e["path"]) for e in manifest])
        assert set(statuses.values()) == {0x0000}  # W=1: y's durable copy answers for it.
        assert wait_until(lambda: view(x_address, "x").get("healthy") is False, 10)
        seen = view(x_address, "x")
        assert seen["health_reason"] == "store-write-stalled", seen
        text = render(collect(x_address, timeout_s=3))
        assert "UNHEALTHY (store-write-stalled)" in text and "x is unhealthy: a local store write has run for" in text
        assert ping(x, 2) == grpc.StatusCode.UNAVAILABLE  # No ack...
        assert wait_until(lambda: routed_around(y), 15), view(y.peer_address, "x")  # ...so y suspects it.
        assert x.membership.incarnation == incarnation  # And x has not refuted.
    finally:
        release.set()
        x.replica.inner = inner

    assert wait_until(lambda: view(x_address, "x").get("healthy") is True, 10)
    assert ping(x, 3) == grpc.StatusCode.OK
    assert wait_until(lambda: alive_again(y), 15), view(y.peer_address, "x")
    assert x.membership.incarnation > incarnation  # It refuted once healthy.
    incarnation = x.membership.incarnation

    # 2. The loop's executor with every thread held (the old gray failure's end state).
    gate = threading.Event()
    held = [x.loop.executor.submit(gate.wait, 60) for _ in range(x.loop.executor.statistics().threads_max)]
    try:
        assert wait_until(lambda: view(x_address, "x").get("health_reason") == "store-executor-stalled", 10)
        assert ping(x, 4) == grpc.StatusCode.UNAVAILABLE
        assert wait_until(lambda: routed_around(y), 15), view(y.peer_address, "x")
        # Stores through x still succeed: y is the only live owner, x keeps nothing.
        statuses = clients.send_files(x.config.dicom_port, [Path(e["path"]) for e in manifest])
        assert set(statuses.values()) == {0x0000}
    finally:
        gate.set()
        for future in held:
            future.result(10)
    assert wait_until(lambda: view(x_address, "x").get("healthy") is True, 10)
    assert wait_until(lambda: alive_again(y), 15), view(y.peer_address, "x")
    assert x.membership.incarnation > incarnation
    assert x.metrics()["pacsnode.health.transitions_count"] == 4
