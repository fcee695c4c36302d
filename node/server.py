"""The node process: opens the store, wires the archive and the DICOM front end, and
shuts everything down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config

from pacsnode.node import peer_wire, protocol_log
from pacsnode.node.config import ConfigError, NodeConfig
from pacsnode.node.memory import retain_freed_memory
from pacsnode.node.dicom import DicomFrontEnd
from pacsnode.node.dicom_worker import WorkerFrontEnd
from pacsnode.node.workers import WorkerPool
from pacsnode.node.grpc_transport import Channels, GrpcTransport
from pacsnode.node.health import LocalHealth, WatchedReplica, WriteWatch
from pacsnode.node.http_views import bind_dimse_metrics, http_server_for
from pacsnode.node.dicomweb_metadata import ingest_header_json
from pacsnode.node.local_replica import StoreReplica, decode
from pacsnode.node.swim_membership import GrpcCarrier, SwimMembership, swim_config
from pacsnode.node.peer_handler import PeerHandler
from pacsnode.node.peer_server import PeerServer, replication_settings
from pacsnode.node.runtime import ClusterArchive, LoopThread, own_compressed_reader, own_copy_reader, own_stream_reader
from pacsnode.node.security import NodeSecurity
from pacsnode.node.token_salt import first_token_salt, ring_members_of
from pacsnode.node.store import RocksStore, store_directory
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.node.staleness import ALIVE_STAMP_INTERVAL_S, set_stale_store_aside, stamp_alive
from pacsnode.replication.coordinator import Coordinator, CoordinatorSettings, WriteQuorumMode, WriteScope
from pacsnode.replication.hlc import wall_ms
from pacsnode.replication.delete_coordinator import DeleteCoordinator
from pacsnode.replication.modify_coordinator import ModifyCoordinator
from pacsnode.replication.model import InstanceRecord, StoreError
from pacsnode.replication.repair import Repairer, RepairSettings, intervals_of
from pacsnode.replication.transport import cancelled_by_caller
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.placement import Member
from pacsnode.ring.swim import JoinRefusal

log = logging.getLogger(__name__)


# An instance whose compressed copy is smaller than this gets its WADO-RS /metadata entry
# when first asked, not as it is stored (metadata_at_ingest).
METADATA_AT_INGEST_BLOB_BYTES_MIN = 16 * 1024


def metadata_at_ingest(record: InstanceRecord, blob: bytes) -> bytes | None:
    """The WADO-RS /metadata entry of an instance being stored, or None to build it when
    first asked (node/http_views.py builds and keeps it then). An entry is ~2-3 KB of JSON
    whatever the image: for a CT or MR slice it is a few percent of the stored copy and
    saves the first /metadata a re-read of every slice (a 100-slice series: 22 ms built at
    ingest vs 70 ms built when asked); for a small image (a 16x16 test study: 1.4 KB
    compressed) it was the biggest thing on disk, so below METADATA_AT_INGEST_BLOB_BYTES_MIN
    it waits until someone opens the series through DICOMweb (the first /metadata of 500
    64x64 instances: ~40 -> ~160-200 ms at load 10; the next ones as before)."""
    if len(blob) < METADATA_AT_INGEST_BLOB_BYTES_MIN:
        return None
    return ingest_header_json(record, blob)


def health_now_ms() -> int:
    return int(time.monotonic() * 1000)


def _probe() -> None:
    """The executor probe: nothing to do; what counts is how long it waited for a thread."""


IDENTITY_FILE = "identity.json"


def load_identity(config: NodeConfig) -> dict[str, Any]:
    """Persist the node's identity and bump its boot generation on every start.

    A data dir belongs to one node id: starting it under another id is refused, since its
    data would then be attributed to the wrong owner.
    """
    path = config.data_dir / IDENTITY_FILE
    identity: dict[str, Any] = {}
    if path.exists():
        try:
            identity = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        if identity.get("node_id") not in (None, config.node_id):
            raise ConfigError(
                f"data dir {config.data_dir} belongs to node {identity['node_id']!r}, "
                f"not {config.node_id!r}; use --node-id {identity['node_id']} or another --data-dir"
            )
    if identity and "token_salt" not in identity:
        identity["token_salt"] = 0  # A data dir from before token salts keeps the tokens it had.
    identity.update(
        node_id=config.node_id,
        cluster_id=config.cluster_id,
        site=config.site,
        generation=int(identity.get("generation", 0)) + 1,
    )
    save_identity(config, identity)
    return identity


def save_identity(config: NodeConfig, identity: dict[str, Any]) -> None:
    path = config.data_dir / IDENTITY_FILE
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as handle:
        json.dump(identity, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class Node:
    """One pacsnode process: DICOM front end, peer server and coordinator over one store.

    A node alone is a ring of one; with seeds it joins their cluster.
    """

    software_version = "0.1.0"

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.security = NodeSecurity(config)  # TLS files, peer guard, audit trail (ConfigError when unusable)
        # The stale-store rule (node/staleness.py): a store out of the cluster longer than the
        # tombstone grace is moved aside and the node starts empty. A running node stamps
        # alive.json every minute, so a store in use by another process is never stale.
        set_stale_store_aside(config.data_dir, wall_ms(), config.tombstone_grace_s * 1000)
        # Instance-sized buffers reused, not faulted in again page by page (node/memory.py).
        retain_freed_memory(config.malloc_trim_threshold_bytes)
        # The store first: its lock says whether another node runs on this data dir, and
        # a start that fails there must not raise the running node's boot generation.
        try:
            self.store = RocksStore(
                store_directory(config.data_dir),
                disk_free_bytes_min=config.disk_free_bytes_min,
                instance_size_bytes_max=config.instance_size_bytes_max,
                blob_file_bytes_min=config.blob_file_bytes_min,
                zstd_level=config.zstd_level,
                header_of=metadata_at_ingest,
            )
        except Exception as error:  # rocksdict: lock held by another process, corrupt files
            raise StoreError(f"cannot open the store in {config.data_dir}: {error}") from None
        try:
            self.identity = load_identity(config)
        except BaseException:
            self.store.close()
            raise
        # Local health (node/health.py): every local write is timed while it runs, and the
        # loop's executor is probed; a stuck store path makes the node say so.
        self.write_watch = WriteWatch()
        self.replica = WatchedReplica(StoreReplica(self.store), self.write_watch, health_now_ms)
        self.health = LocalHealth(config.store_stall_ms)
        # Status and other admin reads run here, never queued behind the data path's executor.
        self.admin_executor = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                                    thread_name_prefix="pacsnode-admin")
        self.started_at_ms = int(time.time() * 1000)
        # Peers known before a restart join the seeds: a restarted node must find its
        # cluster again, not serve (and acknowledge writes) as a ring of one.
        self._peers_path = config.data_dir / "peers.json"
        seeds = list(dict.fromkeys([*config.seeds, *self._load_known_peers()]))
        if "token_salt" not in self.identity:  # The first start of this data dir.
            self.identity["token_salt"] = config.token_salt if config.token_salt >= 0 else self._first_token_salt(seeds)
            save_identity(config, self.identity)
        elif config.token_salt >= 0 and config.token_salt != int(self.identity["token_salt"]):
            self.store.close()
            raise ConfigError(f"token_salt {config.token_salt} but data dir {config.data_dir} keeps "
                              f"{self.identity['token_salt']}: a node never changes its tokens; drop the setting")
        me = MemberInfo(
            node_id=config.node_id,
            peer_host=config.peer_host,
            peer_port=config.peer_port,
            dicom_host=config.peer_host,
            dicom_port=config.dicom_port,
            ae_title=config.ae_title,
            site=config.site,
            host=socket.gethostname(),
            vnodes=config.vnodes,
            generation=int(self.identity["generation"]),
            updated_at_ms=self.started_at_ms,
            token_salt=int(self.identity["token_salt"]),
        )
        self.membership = SwimMembership(
            config.cluster_id, me, seeds,
            config=swim_config(config.profile, config.dead_grace_s * 1000),
            next_generation=self._next_generation,
            signer=self.security.member_signer.sign if self.security.member_signer else None,
            verifier=self.security.member_verifier,
        )
        self.loop = LoopThread()
        self.channels = Channels(dict(config.peer_routes), self.security.channel_credentials())
        self.transport = GrpcTransport(self.channels, self.membership.member, self.envelope,
                                       observe=lambda version: self.coordinator.hlc.observe(version),
                                       site=config.site)
        self.coordinator = Coordinator(
            config.node_id,
            self.membership,
            self.transport,
            self.replica,
            CoordinatorSettings(
                replication_factor=config.replication,
                write_quorum=config.write_quorum,
                write_scope=WriteScope.LOCAL if config.write_scope_local else WriteScope.GLOBAL,
                write_mode=WriteQuorumMode(config.write_quorum_mode),
                read_quorum=config.read_quorum,
                scatter_read_quorum=config.scatter_read_quorum,
                read_fault_window_ms=config.read_fault_window_ms,
                replica_timeout_ms=config.replica_timeout_ms,
                store_timeout_ms=config.store_timeout_ms,
                fetch_timeout_ms=config.fetch_timeout_ms,
                query_timeout_ms=config.query_timeout_ms,
                replica_start_timeout_ms=config.replica_start_timeout_ms,
                hint_max_age_ms=config.tombstone_grace_s * 1000,
            ),
            decode=decode,
        )
        self.deletes = DeleteCoordinator(
            config.node_id, self.membership, self.transport, self.replica, self.coordinator.hlc,
            self.coordinator.find, replication_factor=config.replication,
            write_quorum=config.write_quorum, replica_timeout_ms=config.replica_timeout_ms,
            strict_quorum=WriteQuorumMode(config.write_quorum_mode) is WriteQuorumMode.STRICT)
        self.coordinator.supersede = self.deletes.supersede
        self.modifies = ModifyCoordinator(
            config.node_id, self.membership, self.transport, self.replica, self.coordinator.hlc,
            self.coordinator.find, replication_factor=config.replication,
            write_quorum=config.write_quorum, replica_timeout_ms=config.replica_timeout_ms)
        self.coordinator.send_correction = self.modifies.send_correction  # Read repair of corrections.
        self.archive = ClusterArchive(self.loop, self.coordinator, store_timeout_ms=config.store_timeout_ms,
                                      zstd_level=config.zstd_level,
                                      alone=self.coordinator.alone, local_store=self.coordinator.store_alone,
                                      find_buffer_rows=config.find_buffer_rows, deletes=self.deletes,
                                      own_copy=own_copy_reader(self.store),
                                      own_stream=own_stream_reader(self.store),
                                      own_compressed=own_compressed_reader(self.store), modifies=self.modifies,
                                      metadata_of=metadata_at_ingest)
        self.repairer = Repairer(
            config.node_id, self.membership, self.transport, self.store,
            RepairSettings(replication_factor=config.replication, interval_ms=config.anti_entropy_interval_ms,
                           fetch_timeout_ms=config.fetch_timeout_ms,
                           bytes_per_second_max=config.repair_bytes_per_second_max,
                           fetch_window=config.repair_fetch_window,
                           tombstone_grace_ms=config.tombstone_grace_s * 1000),
        )
        self.coordinator.pending = self.repairer.pending
        self.deletes.former_owners = self.repairer.former_owners
        self.membership.on_change.append(lambda: self.loop.loop.call_soon_threadsafe(self.repairer.ring_changed))
        self.membership.on_change.append(self._save_known_peers)
        if config.dicom_workers and config.dicom_local_associations:
            # Beside its workers, the node serves a few connections itself (node/workers.py
            # ConnectionHandOff.serve_local): handed over a socket pair, not accepted.
            self.front_end: DicomFrontEnd = WorkerFrontEnd(config, self.archive, security=self.security,
                                                           blob_files=self.store.blob_files, in_worker=False)
        else:
            self.front_end = DicomFrontEnd(config, self.archive, security=self.security,
                                           blob_files=self.store.blob_files)
        self.peer_handler = PeerHandler(config.node_id, self.replica, self.membership, self.repairer,
                                        replication_factor=config.replication,
                                        run_blocking=asyncio.to_thread)
        self.workers: WorkerPool | None = None  # dicom_workers > 0: the front end runs in worker processes.
        self.peer_server = PeerServer(self)
        self.http = http_server_for(self)  # DICOMweb, web page, /metrics, /healthz, /readyz.
        self._hint_task: asyncio.Task[None] | None = None
        self._repair_task: asyncio.Task[None] | None = None
        self._leave_task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._alive_task: asyncio.Task[None] | None = None
        self.shutdown_requested = threading.Event()
        # Why the node stopped by itself with an error (the CLI then exits 1), or "".
        self.exit_error = ""
        self._stopped = threading.Event()

    def envelope(self) -> pb.Envelope:
        membership = self.membership
        return peer_wire.envelope(self.config.cluster_id, self.config.node_id, membership.generation,
                                  membership.ring().version, membership.incarnation)

    def _next_generation(self, at_least: int) -> int:
        """The cluster removed this boot of the node, or holds a newer boot of its id than this
        one (the data dir was wiped): the next generation, at least `at_least`, persisted like
        a restart's."""
        self.identity["generation"] = max(int(self.identity["generation"]) + 1, at_least)
        save_identity(self.config, self.identity)
        return int(self.identity["generation"])

    def metrics(self) -> dict[str, float]:
        """Dotted names ending with their unit (STYLE 6), from each part's statistics."""
        store = self.store.statistics()
        commits, batched = self.store.commit_statistics()
        coordinator = self.coordinator.stats
        repair = self.repairer.stats
        io = self.loop.executor.statistics()
        return {
            "pacsnode.store.instances_count": store.instances,
            "pacsnode.store.studies_count": store.studies,
            "pacsnode.store.received_bytes": store.bytes_received,
            "pacsnode.store.stored_bytes": store.bytes_stored,
            "pacsnode.store.conflicts_count": store.conflicts,
            "pacsnode.store.missing_blob_files_count": self.store.missing_blob_files,
            "pacsnode.store.group_commits_count": commits,
            "pacsnode.store.commits_batched_count": batched,
            "pacsnode.hints.queue_depth_count": store.hints,
            "pacsnode.hints.queue_bytes": store.hint_bytes,
            "pacsnode.replication.writes_count": coordinator.writes,
            "pacsnode.replication.writes_failed_count": coordinator.writes_failed,
            "pacsnode.replication.hints_written_count": coordinator.hints_written,
            "pacsnode.replication.hints_replayed_count": coordinator.hints_replayed,
            "pacsnode.replication.read_repairs_count": coordinator.read_repairs,
            "pacsnode.replication.query_replans_count": coordinator.query_replans,
            **{f"pacsnode.replication.{name}_count": value for name, value in sorted(coordinator.extra.items())},
            "pacsnode.repair.passes_count": repair.passes,
            "pacsnode.repair.instances_pulled_count": repair.instances_pulled,
            "pacsnode.repair.pulled_bytes": repair.bytes_pulled,
            "pacsnode.repair.studies_dropped_count": repair.studies_dropped,
            "pacsnode.repair.instances_dropped_count": repair.instances_dropped,
            "pacsnode.repair.pending_ranges_count": repair.pending_ranges,
            "pacsnode.repair.last_pass_ms": repair.last_pass_ms,
            "pacsnode.peer.refused_count": self.peer_server.refused,
            # Payload bytes this node sent to peers: whole instances (FetchInstance) and frames
            # (FetchFrames, WADO-RS /frames asked through another node).
            "pacsnode.peer.fetch_sent_bytes": self.peer_server.fetch_sent_bytes,
            "pacsnode.peer.frames_sent_bytes": self.peer_server.frames_sent_bytes,
            "pacsnode.peer.frames_answers_count": self.peer_server.frames_answers,
            "pacsnode.io.threads_count": io.threads,
            "pacsnode.io.running_count": io.running,
            "pacsnode.io.queued_count": io.queued,
            "pacsnode.health.unhealthy_count": 0 if self.health.current.healthy else 1,
            "pacsnode.health.oldest_write_age_ms": self.health.current.oldest_write_age_ms,
            "pacsnode.health.probe_wait_ms": self.health.current.probe_wait_ms,
            "pacsnode.health.transitions_count": self.health.transitions,
            "pacsnode.membership.probes_unanswered_count": self.membership.probes_unanswered,
            "pacsnode.security.peer_refused_count": self.security.guard.refused,
            "pacsnode.security.dicom_refused_count":
                self.front_end.guard.refused + (self.workers.refused if self.workers is not None else 0),
            "pacsnode.security.http_refused_count": self.http.audit.refused_count,
            "pacsnode.security.http_tls_refused_count": self.http.tls_refused_count,
            "pacsnode.security.audit_syslog_sent_count": self.security.syslog.sent if self.security.syslog else 0,
            "pacsnode.security.audit_syslog_dropped_count":
                self.security.syslog.dropped if self.security.syslog else 0,
            "pacsnode.security.audit_messages_count": self.security.audit.written,
            # Signed member records (node/member_signing.py): signatures made, ECDSA checks run
            # (cache misses), peer records refused.
            "pacsnode.security.member_signatures_count":
                self.security.member_signer.signed if self.security.member_signer else 0,
            "pacsnode.security.member_verifications_count":
                self.security.member_verifier.verified if self.security.member_verifier else 0,
            "pacsnode.security.member_records_refused_count":
                self.security.member_verifier.refused if self.security.member_verifier else 0,
            **self.membership_metrics(),
        }

    def membership_metrics(self) -> dict[str, float]:
        return self.membership.metrics()

    async def _finish_leave_when_drained(self) -> None:
        """While leaving: once every range we held is with its new owners (the drop rule
        emptied our store) and our hints are handed over, announce LEFT and shut down."""
        while True:
            await asyncio.sleep(0.5)
            me = self.membership.member(self.config.node_id)
            if me is None or me.state != "leaving":
                continue
            self.repairer.ring_changed()
            if not self.store.is_empty() or self.store.statistics().hints:
                continue
            await self.membership.mark_left()  # Told to every member it can reach, then gossiped.
            log.warning("node.left node_id=%s", self.config.node_id)
            self.shutdown_requested.set()
            return

    def _first_token_salt(self, seeds: list[str]) -> int:
        """This node's token salt at its first start (node/token_salt.py)."""
        config = self.config
        me = Member(node_id=config.node_id, site=config.site, host=socket.gethostname(), vnodes=config.vnodes)
        envelope = peer_wire.envelope(config.cluster_id, config.node_id, int(self.identity["generation"]), 0)
        routes = dict(config.peer_routes)
        credentials = self.security.channel_credentials()
        return first_token_salt(config.cluster_id, me, config.replication, seeds,
                                lambda seed: ring_members_of(seed, routes.get(seed, seed), envelope, credentials))

    def _load_known_peers(self) -> list[str]:
        try:
            peers = json.loads(self._peers_path.read_text())
        except (OSError, ValueError):
            return []
        return [str(p) for p in peers if isinstance(p, str)] if isinstance(peers, list) else []

    def _save_known_peers(self) -> None:
        """Remember the peer addresses of the ring's members (atomically) for the next start."""
        peers = sorted({m.peer_address for m in self.membership.members()
                        if m.node_id != self.config.node_id and m.state in ("alive", "suspect", "dead", "leaving")})
        if not peers:
            return
        try:
            temporary = self._peers_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(peers))
            os.replace(temporary, self._peers_path)
        except OSError as error:
            log.warning("node.peers.save_failed error=%s", error)

    def under_replicated_studies(self) -> int:
        """Studies this node holds in ranges that may lack a full copy somewhere."""
        count = 0
        for token_range in self.repairer.under_replicated_ranges():
            for low, high in intervals_of(token_range):
                count += len(self.store.studies_in(low, high))
        return count

    async def _start_async(self) -> None:
        port = await self.peer_server.start(self.config.host, self.config.peer_port)
        if port != self.config.peer_port:
            self.membership.update_self(peer_port=port)
        self.membership.start(GrpcCarrier(self.transport, replication_settings(self.config)))
        self._hint_task = asyncio.ensure_future(self._replay_hints_forever())
        self._repair_task = asyncio.ensure_future(self.repairer.run_forever())
        self._leave_task = asyncio.ensure_future(self._finish_leave_when_drained())
        self._health_task = asyncio.ensure_future(self._watch_health_forever())
        self._alive_task = asyncio.ensure_future(self._stamp_alive_forever())

    async def _stamp_alive_forever(self) -> None:
        """DATA_DIR/alive.json every minute: the stale-store rule's clock (node/staleness.py)."""
        while True:
            try:
                await asyncio.to_thread(stamp_alive, self.config.data_dir, wall_ms())
            except OSError as error:
                log.error("node.alive_stamp_failed error=%s", error)
            await asyncio.sleep(ALIVE_STAMP_INTERVAL_S)

    async def _watch_health_forever(self) -> None:
        """Probe the store's executor and assess local health every health_probe_interval_ms;
        tell membership when it flips (node/health.py)."""
        loop = asyncio.get_running_loop()
        health = self.health
        interval_ms = self.config.health_probe_interval_ms
        interval_s = interval_ms / 1000
        last_ms = health_now_ms()
        while True:
            try:
                now = health_now_ms()
                late = now - last_ms > 2 * interval_ms + 500
                last_ms = now
                if late:
                    # This whole process was stopped or starved (SIGSTOP, a paused VM), not its
                    # store path: start the probe's clock again and look next time.
                    if health.probe_outstanding:
                        health.probe_sent(now)
                    await asyncio.sleep(interval_s)
                    continue
                if not health.probe_outstanding:
                    health.probe_sent(health_now_ms())
                    probe = loop.run_in_executor(None, _probe)
                    probe.add_done_callback(lambda _future: health.probe_answered())
                was_healthy = health.current.healthy
                now = health_now_ms()
                report = health.assess(now, self.write_watch.oldest_started_ms())
                if report.healthy != was_healthy:
                    if report.healthy:
                        log.warning("node.health.healthy node_id=%s", self.config.node_id)
                    else:
                        log.error("node.health.unhealthy node_id=%s reason=%s detail=%s", self.config.node_id,
                                  report.reason.value, report.detail)
                    self.membership.set_local_health(report.healthy, report.reason.value)
            except Exception as error:  # Never let the watchdog die; say why and go on.
                log.error("node.health.error error=%r", error)
            await asyncio.sleep(interval_s)

    async def _replay_hints_forever(self) -> None:
        # One pass sends at most 64 hints per owner, each within its replica deadline; a
        # pass still running after this long is stuck and is abandoned for the next one.
        pass_timeout_s = max(120.0, 10 * self.config.hint_replay_interval_ms / 1000)
        while True:
            await asyncio.sleep(self.config.hint_replay_interval_ms / 1000)
            try:
                await asyncio.wait_for(self.coordinator.replay_hints(), pass_timeout_s)
                await asyncio.wait_for(self.deletes.replay_tombstone_hints(), pass_timeout_s)
                await asyncio.wait_for(self.modifies.replay_correction_hints(), pass_timeout_s)
            except asyncio.CancelledError:
                if cancelled_by_caller():
                    raise
                log.error("replication.hint.replay_error error=CancelledError from inside the pass")
            except asyncio.TimeoutError:
                log.error("replication.hint.replay_stuck timeout_s=%.0f", pass_timeout_s)
            except Exception as error:  # Keep replaying; say what went wrong.
                log.error("replication.hint.replay_error error=%r", error)

    async def _stop_async(self) -> None:
        for task in (self._hint_task, self._repair_task, self._leave_task, self._health_task, self._alive_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.membership.stop()
        await self.coordinator.close()
        await self.peer_server.stop(grace_s=2.0)
        await self.channels.close()

    def start(self) -> None:
        self.loop.run(self._start_async(), 30)
        if self.config.dicom_workers:
            self.workers = WorkerPool(self.config, self.archive, self.config.dicom_workers, self.security.audit,
                                      blob_files=self.store.blob_files)
            self.workers.start()
            local = self.workers.local_handoff
            if local is not None and isinstance(self.front_end, WorkerFrontEnd):
                self.front_end.serve_handed(local, self.workers.port)
        else:
            self.front_end.start()
        self.security.started(self.config.dicom_tls_port if self.workers is not None else self.front_end.tls_port)
        bind_dimse_metrics(self, self.http)
        if self.workers is not None:
            self.workers.count_dimse(self.http.metrics.observe_dimse)
        self.http.start()
        stats = self.store.statistics()
        log.info(
            "node.started node_id=%s generation=%d ae_title=%s dicom=%s:%d peer=%s:%d seeds=%s instances=%d "
            "studies=%d data_dir=%s",
            self.config.node_id,
            self.identity["generation"],
            self.config.ae_title,
            self.config.host,
            self.workers.port if self.workers is not None else self.front_end.port,
            self.config.host,
            self.peer_server.port,
            ",".join(self.config.seeds) or "none",
            stats.instances,
            stats.studies,
            self.config.data_dir,
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("node.stopping node_id=%s", self.config.node_id)
        self.http.stop()
        if self.workers is not None:
            # The node's own front end (dicom_local_associations) lets its open associations
            # finish while the workers let theirs: one grace period, not two in turn.
            local = threading.Thread(target=self.front_end.stop, kwargs={"grace_s": 10.0},
                                     name="pacsnode-dicom-local-stop")
            local.start()
            self.workers.stop(grace_s=10.0)
            local.join()
            self.workers.close_local()  # After the front end's accept loop ended.
        else:
            self.front_end.stop(grace_s=10.0)
        try:
            self.loop.run(self._stop_async(), 15)
        except Exception as error:  # Shut down the rest regardless.
            log.error("node.stop.error error=%r", error)
        self.loop.stop()
        self.admin_executor.shutdown(wait=False, cancel_futures=True)
        self.store.close()
        self.security.stopped()
        log.info("node.stopped node_id=%s", self.config.node_id)

    def reload_certificates(self) -> None:
        """New tls_dir files (SIGHUP or the poll): new contexts for new DICOM TLS and HTTPS
        connections, new outgoing peer channels; the peer server re-reads them itself."""
        if not self.security.reload_certificates():
            return
        tls_server = getattr(self.front_end, "_tls_server", None)
        if tls_server is not None:
            tls_server.ssl_context = self.security.dicom_context()
        if self.workers is not None:
            self.workers.reload_certificates()  # Their DICOM TLS listeners.
        context = self.security.http_context()
        if context is not None:
            self.http.set_ssl_context(context)
        credentials = self.security.channel_credentials()
        if credentials is not None:
            self.loop.run(self.channels.set_credentials(credentials), 15)

        async def reannounce() -> None:  # Our record signed by the new certificate, gossiped.
            self.membership.reannounce()

        self.loop.run(reannounce(), 15)

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly; SIGHUP (and a poll every
        `CERT_POLL_S`) reloads the certificate files."""
        wake = threading.Event()
        hangup = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("node.signal signal=%s", signal.Signals(signum).name)
            wake.set()

        def on_hangup(_signum: int, _frame: Any) -> None:
            hangup.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
        self.start()
        next_poll = time.monotonic() + CERT_POLL_S
        try:
            while not wake.wait(0.5):
                if self.shutdown_requested.is_set():
                    break
                if self.membership.join_refusal() is JoinRefusal.PLACEMENT:
                    # Retrying cannot help: the cluster places studies otherwise. Stop, loudly.
                    self.exit_error = f"join refused: {self.membership.swim.join_refused_reason}"
                    log.error("node.exit reason=join-refused-placement node_id=%s", self.config.node_id)
                    break
                if hangup.is_set() or time.monotonic() >= next_poll:
                    if hangup.is_set():
                        log.info("node.signal signal=SIGHUP")
                    hangup.clear()
                    next_poll = time.monotonic() + CERT_POLL_S
                    try:
                        self.reload_certificates()
                    except Exception as error:  # Keep serving with the certificate in use.
                        log.error("security.tls.reload_failed error=%r", error)
        finally:
            self.stop()


CERT_POLL_S = 10.0  # How often run_forever looks at the tls_dir files' modification times.


def configure_logging(level: str, data_dir: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        handlers=handlers,
        force=True,
    )
    # pynetdicom logs every PDU at INFO and identifiers (patient data) at DEBUG; pydicom
    # warns about invalid values by quoting them (a birth date is patient data). Neither
    # may reach the node's log: only our own event lines do.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level.upper() != "DEBUG" else logging.INFO)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.Formatter.converter = time.gmtime
    protocol_log.install(level)
