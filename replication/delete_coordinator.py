"""Deletes: a study, a series or one instance, made durable as tombstones on W owners.

Every node runs one DeleteCoordinator beside its Coordinator; any node coordinates any
delete. A delete

1. lists the instances in its scope through the ordinary named read (R owners of the
   study, reconciled, plus the hints of stand-ins when an owner is down), and has this
   node's hybrid clock observe the version of every instance listed;
2. stamps one version (`hlc.now()`, so greater than every version it listed) and sends
   the study's N owners a Tombstone request naming those instances. An owner writes a
   tombstone for each of them and for every instance it holds in the scope with an
   older version (`apply_tombstones`), in one synced batch;
3. an owner that is down or does not answer gets its tombstones kept as hints on the
   next stand-in (as a write's copy would), replayed by `replay_tombstone_hints` when it
   answers again;
4. also sends them, best effort and not counted, to the owners of the study in the ring
   before the last change that are owners no more (`former_owners`): such a node keeps
   its copy until its drop pass has seen every new owner hold it, and a delete in
   between would otherwise leave the deleted bytes on its disk until then;
5. answers DELETED once W owners made them durable, and never before. Tombstones kept
   as hints count toward W only with `strict_quorum=False` (write_quorum_mode sloppy),
   as a write's hints do: with strict writes an acknowledged delete is on W owners, so
   R owners asked by any later read include one that has the tombstone.

A tombstone wins over every copy of its SOP Instance UID with an older version wherever
it meets one: replica writes, hint replay, read repair and anti-entropy (whose digests
cover tombstones) all answer such a copy DELETED instead of storing it. A copy with a
newer version is a new instance stored after the delete (a re-store).

Async; reaches peers and the local store only through the injected transport and store.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol, Sequence

from pacsnode.replication.archive import IncompleteAnswer
from pacsnode.replication.hlc import HybridClock, Version
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import Attributes, InstanceRecord, StoreError, Tombstone
from pacsnode.replication.transport import PeerError
from pacsnode.ring.members import MembershipView
from pacsnode.ring.placement import Replication
from pacsnode.ring.tokens import study_token

log = logging.getLogger(__name__)

# Instances named in one Tombstone request (each ~150 bytes: well under the 4 MiB limit).
TOMBSTONES_PER_REQUEST = 2_000


class DeleteStatus(enum.Enum):
    """How a delete ended (the CLI and DICOMweb map it to their answers)."""

    DELETED = "deleted"  # Tombstones durable on W owners (sloppy: or stand-ins holding them as hints).
    NOT_FOUND = "not-found"  # R owners answered and none holds anything in the scope.
    INCOMPLETE = "incomplete"  # Durable on W, but the listing could not ask enough owners: run it again.
    QUORUM_FAILED = "quorum-failed"  # Fewer than W durable: not deleted (a retry may work).
    NOT_JOINED = "not-joined"  # This node is still joining its cluster.


@dataclass(frozen=True)
class DeleteScope:
    """What to delete: a study, one series of it, or one instance of it."""

    study_instance_uid: str
    series_instance_uid: str = ""
    sop_instance_uid: str = ""

    @property
    def level(self) -> str:
        if self.sop_instance_uid:
            return "instance"
        return "series" if self.series_instance_uid else "study"

    def covers(self, record: InstanceRecord) -> bool:
        if record.study_instance_uid != self.study_instance_uid:
            return False
        if self.series_instance_uid and record.series_instance_uid != self.series_instance_uid:
            return False
        return not self.sop_instance_uid or record.sop_instance_uid == self.sop_instance_uid

    def image_query(self) -> Query:
        conditions = [Condition("StudyInstanceUID", "UI", self.study_instance_uid)]
        if self.series_instance_uid:
            conditions.append(Condition("SeriesInstanceUID", "UI", self.series_instance_uid))
        if self.sop_instance_uid:
            conditions.append(Condition("SOPInstanceUID", "UI", self.sop_instance_uid))
        return Query("IMAGE", tuple(conditions), ())


@dataclass(frozen=True)
class DeleteResult:
    status: DeleteStatus
    instances: int = 0  # Instances listed and tombstoned.
    acked: int = 0  # Copies counted toward W: owners (sloppy: and stand-ins for them) with the tombstones durable.
    message: str = ""


class TombstoneStore(Protocol):
    """The store operations a delete needs (blocking: run them in a thread)."""

    def instances(self, study_instance_uid: str) -> Iterable[InstanceRecord]: ...
    def put_tombstones(self, tombstones: Sequence[Tombstone], *, hint_for: str = "") -> int: ...
    def tombstone_hint_owners(self) -> list[str]: ...
    def tombstone_hints(self, owner: str) -> Iterable[Tombstone]: ...
    def delete_tombstone_hints(self, owner: str, tombstones: Sequence[Tombstone]) -> None: ...


class TombstoneTransport(Protocol):
    async def tombstone(self, target: str, tombstones: Sequence[Tombstone], *, scope: DeleteScope | None,
                        hint_for: str, timeout_ms: int) -> int:
        """Apply (or, with `hint_for`, keep as hints) on `target`; how many instances it
        removed there. Raises PeerError when it did not make them durable."""
        ...


def expand_scope(records: Iterable[InstanceRecord], scope: DeleteScope, version: Version) -> list[Tombstone]:
    """Tombstones for the held instances of `scope` that `version` supersedes. Pure."""
    return [Tombstone(r.study_instance_uid, r.sop_instance_uid, version, r.series_instance_uid)
            for r in records if scope.covers(r) and r.version < version]


def apply_tombstones(store: TombstoneStore, tombstones: Sequence[Tombstone], *, scope: DeleteScope | None,
                     hint_for: str = "") -> int:
    """What an owner does with a Tombstone request (blocking): the listed tombstones, plus
    one for every instance it holds in `scope` that they supersede (unless it keeps them
    as hints for another owner); one synced batch. How many instances were removed."""
    chosen = list(tombstones)
    if scope is not None and not hint_for and chosen:
        version = max(t.version for t in chosen)
        listed = {t.sop_instance_uid for t in chosen}
        chosen += [t for t in expand_scope(store.instances(scope.study_instance_uid), scope, version)
                   if t.sop_instance_uid not in listed]
    return store.put_tombstones(chosen, hint_for=hint_for)


def batches(tombstones: Sequence[Tombstone], size: int = TOMBSTONES_PER_REQUEST) -> list[list[Tombstone]]:
    """Groups of at most `size` tombstones, each of one study and one version (one request)."""
    groups: dict[tuple[str, Version], list[Tombstone]] = {}
    for tombstone in tombstones:
        groups.setdefault((tombstone.study_instance_uid, tombstone.version), []).append(tombstone)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


Finder = Callable[[Query], AsyncIterator[Attributes]]


class _Copy(enum.Enum):
    """Where one owner's tombstones ended up."""

    OWNER = "owner"  # Durable on the owner itself.
    HINT = "hint"  # Durable on a stand-in, as hints for the owner.
    NONE = "none"  # Nowhere else (kept here as hints at most: never counted).


