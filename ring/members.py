"""Members: who is in the cluster and how to reach them, and what the data path asks. Pure code.

`MemberInfo` is one node's identity and addresses; ring/swim.py keeps a record of each
(state, incarnation, generation) and node/swim_membership.py serves the data path the
`MembershipView` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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
    updated_at_ms: int = 0  # Wall clock when this boot of the member started (informational).
    # alive | suspect | dead | leaving | left | removed: the member's ring/swim.py state
    # (kept equal to its record's). Alive, suspect and dead members own ring tokens,
    # unless leaving.
    state: str = "alive"
    token_salt: int = 0  # Which token set the node has (ring/token_choice.py); 0: from before salts.

    def as_ring_member(self) -> Member:
        return Member(node_id=self.node_id, site=self.site or "default", host=self.host, vnodes=self.vnodes,
                      token_salt=self.token_salt)

    @property
    def peer_address(self) -> str:
        return f"{self.peer_host}:{self.peer_port}"


class MembershipView(Protocol):
    """What the data path needs from membership (node/swim_membership.py; fakes in tests)."""

    def ring(self) -> Ring: ...
    def is_alive(self, node_id: str) -> bool: ...
    def member(self, node_id: str) -> MemberInfo | None: ...
    def members(self) -> list[MemberInfo]: ...
    def troubled_within(self, window_ms: int) -> bool:
        """True when any other member changed state (suspected, dead, restarted, back,
        leaving) in the last `window_ms` of membership's clock (ring/trouble.py)."""
        ...
