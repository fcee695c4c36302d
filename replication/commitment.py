"""Storage Commitment inside the cluster (PS3.4 Annex J): is each referenced instance
durable on every one of its study's N owners?

A modality deletes its own copy once the archive commits, so "committed" here is the
strongest thing the archive can say: every owner in the study's preference list (all N,
not the W a C-STORE waited for) answered that it holds the instance in its own store. A
copy a stand-in keeps as a hint does not count; neither does an owner that is down.

An N-ACTION names instances, not studies, and the ring places studies. So each
instance's study is found first: from the `known` map the caller passes (the studies of
instances recently stored through this node), else by one scatter query over the
cluster for all the unresolved instances at once (an IMAGE query on SOPInstanceUID, one
live owner per token range, like a C-FIND with no study key; its cost grows with the
archive). Then, for each study, each owner is asked once, for all the study's referenced
instances (`StudyInstanceUID` + a `SOPInstanceUID` list, its own rows only, no hints).

Outcomes per instance:

- committed: every owner holds it (with the SOP Class the request names);
- NO_SUCH_INSTANCE: a complete scatter found it nowhere, neither on an owner nor as a hint;
- CLASS_CONFLICT: it is stored with another SOP Class UID than the request names;
- NOT_ON_ALL_OWNERS: still short of N copies (or an owner could not be asked) when the
  timeout ended. Until then the check is repeated every `recheck_s`, while hint replay,
  read repair and anti-entropy bring the missing copies.

The first three are final at once; only missing copies are waited for. Every call to a
peer is bounded by the read path's deadlines, at most `parallel_calls` run at a time, and
cancelling the task that runs `check` cancels them all.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Mapping, Sequence

from pacsnode.replication.archive import IncompleteAnswer
from pacsnode.replication.gather import ReadContext, pump_rows
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import Attributes
from pacsnode.replication.planning import study_range

log = logging.getLogger(__name__)


class FailureReason(enum.Enum):
    """Why an instance is in the Failed SOP Sequence (the front end maps it to PS3.4 J.3.3.1.1)."""

    NO_SUCH_INSTANCE = "no-such-instance"  # 0x0112 No such object instance.
    CLASS_CONFLICT = "class-instance-conflict"  # 0x0119 Class / Instance conflict.
    NOT_ON_ALL_OWNERS = "not-on-all-owners"  # 0x0110 Processing failure: fewer than N copies in time.


@dataclass(frozen=True)
class Reference:
    """One item of the Referenced SOP Sequence."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class CommitResult:
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, FailureReason], ...]
    rounds: int = 0  # Checks made (1 when everything was decided at once).


@dataclass(frozen=True)
class CommitSettings:
    timeout_s: float = 600.0  # storage_commitment_timeout_s
    recheck_s: float = 2.0  # Between two checks of the instances still short of N copies.
    uids_per_query: int = 500  # SOP Instance UIDs in one query (one UID-list condition).
    parallel_calls: int = 8  # Peer queries of one commitment running at once.


Scatter = Callable[[Query], AsyncIterator[Attributes]]