class DeleteCoordinator:
    def __init__(self, self_id: str, membership: MembershipView, transport: TombstoneTransport,
                 local: TombstoneStore, hlc: HybridClock, find: Finder, *, replication_factor: Replication,
                 write_quorum: int, replica_timeout_ms: int = 2_000, strict_quorum: bool = True,
                 run_blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread) -> None:
        self.self_id = self_id
        self._membership = membership
        self._transport = transport
        self._local = local
        self.hlc = hlc
        self._find = find
        self._n = replication_factor
        self._w = write_quorum
        self._timeout_ms = replica_timeout_ms
        self._strict = strict_quorum  # Only owners' durable tombstones count toward W.
        self._run_blocking = run_blocking
        # The study token's owners in the ring before the last change that are not owners
        # now (Repairer.former_owners; set by the node shell): they may still hold copies.
        self.former_owners: Callable[[int], Sequence[str]] = lambda token: ()
        self.deletes = 0
        self.deletes_failed = 0
        self.former_owners_reached = 0
        self.tombstone_hints_written = 0
        self.tombstone_hints_replayed = 0

    async def resolve(self, scope: DeleteScope) -> list[DeleteScope]:
        """`scope` with its study filled in: a series or an instance named without its study
        is looked up (a scatter over the archive: an operator's rare request), one scope per
        study found. Raises IncompleteAnswer when part of the archive could not be asked."""
        if scope.study_instance_uid:
            return [scope]
        conditions = []
        if scope.series_instance_uid:
            conditions.append(Condition("SeriesInstanceUID", "UI", scope.series_instance_uid))
        if scope.sop_instance_uid:
            conditions.append(Condition("SOPInstanceUID", "UI", scope.sop_instance_uid))
        if not conditions:
            return []
        studies: dict[str, None] = {}
        async for row in self._find(Query("IMAGE", tuple(conditions), ())):
            studies[str(row.get("StudyInstanceUID", ""))] = None
        return [DeleteScope(study, scope.series_instance_uid, scope.sop_instance_uid) for study in studies if study]

    def _joined(self) -> bool:
        joined = getattr(self._membership, "joined", True)
        return bool(joined() if callable(joined) else joined)

    async def delete(self, scope: DeleteScope) -> DeleteResult:
        self.deletes += 1
        if not self._joined():
            self.deletes_failed += 1
            return DeleteResult(DeleteStatus.NOT_JOINED, message="node is still joining its cluster; retry")
        listed: dict[str, Tombstone] = {}
        incomplete = False
        seen: list[Version] = []
        rows: list[Attributes] = []
        try:
            async for row in self._find(scope.image_query()):
                rows.append(row)
        except IncompleteAnswer:
            incomplete = True
        for row in rows:
            mark = row.get("_version")
            if isinstance(mark, str) and mark:
                try:
                    seen.append(Version.from_mark(mark))
                except ValueError:
                    pass
        for version in seen:
            self.hlc.observe(version)  # The delete's version is then newer than each instance listed.
        version = self.hlc.now()
        for row in rows:
            sop = str(row.get("SOPInstanceUID", ""))
            if sop:
                listed[sop] = Tombstone(scope.study_instance_uid, sop, version, str(row.get("SeriesInstanceUID", "")))
        if not listed and not incomplete:
            return DeleteResult(DeleteStatus.NOT_FOUND, message="nothing in this scope on the study's owners")
        tombstones = list(listed.values())
        ring = self._membership.ring()
        # The placement policy itself (per-site copies included), as the Coordinator's writes
        # use it: a plain count here would send the tombstones to other nodes than the owners.
        n = ring.effective(self._n)
        w = min(self._w, ring.effective_replicas(self._n))
        token = study_token(scope.study_instance_uid)
        owners = ring.preference_list(token, n)
        used: set[str] = set()
        former = [node for node in self.former_owners(token) if node not in owners]
        results, reached = await asyncio.gather(
            asyncio.gather(*(self._replicate(owner, owners, tombstones, scope, token, n, used) for owner in owners)),
            self._tell_former(former, tombstones, scope))
        acked = self._counted(results)
        if former:
            log.info("replication.delete.former_owners asked=%d reached=%d", len(former), reached)
        log.info("replication.delete scope=%s instances=%d owners=%d acked=%d write_quorum=%d version=%s",
                 scope.level, len(tombstones), len(owners), acked, w, version.mark())
        if acked < w:
            self.deletes_failed += 1
            return DeleteResult(DeleteStatus.QUORUM_FAILED, len(tombstones), acked,
                                f"tombstones durable on {acked} of {w} required "
                                + ("owners (hints kept for the others do not count)" if self._strict else "replicas"))
        if incomplete:
            return DeleteResult(DeleteStatus.INCOMPLETE, len(tombstones), acked,
                                "some owners could not be asked for the instances; run the delete again")
        return DeleteResult(DeleteStatus.DELETED, len(tombstones), acked)

    async def supersede(self, tombstones: list[Tombstone]) -> bool:
        """Tombstones (one study) on its owners, hints for the down ones, without a listing;
        True once W made them durable (Coordinator.store, after it met a newer tombstone)."""
        ring = self._membership.ring()
        n = ring.effective(self._n)
        token = study_token(tombstones[0].study_instance_uid)
        owners = ring.preference_list(token, n)
        used: set[str] = set()
        results = await asyncio.gather(*(self._replicate(owner, owners, tombstones, None, token, n, used)
                                         for owner in owners))
        return self._counted(results) >= min(self._w, ring.effective_replicas(self._n))

    async def _tell_former(self, former: Sequence[str], tombstones: Sequence[Tombstone],
                           scope: DeleteScope) -> int:
        """The tombstones on the former owners that answer (not counted toward W, no hints:
        what one misses its drop pass settles, as the owners answer it DELETED); how many
        made them durable."""
        async def one(node_id: str) -> bool:
            if node_id != self.self_id and not self._membership.is_alive(node_id):
                return False
            try:
                await self._send(node_id, tombstones, scope, "")
                return True
            except PeerError as error:
                log.info("replication.delete.former_owner_failed node=%s error=%s", node_id, error)
                return False

        reached = sum(await asyncio.gather(*(one(node_id) for node_id in former)))
        self.former_owners_reached += reached
        return reached

    def _counted(self, results: Sequence[_Copy]) -> int:
        """Copies that count toward W: owners' own, and with sloppy quorum hints too."""
        return sum(1 for copy in results if copy is _Copy.OWNER or (copy is _Copy.HINT and not self._strict))

    async def _send(self, node_id: str, tombstones: Sequence[Tombstone], scope: DeleteScope | None,
                    hint_for: str) -> int:
        removed = 0
        for group in batches(tombstones):
            if node_id == self.self_id:
                try:
                    removed += int(await self._run_blocking(
                        lambda g=group: apply_tombstones(self._local, g, scope=scope, hint_for=hint_for)))
                except StoreError as error:
                    raise PeerError(f"local store failed: {error}") from error
            else:
                removed += await self._transport.tombstone(node_id, group, scope=scope, hint_for=hint_for,
                                                           timeout_ms=self._timeout_ms + 2 * len(group))
        return removed

    async def _replicate(self, owner: str, owners: Sequence[str], tombstones: Sequence[Tombstone],
                         scope: DeleteScope | None, token: int, n: Replication, used: set[str]) -> "_Copy":
        """The tombstones on `owner`, or else as hints for it on the next stand-in."""
        if owner == self.self_id or self._membership.is_alive(owner):
            try:
                await self._send(owner, tombstones, scope, "")
                return _Copy.OWNER
            except PeerError as error:
                log.info("replication.delete.owner_failed owner=%s error=%s", owner, error)
        ring = self._membership.ring()
        while True:
            stand_in = next((s.node_id for s in ring.stand_ins(token, n, {owner} | used) if s.owner == owner), None)
            if stand_in is None:
                # As a write's copy: this node keeps them as hints for the owner (replayed as soon
                # as it answers), never counted toward W (it is not a distinct replica).
                if owner != self.self_id:
                    try:
                        await self._send(self.self_id, tombstones, None, owner)
                        self.tombstone_hints_written += len(tombstones)
                        log.info("replication.delete.hint_kept_here owner=%s tombstones=%d", owner, len(tombstones))
                    except PeerError as error:
                        log.warning("replication.delete.hint_keep_failed owner=%s error=%s", owner, error)
                return _Copy.NONE
            used.add(stand_in)
            if stand_in in owners or (stand_in != self.self_id and not self._membership.is_alive(stand_in)):
                continue
            try:
                await self._send(stand_in, tombstones, None, owner)
            except PeerError as error:
                log.info("replication.delete.hint_failed owner=%s holder=%s error=%s", owner, stand_in, error)
                continue
            self.tombstone_hints_written += len(tombstones)
            log.info("replication.delete.hint_written owner=%s holder=%s tombstones=%d", owner, stand_in,
                     len(tombstones))
            return _Copy.HINT

    async def replay_tombstone_hints(self) -> int:
        """One pass: hand the tombstones held for owners that answer again to them (an owner
        out of the ring: to the study's current owners); forget each once made durable."""
        handed = 0
        owners = await self._run_blocking(self._local.tombstone_hint_owners)
        ring = self._membership.ring()
        n = ring.effective(self._n)
        for owner in owners:
            if owner in ring and not self._membership.is_alive(owner):
                continue
            held: list[Tombstone] = await self._run_blocking(lambda o=owner: list(_take(self._local.tombstone_hints(o),
                                                                                        TOMBSTONES_PER_REQUEST)))
            done: list[Tombstone] = []
            for group in batches(held):
                targets = [owner] if owner in ring else ring.owners_of_study(group[0].study_instance_uid, n)
                try:
                    for target in targets:
                        if target != self.self_id and not self._membership.is_alive(target):
                            raise PeerError(f"{target} is down")
                        await self._send(target, group, None, "")
                except PeerError as error:
                    log.info("replication.delete.hint_replay_failed owner=%s error=%s", owner, error)
                    break
                done.extend(group)
            if done:
                await self._run_blocking(self._local.delete_tombstone_hints, owner, done)
                handed += len(done)
                self.tombstone_hints_replayed += len(done)
                log.info("replication.delete.hints_replayed owner=%s tombstones=%d", owner, len(done))
        return handed


def _take(iterator: Iterable[Tombstone], count: int) -> Iterable[Tombstone]:
    for index, item in enumerate(iterator):
        if index >= count:
            return
        yield item
