"""`pacsnode sim chaos`: real pacsnode processes, real DICOM clients, real faults.

    pacsnode sim chaos --nodes 5 --duration 120 --seed 3

Starts K nodes on 127.0.0.1, every peer connection routed through a fault proxy
(sim/faultproxy.py; each node's `--peer-route` sends its traffic for node B to the link
"A>B"). While pynetdicom SCUs and dcmtk's storescu store new studies through random
nodes, readers C-FIND and C-GET acknowledged ones and a deleter deletes some of them
(Admin.Delete, or `pacsnode delete`) through random live nodes, the runner injects faults one
at a time from a seeded plan (sim/chaos_plan.py: kill -9, SIGSTOP/SIGCONT, clean
restart, data-dir wipe, partitions, one-way cuts, isolation, slow links), measures how
long detection and recovery took, and records every client operation and its outcome.

At the end it heals everything and checks, on the real processes:

1. every node sees every other alive, no hints are held, nothing is under-replicated,
   and every node reports the same ring (Admin.RingView);
2. every acknowledged instance no delete named is held by exactly its N owners, and no
   node holds one whose delete was acknowledged (ListStudy on every node);
3. every acknowledged instance no delete named is retrievable byte-identical by C-GET
   from every node, and no C-GET returns a deleted one;
4. a C-FIND at every node lists every acknowledged study, and no IMAGE-level C-FIND
   lists a deleted instance (unclear deletes, with no clear answer, are judged neither way);
5. no node process died on its own, and no C-GET during the run returned other bytes
   than those acknowledged.

It exits 1 on any violation and prints the scenario and seed. The seed fixes the fault
plan and the clients' choices; the timing of real processes is not replayable, so the
same seed gives the same faults in the same order, not the same interleaving.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc

from pacsnode.cli.status import STATE_NAMES, StatusError, ask
from pacsnode.cli.status import metrics as status_metrics
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.ring.placement import Member, Replication, Ring, SiteReplicas, replica_total
from pacsnode.sim import chaos_clients as clients
from pacsnode.sim import datagen
from pacsnode.sim.chaos_plan import SCENARIOS, Fault, plan_faults
from pacsnode.sim.faultproxy import FaultProxy
from pacsnode.sim.process import NodeProcess, free_port, pacsnode_command, wait_until

log = logging.getLogger("pacsnode.sim.chaos")

CLUSTER_ID = "pacsnode"
# A hint this young is a copy on its way, not one held back: with the local write scope every
# store through a node keeps one hint per owner in another site until the immediate send
# lands (~2 WAN legs), and the workload keeps storing while the runner waits for health.
# Counting those, "healthy" needed an instant with no store in flight anywhere (stop 22:
# the "4 hints on c4 45 s after the cut" and "6 hints" of two seed-2 runs were the copies of
# the study being stored through c4 at that moment; none was older than a second).
HINT_IN_FLIGHT_MS = 5_000


def local_health_problem(local: pb.LocalStats, now_ms: int) -> str | None:
    """Why a node's own state is not healthy (hints held back, transfers, under-replicated
    studies), or None. Instance hints younger than HINT_IN_FLIGHT_MS do not count; tombstone
    hints (no age in the summary) always do."""
    instance_hints = sum(h.hint_count for h in local.hints_by_owner)
    held_back = sum(h.hint_count for h in local.hints_by_owner
                    if h.oldest_stored_at_ms and now_ms - h.oldest_stored_at_ms > HINT_IN_FLIGHT_MS)
    other_hints = max(0, local.hint_count - instance_hints)
    if held_back or other_hints or len(local.transfers) or local.under_replicated_study_count:
        return (f"{local.hint_count} hints ({held_back + other_hints} older than {HINT_IN_FLIGHT_MS // 1000} s or "
                f"tombstones), {len(local.transfers)} transfers, {local.under_replicated_study_count} "
                f"under-replicated studies")
    return None


@dataclass
class ChaosSettings:
    """Every knob of a chaos run, with its default (also the CLI's defaults)."""

    nodes: int = 5
    duration_s: float = 120.0           # Faults are started during this long; the final checks come after.
    seed: int = 0
    scenario: str = "mixed"
    sites: int = 1                      # Nodes round-robin over this many sites.
    wan_delay_ms: float = 0.0           # One-way latency of links between sites (issue 15: 40) ...
    wan_jitter_ms: float = 0.0          # ... plus or minus this (issue 15: 10) ...
    lan_delay_ms: float = 0.0           # ... and of links within a site (issue 15: 0.2). Kept across heals.
    replication_factor: int = 3
    site_copies: int = 0                # > 0: --site-replicas SITE=this for every site (issue 15), N unused.
    write_quorum_scope: str = "auto"    # auto: local with site copies, else global.
    write_quorum: int = 2
    write_quorum_mode: str = "strict"   # strict: only owners' copies count toward W; sloppy: hints too.
    dead_grace_s: int = 10              # Short, so a long kill is removed and re-replicated within the run.
    profile: str = "local"              # Membership timers for loopback (probe 0.2 s).
    anti_entropy_interval_ms: int = 5_000
    store_threads: int = 2              # pynetdicom SCUs storing new studies.
    storescu_every_s: float = 6.0       # A dcmtk storescu study this often (0: none).
    read_threads: int = 2               # Readers: each a C-FIND or C-GET of an acknowledged study ...
    read_every_s: float = 0.5           # ... this often.
    delete_every_s: float = 2.0         # A delete of an acknowledged study or instance this often (0: none) ...
    delete_timeout_s: float = 30.0      # ... unclear when not answered within this.
    instances_per_study: int = 4
    warmup_s: float = 5.0               # Load before the first fault.
    recover_max_s: float = 45.0         # Wait at most this long for health after a fault.
    settle_timeout_s: float = 180.0     # Wait at most this long for convergence at the end.
    work_dir: Path | None = None        # Default: a temporary directory, removed unless --keep or a failure.
    keep: bool = False

    def check(self) -> None:
        """Raise ValueError, before anything is started, for settings a run cannot have."""
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown chaos scenario {self.scenario!r}; one of {', '.join(SCENARIOS)}")
        if self.nodes < 2:
            raise ValueError(f"chaos needs at least 2 nodes, got {self.nodes}")
        if not 1 <= self.sites <= self.nodes:
            raise ValueError(f"sites must be 1..nodes ({self.nodes}), got {self.sites}")
        if not 0 <= self.wan_jitter_ms <= self.wan_delay_ms or self.lan_delay_ms < 0:
            raise ValueError("need 0 <= WAN jitter <= WAN delay and LAN delay >= 0")
        if self.scenario == "sites" and self.sites < 2:
            raise ValueError("the sites scenario needs --sites 2 or more")
        if self.site_copies < 0 or self.write_quorum_scope not in ("auto", "local", "global"):
            raise ValueError("site copies must be >= 0 and the write quorum scope auto, local or global")
        if self.write_quorum_mode not in ("strict", "sloppy"):
            raise ValueError(f"the write quorum mode is strict or sloppy, got {self.write_quorum_mode!r}")
        if not 1 <= self.write_quorum <= replica_total(self.replication):
            raise ValueError(f"need 1 <= write quorum <= replicas, got W={self.write_quorum} N={self.replication}")
        if not self.duration_s > 0 or self.dead_grace_s < 0 or self.store_threads < 0 or self.storescu_every_s < 0 \
                or self.delete_every_s < 0 or not self.delete_timeout_s > 0 or not self.settle_timeout_s > 0:
            raise ValueError("duration, delete timeout and settle timeout must be > 0; dead grace, store threads, "
                             "storescu and delete intervals must be >= 0")

    @property
    def write_scope_local(self) -> bool:
        """W is counted in the entry node's site (as node/config.py resolves auto)."""
        return self.write_quorum_scope == "local" or (self.write_quorum_scope == "auto" and self.site_copies > 0)

    @property
    def replication(self) -> Replication:
        """The placement policy the nodes run with: N, or site_copies in every site."""
        if self.site_copies:
            return SiteReplicas.of({self.site_name(i): self.site_copies for i in range(self.sites)})
        return self.replication_factor

    def site_name(self, index: int) -> str:
        return f"site{index + 1}" if self.sites > 1 else "default"

    def replay(self) -> str:
        return (f"pacsnode sim chaos --nodes {self.nodes} --duration {self.duration_s:g} --seed {self.seed} "
                f"--scenario {self.scenario} --sites {self.sites}"
                + (f" --wan-delay-ms {self.wan_delay_ms:g} --wan-jitter-ms {self.wan_jitter_ms:g}"
                   if self.wan_delay_ms else "")
                + (f" --lan-delay-ms {self.lan_delay_ms:g}" if self.lan_delay_ms else "")
                + (f" --site-copies {self.site_copies}" if self.site_copies else "")
                + (f" --write-quorum-scope {self.write_quorum_scope}" if self.write_quorum_scope != "auto" else "")
                + (f" --write-quorum-mode {self.write_quorum_mode}" if self.write_quorum_mode != "strict" else "")
                + (f" --profile {self.profile}" if self.profile != "local" else "")
                + (f" --delete-every {self.delete_every_s:g}" if self.delete_every_s != 2.0 else ""))


# ---------------------------------------------------------------------------------------
# The cluster: processes and their links


class ChaosCluster:
    """K pacsnode processes whose peer traffic all goes through one FaultProxy."""

    def __init__(self, root: Path, settings: ChaosSettings) -> None:
        self.root = root
        self.settings = settings
        self.ids = [f"c{i + 1}" for i in range(settings.nodes)]
        self.sites = {node_id: settings.site_name(i % settings.sites) for i, node_id in enumerate(self.ids)}
        self.proxy = FaultProxy()
        peer_ports = {node_id: free_port() for node_id in self.ids}
        self.nodes: dict[str, NodeProcess] = {}
        self._rings: dict[tuple[int, ...], Ring] = {}  # Expected rings by the nodes' token salts.
        self.paused: set[str] = set()
        self.expected_down: set[str] = set()
        self.outages: dict[str, int] = {node_id: 0 for node_id in self.ids}  # Kills, stops and pauses so far.
        for node_id in self.ids:
            routes: list[str] = []
            for other in self.ids:
                if other != node_id:
                    via = self.proxy.add_link(f"{node_id}>{other}", "127.0.0.1", peer_ports[other])
                    if self.sites[node_id] != self.sites[other] and settings.wan_delay_ms:
                        self.proxy.base_delay(f"{node_id}>{other}", settings.wan_delay_ms, settings.wan_jitter_ms)
                    elif self.sites[node_id] == self.sites[other] and settings.lan_delay_ms:
                        self.proxy.base_delay(f"{node_id}>{other}", settings.lan_delay_ms)
                    routes += ["--peer-route", f"127.0.0.1:{peer_ports[other]}=127.0.0.1:{via}"]
            s = settings
            self.nodes[node_id] = NodeProcess(
                root / node_id, node_id=node_id, peer_port=peer_ports[node_id],
                extra_args=[
                    "--site", self.sites[node_id],
                    "--replication-factor", str(s.replication_factor), "--write-quorum", str(s.write_quorum),
                    "--write-quorum-scope", s.write_quorum_scope, "--write-quorum-mode", s.write_quorum_mode,
                    *[arg for site, copies in (s.replication.per_site if isinstance(s.replication, SiteReplicas)
                                               else ()) for arg in ("--site-replicas", f"{site}={copies}")],
                    "--profile", s.profile, "--dead-grace-s", str(s.dead_grace_s),
                    "--anti-entropy-interval-ms", str(s.anti_entropy_interval_ms),
                    *routes,
                ],
                log_path=root / f"{node_id}.log",
            )

    # -------------------------------------------------------------- lifecycle
    def start_all(self) -> None:
        first = self.nodes[self.ids[0]]
        first.start()
        for node_id in self.ids[1:]:
            node = self.nodes[node_id]
            node.seeds = [first.peer_address]
            node.start()
        if not wait_until(lambda: self.membership_converged(), 60, 0.25):
            raise RuntimeError(f"the {len(self.ids)} nodes did not see each other alive within 60 s")

    def start(self, node_id: str) -> None:
        """(Re)start a node, with every other node as a seed (a wiped node has no peers.json)."""
        node = self.nodes[node_id]
        node.seeds = [self.nodes[o].peer_address for o in self.ids if o != node_id]
        node.start()
        self.expected_down.discard(node_id)
        self.paused.discard(node_id)

    def up(self, node_id: str) -> bool:
        return node_id not in self.expected_down and node_id not in self.paused

    def kill(self, node_id: str) -> None:
        self.outages[node_id] += 1
        self.expected_down.add(node_id)
        self.nodes[node_id].kill()

    def stop(self, node_id: str) -> None:
        self.outages[node_id] += 1
        self.expected_down.add(node_id)
        self.nodes[node_id].stop()

    def pause(self, node_id: str) -> None:
        self.outages[node_id] += 1
        self.paused.add(node_id)
        self.nodes[node_id].pause()

    def resume(self, node_id: str) -> None:
        self.nodes[node_id].resume()
        self.paused.discard(node_id)

    def links_between(self, group_a: tuple[str, ...] | list[str], group_b: tuple[str, ...] | list[str],
                      *, both_ways: bool = True) -> list[str]:
        names = [f"{a}>{b}" for a in group_a for b in group_b if a != b]
        if both_ways:
            names += [f"{b}>{a}" for a in group_a for b in group_b if a != b]
        return names

    def heal(self) -> None:
        self.proxy.heal_all()
        for node_id in list(self.paused):
            self.resume(node_id)
        for node_id in self.ids:
            if not self.nodes[node_id].alive:
                self.start(node_id)

    def crashed(self) -> list[str]:
        """Nodes whose process ended without the runner ending it."""
        return [n for n in self.ids if n not in self.expected_down and not self.nodes[n].alive]

    def close(self) -> None:
        for node_id in list(self.paused):
            try:
                self.resume(node_id)
            except OSError:
                pass
        for node in self.nodes.values():
            node.stop(timeout_s=20)
        self.proxy.close()

    # -------------------------------------------------------------- what the nodes say
    def answering(self) -> list[str]:
        return [n for n in self.ids if self.nodes[n].alive and n not in self.paused]

    def status(self, node_id: str, timeout_s: float = 2.0) -> pb.StatusReply | None:
        try:
            return ask(self.nodes[node_id].peer_address, CLUSTER_ID, timeout_s)
        except StatusError:
            return None

    def view(self, observer: str, timeout_s: float = 1.0) -> dict[str, str] | None:
        """node id -> state, as `observer` sees the members."""
        reply = self.status(observer, timeout_s)
        if reply is None:
            return None
        return {m.member.node_id: STATE_NAMES.get(m.member.state, "unknown") for m in reply.members}

    def membership_converged(self) -> bool:
        for node_id in self.ids:
            view = self.view(node_id)
            if view is None or any(view.get(other) != "alive" for other in self.ids):
                return False
        return True

    def health(self) -> tuple[bool, str]:
        """Healthy: every node answers and sees all alive; no hint held back (HINT_IN_FLIGHT_MS),
        no transfer, nothing under-replicated."""
        for node_id in self.ids:
            reply = self.status(node_id)
            if reply is None:
                return False, f"{node_id} does not answer"
            states = {m.member.node_id: STATE_NAMES.get(m.member.state, "?") for m in reply.members}
            not_alive = {n: states.get(n, "unknown") for n in self.ids if states.get(n) != "alive"}
            if not_alive:
                return False, f"{node_id} sees {not_alive}"
            problem = local_health_problem(reply.local, int(time.time() * 1000))
            if problem is not None:
                return False, f"{node_id}: {problem}"
        return True, "healthy"

    def _ask(self, node_id: str, call: Callable[[grpc.Channel, pb.Envelope], Any]) -> Any:
        """`call(channel, envelope)` on one channel to the node's peer port; None if it fails."""
        envelope = pb.Envelope(cluster_id=CLUSTER_ID, protocol_version=PROTOCOL_VERSION, sender_id="chaos")
        try:
            with grpc.insecure_channel(self.nodes[node_id].peer_address) as channel:
                return call(channel, envelope)
        except grpc.RpcError:
            return None

    def held(self, node_id: str, study_uids: list[str]) -> dict[str, set[str]] | None:
        """Per study, the instances the node holds itself (not as hints): ListStudy, one channel."""
        def call(channel: grpc.Channel, envelope: pb.Envelope) -> dict[str, set[str]]:
            stub = pb_grpc.DataStub(channel)
            return {uid: {r.sop_instance_uid for r in stub.ListStudy(
                        pb.ListStudyRequest(envelope=envelope, study_instance_uid=uid), timeout=10).records}
                    for uid in study_uids}
        result: dict[str, set[str]] | None = self._ask(node_id, call)
        return result

    def ring_layout(self, node_id: str) -> list[tuple[int, int, tuple[str, ...]]] | None:
        """Every range and its owners as `node_id` sees the ring (Admin.RingView)."""
        def call(channel: grpc.Channel, envelope: pb.Envelope) -> list[tuple[int, int, tuple[str, ...]]]:
            reply = pb_grpc.AdminStub(channel).RingView(pb.RingViewRequest(envelope=envelope), timeout=10)
            return [(r.range.start, r.range.end, tuple(r.owner_ids)) for r in reply.ranges]
        result: list[tuple[int, int, tuple[str, ...]]] | None = self._ask(node_id, call)
        return result

    def metrics(self, node_id: str) -> dict[str, float]:
        try:
            return status_metrics(self.nodes[node_id].peer_address, CLUSTER_ID, 5.0)
        except grpc.RpcError as error:
            return {"error": str(error.code()) if hasattr(error, "code") else repr(error)}  # type: ignore[dict-item]

    def token_salts(self) -> tuple[int, ...]:
        """Each node's token salt as its data dir keeps it (chosen at its first start; a
        wiped node chooses again); 0 for a node that has not started."""
        salts = []
        for node_id in self.ids:
            try:
                identity = json.loads((self.nodes[node_id].data_dir / "identity.json").read_text())
                salts.append(int(identity.get("token_salt", 0)))
            except (OSError, ValueError, KeyError):
                salts.append(0)
        return tuple(salts)

    @property
    def ring(self) -> Ring:
        """The ring every node should hold once all are members (the expected placement)."""
        salts = self.token_salts()
        ring = self._rings.get(salts)
        if ring is None:
            ring = self._rings[salts] = Ring(CLUSTER_ID, [
                Member(node_id=n, site=self.sites[n], host=socket.gethostname(), token_salt=salt)
                for n, salt in zip(self.ids, salts)])
        return ring

    def owners(self, study_uid: str) -> set[str]:
        ring = self.ring
        return set(ring.owners_of_study(study_uid, ring.effective(self.settings.replication)))

    def quorum_reachable(self, entry: str, study_uid: str) -> bool:
        """Whether a store of this study through `entry` can meet W now, as far as the runner's
        own faults go (see `write_quorum_reachable`)."""
        blocked = set(self.proxy.blocked())
        reachable = {n for n in self.ids if n == entry or (
            self.up(n) and f"{entry}>{n}" not in blocked and f"{n}>{entry}" not in blocked)}
        return write_quorum_reachable(entry, self.owners(study_uid), reachable, self.sites, self.settings)


def write_quorum_reachable(entry: str, owners: set[str], reachable: set[str], sites: dict[str, str],
                           settings: ChaosSettings) -> bool:
    """Whether W copies of a study can be made through `entry` when only `reachable` nodes
    (the entry among them) can be reached from it: strict counts the study's owners, sloppy
    any reachable node (a stand-in's hint counts); local scope counts in the entry's site,
    capped at the copies that site holds. A store that cannot meet W is refused honestly
    (0xA701): the runner reports those apart from the ones that should have succeeded."""
    if settings.write_scope_local:
        in_scope = {n for n in sites if sites[n] == sites[entry]}
        needed = min(settings.write_quorum, len(owners & in_scope))
    else:
        in_scope, needed = set(sites), settings.write_quorum
    counted = reachable & in_scope
    if settings.write_quorum_mode == "strict":
        counted &= owners
    return len(counted) >= needed


# ---------------------------------------------------------------------------------------
# The clients and what they saw


@dataclass
class Sent:
    path: str
    study_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""


class DeleteVerdict(enum.Enum):
    """What a delete of acknowledged instances means for the final checks."""

    DELETED = "deleted"          # Acknowledged: the instances must be gone from every node, for good.
    NOT_DELETED = "not-deleted"  # The node deleted nothing (NOT_FOUND, NOT_JOINED): still expected present.
    UNCLEAR = "unclear"          # May or may not apply (INCOMPLETE, QUORUM_FAILED, no answer): judged neither way.


def delete_verdict(outcome: int | None) -> DeleteVerdict:
    """The verdict for a node's DeleteOutcome, or None when no answer came (timeout, RPC
    failure, an exit code of `pacsnode delete` that does not say which outcome it was)."""
    if outcome == pb.DELETE_OUTCOME_DELETED:
        return DeleteVerdict.DELETED
    if outcome in (pb.DELETE_OUTCOME_NOT_FOUND, pb.DELETE_OUTCOME_NOT_JOINED):
        return DeleteVerdict.NOT_DELETED  # Both return before any tombstone is sent.
    return DeleteVerdict.UNCLEAR


# `pacsnode delete`'s exit codes that name one outcome (cli/delete_command.py); 1 is
# QUORUM_FAILED, NOT_JOINED or a failed call: unclear.
CLI_DELETE_EXIT_OUTCOMES = {0: pb.DELETE_OUTCOME_DELETED, 3: pb.DELETE_OUTCOME_NOT_FOUND,
                            4: pb.DELETE_OUTCOME_INCOMPLETE}


class OpLog:
    """Every client operation, its outcome, and the acknowledged instances (thread-safe)."""

    def __init__(self, started: float, path: Path) -> None:
        self.started = started
        self._lock = threading.Lock()
        self._sink = open(path, "w")
        self.ops: list[dict[str, Any]] = []
        self.sent: dict[str, Sent] = {}          # SOP Instance UID -> the file sent
        self.acked: dict[str, Sent] = {}
        self.violations: list[str] = []
        self.fault_now = ""
        # Deletes of acknowledged instances: named by a delete not yet over, or whose delete
        # was acknowledged (DELETED), or unclear; an instance a delete left untouched
        # (NOT_FOUND, NOT_JOINED) is expected present again.
        self.delete_touched: set[str] = set()
        self.deleted: dict[str, float] = {}      # SOP Instance UID -> when its delete was acknowledged
        self.unclear: set[str] = set()

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def moment(self) -> dict[str, Any]:
        """When an operation starts and which fault is on then (what its record is filed under)."""
        return {"t": self.now(), "fault": self.fault_now}

    def record(self, **op: Any) -> None:
        op.setdefault("t", self.now())
        op.setdefault("fault", self.fault_now)
        with self._lock:
            self.ops.append(op)
            self._sink.write(json.dumps(op) + "\n")

    def sending(self, sent: Sent) -> None:
        with self._lock:
            self.sent[sent.sop_uid] = sent

    def ack(self, sop_uid: str) -> None:
        with self._lock:
            self.acked[sop_uid] = self.sent[sop_uid]

    def violation(self, text: str) -> None:
        log.error("violation: %s", text)
        with self._lock:
            self.violations.append(text)

    def acked_studies(self) -> dict[str, list[Sent]]:
        """Acknowledged instances that must be there: none a delete named (in flight,
        acknowledged or unclear), by study."""
        with self._lock:
            studies: dict[str, list[Sent]] = {}
            for sent in self.acked.values():
                if sent.sop_uid not in self.delete_touched:
                    studies.setdefault(sent.study_uid, []).append(sent)
            return studies

    def deleted_studies(self) -> dict[str, list[Sent]]:
        """Acknowledged instances whose delete was acknowledged: must be gone for good."""
        with self._lock:
            studies: dict[str, list[Sent]] = {}
            for sop_uid in self.deleted:
                sent = self.acked[sop_uid]
                studies.setdefault(sent.study_uid, []).append(sent)
            return studies

    def touched(self, sop_uid: str) -> bool:
        with self._lock:
            return sop_uid in self.delete_touched

    def deleted_at(self, sop_uid: str) -> float | None:
        with self._lock:
            return self.deleted.get(sop_uid)

    def begin_delete(self, sents: list[Sent]) -> None:
        with self._lock:
            self.delete_touched.update(s.sop_uid for s in sents)

    def end_delete(self, sents: list[Sent], verdict: "DeleteVerdict") -> None:
        now = self.now()
        with self._lock:
            for sent in sents:
                if verdict is DeleteVerdict.DELETED:
                    self.deleted.setdefault(sent.sop_uid, now)
                    self.unclear.discard(sent.sop_uid)
                elif verdict is DeleteVerdict.UNCLEAR:
                    if sent.sop_uid not in self.deleted:
                        self.unclear.add(sent.sop_uid)
                elif sent.sop_uid not in self.deleted and sent.sop_uid not in self.unclear:
                    self.delete_touched.discard(sent.sop_uid)

    def close(self) -> None:
        with self._lock:
            self._sink.close()


def _sent_of(entry: datagen.ManifestEntry) -> Sent:
    return Sent(path=entry["path"], study_uid=entry["study_uid"], sop_uid=entry["sop_uid"],
                sop_class_uid=entry["sop_class_uid"], transfer_syntax_uid=entry["transfer_syntax_uid"],
                patient_id=entry["patient_id"])


class Workload:
    """Storers (pynetdicom), a storescu loop (dcmtk), readers and a deleter, until stopped."""

    def __init__(self, cluster: ChaosCluster, oplog: OpLog, data_dir: Path, settings: ChaosSettings) -> None:
        self.cluster = cluster
        self.oplog = oplog
        self.data_dir = data_dir
        self.settings = settings
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.file_bytes: dict[str, bytes] = {}   # SOP Instance UID -> dataset bytes as sent
        self._bytes_lock = threading.Lock()

    def start(self) -> None:
        s = self.settings
        for i in range(s.store_threads):
            self.threads.append(threading.Thread(target=self._guard(self._store_loop, i), name=f"store{i}", daemon=True))
        if s.storescu_every_s > 0:
            if clients.have_storescu():
                self.threads.append(threading.Thread(target=self._guard(self._storescu_loop, 0), name="storescu",
                                                     daemon=True))
            else:
                print("chaos: dcmtk's storescu is not installed; its load is skipped (apt-get install dcmtk)")
        if s.read_every_s > 0:
            for i in range(s.read_threads):
                self.threads.append(threading.Thread(target=self._guard(self._read_loop, i), name=f"reader{i}",
                                                     daemon=True))
        if s.delete_every_s > 0:
            self.threads.append(threading.Thread(target=self._guard(self._delete_loop, 0), name="deleter", daemon=True))
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _guard(self, loop: Callable[[int], None], index: int) -> Callable[[], None]:
        def run() -> None:
            try:
                loop(index)
            except Exception as error:  # A client bug must not pass for a clean run.
                log.exception("chaos client crashed")
                self.oplog.violation(f"chaos client {loop.__name__}[{index}] crashed: {error!r}")
        return run

    def _study(self, rng: random.Random, name: str, *, implicit: bool = False) -> list[datagen.ManifestEntry]:
        spec = datagen.StudySetSpec(patients=1, series_per_study=1, instances_per_series=self.settings.instances_per_study,
                                    rows=64, cols=64, seed=rng.getrandbits(48), implicit_vr=implicit)
        entries = datagen.write_study_set(spec, self.data_dir / name)
        for entry in entries:
            self.oplog.sending(_sent_of(entry))
            with self._bytes_lock:
                self.file_bytes[entry["sop_uid"]] = clients.dataset_bytes(Path(entry["path"]).read_bytes())
        return entries

    def _moment(self, node_id: str) -> dict[str, Any]:
        """When an operation starts and which fault is on then."""
        moment = self.oplog.moment()
        moment["entry_up"] = self.cluster.up(node_id)
        moment["outages"] = self.cluster.outages[node_id]
        return moment

    def _entry_stayed_up(self, node_id: str, moment: dict[str, Any]) -> dict[str, Any]:
        """`entry_up`: the entry node was up from the start of the operation to its end (not
        killed, stopped or paused by the runner meanwhile). A client of a node that went
        down is expected to fail; one of a node that stayed up should not."""
        outages = moment.pop("outages")
        moment["entry_up"] = moment["entry_up"] and self.cluster.up(node_id) and \
            self.cluster.outages[node_id] == outages
        return moment

    def expected_bytes(self, sop_uid: str) -> bytes | None:
        with self._bytes_lock:
            return self.file_bytes.get(sop_uid)

    def _store_loop(self, index: int) -> None:
        rng = random.Random(f"{self.settings.seed}:store:{index}")
        count = 0
        while not self.stop.is_set():
            entries = self._study(rng, f"store{index}-{count}", implicit=rng.random() < 0.3)
            count += 1
            node_id = rng.choice(self.cluster.ids)
            study_uid = entries[0]["study_uid"]
            reachable = self.cluster.quorum_reachable(node_id, study_uid)
            started, moment = time.monotonic(), self._moment(node_id)
            outcome = clients.store_files(self.cluster.nodes[node_id].dicom_port,
                                          [(e["path"], e["sop_class_uid"], e["transfer_syntax_uid"]) for e in entries])
            took = round(time.monotonic() - started, 3)
            moment = self._entry_stayed_up(node_id, moment)
            moment["quorum_reachable"] = reachable and self.cluster.quorum_reachable(node_id, study_uid)
            for entry in entries:
                status = outcome.statuses.get(entry["path"])
                if status == 0:
                    self.oplog.ack(entry["sop_uid"])
                self.oplog.record(op="store", client="pynetdicom", node=node_id, sop=entry["sop_uid"],
                                  study=entry["study_uid"], status=status, ok=status == 0, error=outcome.error,
                                  took_s=took, **moment)
            self.stop.wait(0.1)

    def _storescu_loop(self, index: int) -> None:
        rng = random.Random(f"{self.settings.seed}:storescu:{index}")
        count = 0
        while not self.stop.wait(self.settings.storescu_every_s):
            entries = self._study(rng, f"storescu-{count}")
            count += 1
            node_id = rng.choice(self.cluster.ids)
            study_uid = entries[0]["study_uid"]
            reachable = self.cluster.quorum_reachable(node_id, study_uid)
            started, moment = time.monotonic(), self._moment(node_id)
            code, acked, tail = clients.storescu(self.cluster.nodes[node_id].dicom_port, [e["path"] for e in entries])
            took = round(time.monotonic() - started, 3)
            moment = self._entry_stayed_up(node_id, moment)
            moment["quorum_reachable"] = reachable and self.cluster.quorum_reachable(node_id, study_uid)
            acked_paths = set(acked)
            for entry in entries:
                ok = entry["path"] in acked_paths
                if ok:
                    self.oplog.ack(entry["sop_uid"])
                self.oplog.record(op="store", client="storescu", node=node_id, sop=entry["sop_uid"],
                                  study=entry["study_uid"], status=0 if ok else None, ok=ok,
                                  error="" if ok else f"exit {code}: {tail[-200:]}", took_s=took, **moment)

    def _read_loop(self, index: int) -> None:
        rng = random.Random(f"{self.settings.seed}:read:{index}")
        turn = 0
        while not self.stop.wait(self.settings.read_every_s):
            studies = self.oplog.acked_studies()
            if not studies:
                continue
            study_uid = rng.choice(sorted(studies))
            acked = studies[study_uid]
            node_id = rng.choice(self.cluster.ids)
            port = self.cluster.nodes[node_id].dicom_port
            turn += 1
            started, moment = time.monotonic(), self._moment(node_id)
            if turn % 3 == 2 and acked[0].patient_id:
                # The patient's studies by PatientID: no study key, a scatter over every range.
                patient_id = acked[0].patient_id
                found = clients.find_studies(port, clients.patient_identifier(patient_id))
                took = round(time.monotonic() - started, 3)
                moment = self._entry_stayed_up(node_id, moment)
                ok = found.final_status == 0 and not found.error
                wanted = {uid: [s for s in sents if not self.oplog.touched(s.sop_uid)]
                          for uid, sents in studies.items() if sents[0].patient_id == patient_id}
                complete = all(found.instance_counts.get(uid, 0) >= len(still) for uid, still in wanted.items() if still)
                self.oplog.record(op="find-patient", node=node_id, study=study_uid, status=found.final_status, ok=ok,
                                  found=complete, complete=complete, error=found.error, took_s=took, **moment)
                continue
            if turn % 3 == 1:
                found = clients.find_studies(port, clients.study_identifier(study_uid))
                took = round(time.monotonic() - started, 3)
                moment = self._entry_stayed_up(node_id, moment)
                ok = found.final_status == 0 and not found.error
                # Instances a delete named meanwhile may be gone: complete means the others are counted.
                still = [s for s in acked if not self.oplog.touched(s.sop_uid)]
                self.oplog.record(op="find", node=node_id, study=study_uid, status=found.final_status, ok=ok,
                                  found=study_uid in found.study_uids or not still, error=found.error, took_s=took,
                                  complete=found.instance_counts.get(study_uid, 0) >= len(still), **moment)
                continue
            with clients.Getter(port, [(s.sop_class_uid, s.transfer_syntax_uid) for s in acked]) as getter:
                got = getter.get_study(study_uid)
            took = round(time.monotonic() - started, 3)
            moment = self._entry_stayed_up(node_id, moment)
            for sop_uid, data in got.received.items():
                deleted_at = self.oplog.deleted_at(sop_uid)
                if deleted_at is not None and deleted_at < moment["t"]:
                    # Served after its delete was acknowledged (before this read began). The
                    # C-GET's final status says whether the node vouched for its answer
                    # (Success) or flagged it (a failure or warning status: not all owners).
                    self.oplog.record(op="deleted-served", node=node_id, study=study_uid, sop=sop_uid, ok=False,
                                      status=got.final_status, deleted_at=deleted_at, **moment)
                expected = self.expected_bytes(sop_uid)
                if expected is None:
                    self.oplog.violation(f"C-GET of study {study_uid} at {node_id} returned unknown instance {sop_uid}")
                elif data != expected:
                    self.oplog.violation(f"C-GET at {node_id} returned other bytes for {sop_uid} "
                                         f"({len(data)} vs {len(expected)} sent)")
            missing = [s.sop_uid for s in acked if s.sop_uid not in got.received and not self.oplog.touched(s.sop_uid)]
            ok = got.final_status in (0x0000,) and not got.error
            self.oplog.record(op="get", node=node_id, study=study_uid, status=got.final_status, ok=ok,
                              received=len(got.received), missing=len(missing), error=got.error, took_s=took,
                              **moment)
            if ok and missing:
                # Success without every acknowledged instance: a stale replica answered the
                # study's instance list (R=1). Recorded; the final check demands completeness.
                self.oplog.record(op="stale-get", node=node_id, study=study_uid, missing=len(missing), ok=True,
                                  **moment)


    def _delete_loop(self, index: int) -> None:
        """Delete acknowledged instances (one time in four a whole study, else one
        instance) through a random node the runner has not taken down, three times in four
        with the Admin.Delete RPC (its typed outcome), else with `pacsnode delete` (its
        exit code). Records each delete's verdict (DeleteVerdict)."""
        rng = random.Random(f"{self.settings.seed}:delete:{index}")
        count = 0
        while not self.stop.wait(self.settings.delete_every_s):
            studies = self.oplog.acked_studies()
            live = [n for n in self.cluster.ids if self.cluster.up(n) and self.cluster.nodes[n].alive]
            if not studies or not live:
                continue
            study_uid = rng.choice(sorted(studies))
            sents = sorted(studies[study_uid], key=lambda s: s.sop_uid)
            whole = rng.random() < 0.25
            named = sents if whole else [rng.choice(sents)]
            node_id = rng.choice(live)
            self.delete(node_id, study_uid, named, whole=whole, via="cli" if count % 4 == 3 else "rpc")
            count += 1

    def delete(self, node_id: str, study_uid: str, named: list[Sent], *, whole: bool, via: str) -> DeleteVerdict:
        """Delete `named` (acknowledged instances of one study: all of them with `whole`,
        else one) through `node_id`, by "rpc" or "cli"; record the op and its verdict."""
        sop_uid = "" if whole else named[0].sop_uid
        self.oplog.begin_delete(named)
        started, moment = time.monotonic(), self._moment(node_id)
        if via == "cli":
            outcome, removed, error = self.delete_cli(node_id, study_uid, sop_uid)
        else:
            outcome, removed, error = self.delete_rpc(node_id, study_uid, sop_uid)
        took = round(time.monotonic() - started, 3)
        moment = self._entry_stayed_up(node_id, moment)
        verdict = delete_verdict(outcome)
        self.oplog.end_delete(named, verdict)
        self.oplog.record(op="delete", via=via, node=node_id, study=study_uid, sop=sop_uid,
                          level="study" if whole else "instance", instances=len(named),
                          outcome=pb.DeleteOutcome.Name(outcome) if outcome is not None else None,
                          removed=removed, verdict=verdict.value, ok=verdict is DeleteVerdict.DELETED,
                          status=outcome, error=error, took_s=took, **moment)
        return verdict

    def delete_rpc(self, node_id: str, study_uid: str, sop_uid: str) -> tuple[int | None, int | None, str]:
        """Admin.Delete, as `pacsnode delete` sends it: (outcome or None, instances removed, error)."""
        envelope = pb.Envelope(cluster_id=CLUSTER_ID, protocol_version=PROTOCOL_VERSION, sender_id="chaos",
                               sent_at_ms=int(time.time() * 1000))
        request = pb.DeleteRequest(envelope=envelope, study_instance_uid=study_uid, sop_instance_uid=sop_uid)
        try:
            with grpc.insecure_channel(self.cluster.nodes[node_id].peer_address) as channel:
                reply = pb_grpc.AdminStub(channel).Delete(request, timeout=self.settings.delete_timeout_s)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            return None, None, f"rpc failed: {code.name if code is not None else repr(error)}"
        return int(reply.outcome), int(reply.instances_deleted_count), ""

    def delete_cli(self, node_id: str, study_uid: str, sop_uid: str) -> tuple[int | None, int | None, str]:
        """`pacsnode delete --node ... --study ... [--instance ...]`: the outcome its exit code names."""
        timeout_s = self.settings.delete_timeout_s
        command = pacsnode_command() + ["delete", "--node", self.cluster.nodes[node_id].peer_address,
                                        "--study", study_uid, "--cluster-id", CLUSTER_ID,
                                        "--timeout-s", f"{timeout_s:g}"] + (["--instance", sop_uid] if sop_uid else [])
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 30, errors="replace")
        except subprocess.TimeoutExpired:
            return None, None, "pacsnode delete did not exit"
        if run.returncode == 2:
            self.oplog.violation(f"pacsnode delete refused its arguments: {run.stderr[-300:]}")
        outcome = CLI_DELETE_EXIT_OUTCOMES.get(run.returncode)
        return outcome, None, "" if outcome is not None else f"exit {run.returncode}: {run.stderr[-200:].strip()}"


