"""Corrections of patient and study attributes, made durable on W owners like a write.

`pacsnode modify` (one study) and `pacsnode merge-patient` (every study of one PatientID
put under another) run here, on whichever node the operator asked. A correction
(replication/correction.py) is a versioned study-level overlay:

1. the study is looked up with the ordinary named read (R owners): NOT_FOUND when R
   owners answered and none holds it. Its current correction, if any, comes with the
   rows (`_correction`); this node's hybrid clock observes its version;
2. one version is stamped (`hlc.now()`, newer than every change it saw) and the
   correction (keyword -> (value, version)) is sent to the study's N owners (Correct
   request). Each merges it into the one it holds, keyword by keyword, the newer version
   winning, and applies it to its study record and index in one synced batch;
3. an owner that is down or does not answer: the correction goes to the next stand-in,
   which keeps it as a hint for that owner (as a write's copy or a delete's tombstones
   are kept); `replay_correction_hints`, run with the node's hint replay every
   `hint_replay_interval_ms`, hands it to the owner as soon as it answers again (an owner
   out of the ring: to the study's current owners) and then forgets it. With no stand-in
   left, this node keeps the hint itself (never counted toward W);
4. MODIFIED once W owners or stand-ins made it durable, and never before.

Anti-entropy carries corrections too (their listing entry is in the segment digests:
("", "^" + the correction's JSON)), so an owner that missed one gets it from the others.

Async; reaches peers and the local store only through the injected transport and store.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from itertools import islice
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Protocol, Sequence

from pacsnode.replication.archive import IncompleteAnswer
from pacsnode.replication.correction import Correction, InvalidCorrection, check_changes
from pacsnode.replication.hlc import HybridClock
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import Attributes, StoreError
from pacsnode.replication.transport import PeerError
from pacsnode.ring.members import MembershipView
from pacsnode.ring.placement import Replication
from pacsnode.ring.tokens import study_token

log = logging.getLogger(__name__)

# Correction hints handed to one owner per replay pass (the rest wait for the next pass).
CORRECTION_HINTS_PER_PASS = 256


class ModifyStatus(enum.Enum):
    """How a modify (or a patient merge) ended."""

    MODIFIED = "modified"  # Durable on W owners (or stand-ins for them).
    NOT_FOUND = "not-found"  # R owners answered and none holds the study (no study of that PatientID).
    INCOMPLETE = "incomplete"  # Durable on W, but not every owner (or study) could be asked: run it again.
    QUORUM_FAILED = "quorum-failed"  # Fewer than W durable: a retry may work.
    INVALID = "invalid"  # An attribute that may not be changed, or a bad value: nothing sent.
    NOT_JOINED = "not-joined"  # This node is still joining its cluster.


_SEVERITY = {ModifyStatus.MODIFIED: 0, ModifyStatus.NOT_FOUND: 1, ModifyStatus.INCOMPLETE: 2,
             ModifyStatus.QUORUM_FAILED: 3, ModifyStatus.INVALID: 4, ModifyStatus.NOT_JOINED: 5}


@dataclass(frozen=True)
class ModifyResult:
    status: ModifyStatus
    studies: int = 0  # Studies the correction was made durable for.
    acked: int = 0  # Owners (or stand-ins) that made it durable (the fewest over the studies).
    message: str = ""  # No PHI: never a value, at most attribute names.
    attributes: tuple[str, ...] = ()  # The names of the attributes changed (for the log and audit).


class CorrectionStore(Protocol):
    def put_correction(self, correction: Correction, *, hint_for: str = "") -> bool: ...
    def correction_hint_owners(self) -> list[str]: ...
    def correction_hints(self, owner: str) -> Iterable[Correction]: ...
    def delete_correction_hints(self, owner: str, corrections: Sequence[Correction]) -> None: ...


class CorrectionTransport(Protocol):
    async def correct(self, target: str, correction: Correction, *, timeout_ms: int, hint_for: str = "") -> bool:
        """Merge `correction` on `target` (with `hint_for`: keep it there as a hint for that
        owner); True if it changed anything there. Raises PeerError when it did not make it
        durable."""
        ...


Finder = Callable[[Query], AsyncIterator[Attributes]]


class ModifyCoordinator:
    def __init__(self, self_id: str, membership: MembershipView, transport: CorrectionTransport,
                 local: CorrectionStore, hlc: HybridClock, find: Finder, *, replication_factor: Replication,
                 write_quorum: int, replica_timeout_ms: int = 2_000,
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
        self._run_blocking = run_blocking
        self.modifies = 0
        self.modifies_failed = 0
        self.stand_in_copies = 0
        self.correction_hints_replayed = 0

    def _joined(self) -> bool:
        joined = getattr(self._membership, "joined", True)
        return bool(joined() if callable(joined) else joined)

    async def modify(self, study_instance_uid: str, changes: Mapping[str, str]) -> ModifyResult:
        """Correct one study (see the module docstring)."""
        try:
            checked = check_changes(changes)
        except InvalidCorrection as error:
            return ModifyResult(ModifyStatus.INVALID, message=str(error))
        if not self._joined():
            return ModifyResult(ModifyStatus.NOT_JOINED, message="node is still joining its cluster; retry")
        self.modifies += 1
        query = Query("STUDY", (Condition("StudyInstanceUID", "UI", study_instance_uid),), ())
        rows: list[Attributes] = []
        incomplete = False
        try:
            async for row in self._find(query):
                rows.append(row)
        except IncompleteAnswer:
            incomplete = True
        if not rows and not incomplete:
            return ModifyResult(ModifyStatus.NOT_FOUND, message="no such study on its owners",
                                attributes=tuple(sorted(checked)))
        for row in rows:
            held = row.get("_correction")
            if isinstance(held, str) and held:
                try:
                    self.hlc.observe(Correction.loads(held).version)  # Ours is then the newer change.
                except (ValueError, KeyError):
                    pass
        correction = Correction.of(study_instance_uid, checked, self.hlc.now())
        ring = self._membership.ring()
        n = ring.effective(self._n)  # The placement policy (per-site copies included), as writes use it.
        w = min(self._w, ring.effective_replicas(self._n))
        token = study_token(study_instance_uid)
        owners = ring.preference_list(token, n)
        used: set[str] = set()
        results = await asyncio.gather(*(self._replicate(owner, owners, correction, token, n, used)
                                         for owner in owners))
        acked = sum(1 for ok in results if ok)
        names = tuple(sorted(checked))
        log.info("replication.modify attributes=%s owners=%d acked=%d write_quorum=%d version=%s",
                 ",".join(names), len(owners), acked, w, correction.version.mark())
        if acked < w:
            self.modifies_failed += 1
            return ModifyResult(ModifyStatus.QUORUM_FAILED, 0, acked,
                                f"correction durable on {acked} of {w} required replicas", names)
        if incomplete:
            return ModifyResult(ModifyStatus.INCOMPLETE, 1, acked,
                                "some owners could not be asked for the study; run the modify again", names)
        return ModifyResult(ModifyStatus.MODIFIED, 1, acked, "", names)

    async def merge_patient(self, from_patient_id: str, to_patient_id: str,
                            changes: Mapping[str, str]) -> ModifyResult:
        """Every study of `from_patient_id` corrected to `to_patient_id` (plus `changes`,
        e.g. the surviving patient's name). The studies are found with a scatter C-FIND over
        the archive (an operator's rare request)."""
        wanted = dict(changes)
        wanted["PatientID"] = to_patient_id
        try:
            check_changes(wanted)
        except InvalidCorrection as error:
            return ModifyResult(ModifyStatus.INVALID, message=str(error))
        if not from_patient_id or "*" in from_patient_id or "?" in from_patient_id or "\\" in from_patient_id:
            return ModifyResult(ModifyStatus.INVALID, message="--from must be one PatientID, no wildcards")
        if not self._joined():
            return ModifyResult(ModifyStatus.NOT_JOINED, message="node is still joining its cluster; retry")
        studies: dict[str, None] = {}
        incomplete = False
        try:
            async for row in self._find(Query("STUDY", (Condition("PatientID", "LO", from_patient_id),), ())):
                uid = str(row.get("StudyInstanceUID", ""))
                if uid and str(row.get("PatientID", "")) == from_patient_id:
                    studies[uid] = None
        except IncompleteAnswer:
            incomplete = True
        if not studies:
            status = ModifyStatus.INCOMPLETE if incomplete else ModifyStatus.NOT_FOUND
            return ModifyResult(status, message="no study of that PatientID" + (" in the part of the archive "
                                "that answered" if incomplete else ""), attributes=tuple(sorted(wanted)))
        results = [await self.modify(uid, wanted) for uid in studies]
        # A study the listing named that its own owners then answer NOT_FOUND for is gone
        # (deleted meanwhile, or listed by a copy that had not heard of its delete): there
        # is nothing left of it to correct, so it does not make the merge's answer. The
        # merge is NOT_FOUND only when every study it listed is gone.
        found = [r for r in results if r.status is not ModifyStatus.NOT_FOUND]
        gone = len(results) - len(found)
        if not found:
            return ModifyResult(ModifyStatus.NOT_FOUND, message="no study of that PatientID on its owners",
                                attributes=tuple(sorted(wanted)))
        worst = max(found, key=lambda r: _SEVERITY[r.status])
        done = sum(r.studies for r in found if r.status in (ModifyStatus.MODIFIED, ModifyStatus.INCOMPLETE))
        status = worst.status
        message = worst.message
        if status is ModifyStatus.MODIFIED and incomplete:
            status, message = ModifyStatus.INCOMPLETE, "part of the archive could not be asked for the patient's studies"
        if gone:
            note = f"{gone} of {len(results)} studies listed were no longer found on their owners"
            message = f"{message}; {note}" if message else note
        return ModifyResult(status, done, min(r.acked for r in found), message, tuple(sorted(wanted)))

    async def _send(self, node_id: str, correction: Correction, hint_for: str = "") -> None:
        if node_id == self.self_id:
            try:
                await self._run_blocking(lambda: self._local.put_correction(correction, hint_for=hint_for))
            except StoreError as error:
                raise PeerError(f"local store failed: {error}") from error
        else:
            await self._transport.correct(node_id, correction, timeout_ms=self._timeout_ms, hint_for=hint_for)

    async def send_correction(self, correction: Correction, owners: Sequence[str]) -> int:
        """Read repair: `correction` merged on each of `owners` (a read saw them answer
        without it). No stand-ins and no hints: an owner that cannot be reached now gets it
        from anti-entropy, as before. How many made it durable."""
        sent = 0
        for owner in owners:
            try:
                await self._send(owner, correction)
            except PeerError as error:
                log.info("replication.modify.read_repair_failed owner=%s error=%s", owner, error)
                continue
            sent += 1
        return sent

    async def replay_correction_hints(self) -> int:
        """One pass: hand the corrections held as hints to their owners that answer again (an
        owner out of the ring: to the study's current owners, all of them); forget each once
        made durable there, unless a newer change was merged into it meanwhile. How many."""
        handed = 0
        owners = await self._run_blocking(self._local.correction_hint_owners)
        if not owners:
            return 0
        ring = self._membership.ring()
        n = ring.effective(self._n)
        for owner in owners:
            if owner in ring and not self._membership.is_alive(owner):
                continue
            held: list[Correction] = await self._run_blocking(
                lambda o=owner: list(islice(self._local.correction_hints(o), CORRECTION_HINTS_PER_PASS)))
            done: list[Correction] = []
            for correction in held:
                targets = [owner] if owner in ring else ring.owners_of_study(correction.study_instance_uid, n)
                try:
                    for target in targets:
                        if target != self.self_id and not self._membership.is_alive(target):
                            raise PeerError(f"{target} is down")
                        await self._send(target, correction)
                except PeerError as error:
                    log.info("replication.modify.hint_replay_failed owner=%s error=%s", owner, error)
                    break
                done.append(correction)
            if done:
                await self._run_blocking(self._local.delete_correction_hints, owner, done)
                handed += len(done)
                self.correction_hints_replayed += len(done)
                log.info("replication.modify.hints_replayed owner=%s corrections=%d", owner, len(done))
        return handed

    async def _replicate(self, owner: str, owners: Sequence[str], correction: Correction, token: int, n: Replication,
                         used: set[str]) -> bool:
        """The correction on `owner`, or else as a hint for it on the next stand-in."""
        if owner == self.self_id or self._membership.is_alive(owner):
            try:
                await self._send(owner, correction)
                return True
            except PeerError as error:
                log.info("replication.modify.owner_failed owner=%s error=%s", owner, error)
        ring = self._membership.ring()
        while True:
            stand_in = next((s.node_id for s in ring.stand_ins(token, n, {owner} | used) if s.owner == owner), None)
            if stand_in is None:
                # As a write's copy: kept here as a hint for the owner (replayed as soon as it
                # answers), never counted toward W (this node is not a distinct replica).
                if owner != self.self_id:
                    try:
                        await self._send(self.self_id, correction, owner)
                        log.info("replication.modify.hint_kept_here owner=%s", owner)
                    except PeerError as error:
                        log.warning("replication.modify.hint_keep_failed owner=%s error=%s", owner, error)
                return False
            used.add(stand_in)
            if stand_in in owners or (stand_in != self.self_id and not self._membership.is_alive(stand_in)):
                continue
            try:
                await self._send(stand_in, correction, owner)
            except PeerError as error:
                log.info("replication.modify.stand_in_failed owner=%s holder=%s error=%s", owner, stand_in, error)
                continue
            self.stand_in_copies += 1
            log.info("replication.modify.stand_in owner=%s holder=%s", owner, stand_in)
            return True
