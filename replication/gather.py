"""One cluster read fan-out: ask one live owner per piece, merge, re-plan, account.

A piece is a token range (a query with no study key scatters over every range) or one
study (a query that names studies asks only their owners). Each piece is asked of its
nearest live owner; when that owner fails or stays silent, the piece moves to its next
owner. A piece none of whose owners answered is *unreachable*: it is counted in the
`Shortfall` that ends the answer (`IncompleteAnswer`, raised after the last row), and its
stand-ins (the nodes that hold hints for its owners) are asked for the copies they hold,
so that a study acknowledged while all its owners were down is still found. Rows from
hint holders are held back until every owner has answered and only added where no owner
gave the same row (an owner's row is the more complete one).

Every peer call is bounded (replica_start_timeout_ms to begin answering, query_timeout_ms
in all) and every task is cancelled when the consumer stops iterating.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, Sequence, TypeVar

from pacsnode.replication.archive import IncompleteAnswer, Shortfall
from pacsnode.replication.correction import CORRECTABLE, Correction, newest_correction, with_correction
from pacsnode.replication.matching import LEVELS, Condition, Query, match_all
from pacsnode.replication.model import Attributes
from pacsnode.replication.planning import Piece, RangeSet, narrow_to_studies, next_reader, read_order, study_pieces
from pacsnode.replication.query import COUNT_ONLY, level_of, unique_key
from pacsnode.replication.transport import LocalReplica, Transport, cancelled_by_caller
from pacsnode.ring.placement import Replication, Ring, TokenRange
from pacsnode.ring.tokens import study_token

log = logging.getLogger(__name__)

T = TypeVar("T")
BATCH_ROWS = 200
HELD_ROWS_MAX = 50_000  # Rows from hint holders kept back at most; past that they go out at once.

Answering = Callable[[str, Callable[[Callable[[], None]], Awaitable[Any]]], Awaitable[Any]]


@dataclass(frozen=True)
class ReadContext:
    """What a fan-out needs of its node, injected by the coordinator."""

    self_id: str
    ring: Ring
    n: Replication
    is_alive: Callable[[str], bool]
    site_of: Callable[[str], str]
    pending: RangeSet  # Ranges this node is still filling: asked of another owner.
    local: LocalReplica
    transport: Transport
    run_blocking: Callable[..., Awaitable[Any]]
    answering: Answering
    query_timeout_ms: int
    count: Callable[[str], None]  # Statistics: count("query_peers") per remote query started.
    slow: Callable[[str], bool] = lambda node_id: False  # Just failed to answer: asked last.
    # Sloppy writes only: membership changed within read_fault_window_ms, so owners that look
    # alive may still lack what was acknowledged through hints; named reads ask stand-ins too.
    troubled: bool = False
    # Local reads (issue 15): a request that names a study counts R among the owners in
    # this node's site (capped at their number) and asks hint holders of those owners only,
    # unless one of them is unavailable; owners elsewhere are asked only for what this
    # site's owners cannot answer.
    local_reads: bool = False
    # Hints counted toward W (write_quorum_mode sloppy). False (strict, the default): every
    # acknowledged instance is durable on W owners, so R owners that answered hold it, and
    # the stand-ins are asked only for a study that could not get R owners to answer.
    sloppy_writes: bool = False


@dataclass
class _Call:
    node_id: str
    pieces: list[int]
    hints: bool  # Asked as a hint holder (rows held back, failures change nothing).


class Gather:
    """The fan-out of a query with no study key: `read_quorum` (R) live owners per token
    range. Iterate `rows()`: each matching row once; IncompleteAnswer after the last when
    some range (or, R > 1, some study rechecked) could not get R owners to answer.

    R = 1: each range is asked of its nearest live owner and rows stream out as they come.
    R > 1 (`scatter_read_quorum`): each range is asked of its R nearest live owners at
    once; a row goes out as soon as R owners gave the same row. What is left at the end
    (a study one owner listed and another did not, or whose rows differ: an owner missed
    writes, a delete or a correction) is read again as a request naming those studies
    (`RoutedGather` over the same owners), which copies what one owner has to the others
    (read repair) and answers with counts of the merged set. A range with fewer than R
    owners answering is flagged, as a named study is."""

    def __init__(self, context: ReadContext, query: Query, pieces: Sequence[Piece], *, routed: bool,
                 read_quorum: int = 1, reconcile: "Reconcile | None" = None,
                 repair_correction: Callable[[Correction, list[str]], None] | None = None) -> None:
        self._context = context
        self._repair_correction = repair_correction  # Handed to the recheck (read repair of corrections).
        self._query = query
        self._pieces = list(pieces)
        self._routed = routed  # Pieces are studies: narrow each call's study key to its own.
        self._needed = [max(1, min(read_quorum, quorum_owners(context, p))) for p in self._pieces]
        if any(needed > 1 for needed in self._needed) and reconcile is None:
            raise ValueError("a scatter with read_quorum > 1 needs reconcile (it rechecks studies that differ)")
        self._read_quorum = read_quorum
        self._reconcile = reconcile
        self._asked: list[set[str]] = [set() for _ in self._pieces]
        self._answered: list[set[str]] = [set() for _ in self._pieces]
        self._failed: list[set[str]] = [set() for _ in self._pieces]
        self._excluded: list[set[str]] = [set() for _ in self._pieces]
        self._unreachable: set[int] = set()
        self._ends = sorted((p.token_range.end, i) for i, p in enumerate(self._pieces))
        self._queue: asyncio.Queue[tuple[int, list[Attributes] | None, str | None]] = asyncio.Queue(maxsize=8)
        self._calls: dict[int, _Call] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._serial = itertools.count()
        self._recheck_shortfall = Shortfall()
        self.peers_asked: set[str] = set()

    # ----------------------------------------------------------------- planning
    def _excluded_at_start(self, index: int) -> set[str]:
        piece = self._pieces[index]
        pending = self._context.pending
        if pending and piece.token_range.end in pending:
            return {self._context.self_id}  # Still filling it here: ask another owner.
        return set()

    def _assign(self, indexes: Sequence[int]) -> dict[str, list[int]]:
        """Owners to ask next, so that each piece has R answered or in flight; the pieces
        that cannot get there become unreachable."""
        context = self._context
        plan: dict[str, list[int]] = {}
        lost: list[int] = []
        # next_reader's read order, by owner list: a scatter has a piece per token range and
        # the ranges share few owner lists, and nothing it depends on (liveness, sites,
        # slowness) changes while this runs (no await).
        orders: dict[tuple[str, ...], list[str]] = {}
        for index in indexes:
            asked, answered, failed = self._asked[index], self._answered[index], self._failed[index]
            in_flight = len(asked - answered - failed)
            wanted = self._needed[index] - len(answered) - in_flight
            excluded = asked | self._excluded[index]
            if wanted > 0:
                owners = self._pieces[index].owners
                order = orders.get(owners)
                if order is None:
                    order = orders[owners] = read_order(owners, context.self_id, context.is_alive,
                                                        context.site_of, context.slow)
                while wanted > 0:
                    chosen = next_reader(order, excluded, context.is_alive)
                    if chosen is None:
                        break
                    excluded.add(chosen)
                    asked.add(chosen)
                    plan.setdefault(chosen, []).append(index)
                    wanted -= 1
            if wanted > 0 and index not in self._unreachable:
                lost.append(index)
        if lost:
            self._lose(lost)
        return plan

    def _lose(self, indexes: list[int]) -> None:
        """No owner of these pieces answers: count them, and ask their stand-ins for hints."""
        context = self._context
        self._unreachable.update(indexes)
        kind = "studies" if self._routed else "ranges"
        log.warning("replication.find.unreachable %s=%d of=%d", kind, len(indexes), len(self._pieces))
        holders: dict[str, list[int]] = {}
        for index in indexes:
            piece = self._pieces[index]
            for stand_in in context.ring.stand_ins(piece.token_range.end, context.n, set(piece.owners)):
                if stand_in.node_id == context.self_id or context.is_alive(stand_in.node_id):
                    holders.setdefault(stand_in.node_id, []).append(index)
            # This node may keep hints itself (when no stand-in could take a write).
            if context.self_id not in piece.owners:
                holders.setdefault(context.self_id, []).append(index)
        for node_id, pieces in holders.items():
            self._launch(node_id, sorted(set(pieces)), hints=True)

    def _launch(self, node_id: str, pieces: list[int], *, hints: bool) -> None:
        key = next(self._serial)
        self._calls[key] = _Call(node_id, pieces, hints)
        query = self._query
        if self._routed:
            query = narrow_to_studies(query, [self._pieces[i].study_instance_uid for i in pieces])
        ranges = [self._pieces[i].token_range for i in pieces]
        if node_id != self._context.self_id:
            self.peers_asked.add(node_id)
        self._tasks[key] = asyncio.ensure_future(
            pump_rows(self._context, self._queue, key, node_id, query, ranges, hints))

    def _piece_of(self, row: Attributes) -> int:
        """The piece (token range) that holds the row's study."""
        token = study_token(str(row.get("StudyInstanceUID", "")))
        at = bisect.bisect_left(self._ends, (token, -1))
        return self._ends[at % len(self._ends)][1]  # Past the last end: the range that wraps.

    # ----------------------------------------------------------------- answered here
    def rows_here(self, rows_max: int) -> list[Attributes] | None:
        """rows()'s whole answer read from this node's own store on the calling (blocking)
        thread, when that store is all rows() would ask: every range needs one owner (R = 1,
        or the range has one owner) and this node, an owner of each that is not still
        filling it, is the one rows() asks (read_order puts this node first; it is never
        `slow`). None, having asked nothing, when a peer or a hint holder would be asked,
        when the store fails (rows() then asks it again and re-plans as it does), or when
        the answer has more than `rows_max` rows (rows() streams it): use rows()."""
        context = self._context
        if not self._pieces or not context.is_alive(context.self_id):
            return None
        for index, piece in enumerate(self._pieces):
            if self._needed[index] != 1 or context.self_id not in piece.owners or self._excluded_at_start(index):
                return None
        query = self._query
        if self._routed:
            query = narrow_to_studies(query, [piece.study_instance_uid for piece in self._pieces])
        found = _read_here(context, query, [piece.token_range for piece in self._pieces], rows_max)
        return None if found is None else _first_of_each(self._query.level, found)

    @staticmethod
    def rows_of_one(context: ReadContext, query: Query, rows_max: int) -> list[Attributes] | None:
        """rows_here() of a scatter over a ring of one (this node the only owner of every
        range), without planning the ring's ranges (~60 pieces a query) or filtering the
        rows by them: the ranges cover every token. None while this node still fills a
        range, when the store fails or past `rows_max` rows."""
        if context.pending or not context.is_alive(context.self_id):
            return None
        if list(context.ring.node_ids) != [context.self_id]:
            raise ValueError("rows_of_one needs a ring of this node alone")
        found = _read_here(context, query, None, rows_max)
        return None if found is None else _first_of_each(query.level, found)

    # ----------------------------------------------------------------- the answer
    async def rows(self) -> AsyncIterator[Attributes]:
        level = "STUDY" if self._query.level == "PATIENT" else self._query.level
        seen: set[tuple[str, ...]] = set()
        held: list[Attributes] = []
        # R > 1: rows not yet given alike by R owners: identity -> (row, owners that gave it, differs).
        waiting: dict[tuple[str, ...], _Waiting] = {}
        starts = list(range(len(self._pieces)))
        for index in starts:
            self._excluded[index].update(self._excluded_at_start(index))
        for node_id, pieces in self._assign(starts).items():
            self._launch(node_id, pieces, hints=False)
        shortfall = Shortfall()
        try:
            while any(not task.done() for task in self._tasks.values()) or not self._queue.empty():
                key, batch, error = await self._queue.get()
                call = self._calls[key]
                if batch is not None:
                    if call.hints and len(held) < HELD_ROWS_MAX:
                        held.extend(batch)
                        continue
                    for row in batch:
                        identity = _identity(level, row)
                        if identity in seen:
                            continue
                        if call.hints:
                            seen.add(identity)
                            yield row
                            continue
                        index = self._piece_of(row)
                        entry = waiting.get(identity)
                        if entry is None:
                            entry = waiting[identity] = _Waiting(row, index)
                        elif row != entry.row:
                            entry.differs = True
                        entry.owners.add(call.node_id)
                        if not entry.differs and len(entry.owners) >= self._needed[index]:
                            del waiting[identity]
                            seen.add(identity)
                            yield row
                    continue
                if call.hints:
                    if error is not None:
                        log.info("replication.find.hint_holder_failed node=%s error=%s", call.node_id, error)
                    continue
                if error is None:
                    for index in call.pieces:
                        self._answered[index].add(call.node_id)
                    continue
                log.warning("replication.find.replica_failed node=%s pieces=%d error=%s",
                            call.node_id, len(call.pieces), error)
                self._context.count("query_replans")
                for index in call.pieces:
                    self._failed[index].add(call.node_id)
                for node_id, pieces in self._assign(call.pieces).items():
                    self._launch(node_id, pieces, hints=False)
            # What R owners did not give alike. A range that could not get R owners is
            # flagged anyway: its rows go out as they are. Elsewhere an owner that answered
            # lacks the study or holds it otherwise: read it again by its study key.
            recheck: dict[str, list[_Waiting]] = {}
            for identity, entry in waiting.items():
                if identity[-1:] == ("count-only",) and identity[:-1] in seen:
                    # PATIENT level: the study's own row went out (R owners agreed), and it
                    # counts the study; this one came from an owner whose call also held a
                    # matching study of the patient (calls group ranges differently).
                    continue
                if entry.index in self._unreachable:
                    seen.add(identity)
                    yield entry.row
                else:
                    recheck.setdefault(str(entry.row.get("StudyInstanceUID", "")), []).append(entry)
            if recheck:
                async for row in self._recheck(recheck, seen, level):
                    yield row
                shortfall = self._recheck_shortfall
            for row in held:
                identity = _identity(level, row)
                if identity not in seen:
                    seen.add(identity)
                    yield row
        finally:
            for task in self._tasks.values():
                task.cancel()
        if self._unreachable or shortfall:
            if self._routed:
                raise IncompleteAnswer(Shortfall(studies=len(self._unreachable)) + shortfall)
            raise IncompleteAnswer(Shortfall(ranges=len(self._unreachable)) + shortfall)

    async def _recheck(self, entries: dict[str, list["_Waiting"]], seen: set[tuple[str, ...]],
                       level: str) -> AsyncIterator[Attributes]:
        """The studies R owners answered differently, asked again by their study key (R
        owners each, reconciled): their rows, and for a study that no longer matches there,
        only the rows that were there to be counted (PATIENT level)."""
        context, reconcile = self._context, self._reconcile
        if reconcile is None:  # __init__ refuses R > 1 without it: a bug if we get here.
            raise RuntimeError("a scatter recheck needs reconcile")
        uids = sorted(entries)
        context.count("scatter_rechecks")
        for _ in uids:
            context.count("scatter_rechecked_studies")
        log.info("replication.find.scatter_recheck studies=%d", len(uids))
        query = self._query
        if query.level == "PATIENT":
            # Read again at STUDY level, where the study key is matched (a PATIENT-level row
            # is its study's row, folded into the patient's by the caller): the owners then
            # look the studies up by key, not through an index of the query's other keys.
            query = dataclasses.replace(query, level="STUDY")
        query = dataclasses.replace(query, conditions=query.conditions + (
            Condition("StudyInstanceUID", "UI", "\\".join(uids)),))
        routed = RoutedGather(context, query, study_pieces(context.ring, context.n, uids),
                              read_quorum=self._read_quorum, reconcile=reconcile,
                              repair_correction=self._repair_correction)
        answered: set[str] = set()
        try:
            async for row in routed.rows():
                answered.add(str(row.get("StudyInstanceUID", "")))
                identity = _identity(level, row)
                if identity not in seen:
                    seen.add(identity)
                    yield row
        except IncompleteAnswer as error:
            self._recheck_shortfall = error.shortfall
        # Studies the query no longer matches when read by their key: what an owner gave of
        # them only to be counted (PATIENT level, NumberOfPatientRelated*). Those rows are
        # one owner's, which may have missed a delete of the whole study or of some of its
        # instances: read each such study again at STUDY level by its key alone (R owners,
        # reconciled, counts from an owner holding the tombstones) and count that row. A
        # study no owner lists any more was deleted: not counted.
        uncounted = {uid: [entry for entry in waiting if entry.row.get(COUNT_ONLY) == "1"]
                     for uid, waiting in entries.items() if uid not in answered}
        uncounted = {uid: waiting for uid, waiting in uncounted.items() if waiting}
        if not uncounted:
            return
        recount = RoutedGather(
            context, Query("STUDY", (Condition("StudyInstanceUID", "UI", "\\".join(sorted(uncounted))),)),
            study_pieces(context.ring, context.n, sorted(uncounted)), read_quorum=self._read_quorum,
            reconcile=reconcile, repair_correction=self._repair_correction)
        counted: set[str] = set()
        try:
            async for row in recount.rows():
                uid = str(row.get("StudyInstanceUID", ""))
                if uid not in uncounted or uid in counted:
                    continue
                counted.add(uid)
                row = {**row, COUNT_ONLY: "1"}
                identity = _identity(level, row)
                if identity not in seen:
                    seen.add(identity)
                    yield row
        except IncompleteAnswer as error:
            # Flagged: the owners' rows as they gave them, for the studies not read again.
            self._recheck_shortfall = self._recheck_shortfall + error.shortfall
            for uid, waiting in uncounted.items():
                if uid in counted:
                    continue
                for entry in waiting:
                    identity = _identity(level, entry.row)
                    if identity not in seen:
                        seen.add(identity)
                        yield entry.row


