"""Who may do what on the DICOM ports: a table of known application entities.

Defaults follow Orthanc's: C-ECHO and C-STORE are open to any AE; C-FIND, C-GET and C-MOVE
only to known AEs (`known_aes`), each with its allowed hosts and services; an AE title
calling from a host it is not known at counts as unknown (Orthanc's
DicomCheckModalityHost). Callers on the loopback interface may do everything while
`loopback_trusted` is on (the quick start). `access_mode = "strict"` refuses unknown AEs
at association time and trusts no address.

A C-MOVE names a destination: it must be a configured destination (`destinations`) and
one the caller may send to: its own AE title by default, or those its entry lists with
`move-to:AET` (`move-to:*` for any).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

SERVICES = ("echo", "store", "find", "get", "move")
OPEN_SERVICES = frozenset({"echo", "store"})  # For unknown AEs in the default mode.
ACCESS_MODES = ("default", "strict")


class AccessError(ValueError):
    """A malformed known-AE entry."""


@dataclass(frozen=True)
class KnownAe:
    """One known application entity: where it may call from and what it may ask."""

    ae_title: str
    hosts: tuple[str, ...] = ()  # Empty: any address.
    services: frozenset[str] = frozenset(SERVICES)
    move_to: tuple[str, ...] = ()  # C-MOVE destinations besides itself; "*" = any configured one.

    @classmethod
    def parse(cls, text: str) -> "KnownAe":
        """`AET[@HOST[,HOST...]][=SERVICE,...]`; a service `move-to:AET` allows that destination."""
        head, has_services, services_text = text.partition("=")
        ae_title, _at, hosts_text = head.partition("@")
        hosts = tuple(h.strip() for h in hosts_text.split(",") if h.strip())
        if not has_services:
            return cls.build(ae_title, hosts, list(SERVICES), [])
        services, move_to = [], []
        for token in (t.strip() for t in services_text.split(",")):
            if not token:
                continue
            if token.startswith("move-to:"):
                move_to.append(token.removeprefix("move-to:").strip())
            else:
                services.append(token)
        return cls.build(ae_title, hosts, services, move_to)

    @classmethod
    def from_table(cls, ae_title: str, table: Mapping[str, Any]) -> "KnownAe":
        """The TOML form: `[known_aes.AET] hosts = [...] services = [...] move_to = [...]`."""
        unknown = set(table) - {"hosts", "services", "move_to"}
        if unknown:
            raise AccessError(f"known AE {ae_title}: unknown key(s) {', '.join(sorted(unknown))}")
        return cls.build(ae_title, [str(h) for h in table.get("hosts", [])],
                         [str(s) for s in table.get("services", SERVICES)], [str(m) for m in table.get("move_to", [])])

    @classmethod
    def build(cls, ae_title: str, hosts: Any, services: list[str], move_to: list[str]) -> "KnownAe":
        ae_title = ae_title.strip()
        if not 1 <= len(ae_title) <= 16 or "\\" in ae_title or not ae_title.isprintable():
            raise AccessError(f"known AE title must be 1-16 printable characters, got {ae_title!r}")
        bad = [s for s in services if s not in SERVICES]
        if bad:
            raise AccessError(f"known AE {ae_title}: unknown service(s) {', '.join(bad)} "
                              f"(services: {', '.join(SERVICES)}, move-to:AET)")
        return cls(ae_title=ae_title, hosts=tuple(hosts), services=frozenset(services), move_to=tuple(move_to))

    def __str__(self) -> str:
        hosts = "@" + ",".join(self.hosts) if self.hosts else ""
        tokens = [s for s in SERVICES if s in self.services] + [f"move-to:{m}" for m in self.move_to]
        return f"{self.ae_title}{hosts}={','.join(tokens)}"


class Decision(NamedTuple):
    allowed: bool
    reason: str  # Stable word for the log line: known, loopback, open, unknown-ae, host-mismatch, ...


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


class AccessPolicy:
    """Decides each request from (calling AE title, peer address, service)."""

    def __init__(self, known_aes: tuple[KnownAe, ...], *, mode: str = "default", loopback_trusted: bool = True,
                 destinations: tuple[str, ...] = ()) -> None:
        if mode not in ACCESS_MODES:
            raise AccessError(f"access_mode must be one of {', '.join(ACCESS_MODES)}, got {mode!r}")
        self.mode = mode
        self.loopback_trusted = loopback_trusted and mode != "strict"
        self._known = {ae.ae_title: ae for ae in known_aes}
        self._destinations = frozenset(destinations)

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    def known_titles(self) -> list[str]:
        return sorted(self._known)

    def known(self, ae_title: str, address: str) -> tuple[KnownAe | None, str]:
        entry = self._known.get(ae_title.strip())
        if entry is None:
            return None, "unknown-ae"
        if entry.hosts and address not in entry.hosts:
            return None, "host-mismatch"
        return entry, "known"

    def allows(self, ae_title: str, address: str, service: str) -> Decision:
        if self.loopback_trusted and is_loopback(address):
            return Decision(True, "loopback")
        entry, why = self.known(ae_title, address)
        if entry is not None:
            return Decision(True, "known") if service in entry.services else Decision(False, "service-not-allowed")
        if not self.strict and service in OPEN_SERVICES:
            return Decision(True, "open")
        return Decision(False, why)

    def allows_move(self, ae_title: str, address: str, destination: str) -> Decision:
        """May this caller C-MOVE to `destination`? (The move itself is checked by allows().)"""
        destination = destination.strip()
        if destination not in self._destinations:
            return Decision(False, "unknown-destination")
        if self.loopback_trusted and is_loopback(address):
            return Decision(True, "loopback")
        entry, why = self.known(ae_title, address)
        if entry is None:
            return Decision(False, why)
        if destination == entry.ae_title or "*" in entry.move_to or destination in entry.move_to:
            return Decision(True, "known")
        return Decision(False, "destination-not-allowed")