class CommitmentCheck:
    """One Storage Commitment request: `await check(references)` decides every instance.

    `context()` gives the coordinator's current read context (ring, N, liveness, the
    local replica and the transport); `scatter(query)` is the coordinator's cluster find
    (raises IncompleteAnswer after its rows when part of the archive could not be asked).
    """

    def __init__(self, context: Callable[[], ReadContext], scatter: Scatter, settings: CommitSettings) -> None:
        self._context = context
        self._scatter = scatter
        self._settings = settings

    async def check(self, references: Sequence[Reference], known: Mapping[str, str] | None = None) -> CommitResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.timeout_s
        wanted: dict[str, Reference] = {}
        for reference in references:
            wanted.setdefault(reference.sop_instance_uid, reference)
        study_of = {sop: study for sop, study in (known or {}).items() if sop in wanted and study}
        final: dict[str, FailureReason] = {}
        committed: set[str] = set()
        rounds = 0
        while True:
            rounds += 1
            open_uids = [sop for sop in wanted if sop not in committed and sop not in final]
            unresolved = [sop for sop in open_uids if sop not in study_of]
            if unresolved:
                found, complete = await self._resolve(unresolved)
                study_of.update(found)
                for sop in unresolved:
                    if sop in found:
                        continue
                    if complete:
                        final[sop] = FailureReason.NO_SUCH_INSTANCE
            by_study: dict[str, list[str]] = {}
            for sop in open_uids:
                if sop in study_of and sop not in final:
                    by_study.setdefault(study_of[sop], []).append(sop)
            if by_study:
                holders = await self._holders(by_study)
                context = self._context()
                for study_uid, sops in by_study.items():
                    owners = context.ring.owners_of_study(study_uid, context.n)
                    for sop in sops:
                        classes = holders.get(sop, {})
                        if any(cls and cls != wanted[sop].sop_class_uid for cls in classes.values()):
                            final[sop] = FailureReason.CLASS_CONFLICT
                        elif owners and all(owner in classes for owner in owners):
                            committed.add(sop)
            if len(committed) + len(final) == len(wanted) or loop.time() >= deadline:
                break
            await asyncio.sleep(max(0.0, min(self._settings.recheck_s, deadline - loop.time())))
        failed = [(wanted[sop], final.get(sop, FailureReason.NOT_ON_ALL_OWNERS if sop in study_of
                                          else FailureReason.NO_SUCH_INSTANCE))
                  for sop in wanted if sop not in committed]
        return CommitResult(committed=tuple(wanted[sop] for sop in wanted if sop in committed),
                            failed=tuple(failed), rounds=rounds)

    # ------------------------------------------------------------------ studies
    async def _resolve(self, sop_uids: list[str]) -> tuple[dict[str, str], bool]:
        """The study of each instance any node holds (as owner or hint holder), and whether
        the scatter reached the whole ring (only then is "not found" final)."""
        found: dict[str, str] = {}
        complete = True
        for chunk in _chunks(sop_uids, self._settings.uids_per_query):
            query = Query("IMAGE", (Condition("SOPInstanceUID", "UI", "\\".join(chunk)),),
                          ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"))
            rows = self._scatter(query)
            try:
                async for row in rows:
                    sop, study = str(row.get("SOPInstanceUID", "")), str(row.get("StudyInstanceUID", ""))
                    if sop and study:
                        found.setdefault(sop, study)
            except IncompleteAnswer as error:
                complete = False
                log.info("commitment.resolve.incomplete instances=%d unreachable_ranges=%d unreachable_studies=%d",
                         len(chunk), error.shortfall.ranges, error.shortfall.studies)
            finally:
                close = getattr(rows, "aclose", None)
                if close is not None:
                    await close()
        return found, complete

    # ------------------------------------------------------------------ owners
    async def _holders(self, by_study: dict[str, list[str]]) -> dict[str, dict[str, str]]:
        """sop uid -> {owner: SOP Class UID it holds it with}, for every owner that answered
        and holds it in its own store. An owner that is down or fails is left out."""
        context = self._context()
        limit = asyncio.Semaphore(self._settings.parallel_calls)
        holders: dict[str, dict[str, str]] = {}

        async def ask(owner: str, study_uid: str, chunk: list[str]) -> None:
            async with limit:
                rows = await _own_rows(context, owner, study_uid, chunk)
            if rows is None:
                return
            for row in rows:
                sop = str(row.get("SOPInstanceUID", ""))
                if sop in chunk:
                    holders.setdefault(sop, {})[owner] = str(row.get("SOPClassUID", ""))

        calls = []
        for study_uid, sops in by_study.items():
            for owner in context.ring.owners_of_study(study_uid, context.n):
                if owner != context.self_id and not context.is_alive(owner):
                    continue
                for chunk in _chunks(sops, self._settings.uids_per_query):
                    calls.append(ask(owner, study_uid, chunk))
        await asyncio.gather(*calls)
        return holders


async def _own_rows(context: ReadContext, node_id: str, study_uid: str, sop_uids: list[str]) -> list[Attributes] | None:
    """The rows `node_id` holds in its own store (not as hints) for these instances of the
    study; None when it could not be asked (down, silent, broke off)."""
    query = Query("IMAGE", (Condition("StudyInstanceUID", "UI", study_uid),
                            Condition("SOPInstanceUID", "UI", "\\".join(sop_uids))),
                  ("SOPInstanceUID", "SOPClassUID"))
    queue: asyncio.Queue[tuple[int, list[Attributes] | None, str | None]] = asyncio.Queue()
    await pump_rows(context, queue, 0, node_id, query, [study_range(study_uid)], False)
    rows: list[Attributes] = []
    while not queue.empty():
        _key, batch, error = queue.get_nowait()
        if error is not None:
            log.info("commitment.owner.unanswered node=%s error=%s", node_id, error[:200])
            return None
        rows.extend(batch or [])
    return rows


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i:i + size]) for i in range(0, len(items), max(1, size))]


class RecentStudies:
    """SOP Instance UID -> StudyInstanceUID of the last `capacity` instances stored through
    this node (thread-safe). A modality usually asks commitment of the node it just sent
    its instances to; with this map the check goes straight to the studies' owners
    instead of scattering over the ring to find them."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._studies: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, sop_instance_uid: str, study_instance_uid: str) -> None:
        with self._lock:
            self._studies[sop_instance_uid] = study_instance_uid
            self._studies.move_to_end(sop_instance_uid)
            while len(self._studies) > self._capacity:
                self._studies.popitem(last=False)

    def lookup(self, sop_instance_uids: Sequence[str]) -> dict[str, str]:
        with self._lock:
            return {sop: self._studies[sop] for sop in sop_instance_uids if sop in self._studies}

    def __len__(self) -> int:
        return len(self._studies)
