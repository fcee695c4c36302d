"""The simulated clients: C-STORE, C-FIND and C-GET-like reads through random nodes.

Every operation is sent to a node the way a modality or viewer would: to any node of the
cluster, which then coordinates it with the real `Coordinator` (store, find, read). A node
that is down refuses the association at once ("entry-down"); a paused or slow one makes
the client wait up to its own timeout. Every operation is recorded (a Jepsen-style
history: who, when, outcome), and every store that came back Success is remembered with
its content hash: the checkers read all of them back at the end.

Instances are synthetic but real where it matters: the Part-10 bytes are a preamble, a
file-meta stand-in and a dataset of seeded random bytes (half noise, half zeros, so zstd
has something to do), compressed with node/codec.py's zstd framing (checksummed), and
their content hash is replication/model.py's `content_hash` of the dataset bytes. So a
read that returns other bytes than were acknowledged is caught, byte for byte.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pacsnode.node.codec import compress
from pacsnode.replication.archive import (
    IncompleteAnswer,
    InstanceLocation,
    ReadError,
    RetrievePlan,
    WriteResult,
    WriteStatus,
)
from pacsnode.replication.coordinator import restamped
from pacsnode.replication.delete_coordinator import DeleteResult, DeleteScope, DeleteStatus
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import InstanceRecord, StoredInstance, content_hash
from pacsnode.replication.modify_coordinator import ModifyResult, ModifyStatus
from pacsnode.sim.cluster import SimCluster

TRANSFER_SYNTAX = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MODALITIES = ("CT", "MR", "CR", "US", "DX")


@dataclass
class Study:
    study_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    accession_number: str
    modality: str
    series: list[str] = field(default_factory=list)
    instances: int = 0


@dataclass(frozen=True)
class AckedWrite:
    sop_instance_uid: str
    study_instance_uid: str
    content_hash: str
    size_bytes: int  # Compressed (blob) bytes: what replicas store and move.
    acked_at_ms: int
    stored: StoredInstance


@dataclass(frozen=True)
class DeletedInstance:
    """An instance whose delete was acknowledged, with no store of its UID overlapping the delete."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    deleted_at_ms: int  # When the delete was acknowledged.


@dataclass
class ModifyOp:
    """One modify (`pacsnode modify --study UID --set K=V ...`) the clients sent, and how it ended.
    Every value a client sets is unique, so a value held names the modify that set it."""

    study_instance_uid: str
    changes: dict[str, str]
    started_ms: int
    ended_ms: int = -1  # -1: still running.
    status: str = ""  # A ModifyStatus value, or the client's: entry-down, timeout, entry-crashed, error...

    @property
    def acknowledged(self) -> bool:
        return self.status == ModifyStatus.MODIFIED.value

    @property
    def applied_maybe(self) -> bool:
        """Whether it may have changed something: acknowledged, or it ended in a way that does
        not say (durable on fewer than W, incomplete, timed out, crashed). NOT_FOUND, INVALID,
        NOT_JOINED and a refused entry return before anything is sent."""
        return self.status not in (ModifyStatus.NOT_FOUND.value, ModifyStatus.INVALID.value,
                                   ModifyStatus.NOT_JOINED.value, "entry-down")


@dataclass
class OpRecord:
    kind: str  # store | read | find | retrieve | find-study | delete | modify | merge
    node_id: str
    started_ms: int
    ended_ms: int = 0
    ok: bool = False
    status: str = ""  # success, quorum-failed, out-of-resources, entry-down, entry-crashed, timeout,
    # unavailable, wrong-content, failed-write-content, incomplete, stale, flagged, error: ...
    sop_instance_uid: str = ""
    entry_up: bool = False  # The entry node ran throughout: not down, crashed, restarted or paused.

    @property
    def latency_ms(self) -> int:
        return self.ended_ms - self.started_ms


