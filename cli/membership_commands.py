"""`pacsnode leave` and `pacsnode remove`: ask a running node over its peer port."""

from __future__ import annotations

import sys
import time

import grpc

from pacsnode.cli.status import StatusError, _envelope, collect
from pacsnode.node.tls import cli_channel
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc


def _call_leave(address: str, cluster_id: str, member: pb.MemberUpdate, tls_dir: str | None = None
                ) -> pb.LeaveReply:
    with cli_channel(address, tls_dir) as channel:
        reply: pb.LeaveReply = pb_grpc.MembershipStub(channel).Leave(
            pb.LeaveRequest(envelope=_envelope(cluster_id), member=member), timeout=10)
        return reply


def leave(address: str, *, cluster_id: str, wait: bool, timeout_s: float, tls_dir: str | None = None) -> int:
    try:
        status = collect(address, cluster_id, tls_dir=tls_dir)
    except StatusError as error:
        print(f"pacsnode leave: cannot reach {error}", file=sys.stderr)
        return 1
    node_id = status["node_id"]
    others = [n["peer_address"] for n in status["nodes"] if n["node_id"] != node_id and n["reachable"]]
    try:
        _call_leave(address, cluster_id, pb.MemberUpdate(node_id=node_id, state=pb.MEMBER_STATE_LEFT), tls_dir)
    except grpc.RpcError as error:
        print(f"pacsnode leave: {node_id} refused: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    print(f"{node_id} is leaving: its ranges move to their new owners")
    if not wait:
        return 0
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        time.sleep(1.0)
        try:
            mine = next(n for n in collect(address, cluster_id, timeout_s=3, tls_dir=tls_dir)["nodes"] if n["node_id"] == node_id)
            line = f"  {node_id}: {mine['local_instances']} instances still held, {mine.get('pending_hints', 0)} hints"
            if line != last:
                print(line, flush=True)
                last = line
        except (StatusError, StopIteration):
            # It stopped answering: it has left. Confirm with another member.
            for other in others:
                try:
                    view = collect(other, cluster_id, timeout_s=3, tls_dir=tls_dir)
                except StatusError:
                    continue
                state = next((n["state"] for n in view["nodes"] if n["node_id"] == node_id), "unknown")
                print(f"{node_id} has left (state seen by {view['node_id']}: {state})")
                return 0
            print(f"{node_id} stopped answering")
            return 0
    print(f"pacsnode leave: {node_id} still holds data after {timeout_s:.0f} s", file=sys.stderr)
    return 1


def remove(address: str, node_id: str, *, cluster_id: str, tls_dir: str | None = None) -> int:
    try:
        reply = _call_leave(address, cluster_id, pb.MemberUpdate(node_id=node_id, state=pb.MEMBER_STATE_REMOVED),
                            tls_dir)
    except grpc.RpcError as error:
        print(f"pacsnode remove: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    if not reply.accepted:
        print(f"pacsnode remove: {node_id} was not removed", file=sys.stderr)
        return 1
    print(f"{node_id} removed from the ring; its data is being re-replicated (see pacsnode status)")
    return 0
