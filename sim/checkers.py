"""The verdicts of a simulation run, taken after heal and settle.

- acked-writes: every store that came back Success is read back through a live node
  (another one if the first fails) with the real coordinator, and the bytes returned
  must hash to the content of an acknowledged write of that SOP Instance UID. A miss is
  a lost write; other bytes are phantom content. Both must be zero (research §4.5 1-2).
- no-wrong-content: no read during the run returned bytes no store of that SOP Instance
  UID had sent: the bytes of an acknowledged write, or of a store sent before the read
  ended that was not acknowledged (0xA701, a timeout: indeterminate, since a quorum
  failure rolls back no copy; counted and reported apart). The checks after settle
  (acked-writes) accept acknowledged content only.
- replication: every study with an acknowledged instance is held, whole, by
  min(N, live ring members) live nodes (counted in each node's own store), and by every
  live owner. When an owner is down but still in the ring (a rail keeps it there: more
  than a quarter of the ring down, or its whole site), only its live owners can hold
  it: reported, not failed. Copies on nodes that do not own the study any more are
  reported too (the drop rule removes them on its own schedule).
- replicas-agree: every copy of an instance has one content (first writer wins must be
  the same first everywhere).
- membership: every live node sees every other live node alive and holds the same ring
  (same ring version).
- no-resurrected-deletes: every instance whose delete was acknowledged (and not re-stored
  since, with no store of its UID overlapping the delete) is asked of the cluster as a
  client would: read through a live node (must fail: no replica returns it), and an IMAGE
  C-FIND of its study through another live node (must not list it); and no live node's
  store holds it as an owner copy. Hints still held for it are reported (a stand-in holds
  a hint until its owner takes it or answers DELETED), not failed: they are not served.
- corrections: every study the clients corrected (`pacsnode modify` through the node's
  ModifyCoordinator, and the studies a `pacsnode merge-patient` put under another
  PatientID: each is a modify of PatientID) ends, on every live owner, with the last acknowledged (MODIFIED)
  correction of each attribute it set, or with a modify that overlapped or followed that
  one and may have applied (unclear: it did not answer, or answered INCOMPLETE or
  QUORUM_FAILED); an older acknowledged value is a *reverted* correction, no value or
  another one a *lost* one. A STUDY-level C-FIND naming the study through a live node
  shows the same values (when the study still has acknowledged instances). PatientID is
  not judged for a study a merge that may or may not have applied named.
- no-errors: no exception escaped a task or callback of any node.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from pacsnode.replication.archive import IncompleteAnswer, InstanceLocation, ReadError
from pacsnode.replication.matching import Condition, Query
from pacsnode.ring.placement import copies_among
from pacsnode.ring.swim import State
from pacsnode.sim.cluster import SimCluster
from pacsnode.sim.workload import TRANSFER_SYNTAX, Workload


@dataclass
class CheckResult:
    name: str
    ok: bool | None  # None: skipped.
    detail: str
    violations: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # Figures the sweep adds up.

    def line(self) -> str:
        verdict = "SKIP" if self.ok is None else ("ok" if self.ok else "FAIL")
        return f"{verdict:4} {self.name}: {self.detail}"


async def check_acked_writes(cluster: SimCluster, workload: Workload, seed: int) -> CheckResult:
    rng = random.Random(f"{seed}:checker")
    live = cluster.live_ids()
    if not live:
        return CheckResult("acked-writes", False, "no live node to read through", len(workload.acked))
    lost: list[str] = []
    wrong: list[str] = []
    for sop in sorted(workload.acked):
        first_node, second_node = rng.choice(live), rng.choice(live)
        record = await workload.read(sop, first_node, history=False, indeterminate_ok=False)
        if not record.ok and record.status != "wrong-content":
            record = await workload.read(sop, second_node, history=False, indeterminate_ok=False)
        if record.status == "wrong-content":
            wrong.append(sop)
        elif not record.ok:
            lost.append(f"{sop} ({record.status})")
    detail = f"{len(workload.acked)} acknowledged instances read back"
    if lost:
        detail += f"; LOST {len(lost)}: {', '.join(lost[:3])}"
    if wrong:
        detail += f"; WRONG CONTENT {len(wrong)}: {', '.join(wrong[:3])}"
    return CheckResult("acked-writes", not lost and not wrong, detail, len(lost) + len(wrong))


def check_no_wrong_content(workload: Workload) -> CheckResult:
    wrong = [op for op in workload.history if op.status == "wrong-content"]
    failed_write = sum(1 for op in workload.history if op.status == "failed-write-content")
    return CheckResult("no-wrong-content", not wrong,
                       f"{sum(1 for op in workload.history if op.kind == 'read')} reads during the run, "
                       f"{len(wrong)} returned bytes no store of the UID had sent, {failed_write} the bytes of "
                       "a store that was not acknowledged", len(wrong))


def live_ring_members(cluster: SimCluster) -> list[str]:
    """Live nodes that are in the ring as the live nodes see it (the first live node's view)."""
    live = cluster.live_ids()
    if not live:
        return []
    ring = cluster.process(live[0]).membership.ring()
    return [n for n in live if n in ring]


@dataclass
class StudyCopies:
    holders: int  # Live ring members holding every acknowledged instance of the study.
    live_owners: int  # Owners (in the ring) that are live.
    owners_missing: int  # Live owners that lack some acknowledged instance of it.
    dead_owners: int  # Owners still in the ring but down (a rail holds their removal back).


def study_copies(cluster: SimCluster, workload: Workload) -> tuple[dict[str, StudyCopies], int]:
    """Per study with an acknowledged instance: who holds it; and the copies wanted, min(N, live members)."""
    members = set(live_ring_members(cluster))
    live = cluster.live_ids()
    ring = cluster.process(live[0]).membership.ring() if live else None
    target = copies_among(cluster.config.replication_factor,
                          [ring.member(m).site for m in members] if ring is not None else [])
    sops_of: dict[str, list[str]] = defaultdict(list)
    for sop, writes in workload.acked.items():
        sops_of[writes[0].study_instance_uid].append(sop)
    result: dict[str, StudyCopies] = {}
    for study, sops in sops_of.items():
        holders: set[str] | None = None
        for sop in sops:
            held = cluster.replicas.holders.get(sop, set()) & members
            holders = held if holders is None else holders & held
        holders = holders or set()
        owners = ring.owners_of_study(study, cluster.config.replication_factor) if ring is not None and len(ring) \
            else ()
        live_owners = [o for o in owners if o in members]
        result[study] = StudyCopies(len(holders), len(live_owners),
                                    sum(1 for o in live_owners if o not in holders), len(owners) - len(live_owners))
    return result, target


def check_replication(cluster: SimCluster, workload: Workload) -> CheckResult:
    """Every study at min(N, live members) copies; a study with an owner that is down but kept
    in the ring by a rail can only be at its live owners' count: that is reported, and only a
    live owner lacking it fails."""
    copies, target = study_copies(cluster, workload)
    under = sorted(study for study, c in copies.items()
                   if c.owners_missing or (c.dead_owners == 0 and c.holders < target))
    waiting = sum(1 for c in copies.values() if c.dead_owners and not c.owners_missing)
    over = sum(1 for c in copies.values() if c.holders > target)
    detail = f"{len(copies)} studies, {target} copies wanted; {len(under)} under"
    if waiting:
        detail += f"; {waiting} at their live owners only (an owner is down, kept in the ring by a rail)"
    if over:
        detail += f", {over} with extra copies not dropped yet"
    if under:
        c = copies[under[0]]
        detail += f" (e.g. {under[0]}: {c.holders} copies, {c.owners_missing} live owners without it)"
    return CheckResult("replication", not under, detail, len(under))


def check_replicas_agree(cluster: SimCluster, workload: Workload) -> CheckResult:
    diverged = []
    for sop in sorted(workload.acked):
        study = workload.acked[sop][0].study_instance_uid
        contents = {cluster.nodes[n].store.content_of(study, sop) for n in sorted(cluster.replicas.holders.get(sop, ()))}
        contents.discard(None)
        if len(contents) > 1:
            diverged.append(sop)
    return CheckResult("replicas-agree", not diverged,
                       f"{len(diverged)} instances whose copies hold different content"
                       + (f" (e.g. {diverged[0]})" if diverged else ""), len(diverged))


def check_membership(cluster: SimCluster) -> CheckResult:
    """One ring version; every live node joined (a seed accepted it: until then it refuses
    writes and flags every read); every live node held alive by every other, at the
    generation it runs (a record of an older or newer boot is not that node: a boot that
    lost its generation count can answer probes meant for the boot the cluster holds)."""
    live = cluster.live_ids()
    versions = cluster.ring_versions()
    distinct = len(set(versions.values()))
    not_alive = 0
    for observer in live:
        swim = cluster.process(observer).swim
        for other in live:
            record = swim.record(other)
            if record is None or record.state is not State.ALIVE or record.generation != cluster.nodes[other].generation:
                not_alive += 1
    not_joined = [node_id for node_id in live if not cluster.process(node_id).membership.joined]
    ok = distinct <= 1 and not_alive == 0 and not not_joined
    return CheckResult("membership", ok, f"{len(live)} live nodes, {distinct} ring version(s), "
                                         f"{not_alive} (observer, live member) pairs not seen alive at the member's "
                                         f"generation, {len(not_joined)} not joined"
                                         + (f" ({', '.join(not_joined[:3])})" if not_joined else ""),
                       (distinct - 1 if distinct > 1 else 0) + not_alive + len(not_joined))


async def check_deletes(cluster: SimCluster, workload: Workload, seed: int) -> CheckResult:
    rng = random.Random(f"{seed}:deletes")
    live = cluster.live_ids()
    deleted = workload.deleted
    deletes = sum(1 for op in workload.history if op.kind == "delete")
    if not live:
        return CheckResult("no-resurrected-deletes", False, "no live node to read through", len(deleted))
    back: list[str] = []
    hinted = 0
    for sop in sorted(deleted):
        entry = deleted[sop]
        holders = [n for n in live if cluster.nodes[n].store.read_stored(entry.study_instance_uid, sop) is not None]
        for node_id in live:
            store = cluster.nodes[node_id].store
            hinted += sum(1 for owner in store.hint_owners()
                          if store.read_hint(owner, entry.study_instance_uid, sop) is not None)
        location = InstanceLocation(entry.study_instance_uid, entry.series_instance_uid, sop, entry.sop_class_uid,
                                    TRANSFER_SYNTAX)
        readable = False
        try:
            await cluster.process(rng.choice(live)).coordinator.read(location)
            readable = True
        except ReadError:
            pass
        query = Query("IMAGE", (Condition("StudyInstanceUID", "UI", entry.study_instance_uid),), ("SOPInstanceUID",))
        listed = False
        try:
            async for row in cluster.process(rng.choice(live)).coordinator.find(query):
                listed = listed or row.get("SOPInstanceUID") == sop
        except IncompleteAnswer:
            pass
        if holders or readable or listed:
            back.append(f"{sop} (held by {','.join(holders) or 'none'}; read {readable}; found {listed})")
    detail = (f"{deletes} deletes, {len(deleted)} instances deleted and checked, {len(workload.unclear)} unclear "
              f"(a store of the UID overlapped the delete, or the delete failed); {len(back)} back")
    if hinted:
        detail += f"; {hinted} hint copies still held (not served)"
    if back:
        detail += f": {', '.join(back[:2])}"
    restores = workload.restores_acked
    if restores:
        detail += f"; {restores} re-stores acknowledged after their delete (read back by acked-writes)"
    if workload.deleted_served:
        detail += (f"; {workload.deleted_served} located by a study retrieve during the run after their delete "
                   f"was acknowledged ({workload.deleted_served_unflagged} in an answer said complete; "
                   "reported, not failed)")
    return CheckResult("no-resurrected-deletes", not back, detail, len(back),
                       {"deletes": deletes, "deleted_checked": len(deleted), "unclear": len(workload.unclear),
                        "back": len(back), "hint_copies": hinted, "restores_acked": restores,
                        "served_after_delete": workload.deleted_served,
                        "served_after_delete_unflagged": workload.deleted_served_unflagged})


async def check_corrections(cluster: SimCluster, workload: Workload, seed: int) -> CheckResult:
    rng = random.Random(f"{seed}:corrections")
    live = cluster.live_ids()
    sent = sum(len(ops) for ops in workload.modifies.values())
    acked = sum(1 for ops in workload.modifies.values() for op in ops if op.acknowledged)
    members = set(live_ring_members(cluster))
    if not live:
        return CheckResult("corrections", False, "no live node to read through", sent)
    ring = cluster.process(live[0]).membership.ring()
    judged = unjudged = replicas_checked = reads_checked = 0
    lost: list[str] = []
    reverted: list[str] = []
    for study, ops in sorted(workload.modifies.items()):
        owners = [o for o in ring.owners_of_study(study, cluster.config.replication_factor) if o in members]
        wanted: dict[str, tuple[set[str], set[str]]] = {}  # keyword -> (allowed values, older acknowledged)
        for keyword in sorted({k for op in ops for k in op.changes}):
            done = [op for op in ops if op.acknowledged and keyword in op.changes]
            if keyword == "PatientID" and study in workload.patient_unknown:
                done = []  # A merge that may or may not have applied named its patient.
            if not done:
                unjudged += 1  # No acknowledged correction of it: any outcome is allowed.
                continue
            last = max(done, key=lambda op: op.ended_ms)
            allowed = {last.changes[keyword]} | {
                op.changes[keyword] for op in ops if keyword in op.changes and op.applied_maybe
                and (op.ended_ms < 0 or op.ended_ms >= last.started_ms)}
            older = {op.changes[keyword] for op in done} - allowed
            wanted[keyword] = (allowed, older)
            judged += 1
        if not wanted:
            continue

        def verdict(where: str, values: dict[str, str]) -> None:
            for keyword, (allowed, older) in wanted.items():
                value = values.get(keyword)
                if value in allowed:
                    continue
                line = f"{study} {keyword} on {where}"
                (reverted if value in older else lost).append(line)

        for owner in owners:
            correction = cluster.nodes[owner].store.correction(study)
            replicas_checked += 1
            verdict(owner, correction.values() if correction is not None else {})
        if workload.acked_by_study.get(study):
            node_id = rng.choice(live)
            query = Query("STUDY", (Condition("StudyInstanceUID", "UI", study),),
                          ("StudyInstanceUID", "PatientID", "PatientName", "StudyDescription"))
            rows: list[dict[str, str]] = []
            try:
                async for row in cluster.process(node_id).coordinator.find(query):
                    if str(row.get("StudyInstanceUID", "")) == study:
                        rows.append({k: str(row.get(k) or "") for k in ("PatientID", "PatientName",
                                                                         "StudyDescription")})
            except IncompleteAnswer:
                pass
            reads_checked += 1
            if not rows:
                lost.append(f"{study}: a C-FIND through {node_id} did not list it")
            for row in rows:
                verdict(f"a C-FIND through {node_id}", row)
    merges = [op for op in workload.history if op.kind == "merge"]
    merges_acked = sum(1 for op in merges if op.ok)
    detail = (f"{sent} modifies ({acked} acknowledged; {len(merges)} patient merges, {merges_acked} acknowledged), "
              f"{judged} corrected attributes judged on "
              f"{replicas_checked} owner copies and {reads_checked} C-FINDs ({unjudged} with no acknowledged "
              f"modify); {len(lost)} lost, {len(reverted)} reverted")
    if lost or reverted:
        detail += ": " + ", ".join((reverted + lost)[:2])
    return CheckResult("corrections", not lost and not reverted, detail, len(lost) + len(reverted),
                       {"modifies": sent, "modifies_acked": acked, "merges": len(merges),
                        "merges_acked": merges_acked, "corrections_checked": judged,
                        "owner_copies_checked": replicas_checked, "lost": len(lost), "reverted": len(reverted)})


def check_no_errors(cluster: SimCluster) -> CheckResult:
    errors = list(cluster.loop.errors) + list(cluster.errors)
    return CheckResult("no-errors", not errors, f"{len(errors)} unexpected exceptions"
                       + (f": {errors[0][:300]}" if errors else ""), len(errors))


async def run_checkers(cluster: SimCluster, workload: Workload, seed: int) -> list[CheckResult]:
    return [
        await check_acked_writes(cluster, workload, seed),
        check_no_wrong_content(workload),
        check_replication(cluster, workload),
        check_replicas_agree(cluster, workload),
        check_membership(cluster),
        await check_deletes(cluster, workload, seed),
        await check_corrections(cluster, workload, seed),
        check_no_errors(cluster),
    ]