class DataGenerator:
    """Seeded synthetic studies and instances (see the module docstring)."""

    def __init__(self, seed: int, *, size_bytes: tuple[int, int] = (2_000, 24_000)) -> None:
        self.rng = random.Random(f"{seed}:data")
        self.size_bytes = size_bytes
        self._patients = 0

    def uid(self) -> str:
        return f"2.25.{self.rng.getrandbits(120)}"

    def new_study(self, patient_id: str | None = None) -> Study:
        rng = self.rng
        if patient_id is None:
            self._patients += 1
            patient_id = f"PID{self._patients:06d}"
        return Study(
            study_instance_uid=self.uid(),
            patient_id=patient_id,
            patient_name=f"SIM^PATIENT{patient_id[3:]}",
            study_date=f"20{rng.randrange(10, 27):02d}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}",
            accession_number=f"ACC{rng.getrandbits(32):010d}",
            modality=rng.choice(MODALITIES),
        )

    def instance(self, study: Study, *, now_ms: int, sop_instance_uid: str | None = None) -> StoredInstance:
        rng = self.rng
        if not study.series or rng.random() < 0.2:
            study.series.append(self.uid())
        series_uid = rng.choice(study.series)
        sop_uid = sop_instance_uid or self.uid()
        study.instances += 1
        low, high = self.size_bytes
        size = rng.randint(low, high)
        noise = size // 2
        dataset = rng.randbytes(noise) + bytes(size - noise)
        meta = b"\x02\x00" + rng.randbytes(62)
        part10 = bytes(128) + b"DICM" + meta + dataset
        offset = 128 + 4 + len(meta)
        attributes: dict[str, Any] = {
            "PatientID": study.patient_id,
            "PatientName": study.patient_name,
            "PatientBirthDate": "19700101",
            "PatientSex": "O",
            "StudyInstanceUID": study.study_instance_uid,
            "StudyDate": study.study_date,
            "StudyTime": "120000",
            "AccessionNumber": study.accession_number,
            "StudyID": "1",
            "StudyDescription": "SIMULATED",
            "SeriesInstanceUID": series_uid,
            "Modality": study.modality,
            "SeriesNumber": str(study.series.index(series_uid) + 1),
            "SOPInstanceUID": sop_uid,
            "SOPClassUID": CT_IMAGE_STORAGE,
            "InstanceNumber": str(study.instances),
        }
        record = InstanceRecord(
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=CT_IMAGE_STORAGE,
            transfer_syntax_uid=TRANSFER_SYNTAX,
            content_hash=content_hash(TRANSFER_SYNTAX, dataset),
            size_bytes=len(dataset),
            dataset_offset=offset,
            stored_at_ms=now_ms,
            attributes={k: attributes[k] for k in ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")},
        )
        return StoredInstance(record=record, attributes=attributes, blob=compress(part10))


@dataclass(frozen=True)
class WorkloadMix:
    store: float = 0.6
    read: float = 0.3
    find: float = 0.1
    # Of finds (the same share of ops, the same draws: half become study reads): a C-GET of
    # one study (`retrieve`) and a STUDY-level C-FIND naming it (`find-study`), each checked
    # against the instances of that study acknowledged before it began (read your writes).
    retrieve: float = 0.25
    find_study: float = 0.25
    duplicate: float = 0.0  # Of stores: re-send an acknowledged instance unchanged.
    conflict: float = 0.0  # Of stores: re-send an acknowledged SOP Instance UID with other bytes.
    # Of stores: delete an acknowledged instance instead (one time in four its whole study),
    # through the node's DeleteCoordinator; and send a deleted instance again (its first
    # bytes, with the version it was first stamped with: older than the tombstone, so the
    # coordinator must re-stamp it to store it as a new instance).
    delete: float = 0.05
    restore: float = 0.03
    # Of stores: a correction of an acknowledged study instead (`pacsnode modify` through the
    # entry node's ModifyCoordinator: a new PatientName, one time in two a new StudyDescription).
    modify: float = 0.04
    # Of stores: a patient merge instead (`pacsnode merge-patient --from A --to B` through the
    # entry node's ModifyCoordinator: every study of the PatientID of an acknowledged study
    # put under the PatientID of another one).
    merge: float = 0.02


class Workload:
    """Clients of one simulated cluster, and the history of what they were told."""

    def __init__(self, cluster: SimCluster, seed: int, *, size_bytes: tuple[int, int] = (2_000, 24_000),
                 instances_per_study: tuple[int, int] = (1, 8)) -> None:
        self.cluster = cluster
        self.rng = random.Random(f"{seed}:workload")
        self.data = DataGenerator(seed, size_bytes=size_bytes)
        self.instances_per_study = instances_per_study
        self.history: list[OpRecord] = []
        self.acked: dict[str, list[AckedWrite]] = {}  # sop uid -> every acknowledged write of it
        self.acked_by_study: dict[str, set[str]] = {}  # study uid -> sop uids acknowledged
        self.studies: list[Study] = []
        self.stored: dict[str, StoredInstance] = {}  # Every instance ever sent, by sop uid (first bytes).
        # Stores that reached a node and were not acknowledged (refused, timed out, entry crashed):
        # sop uid -> [(started_ms, content hash)]. Their outcome is indeterminate: a quorum
        # failure rolls nothing back, so the owners that took a copy keep it (until the
        # conflict rule settles it against the acknowledged write, for a re-send).
        self.indeterminate: dict[str, list[tuple[int, str]]] = {}
        # Deletes: what must stay deleted, and what cannot be judged (a store of the UID ran
        # while its delete did, or a delete failed or timed out: it may or may not have applied).
        self.deleted: dict[str, DeletedInstance] = {}
        self.unclear: set[str] = set()
        self.ever_deleted: set[str] = set()  # Every UID a delete named (measurements leave them out).
        self._store_windows: dict[str, list[list[int]]] = {}  # sop -> [[started, ended or -1], ...]
        self._deleting: dict[str, int] = {}  # sop -> deletes in flight naming it
        # study -> [[started, ended or -1], ...] of study deletes: a store into the study that
        # overlaps one may be deleted by it (an owner deletes every older instance it holds).
        self._study_deletes: dict[str, list[list[int]]] = {}
        # sop -> [[started, ended or -1], ...] of the deletes that named it: a read that
        # overlaps one may or may not see the instance (either is right), so it is not expected.
        self._delete_windows: dict[str, list[list[int]]] = {}
        # Corrections: every modify sent, by study (the corrections checker judges them); a
        # patient merge adds one per study the clients knew under that PatientID.
        self.modifies: dict[str, list[ModifyOp]] = {}
        # Patient merges: each study's PatientID after the merges acknowledged so far (absent:
        # the one it was stored with); studies whose PatientID no client can know (a merge
        # that may or may not have applied named its patient) are not judged on PatientID,
        # and finds leave out studies while a merge of them runs or after it ended unclear.
        self.patient_of: dict[str, str] = {}
        self.patient_unknown: set[str] = set()
        self._first_patient: dict[str, str] = {}  # study -> the PatientID it was stored with
        self._merge_windows: dict[str, list[list[int]]] = {}  # study -> [[started, ended or -1], ...]
        # Merges running: (the PatientID merged into, the studies named). A merge from that
        # PatientID ending meanwhile may have found any of them already moved and moved it on.
        self._merges_running: list[tuple[str, list[str]]] = []
        self.restores_acked = 0  # Re-stores of a deleted instance acknowledged after its delete.
        self.deleted_served = 0  # Study retrieves during the run that located an instance deleted before.
        self.deleted_served_unflagged = 0  # ... of them in an answer the node said was complete.
        self._runner: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self.client_timeout_s = {"store": cluster.config.store_timeout_ms / 1000 + 5, "read": 60.0, "find": 60.0,
                                 "retrieve": 60.0, "find-study": 60.0, "delete": 120.0,
                                 "modify": 120.0, "merge": 240.0}

    # ----------------------------------------------------------------- entry points
    def entry_nodes(self) -> list[str]:
        """Where a client may send: every node that is part of the cluster (up or not)."""
        return [node_id for node_id, node in self.cluster.nodes.items() if not node.gone]

    def pick_node(self) -> str:
        return self.rng.choice(self.entry_nodes())

    async def _at_node(self, kind: str, node_id: str, work: Callable[[Any], Awaitable[Any]],
                       record: OpRecord) -> Any:
        """Run `work(process)` as part of node `node_id`'s process, with the client's timeout."""
        node = self.cluster.nodes[node_id]
        process = node.process
        if process is None or not process.alive:
            record.status = "entry-down"
            return None

        async def served() -> Any:
            await process.wait_running()
            return await work(process)

        pauses, paused = process.pauses, process.paused
        task = process.spawn(served())
        done, _pending = await asyncio.wait({task}, timeout=self.client_timeout_s[kind])
        record.entry_up = (not paused and process.alive and process.pauses == pauses
                           and node.process is process and not task.cancelled())
        if not done:
            task.cancel()
            record.status = "timeout"
            return None
        if task.cancelled():
            record.status = "entry-crashed"
            return None
        error = task.exception()
        if error is not None:
            record.status = f"error: {type(error).__name__}: {error}"
            self.cluster.note_error(f"{node_id} {kind} raised {error!r}")
            return None
        return task.result()

    # ----------------------------------------------------------------- operations
    async def store(self, stored: StoredInstance, node_id: str | None = None, *, stamp: bool = False) -> OpRecord:
        """A C-STORE through a node. `stamp`: the entry node stamps the version with its hybrid
        clock as node/runtime.py does at ingest (re-stores of deleted instances; other sends
        keep the version the data generator gave them, the loop's time)."""
        node_id = node_id or self.pick_node()
        record = OpRecord("store", node_id, self.cluster.now_ms(), sop_instance_uid=stored.sop_instance_uid)
        self.history.append(record)
        self.stored.setdefault(stored.sop_instance_uid, stored)
        window = [record.started_ms, -1]
        self._store_windows.setdefault(stored.sop_instance_uid, []).append(window)
        def send(process: Any) -> Awaitable[WriteResult]:
            sent = restamped(stored, process.coordinator.hlc.now()) if stamp else stored
            return process.coordinator.store(sent)  # type: ignore[no-any-return]

        result: WriteResult | None = await self._at_node("store", node_id, send, record)
        record.ended_ms = self.cluster.now_ms()
        window[1] = record.ended_ms
        if result is not None:
            record.status = result.status
            record.ok = result.status == WriteStatus.SUCCESS
        sop = stored.sop_instance_uid
        if not record.ok and record.status != "entry-down":  # Sent, not acknowledged: may have applied.
            self.indeterminate.setdefault(sop, []).append((record.started_ms, stored.content_hash))
        if any(start <= record.ended_ms and (end < 0 or end >= record.started_ms)
               for start, end in self._study_deletes.get(stored.study_instance_uid, ())):
            self.unclear.add(sop)  # It ran while its study was being deleted: either may win.
            self.deleted.pop(sop, None)
            self._forget_acked(sop)
            self.cluster.trace.record(record.ended_ms, "op", "store", node_id, sop, record.status)
            return record
        if sop in self.deleted or sop in self._deleting or sop in self.unclear:
            earlier = self.deleted.get(sop)
            if earlier is not None and record.started_ms > earlier.deleted_at_ms and record.ok \
                    and sop not in self._deleting:
                del self.deleted[sop]  # A re-store after the delete: a new instance, acknowledged.
                self.restores_acked += 1
            else:
                # It overlapped a delete of its UID (or followed an unclear one): either may win.
                self.deleted.pop(sop, None)
                self.unclear.add(sop)
                self._forget_acked(sop)
                self.cluster.trace.record(record.ended_ms, "op", "store", node_id, sop, record.status)
                return record
        if record.ok:
            self.acked_by_study.setdefault(stored.study_instance_uid, set()).add(stored.sop_instance_uid)
            self.acked.setdefault(stored.sop_instance_uid, []).append(AckedWrite(
                stored.sop_instance_uid, stored.study_instance_uid, stored.content_hash, len(stored.blob),
                record.ended_ms, stored))
        self.cluster.trace.record(record.ended_ms, "op", "store", node_id, stored.sop_instance_uid, record.status)
        return record

    def _forget_acked(self, sop: str) -> None:
        writes = self.acked.pop(sop, None)
        if writes:
            self.acked_by_study.get(writes[0].study_instance_uid, set()).discard(sop)

    def _deleted_during(self, sop: str, study_instance_uid: str, started_ms: int, ended_ms: int) -> bool:
        """A delete naming the instance, or its whole study, overlapped [started, ended]."""
        return any(start <= ended_ms and (end < 0 or end >= started_ms)
                   for start, end in [*self._delete_windows.get(sop, ()), *self._study_deletes.get(study_instance_uid, ())])

    def _overlaps_a_store(self, sop: str, started_ms: int, ended_ms: int) -> bool:
        return any(start <= ended_ms and (end < 0 or end >= started_ms) for start, end in self._store_windows.get(sop, ()))

    async def delete(self, study_instance_uid: str, sop_instance_uid: str = "", node_id: str | None = None
                     ) -> OpRecord:
        """Delete one instance (or, with no SOP UID, the study) through a node. Acknowledged
        (DELETED): each instance of it acknowledged before, with no store of its UID overlapping
        the delete, must never be read, found or held by an owner again (until re-stored).
        Anything else (failed, timed out, INCOMPLETE) may or may not have applied: unclear."""
        node_id = node_id or self.pick_node()
        record = OpRecord("delete", node_id, self.cluster.now_ms(), sop_instance_uid=sop_instance_uid)
        self.history.append(record)
        targets = [sop_instance_uid] if sop_instance_uid else sorted(self.acked_by_study.get(study_instance_uid, ()))
        self.ever_deleted.update(targets)
        for sop in targets:
            self._deleting[sop] = self._deleting.get(sop, 0) + 1
        scope = DeleteScope(study_instance_uid, "", sop_instance_uid)
        window = [record.started_ms, -1]
        if not sop_instance_uid:
            self._study_deletes.setdefault(study_instance_uid, []).append(window)
        for sop in targets:
            self._delete_windows.setdefault(sop, []).append(window)
        try:
            result: DeleteResult | None = await self._at_node(
                "delete", node_id, lambda process: process.deletes.delete(scope), record)
        finally:
            for sop in targets:
                self._deleting[sop] -= 1
                if not self._deleting[sop]:
                    del self._deleting[sop]
        record.ended_ms = self.cluster.now_ms()
        window[1] = record.ended_ms
        if not sop_instance_uid:  # Instances of the study acknowledged while it ran: unclear.
            targets = sorted(set(targets) | self.acked_by_study.get(study_instance_uid, set()))
            self.ever_deleted.update(targets)
        if result is not None:
            record.status = result.status.value
            record.ok = result.status is DeleteStatus.DELETED
        for sop in targets:
            writes = self.acked.get(sop)
            if record.ok and writes and not self._overlaps_a_store(sop, record.started_ms, record.ended_ms):
                first = writes[0].stored.record
                self.deleted[sop] = DeletedInstance(sop, first.study_instance_uid, first.series_instance_uid,
                                                    first.sop_class_uid, record.ended_ms)
                self.unclear.discard(sop)
            elif writes or sop in self.deleted:
                self.deleted.pop(sop, None)
                self.unclear.add(sop)
            self._forget_acked(sop)
        self.cluster.trace.record(record.ended_ms, "op", "delete", node_id, sop_instance_uid or study_instance_uid,
                                  record.status)
        return record

    async def modify(self, study_instance_uid: str, node_id: str | None = None) -> OpRecord:
        """Correct a study through a node with the production path (`process.modifies`, the
        node's ModifyCoordinator, as `pacsnode modify` reaches it): a new PatientName, and one
        time in two a new StudyDescription, each value unique to this modify."""
        node_id = node_id or self.pick_node()
        record = OpRecord("modify", node_id, self.cluster.now_ms())
        self.history.append(record)
        number = sum(len(ops) for ops in self.modifies.values()) + 1
        changes = {"PatientName": f"SIM^CORRECTED{number:06d}"}
        if self.rng.random() < 0.5:
            changes["StudyDescription"] = f"CORRECTED {number:06d}"
        op = ModifyOp(study_instance_uid, changes, record.started_ms)
        self.modifies.setdefault(study_instance_uid, []).append(op)
        result: ModifyResult | None = await self._at_node(
            "modify", node_id, lambda process: process.modifies.modify(study_instance_uid, changes), record)
        record.ended_ms = op.ended_ms = self.cluster.now_ms()
        if result is not None:
            record.status = result.status.value
            record.ok = result.status is ModifyStatus.MODIFIED
        op.status = record.status
        self.cluster.trace.record(record.ended_ms, "op", "modify", node_id, study_instance_uid, record.status)
        return record

    def patient_id_of(self, study_instance_uid: str) -> str:
        """The study's PatientID as the clients know it (after the merges acknowledged)."""
        known = self.patient_of.get(study_instance_uid)
        if known is None:
            if len(self._first_patient) < len(self.studies):
                self._first_patient.update((s.study_instance_uid, s.patient_id) for s in self.studies)
            known = self._first_patient.get(study_instance_uid, "")
        return known

    async def merge_patient(self, from_patient_id: str, to_patient_id: str, node_id: str | None = None) -> OpRecord:
        """`pacsnode merge-patient --from A --to B` through a node (the node's ModifyCoordinator
        `merge_patient`, as Admin.Modify reaches it). Every study the clients know under A
        with an acknowledged instance gets a ModifyOp setting PatientID B, acknowledged when
        the merge answered MODIFIED: the corrections checker then wants B on every owner
        and in a C-FIND of it. A study deleted (or being deleted) meanwhile, or whose
        PatientID is not known, is not judged by this merge."""
        node_id = node_id or self.pick_node()
        record = OpRecord("merge", node_id, self.cluster.now_ms())
        self.history.append(record)
        changes = {"PatientID": to_patient_id}
        studies = sorted(s for s in self.acked_by_study if self.acked_by_study[s]
                         and self.patient_id_of(s) == from_patient_id)
        ops: list[ModifyOp] = []
        windows: list[list[int]] = []
        for study in studies:
            op = ModifyOp(study, dict(changes), record.started_ms)
            self.modifies.setdefault(study, []).append(op)
            ops.append(op)
            window = [record.started_ms, -1]
            self._merge_windows.setdefault(study, []).append(window)
            windows.append(window)
        running = (to_patient_id, studies)
        self._merges_running.append(running)
        result: ModifyResult | None = await self._at_node(
            "merge", node_id, lambda process: process.modifies.merge_patient(from_patient_id, to_patient_id, {}),
            record)
        record.ended_ms = self.cluster.now_ms()
        self._merges_running.remove(running)
        for window in windows:
            window[1] = record.ended_ms
        if result is not None:
            record.status = result.status.value
            record.ok = result.status is ModifyStatus.MODIFIED
        # Studies of A acknowledged while it ran, or with any store of theirs sent before it
        # ended (one still running, or one that failed but left a copy on an owner): the merge
        # may have found such a copy and moved the study, whose instances are then acknowledged
        # after it. The merge may or may not have moved them.
        unknown = {s for s in self.acked_by_study if self.patient_id_of(s) == from_patient_id} - set(studies)
        unknown |= {stored.study_instance_uid for sop, windows in self._store_windows.items()
                    if (stored := self.stored.get(sop)) is not None
                    and stored.study_instance_uid not in studies
                    and self.patient_id_of(stored.study_instance_uid) == from_patient_id
                    and any(start <= record.ended_ms for start, _end in windows)}
        # So may the studies of a merge into A still running: it may have moved some under A
        # before this one's find, and this one moved them on (the clients, who learn of the
        # merge into A only when it ends, would take them for A; seed 949 of pause-flap).
        unknown |= {s for into, named in self._merges_running if into == from_patient_id for s in named}
        if not record.ok and ModifyOp("", {}, 0, status=record.status).applied_maybe:
            unknown |= set(studies)  # It may have moved some, all or none of them.
        for op in ops:
            op.ended_ms = record.ended_ms
            deleted_meanwhile = not self.acked_by_study.get(op.study_instance_uid) or any(
                start <= record.ended_ms and (end < 0 or end >= record.started_ms)
                for start, end in self._study_deletes.get(op.study_instance_uid, ()))
            op.status = "merge-not-judged" if record.ok and deleted_meanwhile else record.status
            if record.ok:
                self.patient_of[op.study_instance_uid] = to_patient_id
        self.patient_unknown |= unknown
        self.cluster.trace.record(record.ended_ms, "op", "merge", node_id, from_patient_id, record.status)
        return record

    async def read(self, sop_instance_uid: str, node_id: str | None = None, *, history: bool = True,
                   indeterminate_ok: bool = True) -> OpRecord:
        """Read one acknowledged instance through a node (the coordinator's read, no locate).
        "success": the bytes of an acknowledged write of the UID. "failed-write-content"
        (`indeterminate_ok`, reads during the run): the bytes of a store of the UID that was
        sent before the read ended and not acknowledged (indeterminate: a quorum failure keeps
        the copies it made); counted apart, not wrong. "wrong-content": bytes no store of the
        UID sent by then, or (without `indeterminate_ok`: the checks after settle) bytes no
        acknowledged write had."""
        node_id = node_id or self.pick_node()
        writes = self.acked[sop_instance_uid]
        first = writes[0].stored.record
        record = OpRecord("read", node_id, self.cluster.now_ms(), sop_instance_uid=sop_instance_uid)
        if history:
            self.history.append(record)
        location = InstanceLocation(first.study_instance_uid, first.series_instance_uid, first.sop_instance_uid,
                                    first.sop_class_uid, first.transfer_syntax_uid)

        async def work(process: Any) -> Any:
            try:
                return await process.coordinator.read(location)
            except ReadError as error:
                return error

        result = await self._at_node("read", node_id, work, record)
        record.ended_ms = self.cluster.now_ms()
        if isinstance(result, ReadError):
            record.status = "unavailable"
        elif result is not None:
            part10, offset = result
            got = content_hash(first.transfer_syntax_uid, part10[offset:])
            if got in {w.content_hash for w in writes}:
                record.ok, record.status = True, "success"
            elif indeterminate_ok and got in {digest for started_ms, digest in self.indeterminate.get(sop_instance_uid, ())
                                              if started_ms <= record.ended_ms}:
                record.ok, record.status = True, "failed-write-content"
            else:
                record.status = "wrong-content"
        self.cluster.trace.record(record.ended_ms, "op", "read", node_id, sop_instance_uid, record.status)
        return record

    async def find(self, patient_id: str, node_id: str | None = None, *, history: bool = True
                   ) -> tuple[OpRecord, set[str]]:
        node_id = node_id or self.pick_node()
        record = OpRecord("find", node_id, self.cluster.now_ms())
        if history:
            self.history.append(record)
        # By the PatientID after the merges acknowledged before it began; a study a merge named
        # while it ran, or whose PatientID is not known, may answer either way: left out.
        expected = {w[0].study_instance_uid for w in self.acked.values()
                    if self.patient_id_of(w[0].study_instance_uid) == patient_id}
        expected -= self.patient_unknown
        instances = {study: set(self.acked_by_study.get(study, ())) for study in expected}
        query = Query(level="STUDY", conditions=(Condition("PatientID", "LO", patient_id),),
                      return_keys=("StudyInstanceUID", "PatientID"))

        flagged = False

        async def work(process: Any) -> set[str]:
            nonlocal flagged
            found: set[str] = set()
            try:
                async for row in process.coordinator.find(query):
                    found.add(str(row["StudyInstanceUID"]))
            except IncompleteAnswer:
                flagged = True
            return found

        found: set[str] | None = await self._at_node("find", node_id, work, record)
        record.ended_ms = self.cluster.now_ms()
        expected = {s for s in expected if s not in self.patient_unknown and not any(
            start <= record.ended_ms and (end < 0 or end >= record.started_ms)
            for start, end in self._merge_windows.get(s, ()))}
        # A study whose every instance a delete overlapping the find named may be gone either way.
        expected = {s for s in expected if not instances[s] or not all(
            self._deleted_during(sop, s, record.started_ms, record.ended_ms) for sop in instances[s])}
        if found is not None:
            # Answered either way. "flagged": the node said part of the archive could not be
            # asked (the client gets a failure status, never Success). "incomplete": it said
            # Success with an acknowledged study missing (the replica asked had not got it
            # yet): a stale answer, reported apart.
            record.ok = True
            if flagged:
                record.status = "flagged"
            else:
                record.status = "success" if expected <= found else "incomplete"
        self.cluster.trace.record(record.ended_ms, "op", "find", node_id, patient_id, record.status)
        return record, found or set()

    async def retrieve(self, study_instance_uid: str, node_id: str | None = None) -> OpRecord:
        """What a C-GET of one study does first: locate its instances through a node (the
        study's owners, R of them, merged). "success": every instance of the study
        acknowledged before the op began is located; "stale": the node said complete (no
        shortfall) with one of them missing; "flagged": it said part could not be asked."""
        node_id = node_id or self.pick_node()
        record = OpRecord("retrieve", node_id, self.cluster.now_ms())
        self.history.append(record)
        expected = set(self.acked_by_study.get(study_instance_uid, ()))
        query = Query("STUDY", (Condition("StudyInstanceUID", "UI", study_instance_uid),))
        plan: RetrievePlan | None = await self._at_node(
            "retrieve", node_id, lambda process: process.coordinator.locate(query), record)
        record.ended_ms = self.cluster.now_ms()
        expected = {sop for sop in expected if not self._deleted_during(
            sop, study_instance_uid, record.started_ms, record.ended_ms)}  # Either way is right.
        if plan is not None:
            record.ok = True  # Answered; the status says how (as for find).
            located = {location.sop_instance_uid for location in plan.locations}
            record.status = "flagged" if plan.shortfall else "success" if expected <= located else "stale"
            # An instance whose delete was acknowledged before this began, with no store of its
            # UID since: a C-GET would send it (chaos runs count the same: "served after").
            served = [sop for sop in located if sop in self.deleted
                      and self.deleted[sop].deleted_at_ms < record.started_ms
                      and not self._overlaps_a_store(sop, self.deleted[sop].deleted_at_ms, record.ended_ms)]
            self.deleted_served += len(served)
            if not plan.shortfall:
                self.deleted_served_unflagged += len(served)  # Said complete: a C-GET answers Success.
        self.cluster.trace.record(record.ended_ms, "op", "retrieve", node_id, study_instance_uid, record.status)
        return record

    async def find_study(self, study_instance_uid: str, node_id: str | None = None) -> OpRecord:
        """A STUDY-level C-FIND naming one study: "stale" when it says Success with no row for
        an acknowledged study, or NumberOfStudyRelatedInstances below the instances of it
        acknowledged before the op began; "flagged" when it raised IncompleteAnswer."""
        node_id = node_id or self.pick_node()
        record = OpRecord("find-study", node_id, self.cluster.now_ms())
        self.history.append(record)
        acked = set(self.acked_by_study.get(study_instance_uid, ()))
        query = Query(level="STUDY", conditions=(Condition("StudyInstanceUID", "UI", study_instance_uid),),
                      return_keys=("StudyInstanceUID", "NumberOfStudyRelatedInstances"))
        flagged = False

        async def work(process: Any) -> int:
            nonlocal flagged
            count = 0
            try:
                async for row in process.coordinator.find(query):
                    if str(row["StudyInstanceUID"]) == study_instance_uid:
                        count = max(count, int(str(row.get("NumberOfStudyRelatedInstances") or 0)))
            except IncompleteAnswer:
                flagged = True
            return count

        count: int | None = await self._at_node("find-study", node_id, work, record)
        record.ended_ms = self.cluster.now_ms()
        expected = sum(1 for sop in acked if not self._deleted_during(  # A delete overlapping: either way.
            sop, study_instance_uid, record.started_ms, record.ended_ms))
        if count is not None:
            record.ok = True
            record.status = "flagged" if flagged else "success" if count >= expected else "stale"
        self.cluster.trace.record(record.ended_ms, "op", "find-study", node_id, study_instance_uid, record.status)
        return record

    # ----------------------------------------------------------------- generators
    def next_instance(self) -> StoredInstance:
        """A new instance: of a new study, or one more of a recent study."""
        rng = self.rng
        open_studies = [s for s in self.studies[-20:] if s.instances < self.instances_per_study[1]]
        if open_studies and rng.random() < 0.7:
            study = rng.choice(open_studies)
        else:
            patient = rng.choice(self.studies).patient_id if self.studies and rng.random() < 0.3 else None
            study = self.data.new_study(patient)
            self.studies.append(study)
        return self.data.instance(study, now_ms=self.cluster.now_ms())

    async def load(self, instances: int, *, concurrency: int = 8) -> None:
        """Store `instances` new instances, `concurrency` at a time (the initial data)."""
        queue = [self.next_instance() for _ in range(instances)]
        position = 0

        async def worker() -> None:
            nonlocal position
            while position < len(queue):
                stored = queue[position]
                position += 1
                await self.store(stored)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    def start(self, rate_per_s: float, mix: WorkloadMix = WorkloadMix()) -> None:
        """Open-loop clients: operations arrive at `rate_per_s` (Poisson), whatever the replies."""
        self._runner = self.cluster.loop.create_task(self._run(rate_per_s, mix))

    async def stop(self) -> None:
        """Stop issuing operations and wait for the ones in flight."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def _run(self, rate_per_s: float, mix: WorkloadMix) -> None:
        rng = self.rng
        while True:
            await asyncio.sleep(rng.expovariate(rate_per_s))
            roll = rng.random() * (mix.store + mix.read + mix.find)
            if roll < mix.store or not self.acked:
                coroutine: Awaitable[Any] = self._store_or_delete(mix)
            elif roll < mix.store + mix.read:
                coroutine = self.read(rng.choice(sorted(self.acked)) if len(self.acked) < 64
                                      else self._recent_acked())
            else:
                # The find share, split by where the roll fell (no extra draw): PatientID
                # finds, then study retrieves, then study finds.
                study = self.rng.choice(self.studies)
                within = (roll - mix.store - mix.read) / mix.find if mix.find else 0.0
                if within < 1 - mix.retrieve - mix.find_study:
                    coroutine = self.find(study.patient_id)
                elif within < 1 - mix.find_study:
                    coroutine = self.retrieve(study.study_instance_uid)
                else:
                    coroutine = self.find_study(study.study_instance_uid)
            task = self.cluster.loop.create_task(coroutine)  # type: ignore[arg-type]
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _store_or_delete(self, mix: WorkloadMix) -> Awaitable[Any]:
        rng = self.rng
        if mix.delete or mix.restore or mix.modify or mix.merge:  # One more draw only for such a mix.
            draw = rng.random()
            if self.acked and draw < mix.delete:
                sop = self._recent_acked()
                study = self.acked[sop][0].study_instance_uid
                return self.delete(study) if rng.random() < 0.25 else self.delete(study, sop)
            if self.deleted and draw < mix.delete + mix.restore:
                sop = rng.choice(sorted(self.deleted)) if len(self.deleted) < 64 else list(self.deleted)[-1]
                return self.store(self.stored[sop], stamp=True)
            if self.acked and mix.delete + mix.restore <= draw < mix.delete + mix.restore + mix.modify:
                # One time in two a study corrected before (so later corrections meet earlier ones).
                again = sorted(study for study in self.modifies if self.acked_by_study.get(study))
                if again and rng.random() < 0.5:
                    return self.modify(rng.choice(again))
                return self.modify(self.acked[self._recent_acked()][0].study_instance_uid)
            low = mix.delete + mix.restore + mix.modify
            if self.acked and low <= draw < low + mix.merge:
                # The patient of a recent study merged into the patient of another acknowledged study.
                source = self.patient_id_of(self.acked[self._recent_acked()][0].study_instance_uid)
                target = self.patient_id_of(self.acked[self._recent_acked()][0].study_instance_uid)
                if source and target and source != target:
                    return self.merge_patient(source, target)
        return self.store(self._store_payload(mix))

    def _store_payload(self, mix: WorkloadMix) -> StoredInstance:
        rng = self.rng
        if self.acked and mix.duplicate and rng.random() < mix.duplicate:
            return self.acked[self._recent_acked()][0].stored
        if self.acked and mix.conflict and rng.random() < mix.conflict:
            sop = self._recent_acked()
            first = self.acked[sop][0].stored
            study = next(s for s in self.studies if s.study_instance_uid == first.study_instance_uid)
            return self.data.instance(study, now_ms=self.cluster.now_ms(), sop_instance_uid=sop)
        return self.next_instance()

    def _recent_acked(self) -> str:
        # dicts keep insertion order: the last acknowledged instances are at the end.
        keys = list(self.acked)
        return keys[-1 - self.rng.randrange(min(len(keys), 500))]

    # ----------------------------------------------------------------- summaries
    def acked_bytes(self) -> int:
        return sum(writes[0].size_bytes for writes in self.acked.values())

    def ops_between(self, start_ms: int, end_ms: int, kind: str | None = None, *, ended: bool = False
                    ) -> list[OpRecord]:
        """Finished operations that started in [start_ms, end_ms) (and, with `ended`, also ended by end_ms)."""
        return [op for op in self.history if start_ms <= op.started_ms < end_ms and op.ended_ms
                and (not ended or op.ended_ms <= end_ms) and (kind is None or op.kind == kind)]
