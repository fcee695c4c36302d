"""Ring views that differ between sender and receiver: who may refuse a write, and when
to exchange membership with a peer whose envelope carried another ring version.

Pure: no I/O, no clock reads. node/peer_server.py and the simulator's peer handler
(sim/cluster.py) both decide with these.
"""

from __future__ import annotations

from pacsnode.ring.placement import Replication, Ring


def refuses_not_owner(ring: Ring, self_id: str, study_instance_uid: str, *, hint_for: str,
                      sender_ring_version: int, replication_factor: Replication) -> bool:
    """True when a write of `study_instance_uid` should be refused as NOT_OWNER.

    Only a primary write (not a hint), only when the sender planned it on another ring
    than ours (its envelope's ring_version is set and differs), and only when we are not
    among the study's owners under our ring. A joining node is in its own ring, and a new
    (pending) owner is an owner under the ring that made it one, so neither refuses what
    it will own. With the same ring on both sides the sender's plan is ours: never refused
    (a hand-over or read repair to an owner the sender sees is what we see too). A leaving
    node is in no one's ring, its own included, so it refuses new primary copies from a
    sender that has not heard yet; the sender keeps that copy as a hint or re-plans.
    """
    if hint_for or not sender_ring_version or sender_ring_version == ring.version:
        return False
    if not len(ring):
        return False  # No view yet: cannot judge, take it (the drop rule moves it later).
    n = ring.effective(replication_factor)
    return self_id not in ring.owners_of_study(study_instance_uid, n)


class RingSync:
    """When a peer's envelope carries another ring version, exchange full membership state
    with that peer (a push-pull), so views converge in one round trip rather than at the
    next gossip or periodic push-pull. Rate-limited: at most once per `peer_interval_ms`
    per peer, and at most one every `gap_ms` in all (right after a ring change most
    envelopes differ for a moment; one exchange usually settles it)."""

    def __init__(self, *, peer_interval_ms: int = 30_000, gap_ms: int = 1_000, peers_max: int = 4_096) -> None:
        self.peer_interval_ms = peer_interval_ms
        self.gap_ms = gap_ms
        self.peers_max = peers_max
        self._last_by_peer: dict[str, int] = {}
        self._last_ms: int | None = None
        self.started = 0
        self.skipped = 0

    def due(self, peer: str, now_ms: int, *, ring_version: int, sender_ring_version: int) -> bool:
        """True (and counted as started) when a mismatch seen now should start a push-pull with `peer`."""
        if not sender_ring_version or sender_ring_version == ring_version:
            return False
        if self._last_ms is not None and now_ms - self._last_ms < self.gap_ms:
            self.skipped += 1
            return False
        last = self._last_by_peer.get(peer)
        if last is not None and now_ms - last < self.peer_interval_ms:
            self.skipped += 1
            return False
        if len(self._last_by_peer) >= self.peers_max:
            self._last_by_peer.clear()  # Bounded: forgetting old peers only allows an exchange sooner.
        self._last_by_peer[peer] = now_ms
        self._last_ms = now_ms
        self.started += 1
        return True