# ---------------------------------------------------------------------------------------
# Faults


@dataclass
class FaultRecord:
    kind: str
    description: str
    started_s: float
    duration_s: float
    label: str = ""                             # "#3 kill c2 for 5.0 s": what ops.jsonl files operations under.
    target: str = ""
    skipped: str = ""
    dead_everywhere_s: float | None = None      # After the fault began, every observer saw the target dead.
    suspected_by: list[str] = field(default_factory=list)
    declared_dead_by: list[str] = field(default_factory=list)
    removed_everywhere_s: float | None = None
    recovered_s: float | None = None            # After the fault ended: healthy again.
    recovery_state: str = ""


class FaultInjector:
    def __init__(self, cluster: ChaosCluster, oplog: OpLog, settings: ChaosSettings) -> None:
        self.cluster = cluster
        self.oplog = oplog
        self.settings = settings

    def run(self, fault: Fault, number: int = 0) -> FaultRecord:
        c = self.cluster
        record = FaultRecord(kind=fault.kind, description=fault.describe(), started_s=self.oplog.now(),
                             duration_s=fault.duration_s, target=fault.target,
                             label=f"#{number} {fault.describe()}")
        if fault.kind == "wipe":
            healthy = wait_until(lambda: c.health()[0], self.settings.recover_max_s, 0.5)
            if not healthy:
                # W=2 survives one lost disk, not two before repair: wipe only a healthy cluster.
                record.skipped = f"cluster not healthy: {c.health()[1]}"
                return record
            record.started_s = self.oplog.now()
        self.oplog.fault_now = record.label
        observers = [n for n in c.ids if n != fault.target]
        if fault.kind in ("kill", "long-kill", "wipe"):
            c.kill(fault.target)
            if fault.kind == "wipe":
                shutil.rmtree(c.nodes[fault.target].data_dir, ignore_errors=True)
        elif fault.kind == "pause":
            c.pause(fault.target)
        elif fault.kind == "restart":
            c.stop(fault.target)
        elif fault.kind in ("partition", "one-way", "site-cut"):
            for name in c.links_between(fault.group_a, fault.group_b, both_ways=fault.kind != "one-way"):
                c.proxy.block(name)
        elif fault.kind == "isolate":
            for name in c.links_between([fault.target], observers):
                c.proxy.block(name)
        elif fault.kind == "slow":
            for name in c.links_between([fault.target], observers):
                c.proxy.delay(name, 100)
        self._watch(fault, record, observers)
        # End of the fault.
        if fault.kind in ("kill", "long-kill", "wipe", "restart"):
            c.start(fault.target)
        elif fault.kind == "pause":
            c.resume(fault.target)
        else:
            c.proxy.heal_all()
        ended = time.monotonic()
        self.oplog.fault_now = ""
        recovered = wait_until(lambda: c.health()[0], self.settings.recover_max_s, 0.5)
        record.recovered_s = round(time.monotonic() - ended, 2) if recovered else None
        record.recovery_state = "healthy" if recovered else c.health()[1]
        for node_id in c.crashed():
            self.oplog.violation(f"{node_id} exited on its own during {record.description}")
        return record

    def _watch(self, fault: Fault, record: FaultRecord, observers: list[str]) -> None:
        """Wait out the fault, watching how the observers see its target."""
        began = time.monotonic()
        deadline = began + fault.duration_s
        seen_dead: dict[str, float] = {}
        seen_removed: dict[str, float] = {}
        while time.monotonic() < deadline:
            if fault.target and fault.kind != "restart":
                for observer in observers:
                    if observer in self.cluster.paused or not self.cluster.nodes[observer].alive:
                        continue
                    view = self.cluster.view(observer, timeout_s=0.5)
                    state = (view or {}).get(fault.target)
                    if state == "suspect" and observer not in record.suspected_by:
                        record.suspected_by.append(observer)
                    if state in ("dead", "removed") and observer not in seen_dead:
                        seen_dead[observer] = time.monotonic() - began
                    if state == "removed" and observer not in seen_removed:
                        seen_removed[observer] = time.monotonic() - began
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        record.declared_dead_by = sorted(seen_dead)
        if observers and len(seen_dead) == len(observers):
            record.dead_everywhere_s = round(max(seen_dead.values()), 2)
        if observers and len(seen_removed) == len(observers):
            record.removed_everywhere_s = round(max(seen_removed.values()), 2)


