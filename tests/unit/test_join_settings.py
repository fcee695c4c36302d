"""The join check of placement settings (node/peer_server.py placement_mismatch)."""

from __future__ import annotations

import pytest

from pacsnode.node.peer_server import placement_mismatch
from pacsnode.proto import pacsnode_pb2 as pb


def settings(n: int, site_replicas: str = "", *, w: int = 2, r: int = 1, vnodes: int = 64) -> pb.ReplicationSettings:
    return pb.ReplicationSettings(replication_factor=n, write_quorum=w, read_quorum=r, vnodes=vnodes,
                                  site_replicas=site_replicas)


@pytest.mark.parametrize("own, joiner, refused", [
    (settings(3), settings(3), False),
    (settings(3), settings(3, w=1, r=2, vnodes=256), False),  # Each node's own: not compared.
    (settings(3), settings(2), True),
    (settings(3, "a=2,b=1"), settings(3, "a=2,b=1"), False),
    (settings(3, "a=2,b=1"), settings(3, "a=1,b=2"), True),  # Same total, other sites.
    (settings(3, "a=2,b=1"), settings(3), True),  # Plain N against per-site copies.
    (settings(2), settings(2, "a=1,b=1"), True),
])
def test_only_placement_decides(own: pb.ReplicationSettings, joiner: pb.ReplicationSettings, refused: bool) -> None:
    reason = placement_mismatch(own, joiner)
    assert (reason is not None) == refused
    if reason is not None:
        assert reason.startswith("replication settings differ: this cluster places ")
