"""NodeConfig: every setting of a node, with its default, in one place.

The CLI flags, the TOML file and `pacsnode status` all use these field names (with `-`
for `_` on the command line). A bad value is an operating error: ConfigError, never an
assert.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pacsnode.node.access import ACCESS_MODES, AccessError, KnownAe
from pacsnode.node.codec import ZSTD_LEVEL, ZSTD_LEVEL_MAX, ZSTD_LEVEL_MIN
from pacsnode.ring.placement import Replication, SiteReplicas, parse_site_replicas


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range."""


# Where W is counted: auto = local when site_replicas is set, else global.
WRITE_QUORUM_SCOPES = ("auto", "local", "global")
WRITE_QUORUM_MODES = ("strict", "sloppy")

# Membership timer profiles (node/swim_membership.py maps them to ring/swim.py SwimConfig).
PROFILES = ("lan", "local", "wan")

# AE VR: default repertoire without backslash or control characters, at most 16.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


@dataclass(frozen=True)
class Destination:
    """A C-MOVE destination: an AE title and where it listens."""

    ae_title: str
    host: str
    port: int
    tls: bool = False  # `AET=HOST:PORT+tls`: C-MOVE over DICOM TLS with the node's certificate.

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """Parse `AET=HOST:PORT[+tls]` (the --destination flag and the TOML list form)."""
        tls = text.rstrip().endswith("+tls")
        if tls:
            text = text.rstrip()[: -len("+tls")]
        ae_title, sep, address = text.partition("=")
        host, sep2, port_text = address.rpartition(":")
        if not sep or not sep2 or not ae_title.strip() or not host:
            raise ConfigError(f"destination must look like AET=HOST:PORT, got {text!r}")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"destination port is not a number in {text!r}") from None
        if not 1 <= port <= 65535:
            raise ConfigError(f"destination port must be 1-65535, got {port} in {text!r}")
        if not _AE_TITLE.match(ae_title.strip()):
            raise ConfigError(f"destination AE title must be 1-16 printable ASCII characters, no backslash, in {text!r}")
        return cls(ae_title=ae_title.strip(), host=host.strip("[]"), port=port, tls=tls)

    def __str__(self) -> str:
        return f"{self.ae_title}={self.host}:{self.port}" + ("+tls" if self.tls else "")


def setting(default: Any, help_text: str) -> Any:
    """A NodeConfig field with its documentation (shown by `pacsnode start --help`)."""
    return field(default=default, metadata={"help": help_text})