# ---------------------------------------------------------------------------------------
# The final checks


def final_checks(cluster: ChaosCluster, oplog: OpLog, workload: Workload, settings: ChaosSettings,
                 result: dict[str, Any]) -> None:
    """Present: every acknowledged instance no delete named; deleted: those whose delete
    was acknowledged. Unclear deletes' instances are judged neither way."""
    studies = oplog.acked_studies()
    deleted = oplog.deleted_studies()
    every_study = sorted(set(studies) | set(deleted))
    started = time.monotonic()
    last_held: dict[str, dict[str, set[str]] | None] = {}

    def placement_problems() -> list[str]:
        problems = []
        held = {node_id: cluster.held(node_id, every_study) for node_id in cluster.ids}
        last_held.clear()
        last_held.update(held)
        for node_id, holdings in held.items():
            if holdings is None:
                problems.append(f"{node_id} did not answer ListStudy")
        for study_uid in every_study:
            acked = {s.sop_uid for s in studies.get(study_uid, [])}
            gone = {s.sop_uid for s in deleted.get(study_uid, [])}
            owners = cluster.owners(study_uid)
            for node_id, holdings in held.items():
                if holdings is None:
                    continue
                mine = holdings[study_uid]
                if node_id in owners and not acked <= mine:
                    problems.append(f"study {study_uid}: owner {node_id} lacks {len(acked - mine)} of {len(acked)}")
                if node_id not in owners and acked & mine:
                    problems.append(f"study {study_uid}: {node_id} still holds {len(acked & mine)} (not an owner)")
                if gone & mine:
                    problems.append(f"study {study_uid}: {node_id} holds {len(gone & mine)} deleted instances")
            if len(problems) > 20:
                break
        return problems

    converged = wait_until(lambda: cluster.health()[0] and not placement_problems(), settings.settle_timeout_s, 1.0)
    result["settle_s"] = round(time.monotonic() - started, 1) if converged else None
    if not converged:
        healthy, why = cluster.health()
        if not healthy:
            oplog.violation(f"not healthy {settings.settle_timeout_s:.0f} s after healing: {why}")
            result["metrics_when_unhealthy"] = {n: cluster.metrics(n) for n in cluster.ids}
        for problem in placement_problems()[:10]:
            oplog.violation(f"not at N copies after {settings.settle_timeout_s:.0f} s: {problem}")
    back: dict[str, set[str]] = {}  # Deleted instance -> how it came back ("held by c2", "C-GET at c3", ...)
    for node_id, holdings in last_held.items():
        for study_uid, sents in deleted.items():
            for sent in sents:
                if holdings is not None and sent.sop_uid in holdings.get(study_uid, set()):
                    back.setdefault(sent.sop_uid, set()).add(f"held by {node_id}")

    # One ring everywhere.
    layouts = {node_id: cluster.ring_layout(node_id) for node_id in cluster.ids}
    if len({repr(layout) for layout in layouts.values()}) != 1:
        differing = sorted(n for n, layout in layouts.items() if layout != layouts[cluster.ids[0]])
        oplog.violation(f"nodes disagree on the ring after healing: {differing} differ from {cluster.ids[0]}")

    # Every acknowledged instance, byte-identical, through every node; no deleted one.
    contexts = sorted({(s.sop_class_uid, s.transfer_syntax_uid)
                       for group in (studies, deleted) for sents in group.values() for s in sents})
    checked = 0
    returned: set[str] = set()  # Present instances some node returned byte-identical.
    retrieve_started = time.monotonic()
    for node_id in cluster.ids:
        bad: list[str] = []
        with clients.Getter(cluster.nodes[node_id].dicom_port, contexts) as getter:
            if not getter.ready:
                oplog.violation(f"final C-GET: no association with {node_id}: {getter.error}")
                continue
            for study_uid in every_study:
                got = getter.get_study(study_uid)
                for sent in studies.get(study_uid, []):
                    data = got.received.get(sent.sop_uid)
                    checked += 1
                    if data is None:
                        bad.append(f"{sent.sop_uid} of study {study_uid} missing (status {got.final_status}, "
                                   f"{got.error or 'no error'})")
                    elif data != workload.expected_bytes(sent.sop_uid):
                        bad.append(f"{sent.sop_uid} of study {study_uid}: other bytes")
                    else:
                        returned.add(sent.sop_uid)
                for sent in deleted.get(study_uid, []):
                    if sent.sop_uid in got.received:
                        back.setdefault(sent.sop_uid, set()).add(f"C-GET at {node_id}")
        for text in bad[:5]:
            oplog.violation(f"final C-GET at {node_id}: {text}")
        if len(bad) > 5:
            oplog.violation(f"final C-GET at {node_id}: {len(bad) - 5} more instances missing or different")
    result["retrieve_checked_instances"] = checked
    result["retrieve_check_s"] = round(time.monotonic() - retrieve_started, 1)

    # Every acknowledged study listed by a C-FIND at every node; no deleted instance listed
    # by an IMAGE-level C-FIND of its study.
    universal = clients.study_identifier("")
    for node_id in cluster.ids:
        port = cluster.nodes[node_id].dicom_port
        found = clients.find_studies(port, universal)
        missing = set(studies) - set(found.study_uids)
        if found.final_status != 0 or found.error:
            oplog.violation(f"final C-FIND at {node_id}: status {found.final_status} {found.error}")
        elif missing:
            oplog.violation(f"final C-FIND at {node_id}: {len(missing)} acknowledged studies not listed")
        else:
            short = [u for u in studies if found.instance_counts.get(u, 0) < len(studies[u])]
            if short:
                oplog.violation(f"final C-FIND at {node_id}: {len(short)} studies show fewer instances than acked")
        for study_uid, sents in sorted(deleted.items()):
            listed = clients.find_studies(port, clients.instances_identifier(study_uid))
            if listed.final_status != 0 or listed.error:
                oplog.violation(f"final IMAGE C-FIND at {node_id}: status {listed.final_status} {listed.error}")
                continue
            for sent in sents:
                if sent.sop_uid in listed.sop_uids:
                    back.setdefault(sent.sop_uid, set()).add(f"C-FIND at {node_id}")
    for sop_uid, how in sorted(back.items())[:20]:
        oplog.violation(f"deleted instance {sop_uid} (delete acknowledged at t={oplog.deleted[sop_uid]:.1f} s) "
                        f"is back: {', '.join(sorted(how))}")
    if len(back) > 20:
        oplog.violation(f"{len(back) - 20} more deleted instances are back")
    present = sum(len(sents) for sents in studies.values())
    result["deleted_back"] = {sop_uid: sorted(how) for sop_uid, how in sorted(back.items())}
    result["final_counts"] = {
        "acked": len(oplog.acked), "present": present, "lost": present - len(returned),
        "deleted": sum(len(sents) for sents in deleted.values()), "back": len(back), "unclear": len(oplog.unclear)}
    for node_id in cluster.crashed():
        oplog.violation(f"{node_id} is not running at the end and the runner did not stop it")