@dataclass
class _Waiting:
    """A scatter row seen from fewer than R owners so far (or differently by some)."""

    row: Attributes
    index: int  # Its piece.
    owners: set[str] = field(default_factory=set)
    differs: bool = False


def _identity(level: str, row: Attributes) -> tuple[str, ...]:
    """A row's identity in a scatter: its unique key, and, for the study rows of a PATIENT
    query, whether it is there only to be counted (one owner may give both for a study)."""
    identity = unique_key(level, row)
    return identity + ("count-only",) if row.get(COUNT_ONLY) == "1" else identity


def quorum_owners(context: ReadContext, piece: Piece) -> int:
    """How many owners R is capped at: this site's (local reads, when it holds any), else all."""
    if context.local_reads:
        site = context.site_of(context.self_id)
        local = [o for o in piece.owners if context.site_of(o) == site]
        if local:
            return len(local)
    return len(piece.owners)


@dataclass
class _PieceState:
    needed: int  # Owners that must answer (read_quorum, capped by the owner count).
    tried: set[str]  # Owners asked (answered, failed or in flight).
    answered: list[str]  # Owners that answered, in order.
    failed: set[str]
    rows: dict[str, list[Attributes]]  # By node; stand-ins' hint rows under "hints:<node>".
    hint_holders_missed: int = 0  # Possible hint holders that were down or failed: the study is flagged.