def _default_node_id() -> str:
    return socket.gethostname().split(".")[0] or "node-1"


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """A node's settings. Each field's help text is what `--help` shows and the README repeats."""

    # --- identity and storage
    node_id: str = field(default_factory=_default_node_id, metadata={"help": "Unique in the cluster; default: the host name."})
    data_dir: Path = setting(Path("pacsnode-data"), "RocksDB store, identity and logs live here.")
    site: str = setting("default", "Failure domain (building, campus); replicas spread over sites.")
    cluster_id: str = setting("pacsnode", "Peers with another cluster id are refused.")

    # --- DICOM front end
    ae_title: str = setting("PACSNODE", "Our Application Entity title (Called AE of associations).")
    host: str = setting("0.0.0.0", "Interface the DICOM and peer listeners bind to.")
    dicom_port: int = setting(11112, "DICOM SCP listener (C-ECHO/C-STORE/C-FIND/C-MOVE/C-GET).")
    destinations: tuple[Destination, ...] = setting((), "C-MOVE destinations (AET=HOST:PORT).")
    require_called_ae_title: bool = setting(False, "Reject associations not addressed to ae_title.")
    max_pdu_bytes: int = setting(262_144, "Largest PDU we accept; bigger PDUs mean fewer syscalls.")
    max_associations: int = setting(32, "Concurrent DICOM associations; more are rejected (busy).")
    dicom_workers: int = setting(0, "DIMSE worker processes; the node accepts on the DICOM port, serves dicom_local_associations connections itself and hands the others to the worker with the fewest open ones; 0 = the front end runs in the node process. With K > 0 the workers share max_associations (a slot from the node per association); each serves DICOM TLS too and sends its DICOM audit messages to the node's audit trail. 0 by default: two workers cost ~170 MB more memory and a slower start (each a Python process of its own), and about 1 ms more CPU per stored instance; they pay off only for several senders at once on a machine with idle cores (docs/workers.md).")
    dicom_local_associations: int = setting(1, "With dicom_workers > 0: how many connections the node process serves itself (its own front end, as with 0 workers) before it hands further concurrent ones to the workers; 0 = every connection to a worker. One sender costs ~1 ms less CPU per instance served in the node process (no channel, no hop between processes) and is served at the one-process rate; further senders use the workers' cores (docs/workers.md).")
    dimse_timeout_s: float = setting(60.0, "Wait for a DIMSE message before aborting.")
    acse_timeout_s: float = setting(30.0, "Wait for association negotiation messages.")
    network_timeout_s: float = setting(60.0, "Idle association before it is closed.")
    move_connect_timeout_s: float = setting(10.0, "Open the association to a C-MOVE destination.")
    move_store_attempt_max: int = setting(3, "C-STORE sub-operation attempts on a C-MOVE/C-GET.")
    find_result_max: int = setting(0, "Cap on C-FIND matches (0 = no cap).")
    storage_commitment_timeout_s: float = setting(600.0, "Storage Commitment: how long the node waits for every one of an instance's N owners to hold it before it reports the instance failed (0x0110); meanwhile hints and repair bring the missing copies.")
    find_buffer_rows: int = setting(1_000, "Rows of one C-FIND held between the cluster and a slow client; when full, the query waits (no thread does), and a cancelled or aborted C-FIND drops them at once.")

    # --- limits and durability
    instance_size_bytes_max: int = setting(4 * 1024**3, "A larger dataset is refused with 0xA700.")
    dataset_spool_threshold_bytes: int = setting(8 * 1024**2, "A received data set larger than this is written to a temporary file under data_dir/spool as it arrives, then read, hashed and compressed from there in chunks.")
    blob_file_bytes_min: int = setting(64 * 1024, "A stored instance whose compressed blob is this large or larger (or that was spooled) is kept as a file under data_dir/store/blobs, beside RocksDB (written into an empty file made ahead, whose directory entry is already durable: a pool syncs the directory once per 64 files; the file fsync'ed, then recorded in RocksDB with its size and CRC-32); C-GET/C-MOVE/WADO-RS read one of up to 2 MiB of Part-10 bytes (a slice) whole and check it by its CRC-32 before sending any byte, and stream a bigger one from there in chunks. Smaller blobs are RocksDB values. Why files: rocksdict holds the GIL while RocksDB copies a value into its log and while it reads one back; file writes and reads release it. With dicom_workers > 0 the worker that received the instance writes the file and the node process only names it.")
    inflight_instance_bytes_max: int = setting(1024**3, "Received instance bytes held in memory by all associations together (data sets below the spool threshold, and instances C-GET/C-MOVE read ahead of the one being sent; a spooled instance is compressed into a blob file and a blob file is streamed, so neither holds any; with DICOM worker processes a spooled instance's compressed copy is held and counted); a C-STORE that would go over it is answered 0xA700.")
    stow_bytes_max: int = setting(2 * 1024**3, "STOW-RS bytes held in memory by all requests together: each part while it arrives and until its write ends (a request stores up to 8 parts at once). A request that cannot take its next bytes reads no more of its body (TCP pushes back on the client) and, after store_timeout_ms, is answered 503 with Retry-After (202 when some of its parts were stored). Half of it is kept for the oldest request's part, so that a part can always be received whole: a STOW-RS part is limited to half of this less 1 MiB when that is below instance_size_bytes_max (C-STORE spools bigger data sets to disk; STOW-RS holds a part whole).")
    zstd_level: int = setting(ZSTD_LEVEL, "zstd level of the stored blobs (compressed once at ingest: C-STORE, STOW-RS; decompressed on every retrieve). Negative levels leave literals without entropy coding: they decompress 16-bit images several times faster than level 1 and compress faster, for less disk saved. -3 (the default) against -1: compression of a CT slice 0.34 instead of 0.85 ms, decompression 0.07 instead of 0.24 ms, for 1-5 percent more bytes stored (pydicom's real CT 11.5 percent saved instead of 15; level 1: 31). 1-19 save more disk for slower ingest and retrieve. Blobs written at another level read as before (bench/README.md, \"DICOMweb\").")
    malloc_trim_threshold_bytes: int = setting(128 * 1024**2, "Freed memory each glibc malloc arena keeps for reuse before it returns any to the kernel (M_TRIM_THRESHOLD; buffers below 4 MiB then come from the heap, M_MMAP_THRESHOLD): instance buffers are reused instead of being faulted in page by page, at the cost of resident memory. 0 = glibc's defaults. No effect on another C library.")
    disk_free_bytes_min: int = setting(256 * 1024**2, "Below this much free disk, stores get 0xA700.")
    store_timeout_ms: int = setting(30_000, "Upper bound for one C-STORE inside the node.")
    duplicate_policy: str = setting("first-wins", "Same SOP Instance UID, other bytes: keep the first.")
    store_stall_ms: int = setting(10_000, "Local health: a local store write, or a probe of the store's thread pool, outstanding this long makes the node unhealthy (it stops acking membership probes and refuting suspicion until the store path answers again).")
    health_probe_interval_ms: int = setting(1_000, "How often the store's thread pool is probed for local health.")

    # --- cluster (a single node is a ring of one)
    peer_port: int = setting(7001, "gRPC peer port (status, replication, membership).")
    seeds: tuple[str, ...] = setting((), "Peer ports (HOST:PORT) of nodes to join through; repeat --seed.")
    peer_routes: tuple[tuple[str, str], ...] = setting(
        (), "Dial VIA instead of a peer's advertised HOST:PORT (ADDR=VIA; repeat --peer-route): for NAT, "
        "tunnels, or the chaos runner's fault-injecting proxy.")
    advertise_host: str = setting("", "Address peers use to reach this node (default: host, or the host name when host is 0.0.0.0).")
    replication_factor: int = setting(3, "N: copies of each study (capped by the node count).")
    site_replicas: tuple[tuple[str, int], ...] = setting(
        (), "Copies per site, SITE=N (repeat --site-replicas; TOML table [site_replicas]): each named site holds N "
        "copies of every study, placed on that site's own ring, and replication_factor is not used. Every node of "
        "the cluster needs the same value (a seed refuses a joiner whose value differs). Empty: replication_factor "
        "copies spread over the sites.")
    write_quorum: int = setting(2, "W: durable copies before C-STORE answers Success.")
    write_quorum_scope: str = setting(
        "auto", "Where the W copies of a C-STORE are counted: local (owners in this node's site, capped at the "
        "copies the site holds; the other sites' copies are kept here as durable hints and sent at once, so no "
        "C-STORE waits on the WAN), global (any owners) or auto (local when site_replicas is set, else global). "
        "Local with one copy per site and strict writes: a store through a site whose owner of the study is down "
        "is refused (0xA701) until it is back.")
    write_quorum_mode: str = setting(
        "strict", "What counts toward W: strict (durable copies on the study's owners only; hints are still kept "
        "for owners that are down but do not count, so a C-STORE with fewer than W owners reachable is refused, "
        "0xA701, and R + W > N makes named reads exact) or sloppy (a stand-in's hint counts too: stores succeed "
        "with one owner reachable, but named reads must ask stand-ins, see read_fault_window_ms).")
    read_quorum: int = setting(2, "R: owners a request that names a study asks and merges (with strict writes and R + W > N: every acknowledged instance is seen; 1 = faster, may miss writes right after a fault).")
    scatter_read_quorum: int = setting(2, "R per token range for a query with no study key (a patient's studies by PatientID, a worklist by date): each range is asked of this many owners and their answers merged; a study one owner lists and another lacks is read again by its key, with read repair, so counts are those of the merged set. With strict writes and R + W > N: every acknowledged study is found and no acknowledged delete is shown; 1 = one owner per range, fewer peer queries, may miss a study stored seconds ago through a fault, and may show instances deleted while the owner asked was down or cut off, until the tombstones reach it.")
    read_fault_window_ms: int = setting(60_000, "Sloppy writes only: after any membership change (a member suspected, dead, restarted, back, leaving), requests that name a study also ask the study's stand-ins for hints this long, and flag the study when one cannot be asked: an owner can look alive yet lack an instance acknowledged through hints until replay delivers it. 0 = only when an owner is down. Not used with strict writes.")
    vnodes: int = setting(64, "V: virtual nodes (ring tokens) per node; weight.")
    token_salt: int = setting(-1, "Which token set this node takes on the ring (its vnode tokens hash it with its node id). -1 = chosen at the node's first start, against the ring its seeds report, as the set that balances its site best (ring/token_choice.py; 0 when a seed is from before salts or none answers), then kept in DATA_DIR/identity.json; a data dir from before salts keeps 0. 0 = the tokens of before salts (random); N > 0 = that set (tests that compute placement themselves). A node never changes its salt: a value other than the one its data dir keeps is refused.")
    replica_timeout_ms: int = setting(2_000, "Deadline for one replica's durable ack on a write (grows with size); then a stand-in takes a hint.")
    fetch_timeout_ms: int = setting(30_000, "Deadline for fetching one instance from a peer (grows with size).")
    query_timeout_ms: int = setting(60_000, "Deadline for one peer's C-FIND stream.")
    replica_start_timeout_ms: int = setting(2_000, "A replica that has not begun answering a query or a fetch this long is passed over for the next one (a partitioned or paused peer costs a reader this, not the whole deadline).")
    profile: str = setting("lan", "Membership timers (SWIM + Lifeguard, memberlist's): lan (probe 1 s), local (loopback tests, probe 0.2 s) or wan (probe 5 s).")
    hint_replay_interval_ms: int = setting(1_000, "How often held hints are offered to their owners.")
    dead_grace_s: int = setting(600, "A member dead this long is removed from the ring (survivors re-replicate), within the rails; overrides the profile's.")
    anti_entropy_interval_ms: int = setting(60_000, "How often each owned range is compared with its other replicas (and at once after a ring change).")
    repair_bytes_per_second_max: int = setting(50_000_000, "Throttle for pulling missing instances (repair, rebalance); 0 = none.")
    repair_fetch_window: int = setting(8, "Instances a repair or rebalance fetches from one source at once (one at a time is bound by the round trip).")
    tombstone_grace_s: int = setting(864_000, "A delete's tombstones are purged this long after it, once every owner holds them; hints older than it are dropped, and a node whose store was out of the cluster longer than it starts empty and refills from the owners (10 days; Cassandra's gc_grace).")

    # --- security (node/tls.py, node/access.py, node/audit.py)
    tls_dir: str = setting("", "Directory with ca.pem, cert.pem, key.pem (`pacsnode cert issue`): mutual TLS on the "
                           "peer port and the DICOM TLS port's certificate. Empty: plain text (loopback development).")
    dicom_tls_port: int = setting(0, "DICOM TLS listener (TLS 1.2+, BCP 195; 2762 is IANA's); 0 = off. Needs tls_dir.")
    dicom_tls_client_cert: str = setting("optional", "DICOM TLS client certificates: none, optional (checked when "
                                         "sent) or required (of the cluster CA).")
    http_tls_client_cert: str = setting("optional", "HTTPS client certificates (with tls_dir): none, optional "
                                        "(checked when sent) or required (of the cluster CA; /healthz, /readyz and "
                                        "/metrics then need one too).")
    access_mode: str = setting("default", "default: echo and store open, find/get/move for known AEs (and loopback); "
                               "strict: only known AEs, from their hosts, with their services.")
    loopback_trusted: bool = setting(True, "Callers on 127.0.0.1/::1 may do everything (quick start); off in strict mode.")
    known_aes: tuple[KnownAe, ...] = setting((), "Known AEs: AET[@HOST,...][=SERVICE,...] with services echo, store, "
                                             "find, get, move and move-to:AET (repeat --known-ae).")
    audit_log: str = setting("", "Audit trail file (PS3.15 A.5 JSON lines); empty: DATA_DIR/audit.jsonl; off: none.")
    audit_log_segment_bytes: int = setting(16 * 1024 * 1024, "The audit file is closed at this size, renamed "
                                           "audit-<UTC time>.jsonl and gzip-compressed beside it (`pacsnode audit` "
                                           "reads them all, zcat one); 0: one file that grows without end.")
    audit_syslog: str = setting("", "Also send the audit trail to this RFC 5424 syslog receiver over TLS (RFC 5425), "
                                    "HOST:PORT; its certificate must be of the cluster CA and name HOST. Needs tls_dir. "
                                    "Empty: off.")

    # --- HTTP front end (DICOMweb, web page, metrics)
    http_host: str = setting("", "Interface the HTTP listener binds to (default: host).")
    http_port: int = setting(8042, "HTTP port: DICOMweb under /dicom-web, the web page at /ui/, /metrics, /healthz, /readyz.")
    qido_result_max: int = setting(10_000, "Most matches one QIDO-RS answer carries (a Warning says how many more there are).")
    viewer_dir: str = setting("", "OHIF's prebuilt viewer, served at /viewer/ (`make viewer` lays it out); empty: node/ohif beside the code.")

    # --- operations
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING, ERROR.")


    def __post_init__(self) -> None:
        if not self.node_id or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", self.node_id):
            raise ConfigError(f"node_id must be 1-64 of [A-Za-z0-9_.-], got {self.node_id!r}")
        if not _AE_TITLE.match(self.ae_title) or not self.ae_title.strip():
            raise ConfigError(f"ae_title must be 1-16 printable ASCII characters, no backslash, got {self.ae_title!r}")
        for name in ("dicom_port", "peer_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be 0-65535, got {port}")
        if self.site_replicas:
            try:
                spec = SiteReplicas(tuple(self.site_replicas))
            except ValueError as error:
                raise ConfigError(f"site_replicas: {error}") from None
            object.__setattr__(self, "site_replicas", spec.per_site)
            if self.site not in dict(spec.per_site):
                raise ConfigError(f"site_replicas name no copies for this node's site {self.site!r} "
                                  f"(site_replicas={spec}); name it, or set --site to one of them")
            if not 1 <= self.write_quorum <= spec.total:
                raise ConfigError(f"need 1 <= write_quorum <= the copies site_replicas place ({spec.total}), got "
                                  f"write_quorum={self.write_quorum} site_replicas={spec}")
        elif not 1 <= self.write_quorum <= self.replication_factor:
            raise ConfigError(
                "need 1 <= write_quorum <= replication_factor, got "
                f"write_quorum={self.write_quorum} replication_factor={self.replication_factor}"
            )
        if self.read_quorum < 1:  # Above N it is capped at N, like W with fewer nodes than N.
            raise ConfigError(f"read_quorum must be >= 1, got {self.read_quorum}")
        if self.scatter_read_quorum < 1:  # Capped at N too.
            raise ConfigError(f"scatter_read_quorum must be >= 1, got {self.scatter_read_quorum}")
        if self.vnodes < 1:
            raise ConfigError(f"vnodes must be >= 1, got {self.vnodes}")
        if self.token_salt < -1:
            raise ConfigError(f"token_salt must be -1 (chosen at the first start) or >= 0, got {self.token_salt}")
        if self.max_pdu_bytes != 0 and self.max_pdu_bytes < 4096:
            raise ConfigError(f"max_pdu_bytes must be 0 (unlimited) or >= 4096, got {self.max_pdu_bytes}")
        if self.duplicate_policy not in ("first-wins",):
            raise ConfigError(f"duplicate_policy must be 'first-wins', got {self.duplicate_policy!r}")
        if self.write_quorum_scope not in WRITE_QUORUM_SCOPES:
            raise ConfigError(f"write_quorum_scope must be one of {', '.join(WRITE_QUORUM_SCOPES)}, "
                              f"got {self.write_quorum_scope!r}")
        if self.write_quorum_mode not in WRITE_QUORUM_MODES:
            raise ConfigError(f"write_quorum_mode must be one of {', '.join(WRITE_QUORUM_MODES)}, "
                              f"got {self.write_quorum_mode!r}")
        if not ZSTD_LEVEL_MIN <= self.zstd_level <= ZSTD_LEVEL_MAX:
            raise ConfigError(f"zstd_level must be {ZSTD_LEVEL_MIN} to {ZSTD_LEVEL_MAX}, got {self.zstd_level}")
        if self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        for name in ("max_associations", "move_store_attempt_max", "store_timeout_ms", "instance_size_bytes_max",
                     "replica_timeout_ms", "fetch_timeout_ms", "query_timeout_ms", "replica_start_timeout_ms",
                     "hint_replay_interval_ms", "repair_fetch_window", "find_buffer_rows", "store_stall_ms",
                     "health_probe_interval_ms", "dataset_spool_threshold_bytes", "inflight_instance_bytes_max",
                     "blob_file_bytes_min",
                     "anti_entropy_interval_ms", "qido_result_max"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dicom_workers", "dicom_local_associations", "disk_free_bytes_min", "malloc_trim_threshold_bytes", "find_result_max", "repair_bytes_per_second_max",
                     "dead_grace_s", "read_fault_window_ms", "audit_log_segment_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dimse_timeout_s", "acse_timeout_s", "network_timeout_s", "move_connect_timeout_s",
                     "storage_commitment_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dicom_tls_client_cert not in ("none", "optional", "required"):
            raise ConfigError(f"dicom_tls_client_cert must be none, optional or required, got {self.dicom_tls_client_cert!r}")
        if self.stow_bytes_max < 4 * 1024**2:
            raise ConfigError(f"stow_bytes_max must be >= 4 MiB (4194304), got {self.stow_bytes_max}")
        if self.http_tls_client_cert not in ("none", "optional", "required"):
            raise ConfigError(f"http_tls_client_cert must be none, optional or required, got {self.http_tls_client_cert!r}")
        if self.access_mode not in ACCESS_MODES:
            raise ConfigError(f"access_mode must be one of {', '.join(ACCESS_MODES)}, got {self.access_mode!r}")
        if self.access_mode == "strict" and not self.known_aes:
            raise ConfigError("access_mode strict needs at least one known AE (known_aes / --known-ae)")
        if not 0 <= self.dicom_tls_port <= 65535:
            raise ConfigError(f"dicom_tls_port must be 0-65535, got {self.dicom_tls_port}")
        if self.dicom_tls_port and not self.tls_dir:
            raise ConfigError("dicom_tls_port needs tls_dir (the node's certificate)")
        if self.audit_syslog:
            from pacsnode.node.audit_syslog import SyslogTargetError, parse_target
            if not self.tls_dir:
                raise ConfigError("audit_syslog needs tls_dir (the cluster CA checks the receiver)")
            try:
                parse_target(self.audit_syslog)
            except SyslogTargetError as error:
                raise ConfigError(str(error)) from None
        known_titles = [k.ae_title for k in self.known_aes]
        if len(known_titles) != len(set(known_titles)):
            raise ConfigError(f"duplicate known AE titles: {known_titles}")
        if any(d.tls for d in self.destinations) and not self.tls_dir:
            raise ConfigError("a +tls C-MOVE destination needs tls_dir (the node's certificate)")
        titles = [d.ae_title for d in self.destinations]
        if len(titles) != len(set(titles)):
            raise ConfigError(f"duplicate C-MOVE destination AE titles: {titles}")

    @property
    def replication(self) -> Replication:
        """The placement policy every owner computation uses: N copies per site when
        site_replicas is set, else the plain replication_factor."""
        if self.site_replicas:
            return SiteReplicas(self.site_replicas)
        return self.replication_factor

    @property
    def write_scope_local(self) -> bool:
        """Whether W is counted in this node's site (write_quorum_scope, auto resolved)."""
        if self.write_quorum_scope == "auto":
            return bool(self.site_replicas)
        return self.write_quorum_scope == "local"

    @property
    def peer_host(self) -> str:
        """The address peers use to reach this node."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::", ""):
            return socket.gethostname()
        return self.host

    def destination(self, ae_title: str) -> Destination | None:
        """The configured C-MOVE destination with this AE title, if any."""
        for destination in self.destinations:
            if destination.ae_title == ae_title.strip():
                return destination
        return None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "NodeConfig":
        """Build from TOML/CLI values (names as the fields); unknown names are an error."""
        known = set(cls.field_names())
        unknown = sorted(set(values) - known - {"destination", "seed", "peer_route", "known_ae", "site_replica"})
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if name in ("destinations", "destination"):
                kwargs["destinations"] = _parse_destinations(value)
                continue
            if name in ("seeds", "seed"):
                kwargs["seeds"] = _parse_seeds(value)
                continue
            if name in ("peer_routes", "peer_route"):
                kwargs["peer_routes"] = _parse_peer_routes(value)
                continue
            if name in ("site_replicas", "site_replica"):
                kwargs["site_replicas"] = _parse_site_replicas(value)
                continue
            if name in ("known_aes", "known_ae"):
                kwargs["known_aes"] = parse_known_aes(value)
                continue
            kwargs[name] = _coerce(name, str(types[name]), value)
        return cls(**kwargs)


def _parse_seeds(value: Any) -> tuple[str, ...]:
    """Seeds are HOST:PORT strings (a list, or one string)."""
    items = [value] if isinstance(value, str) else list(value)
    seeds = []
    for item in items:
        host, sep, port = str(item).strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"seed must look like HOST:PORT, got {item!r}")
        host = host.strip("[]")
        seeds.append(f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}")
    return tuple(seeds)


def _parse_site_replicas(value: Any) -> tuple[tuple[str, int], ...]:
    """A TOML table {SITE = N}, or SITE=N strings (a list, or one string `A=2,B=1`)."""
    if isinstance(value, SiteReplicas):
        return value.per_site
    try:
        if isinstance(value, Mapping):
            copies = {}
            for site, count in value.items():
                if isinstance(count, bool) or not isinstance(count, int):
                    raise ValueError(f"site {site!r} needs a whole number of copies, got {count!r}")
                copies[str(site)] = count
            return SiteReplicas.of(copies).per_site if copies else ()
        items = [value] if isinstance(value, str) else list(value)
        items = [i if isinstance(i, str) else "=".join(str(x) for x in i) for i in items]
        return parse_site_replicas(items).per_site if items else ()
    except ValueError as error:
        raise ConfigError(f"site_replicas: {error}") from None


def _parse_peer_routes(value: Any) -> tuple[tuple[str, str], ...]:
    """Routes are "ADDR=VIA" strings (a list, or one string) or a TOML table {ADDR = "VIA"}."""
    if isinstance(value, Mapping):
        items = [f"{k}={v}" for k, v in value.items()]
    elif isinstance(value, str):
        items = [value]
    else:
        items = [r if isinstance(r, str) else "=".join(r) for r in value]
    routes = []
    for item in items:
        address, sep, via = str(item).partition("=")
        if not sep:
            raise ConfigError(f"peer route must look like HOST:PORT=HOST:PORT, got {item!r}")
        try:
            routes.append((_parse_seeds(address)[0], _parse_seeds(via)[0]))
        except ConfigError:
            raise ConfigError(f"peer route must look like HOST:PORT=HOST:PORT, got {item!r}") from None
    if len({a for a, _ in routes}) != len(routes):
        raise ConfigError(f"two peer routes for one address: {items}")
    return tuple(routes)


def parse_known_aes(value: Any) -> tuple[KnownAe, ...]:
    """A list of `AET[@HOST,...][=SERVICE,...]` strings, or a TOML table of tables
    `[known_aes.AET] hosts = [...] services = [...] move_to = [...]`."""
    try:
        if isinstance(value, Mapping):
            return tuple(KnownAe.from_table(str(k), v if isinstance(v, Mapping) else {}) for k, v in value.items())
        items = [value] if isinstance(value, (str, KnownAe)) else list(value)
        return tuple(i if isinstance(i, KnownAe) else KnownAe.parse(str(i)) for i in items)
    except AccessError as error:
        raise ConfigError(str(error)) from None


def _parse_destinations(value: Any) -> tuple[Destination, ...]:
    """TOML accepts a list of "AET=HOST:PORT" strings or a table {AET = "HOST:PORT"}."""
    if isinstance(value, Mapping):
        return tuple(Destination.parse(f"{k}={v}") for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(d if isinstance(d, Destination) else Destination.parse(str(d)) for d in value)
    raise ConfigError(f"destinations must be a list of AET=HOST:PORT or a table, got {value!r}")


def _coerce(name: str, type_name: str, value: Any) -> Any:
    try:
        if "Path" in type_name:
            return Path(value)
        if type_name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError  # int(104.5) would quietly give 104.
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot use {value!r} as {type_name}") from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; names are NodeConfig fields (a [node] table is also accepted)."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    if "node" in data and isinstance(data["node"], dict):
        merged = dict(data["node"])
        merged.update({k: v for k, v in data.items() if k != "node"})
        data = merged
    return {key.replace("-", "_"): value for key, value in data.items()}