# ---------------------------------------------------------------------------------------
# The run


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summarise_ops(ops: list[dict[str, Any]], faults: list[FaultRecord]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in ("store", "find", "find-patient", "get"):
        mine = [o for o in ops if o["op"] == kind]
        took = [o["took_s"] for o in mine if "took_s" in o]
        up = [o for o in mine if o.get("entry_up", True)]
        summary[kind] = {
            "attempted": len(mine),
            "ok": sum(1 for o in mine if o["ok"]),
            "through_up_node": len(up),
            "ok_through_up_node": sum(1 for o in up if o["ok"]),
            "during_faults": sum(1 for o in mine if o["fault"]),
            "ok_during_faults": sum(1 for o in mine if o["fault"] and o["ok"]),
            "p50_s": _percentile(took, 0.5),
            "p99_s": _percentile(took, 0.99),
            "max_s": max(took) if took else None,
        }
    # Stores through a node that stayed up whose study's W copies could be reached from it
    # all along: the ones that should succeed. The others (a partition leaving the entry
    # fewer than W of the owners) are refused honestly and counted apart.
    stores = [o for o in ops if o["op"] == "store" and o.get("entry_up", True)]
    could = [o for o in stores if o.get("quorum_reachable", True)]
    summary["store"]["quorum_reachable"] = len(could)
    summary["store"]["ok_quorum_reachable"] = sum(1 for o in could if o["ok"])
    summary["store"]["ok_quorum_unreachable"] = sum(1 for o in stores if not o.get("quorum_reachable", True)
                                                    and o["ok"])
    summary["store"]["refused_quorum_unreachable"] = sum(1 for o in stores if not o.get("quorum_reachable", True)
                                                         and not o["ok"])
    summary["store"]["by_client"] = {
        client: {"attempted": sum(1 for o in ops if o["op"] == "store" and o.get("client") == client),
                 "acked": sum(1 for o in ops if o["op"] == "store" and o.get("client") == client and o["ok"])}
        for client in ("pynetdicom", "storescu")}
    summary["find"]["ok_but_not_found"] = sum(1 for o in ops if o["op"] == "find" and o["ok"] and not o["found"])
    summary["find-patient"]["ok_but_not_found"] = sum(1 for o in ops if o["op"] == "find-patient" and o["ok"]
                                                      and not o["found"])
    summary["find-patient"]["stale_through_up_node"] = sum(
        1 for o in ops if o["op"] == "find-patient" and o["ok"] and o.get("entry_up", True) and not o["complete"])
    summary["find-patient"]["flagged_incomplete"] = sum(1 for o in ops if o["op"] == "find-patient"
                                                        and o["status"] == 0xC001)
    summary["get"]["stale"] = sum(1 for o in ops if o["op"] == "stale-get")
    # Read your writes (issue 16): Success without an acknowledged study, or with fewer of
    # its instances than were acknowledged before the read began, through an entry node
    # that stayed up throughout (one that went down is expected to fail).
    summary["find"]["stale_through_up_node"] = sum(
        1 for o in ops if o["op"] == "find" and o["ok"] and o.get("entry_up", True)
        and not (o["found"] and o.get("complete", True)))
    summary["get"]["stale_through_up_node"] = sum(1 for o in ops if o["op"] == "stale-get" and o.get("entry_up", True))
    # Answers the node flagged as partial (part of the archive could not be asked): C-FIND
    # 0xC001, C-GET 0xB000/0xA702 with failed sub-operations. Honest, never Success.
    summary["find"]["flagged_incomplete"] = sum(1 for o in ops if o["op"] == "find" and o["status"] == 0xC001)
    summary["get"]["flagged_incomplete"] = sum(1 for o in ops if o["op"] == "get" and o["status"] in (0xB000, 0xA702))
    by_fault: dict[str, dict[str, int]] = {}
    for fault in faults:
        window = [o for o in ops if o["fault"] == fault.label and o["op"] in ("store", "find", "find-patient", "get")]
        by_fault[fault.label] = {
            "stores": sum(1 for o in window if o["op"] == "store"),
            "stores_ok": sum(1 for o in window if o["op"] == "store" and o["ok"]),
            "reads": sum(1 for o in window if o["op"] != "store"),
            "reads_ok": sum(1 for o in window if o["op"] != "store" and o["ok"]),
        }
    summary["by_fault"] = by_fault
    deletes = [o for o in ops if o["op"] == "delete"]
    summary["delete"] = {
        "attempted": len(deletes),
        "by_verdict": {v.value: sum(1 for o in deletes if o["verdict"] == v.value) for v in DeleteVerdict},
        "by_outcome": {str(name): sum(1 for o in deletes if o["outcome"] == name)
                       for name in sorted({str(o["outcome"]) for o in deletes})},
        "by_path": {via: sum(1 for o in deletes if o["via"] == via) for via in ("rpc", "cli")},
        "study_level": sum(1 for o in deletes if o["level"] == "study"),
        "during_faults": sum(1 for o in deletes if o["fault"]),
        "deleted_during_faults": sum(1 for o in deletes if o["fault"] and o["ok"]),
        "through_up_node": sum(1 for o in deletes if o.get("entry_up", True)),
        "deleted_through_up_node": sum(1 for o in deletes if o.get("entry_up", True) and o["ok"]),
        "p50_s": _percentile([o["took_s"] for o in deletes], 0.5),
        "p99_s": _percentile([o["took_s"] for o in deletes], 0.99),
        # A C-GET during the run that returned an instance whose delete was acknowledged
        # before the read began (the final check demands none at the end).
        "served_after_delete": sum(1 for o in ops if o["op"] == "deleted-served"),
    }
    return summary


def run_chaos(settings: ChaosSettings) -> dict[str, Any]:
    settings.check()
    owned_dir = settings.work_dir is None
    root = Path(tempfile.mkdtemp(prefix="pacsnode-chaos-")) if owned_dir else Path(settings.work_dir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    wall_started = time.monotonic()
    result: dict[str, Any] = {"scenario": settings.scenario, "seed": settings.seed, "nodes": settings.nodes,
                              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
                              "work_dir": str(root), "replay": settings.replay()}
    (root / "nodes").mkdir(exist_ok=True)
    cluster = ChaosCluster(root / "nodes", settings)
    oplog = OpLog(time.monotonic(), root / "ops.jsonl")
    workload = Workload(cluster, oplog, root / "data", settings)
    faults: list[FaultRecord] = []
    try:
        print(f"chaos: starting {settings.nodes} nodes in {root}", flush=True)
        cluster.start_all()
        oplog.started = time.monotonic()
        plan = plan_faults(settings.seed, cluster.ids, settings.duration_s, scenario=settings.scenario,
                           dead_grace_s=settings.dead_grace_s, sites=cluster.sites)
        workload.start()
        time.sleep(settings.warmup_s)
        injector = FaultInjector(cluster, oplog, settings)
        for fault in plan:
            if oplog.now() >= settings.duration_s:
                break
            print(f"chaos: t={oplog.now():6.1f} s  {fault.describe()}", flush=True)
            record = injector.run(fault, len(faults) + 1)
            faults.append(record)
            print("chaos:            " + _fault_line(record), flush=True)
            time.sleep(1.0)
        workload.join()
        result["load_s"] = oplog.now()
        print(f"chaos: t={oplog.now():6.1f} s  faults over; healing and checking "
              f"{len(oplog.acked)} acknowledged instances", flush=True)
        cluster.heal()
        final_checks(cluster, oplog, workload, settings, result)
    except Exception as error:
        log.exception("chaos run failed")
        oplog.violation(f"the runner failed: {error!r}")
    finally:
        workload.stop.set()
        workload.join()
        oplog.close()
        result["proxy_bytes"] = sum(s.bytes_forward + s.bytes_backward for s in cluster.proxy.stats().values())
        cluster.close()
    result["faults"] = [asdict(f) for f in faults]
    result["ops"] = summarise_ops(oplog.ops, faults)
    result["acked_instances"] = len(oplog.acked)
    result["acked_studies"] = len(oplog.acked_studies())
    result["violations"] = list(oplog.violations)
    result["ok"] = not oplog.violations
    result["wall_s"] = round(time.monotonic() - wall_started, 1)
    (root / "chaos-result.json").write_text(json.dumps(result, indent=1))
    if owned_dir and result["ok"] and not settings.keep:
        shutil.rmtree(root, ignore_errors=True)
        result["work_dir"] = "(removed)"
    return result


def _fault_line(record: FaultRecord) -> str:
    if record.skipped:
        return f"skipped: {record.skipped}"
    parts = []
    if record.dead_everywhere_s is not None:
        parts.append(f"dead everywhere {record.dead_everywhere_s:.1f} s")
    elif record.declared_dead_by:
        parts.append(f"declared dead by {','.join(record.declared_dead_by)}")
    elif record.suspected_by:
        parts.append(f"suspected by {','.join(record.suspected_by)}")
    if record.removed_everywhere_s is not None:
        parts.append(f"removed everywhere {record.removed_everywhere_s:.1f} s")
    parts.append(f"healthy {record.recovered_s:.1f} s after the end" if record.recovered_s is not None
                 else f"NOT healthy {record.recovery_state}")
    return "; ".join(parts)


def format_result(result: dict[str, Any]) -> str:
    ops = result["ops"]
    lines = [f"chaos {result['scenario']} seed={result['seed']} nodes={result['nodes']}: "
             f"{'OK' if result['ok'] else 'FAILED'} ({result['wall_s']:.0f} s)", "", "faults:"]
    for fault in result["faults"]:
        window = ops["by_fault"].get(fault["label"], {})
        lines.append(f"  t={fault['started_s']:6.1f}  {fault['description']:38}  "
                     f"{_fault_line(FaultRecord(**fault))};  stores {window.get('stores_ok', 0)}/"
                     f"{window.get('stores', 0)} ok, reads {window.get('reads_ok', 0)}/{window.get('reads', 0)} ok")
    lines.append("")
    store = ops["store"]
    lines.append(f"stores: {store['ok']} acknowledged of {store['attempted']} "
                 f"(pynetdicom {store['by_client']['pynetdicom']['acked']}/{store['by_client']['pynetdicom']['attempted']}, "
                 f"storescu {store['by_client']['storescu']['acked']}/{store['by_client']['storescu']['attempted']}); "
                 f"during faults {store['ok_during_faults']}/{store['during_faults']}; through a node that was up "
                 f"{store['ok_through_up_node']}/{store['through_up_node']} (W reachable from it "
                 f"{store.get('ok_quorum_reachable', '-')}/{store.get('quorum_reachable', '-')}, refused with W out "
                 f"of reach {store.get('refused_quorum_unreachable', '-')}); "
                 f"p50 {store['p50_s']} s p99 {store['p99_s']} s per study")
    for kind in ("find", "find-patient", "get"):
        o = ops.get(kind)
        if o is None:  # A result from before find-patient was added.
            continue
        extra = (f", {o['ok_but_not_found']} Success without the study" if kind == "find"
                 else f", {o['ok_but_not_found']} Success without a study or instance of the patient"
                 if kind == "find-patient" else f", {o['stale']} Success missing an instance")
        extra += f", {o.get('flagged_incomplete', 0)} flagged incomplete (never Success)"
        extra += f"; STALE through a node that stayed up: {o.get('stale_through_up_node', 0)}"
        lines.append(f"{kind}s: {o['ok']} ok of {o['attempted']}; during faults {o['ok_during_faults']}/"
                     f"{o['during_faults']}; through a node that was up {o['ok_through_up_node']}/"
                     f"{o['through_up_node']}; p50 {o['p50_s']} s p99 {o['p99_s']} s max {o['max_s']} s{extra}")
    d = ops.get("delete", {})
    if d.get("attempted"):
        verdicts = d["by_verdict"]
        lines.append(f"deletes: {d['attempted']} ({d['study_level']} whole studies; {d['by_path']['rpc']} by "
                     f"Admin.Delete, {d['by_path']['cli']} by `pacsnode delete`): {verdicts['deleted']} deleted, "
                     f"{verdicts['not-deleted']} not deleted, {verdicts['unclear']} UNCLEAR; outcomes "
                     f"{d['by_outcome']}; during faults {d['deleted_during_faults']}/{d['during_faults']} deleted; "
                     f"p50 {d['p50_s']} s p99 {d['p99_s']} s; served by a C-GET after the delete was "
                     f"acknowledged: {d['served_after_delete']}")
    counts = result.get("final_counts")
    if counts:
        lines.append(f"final instances: {counts['acked']} acknowledged, {counts['present']} expected present "
                     f"(LOST {counts['lost']}), {counts['deleted']} deleted (BACK {counts['back']}), "
                     f"{counts['unclear']} unclear (not judged)")
    lines.append(f"final: converged {result.get('settle_s')} s after healing; "
                 f"{result.get('retrieve_checked_instances', 0)} instance retrievals checked byte for byte "
                 f"({(result.get('final_counts') or {}).get('present', result['acked_instances'])} instances "
                 f"expected present x {result['nodes']} nodes, "
                 f"{result.get('retrieve_check_s')} s); peer traffic through the proxy "
                 f"{result.get('proxy_bytes', 0) / 1e6:.1f} MB")
    if result["violations"]:
        lines.append("")
        lines.append(f"VIOLATIONS ({len(result['violations'])}):")
        lines += [f"  {v}" for v in result["violations"][:40]]
    lines.append("")
    lines.append(f"work dir: {result['work_dir']}")
    lines.append(f"replay (same faults, same clients' choices; real timing differs): {result['replay']}")
    if not result["ok"]:
        lines.append(f"chaos FAILED: scenario {result['scenario']}, seed {result['seed']}")
    return "\n".join(lines)