class Reconcile(Protocol):
    """reconcile(study, owners that answered, hint holders that hold some of it) -> now agree.
    `deleted`, when given, receives the SOP Instance UIDs an owner answered DELETED for (it
    holds a newer tombstone: the copy another owner listed was deleted, not missed), and
    `missed_deletes` the owners in `nodes` that listed one of those (they missed the delete:
    their STUDY/SERIES counts still include it)."""

    async def __call__(self, study_uid: str, nodes: Sequence[str], hint_holders: Sequence[str] = (), *,
                      deleted: set[str] | None = None, missed_deletes: set[str] | None = None) -> bool: ...


class RoutedGather:
    """The fan-out of a request that names studies: `read_quorum` (R) owners per study.

    Each study is asked of its R nearest live owners at once (self first, then our site),
    the next owner replacing one that fails. When the answers differ (an owner missed
    writes: a partition, a pause, a restart), the owners that answered are reconciled
    before the answer goes out (Cassandra's blocking read repair): every instance one of
    them holds is copied to the others, then one of them is asked again, so the counts
    are those of the union. With strict writes (the default) and R + W > N every
    acknowledged instance is on one of the owners asked (on one ring: see docs/design.md
    for what a ring change leaves open). A study with fewer than R owners answering is counted as unreachable
    (the answer is flagged, never Success); the stand-ins of its down owners are asked for
    the hints they hold, and those rows are added where no owner gave the same row.
    Rows are held per study until its owners have answered (a named study is bounded).
    """

    def __init__(self, context: ReadContext, query: Query, pieces: Sequence[Piece], *, read_quorum: int,
                 reconcile: Reconcile, repair_correction: Callable[[Correction, list[str]], None] | None = None
                 ) -> None:
        self._context = context
        # Conditions on attributes a correction may change are matched here, on each row
        # with the study's newest correction over it, not by the owners: an owner that
        # missed a correction matches its old values (it would list the study under the old
        # PatientName and not under the new one), and the owner that holds the correction
        # then lists nothing, which tells nothing of the correction it holds. So the owners
        # are asked without them (a named study: its rows whatever their values), every
        # owner's correction is seen, and the merged rows are matched.
        # (A key below the query level, StudyDescription at SERIES level, matches nothing:
        # left to the owners, which say so. A PATIENT-level query names no study: the
        # owners need its keys to find the studies, so it is left as it is.)
        depth = LEVELS.index(query.level)
        self._corrected_conditions = tuple(
            c for c in query.conditions
            if c.keyword in CORRECTABLE and query.level != "PATIENT"
            and LEVELS.index(level_of(c.keyword) or query.level) <= depth)
        if self._corrected_conditions:
            query = dataclasses.replace(query, conditions=tuple(
                c for c in query.conditions if c not in self._corrected_conditions))
        self._query = query
        self._pieces = list(pieces)
        self._reconcile = reconcile
        # Called with a study's newest correction and the owners that answered without it
        # (read repair for corrections: Coordinator.repair_correction sends it, not waited for).
        self._repair_correction = repair_correction
        self._states = [_PieceState(needed=max(1, min(read_quorum, self._quorum_owners(p))), tried=set(),
                                    answered=[], failed=set(), rows={}) for p in self._pieces]
        self._by_study = {p.study_instance_uid: i for i, p in enumerate(self._pieces)}
        self._queue: asyncio.Queue[tuple[int, list[Attributes] | None, str | None]] = asyncio.Queue(maxsize=8)
        self._calls: dict[int, _Call] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._serial = itertools.count()
        self.peers_asked: set[str] = set()

    def _local_owners(self, piece: Piece) -> list[str]:
        """The piece's owners in this node's site when reads are local, else none."""
        context = self._context
        if not context.local_reads:
            return []
        site = context.site_of(context.self_id)
        return [o for o in piece.owners if context.site_of(o) == site]

    def _quorum_owners(self, piece: Piece) -> int:
        """How many owners R is capped at: this site's (local reads, when it holds any), else all."""
        return len(self._local_owners(piece)) or len(piece.owners)

    def _level(self) -> str:
        return "STUDY" if self._query.level == "PATIENT" else self._query.level

    # ----------------------------------------------------------------- planning
    def _readers(self, index: int) -> list[str]:
        """Owners to ask now for piece `index`, so that answered + in flight reaches R."""
        context, piece, state = self._context, self._pieces[index], self._states[index]
        in_flight = len(state.tried) - len(state.answered) - len(state.failed)
        wanted = state.needed - len(state.answered) - in_flight
        chosen: list[str] = []
        excluded = set(state.tried)
        if context.pending and piece.token_range.end in context.pending:
            excluded.add(context.self_id)  # Still filling it here: ask other owners.
        local = set(self._local_owners(piece))
        for node_id in read_order(piece.owners, context.self_id, context.is_alive, context.site_of, context.slow):
            if len(chosen) >= wanted:
                break
            if node_id not in excluded and context.is_alive(node_id):
                chosen.append(node_id)
                if local and node_id not in local:
                    context.count("reads_other_site")  # This site's owners could not answer for it.
        state.tried.update(chosen)
        return chosen

    def _launch_owners(self, indexes: Sequence[int]) -> None:
        plan: dict[str, list[int]] = {}
        for index in indexes:
            for node_id in self._readers(index):
                plan.setdefault(node_id, []).append(index)
        for node_id, pieces in plan.items():
            self._launch(node_id, pieces, hints=False)

    def _launch_hint_holders(self) -> None:
        """Ask the nodes that may hold hints for a study's owners, when it needs them.

        Strict writes (the default): an acknowledged instance is durable on W owners, so
        when R owners answered (R + W > N) the answer is complete and no stand-in is asked.
        Only a study that could not get R owners to answer (flagged anyway) asks them, for
        the rows they can add; so does, with local reads, a study one of whose owners in
        this site is unavailable (R then counts an owner elsewhere, which gets this site's
        writes later, as hints).

        Sloppy writes (`write_quorum_mode = "sloppy"`): when an owner of a study is down or
        failed, or membership changed recently, ask the nodes that may hold hints.
        A write counts a stand-in's hint toward W (sloppy quorum), so with an owner out of
        reach an acknowledged instance can sit on that owner plus hints held *for the
        owners this read asked* (a writer on the other side of a partition saw those as
        down). So the stand-ins of every owner are asked, not only of the unavailable
        ones; one that cannot be asked leaves the study flagged (see `_answer`).

        The same holds for a while after the fault ends: right after a partition heals,
        every owner looks alive, yet an instance acknowledged only through hints (every
        owner was cut off from the writer) is on none of them until hint replay delivers
        it. So within read_fault_window_ms of a membership change the stand-ins are asked
        too, and there too one that is down or fails leaves the study flagged: during a
        partition the reader can be on the side of every owner (all alive, R answer) while
        the instance sits only in hints across the cut (pacsnode sim run --scenario
        partition-halves --nodes 10 --seed 13, before this: a stale retrieve). The price
        is availability: for the window after a fault, a named study whose stand-in is down
        is answered but flagged (docs/sim.md "Read your writes" has the counts)."""
        context = self._context
        holders: dict[str, list[int]] = {}
        for index, piece in enumerate(self._pieces):
            state = self._states[index]
            asked = self._hint_stand_ins_for(index, len(state.answered))
            if asked is None:
                continue
            unavailable, local = asked
            candidates = {s.node_id for s in context.ring.stand_ins(piece.token_range.end, context.n, unavailable)}
            candidates |= {s.node_id for s in context.ring.stand_ins(piece.token_range.end, context.n,
                                                                    set(local or piece.owners))}
            for node_id in sorted(candidates):
                if node_id == context.self_id or context.is_alive(node_id):
                    holders.setdefault(node_id, []).append(index)
                else:
                    state.hint_holders_missed += 1
            if context.self_id not in piece.owners:
                holders.setdefault(context.self_id, []).append(index)
        for node_id, pieces in holders.items():
            self._launch(node_id, sorted(set(pieces)), hints=True)

    def _hint_stand_ins_for(self, index: int, answered: int) -> tuple[set[str], list[str]] | None:
        """Whether piece `index`, with `answered` owners answered, asks the stand-ins for
        hints (_launch_hint_holders): (the owners whose stand-ins it asks besides its own
        owners', this site's owners when reads are local), or None when it asks none."""
        context, piece, state = self._context, self._pieces[index], self._states[index]
        unavailable = {o for o in piece.owners if o in state.failed or not context.is_alive(o)}
        local = self._local_owners(piece)
        if local and not unavailable & set(local):
            # Local reads: this site's owners answer; a write acknowledged here has its
            # W copies (or hints) among them and their stand-ins in this site. Owners
            # elsewhere being down or cut off changes nothing here.
            unavailable = set()
        if not context.sloppy_writes:
            if answered >= state.needed and not (local and unavailable):
                return None  # R owners hold every acknowledged instance: nothing to add.
        elif not unavailable and not context.troubled:
            return None
        return unavailable, local

    def _launch(self, node_id: str, pieces: list[int], *, hints: bool) -> None:
        key = next(self._serial)
        self._calls[key] = _Call(node_id, pieces, hints)
        query = narrow_to_studies(self._query, [self._pieces[i].study_instance_uid for i in pieces])
        ranges = [self._pieces[i].token_range for i in pieces]
        if node_id != self._context.self_id:
            self.peers_asked.add(node_id)
        for index in pieces:
            self._states[index].rows.setdefault(self._slot(node_id, hints), [])
        self._tasks[key] = asyncio.ensure_future(
            pump_rows(self._context, self._queue, key, node_id, query, ranges, hints))

    @staticmethod
    def _slot(node_id: str, hints: bool) -> str:
        return f"hints:{node_id}" if hints else node_id

    async def _drain(self) -> None:
        """Run calls until every one has ended, replacing owners that fail."""
        while any(not task.done() for task in self._tasks.values()) or not self._queue.empty():
            key, batch, error = await self._queue.get()
            call = self._calls[key]
            slot = self._slot(call.node_id, call.hints)
            if batch is not None:
                for row in batch:
                    index = self._by_study.get(str(row.get("StudyInstanceUID", "")))
                    if index is not None and index in call.pieces:
                        self._states[index].rows[slot].append(row)
                continue
            if call.hints:
                if error is not None:
                    log.info("replication.find.hint_holder_failed node=%s error=%s", call.node_id, error)
                    for index in call.pieces:
                        self._states[index].hint_holders_missed += 1
                continue
            if error is None:
                for index in call.pieces:
                    self._states[index].answered.append(call.node_id)
                continue
            log.warning("replication.find.replica_failed node=%s studies=%d error=%s",
                        call.node_id, len(call.pieces), error)
            self._context.count("query_replans")
            for index in call.pieces:
                state = self._states[index]
                state.failed.add(call.node_id)
                state.rows.pop(slot, None)
            self._launch_owners(call.pieces)

    # ----------------------------------------------------------------- answered here
    def rows_here(self, rows_max: int) -> list[Attributes] | None:
        """rows()'s whole answer read from this node's own store on the calling (blocking)
        thread, when that store is all rows() would ask: each study needs one owner (R = 1,
        or one owner), this node owns it and is not still filling its range (so rows() asks
        it first: read_order puts this node first; it is never `slow`), and with that one
        answer no stand-in would be asked for hints (_hint_stand_ins_for). One answer
        cannot disagree with itself: no reconcile, no read repair; the study's newest
        correction is merged over its rows and the corrected conditions matched, as
        rows() does. None, having asked nothing, otherwise, when the store fails (rows()
        asks it again and re-plans), or past `rows_max` rows: use rows()."""
        context = self._context
        if not self._pieces or not context.is_alive(context.self_id):
            return None
        pending = context.pending
        for index, piece in enumerate(self._pieces):
            if self._states[index].needed != 1 or context.self_id not in piece.owners:
                return None
            if pending and piece.token_range.end in pending:
                return None
            if self._hint_stand_ins_for(index, 1) is not None:
                return None
        query = narrow_to_studies(self._query, [piece.study_instance_uid for piece in self._pieces])
        found = _read_here(context, query, [piece.token_range for piece in self._pieces], rows_max)
        if found is None:
            return None
        by_piece: list[list[Attributes]] = [[] for _ in self._pieces]
        for row in found:
            piece_index = self._by_study.get(str(row.get("StudyInstanceUID", "")))
            if piece_index is not None:
                by_piece[piece_index].append(row)
        answer: list[Attributes] = []
        for rows in by_piece:
            newest = newest_correction(rows)
            if newest is not None:
                rows = [with_correction(row, newest) for row in rows]
            for row in self._keyed(rows).values():
                if row.get(COUNT_ONLY) == "1" or match_all(self._corrected_conditions, row):
                    answer.append(row)
        return answer

    # ----------------------------------------------------------------- the answer
    async def rows(self) -> AsyncIterator[Attributes]:
        unreachable = 0
        try:
            self._launch_owners(range(len(self._pieces)))
            await self._drain()
            self._launch_hint_holders()
            await self._drain()
            for index in range(len(self._pieces)):
                rows, complete = await self._answer(index)
                if not complete:
                    unreachable += 1
                for row in rows:
                    if row.get(COUNT_ONLY) == "1" or match_all(self._corrected_conditions, row):
                        yield row
        finally:
            for task in self._tasks.values():
                task.cancel()
        if unreachable:
            log.warning("replication.find.unreachable studies=%d of=%d", unreachable, len(self._pieces))
            raise IncompleteAnswer(Shortfall(studies=unreachable))

    async def _answer(self, index: int) -> tuple[list[Attributes], bool]:
        """The rows of one study and whether R owners vouch for them."""
        state = self._states[index]
        level = self._level()
        # A study's correction is merged over every row, whichever replica answered: an owner
        # (or a hint holder) that has not got the newest correction yet answers with it anyway,
        # and a difference in corrections alone is no disagreement (anti-entropy evens them).
        newest = newest_correction(row for rows in state.rows.values() for row in rows)
        if newest is not None and self._repair_correction is not None:
            # Owners that answered with rows of the study but an older correction (or none):
            # hand them the newest, as a copy is handed to an owner that lacks an instance.
            stale = [node_id for node_id in state.answered
                     if state.rows.get(node_id) and newest_correction(state.rows[node_id]) != newest]
            if stale:
                self._repair_correction(newest, stale)
        if newest is not None:
            for slot, rows in state.rows.items():
                state.rows[slot] = [with_correction(row, newest) for row in rows]
        answers = [self._keyed(state.rows[node_id]) for node_id in state.answered]
        # R owners vouch for the answer, and, when an owner was out of reach or membership
        # changed recently, every node that may hold hints for the owners was asked too.
        complete = len(state.answered) >= state.needed and not state.hint_holders_missed
        hint_holders = [slot.removeprefix("hints:") for slot, rows in state.rows.items()
                        if slot.startswith("hints:") and rows]
        disagree = len(answers) > 1 and any(answer != answers[0] for answer in answers[1:])
        if hint_holders and level != "IMAGE" and state.answered:
            if disagree:
                self._context.count("read_disagreements")
            # A stand-in holds hints for this study: the owners may lack those instances
            # (not yet replayed), and a STUDY/SERIES row's counts must include them.
            # Deliver them to the owners that answered, then ask one again.
            self._context.count("read_hint_reconciles")
            again = await self._reconciled_again(index, newest, hint_holders)
            if again is not None:
                return list(self._keyed(again).values()), complete
            return self._merge(state, answers, level), False  # Could not make them agree: flagged.
        # IMAGE level: instances only a stand-in's hint lists (no owner that answered lists
        # them). Either the owners missed that write (the hint is theirs, not yet replayed)
        # or they deleted it after the hint was written: a delete cannot reach every hint
        # copy (which stand-ins a writer used depends on what the writer saw), so the
        # hint row is checked where the tombstones are, as Dynamo/Riak merge a hinted
        # copy against a newer tombstone by version: delivered to the answering owners
        # (read repair, as STUDY-level reads do), whose stores answer DELETED when they
        # hold a newer tombstone (a delete supersedes every write it saw), and dropped.
        owner_sops = {str(row.get("SOPInstanceUID", "")) for answer in answers for row in answer.values()}
        hint_only = level == "IMAGE" and bool(state.answered) and any(
            str(row.get("SOPInstanceUID", "")) not in owner_sops
            for slot, rows in state.rows.items() if slot.startswith("hints:") for row in rows)
        if disagree or hint_only:
            if disagree:
                self._context.count("read_disagreements")
            study_uid = self._pieces[index].study_instance_uid
            if level != "IMAGE":
                # Counts come from the merged set: make the owners agree, then ask one again.
                again = await self._reconciled_again(index, newest, ())
                if again is not None:
                    answers = [self._keyed(again)]
                else:
                    complete = False  # Could not make them agree: never a Success on a guess.
            else:
                # Instance rows: the union is the answer, less what was deleted. An instance an
                # owner lacks is either a write it missed or one it deleted (an owner that
                # missed the delete still lists it: the tombstone's other holders list nothing,
                # so a plain union served a deleted instance). The copy to the owner that lacks
                # it tells which: its store answers DELETED for a newer tombstone.
                deleted: set[str] = set()
                if hint_only:
                    self._context.count("read_hint_reconciles")
                if not await self._reconcile(study_uid, list(state.answered), hint_holders if hint_only else (),
                                             deleted=deleted):
                    # A copy failed: an instance only some owners list may be one the others
                    # deleted. Never a Success on a guess (a C-GET then says not all was asked).
                    complete = False
                if deleted:
                    self._context.count("read_deleted_dropped")
                    answers = [{identity: row for identity, row in answer.items()
                                if str(row.get("SOPInstanceUID", "")) not in deleted} for answer in answers]
                    for slot, rows in state.rows.items():
                        if slot.startswith("hints:"):
                            state.rows[slot] = [row for row in rows if str(row.get("SOPInstanceUID", "")) not in deleted]
        return self._merge(state, answers, level), complete

    async def _reconciled_again(self, index: int, newest: Correction | None,
                                hint_holders: Sequence[str]) -> list[Attributes] | None:
        """STUDY/SERIES rows of one study whose owners differ: reconcile the owners that
        answered (and deliver `hint_holders`' hints to them), then read the rows again from
        one of them, with the study's newest correction. The owner read again is one that
        listed no instance another owner answered DELETED for: an owner that missed a
        delete still counts the deleted instance (the repair cannot copy a tombstone's
        absence to it; hint replay and anti-entropy bring it the tombstone), so its
        counts are never the answer. None when that could not be done (flag the answer)."""
        state = self._states[index]
        study_uid = self._pieces[index].study_instance_uid
        deleted: set[str] = set()
        missed: set[str] = set()
        if not await self._reconcile(study_uid, list(state.answered), hint_holders, deleted=deleted,
                                     missed_deletes=missed):
            return None
        source = next((node_id for node_id in state.answered if node_id not in missed), None)
        if source is None:
            return None
        if missed:
            self._context.count("read_missed_delete_passed_over")
        again = await self._ask_again(index, source)
        if again is None:
            return None
        return [with_correction(row, newest) for row in again] if newest is not None else again

    @staticmethod
    def _merge(state: _PieceState, answers: list[dict[tuple[str, ...], Attributes]], level: str) -> list[Attributes]:
        """The owners' rows, then hint holders' rows no owner gave."""
        merged: dict[tuple[str, ...], Attributes] = {}
        for answer in answers:
            for identity, row in answer.items():
                merged.setdefault(identity, row)
        for slot, rows in state.rows.items():
            if slot.startswith("hints:"):
                for row in rows:
                    merged.setdefault(unique_key(level, row), row)
        return list(merged.values())

    def _keyed(self, rows: list[Attributes]) -> dict[tuple[str, ...], Attributes]:
        level = self._level()
        return {unique_key(level, row): row for row in rows}

    async def _ask_again(self, index: int, node_id: str) -> list[Attributes] | None:
        query = narrow_to_studies(self._query, [self._pieces[index].study_instance_uid])
        queue: asyncio.Queue[tuple[int, list[Attributes] | None, str | None]] = asyncio.Queue()
        await pump_rows(self._context, queue, 0, node_id, query, [self._pieces[index].token_range], False)
        rows: list[Attributes] = []
        while not queue.empty():
            _key, batch, error = queue.get_nowait()
            if error is not None:
                return None
            rows.extend(batch or [])
        return rows


