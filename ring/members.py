"""The member table: who is in the cluster and how to reach them. Pure code.

This is the static-membership form (issue: cluster data path): members learn of each
other through seeds and periodic push-pull of the whole table, and a member counts as
reachable while it answered within the failure timeout. The gossip issue replaces the
liveness part with SWIM; the data path only sees `MembershipView`.

Merging is by (generation, updated_at_ms): a node's own newest entry wins, so a restarted
node (new boot generation) replaces its old addresses everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Protocol

from pacsnode.ring.placement import Member, Ring


@dataclass(frozen=True)
class MemberInfo:
    """One node as the cluster knows it."""

    node_id: str
    peer_host: str
    peer_port: int
    dicom_host: str = ""
    dicom_port: int = 0
    ae_title: str = ""
    site: str = "default"
    host: str = ""  # The machine, a failure domain below the site.
    vnodes: int = 64
    generation: int = 0  # Boot generation: bumps on every restart.
    updated_at_ms: int = 0
    # alive | leaving (handing its ranges over) | left | removed. Liveness (answering or
    # not) is tracked apart; only `alive` members own ring tokens.
    state: str = "alive"

    def newer_than(self, other: "MemberInfo") -> bool:
        return (self.generation, self.updated_at_ms) > (other.generation, other.updated_at_ms)

    def as_ring_member(self) -> Member:
        return Member(node_id=self.node_id, site=self.site or "default", host=self.host, vnodes=self.vnodes)

    @property
    def peer_address(self) -> str:
        return f"{self.peer_host}:{self.peer_port}"


class MembershipView(Protocol):
    """What the data path needs from membership, whatever keeps it (static list or SWIM)."""

    def ring(self) -> Ring: ...
    def is_alive(self, node_id: str) -> bool: ...
    def member(self, node_id: str) -> MemberInfo | None: ...
    def members(self) -> list[MemberInfo]: ...


class MemberTable:
    """Members by id, merged by generation; liveness from the last successful contact."""

    def __init__(self, cluster_id: str, self_member: MemberInfo, *, failure_timeout_ms: int) -> None:
        self.cluster_id = cluster_id
        self.self_id = self_member.node_id
        self.failure_timeout_ms = failure_timeout_ms
        self._members: dict[str, MemberInfo] = {self_member.node_id: self_member}
        self._last_contact_ms: dict[str, int] = {}
        self._ring: Ring | None = None

    # ----------------------------------------------------------------- updates
    def merge(self, updates: Iterable[MemberInfo], now_ms: int, wall_ms: int | None = None) -> list[str]:
        """Merge another node's view; returns the ids that were added or changed.

        An update about ourselves that says we are removed (or that a later boot of us
        exists) is refuted: we re-announce ourselves, newer, as we are.
        """
        changed = []
        for update in updates:
            if update.node_id == self.self_id:
                me = self._members[self.self_id]
                if update.generation > me.generation:
                    self.update_self(generation=update.generation + 1, updated_at_ms=(wall_ms or now_ms))
                    changed.append(self.self_id)
                elif update.newer_than(me) and update.state != me.state and me.state == "alive":
                    self.update_self(updated_at_ms=max(update.updated_at_ms, wall_ms or 0) + 1)
                    changed.append(self.self_id)
                continue
            known = self._members.get(update.node_id)
            if known is None or update.newer_than(known):
                self._members[update.node_id] = update
                changed.append(update.node_id)
                if known is None:
                    # A member we just learned of counts as reachable until it fails to answer.
                    self._last_contact_ms.setdefault(update.node_id, now_ms)
        if changed:
            self._ring = None
        return changed

    def update_self(self, **changes: object) -> MemberInfo:
        me = replace(self._members[self.self_id], **changes)  # type: ignore[arg-type]
        self._members[self.self_id] = me
        self._ring = None
        return me

    def contact_succeeded(self, node_id: str, now_ms: int) -> None:
        self._last_contact_ms[node_id] = now_ms

    def contact_failed(self, node_id: str, now_ms: int) -> None:
        """Nothing to record: liveness expires by itself after failure_timeout_ms."""

    # ----------------------------------------------------------------- views
    def member(self, node_id: str) -> MemberInfo | None:
        return self._members.get(node_id)

    def members(self) -> list[MemberInfo]:
        return sorted(self._members.values(), key=lambda m: m.node_id)

    def ring_members(self) -> list[MemberInfo]:
        """Members that own ring tokens (a node that left or was removed does not)."""
        return [m for m in self.members() if m.state == "alive"]

    def set_state(self, node_id: str, state: str, wall_ms: int) -> MemberInfo | None:
        """Change a member's state (operator remove, dead-grace removal), newer than what we had."""
        known = self._members.get(node_id)
        if known is None:
            return None
        updated = replace(known, state=state, updated_at_ms=max(wall_ms, known.updated_at_ms + 1))
        self._members[node_id] = updated
        self._ring = None
        return updated

    def is_alive(self, node_id: str, now_ms: int) -> bool:
        if node_id == self.self_id:
            return True
        last = self._last_contact_ms.get(node_id)
        return last is not None and now_ms - last <= self.failure_timeout_ms

    def last_contact_ms(self, node_id: str) -> int | None:
        return self._last_contact_ms.get(node_id)

    def ring(self) -> Ring:
        if self._ring is None:
            self._ring = Ring(self.cluster_id, (m.as_ring_member() for m in self.ring_members()))
        return self._ring