def _first_of_each(level: str, rows: list[Attributes]) -> list[Attributes]:
    """A scatter's rows, each identity once (Gather.rows with R = 1)."""
    level = "STUDY" if level == "PATIENT" else level
    seen: set[tuple[str, ...]] = set()
    answer: list[Attributes] = []
    for row in rows:
        identity = _identity(level, row)
        if identity not in seen:
            seen.add(identity)
            answer.append(row)
    return answer


def _read_here(context: ReadContext, query: Query, ranges: list[TokenRange] | None,
               rows_max: int) -> list[Attributes] | None:
    """This node's rows for `query` in `ranges` (None: all), read on the calling thread: at most
    `rows_max` (None past that), None when the store fails (logged; the caller's rows()
    then asks it again, as pump_rows would, and re-plans on its error)."""
    try:
        found = list(itertools.islice(context.local.query_rows(query, ranges), rows_max + 1))
    except Exception as error:  # An operating error of the store: rows() handles it as ever.
        log.warning("replication.find.here_failed error=%s", type(error).__name__)
        return None
    return found if len(found) <= rows_max else None


async def pump_rows(context: ReadContext, queue: "asyncio.Queue[tuple[int, list[Attributes] | None, str | None]]",
                key: int, node_id: str, query: Query, ranges: list[TokenRange], hints: bool) -> None:
    """One call's rows into `queue` in batches, then (key, None, error or None)."""
    try:
        if node_id == context.self_id:
            local = context.local
            rows = local.query_hint_rows(query, ranges) if hints else local.query_rows(query, ranges)

            def next_batch() -> list[Attributes]:
                return list(itertools.islice(rows, BATCH_ROWS))

            while True:
                batch = await context.run_blocking(next_batch)
                if not batch:
                    break
                await queue.put((key, batch, None))
        else:
            context.count("query_peers")  # Every remote query: fan-out, read repair's lists, asking again.

            async def stream(started: Callable[[], None]) -> None:
                batch: list[Attributes] = []
                async for row in context.transport.query(node_id, query, ranges, started=started,
                                                         timeout_ms=context.query_timeout_ms, include_hints=hints):
                    batch.append(row)
                    if len(batch) >= BATCH_ROWS:
                        await queue.put((key, batch, None))
                        batch = []
                if batch:
                    await queue.put((key, batch, None))

            await context.answering(node_id, stream)
    except asyncio.CancelledError:
        if cancelled_by_caller():
            raise
        await queue.put((key, None, "CancelledError: the call was cancelled underneath us"))
        return
    except Exception as error:  # A replica breaking off is an operating error: re-plan.
        await queue.put((key, None, f"{type(error).__name__}: {error}"))
        return
    await queue.put((key, None, None))
