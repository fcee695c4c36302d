"""Conversions between the archive's types and the peer protocol's messages."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Iterator, Sequence

from pacsnode.proto import CHUNK_BYTES_MAX, PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.replication.delete_coordinator import DeleteScope
from pacsnode.replication.hlc import Version, is_mark
from pacsnode.replication.model import Attributes, InstanceRecord, StoredInstance, Tombstone
from pacsnode.ring import swim
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.placement import TokenRange

STATE_TO_WIRE = {
    "alive": pb.MEMBER_STATE_ALIVE,
    "suspect": pb.MEMBER_STATE_SUSPECT,
    "dead": pb.MEMBER_STATE_DEAD,
    "left": pb.MEMBER_STATE_LEFT,
    "removed": pb.MEMBER_STATE_REMOVED,
    "leaving": pb.MEMBER_STATE_LEAVING,
}
STATE_FROM_WIRE = {value: key for key, value in STATE_TO_WIRE.items()}
OUTCOME_TO_WIRE = {
    "stored": pb.STORE_OUTCOME_STORED,
    "duplicate": pb.STORE_OUTCOME_DUPLICATE,
    "conflict": pb.STORE_OUTCOME_CONFLICT,
    "deleted": pb.STORE_OUTCOME_DELETED,
}
OUTCOME_FROM_WIRE = {value: key for key, value in OUTCOME_TO_WIRE.items()}


def now_ms() -> int:
    return int(time.time() * 1000)


def envelope(cluster_id: str, sender_id: str, generation: int, ring_version: int, incarnation: int = 0
             ) -> pb.Envelope:
    return pb.Envelope(
        cluster_id=cluster_id,
        protocol_version=PROTOCOL_VERSION,
        sender_id=sender_id,
        sender_generation=generation,
        sender_incarnation=incarnation,
        ring_version=ring_version,
        sent_at_ms=now_ms(),
    )


def record_to_wire(record: InstanceRecord, compressed_size: int) -> pb.InstanceRecord:
    return pb.InstanceRecord(
        study_instance_uid=record.study_instance_uid,
        series_instance_uid=record.series_instance_uid,
        sop_instance_uid=record.sop_instance_uid,
        sop_class_uid=record.sop_class_uid,
        transfer_syntax_uid=record.transfer_syntax_uid,
        dataset_offset=record.dataset_offset,
        content_hash=record.content_hash,
        total_size_bytes=record.size_bytes + record.dataset_offset,
        compressed_size_bytes=compressed_size,
        version=pb.Version(hlc_ms=record.stored_at_ms, hlc_logical=record.version_logical,
                           coordinator_id=record.version_node),
    )


def record_from_wire(message: pb.InstanceRecord, attributes: Attributes) -> InstanceRecord:
    from pacsnode.replication.model import INSTANCE_KEYWORDS

    return InstanceRecord(
        study_instance_uid=message.study_instance_uid,
        series_instance_uid=message.series_instance_uid,
        sop_instance_uid=message.sop_instance_uid,
        sop_class_uid=message.sop_class_uid,
        transfer_syntax_uid=message.transfer_syntax_uid,
        content_hash=message.content_hash,
        size_bytes=int(message.total_size_bytes) - int(message.dataset_offset),
        dataset_offset=int(message.dataset_offset),
        stored_at_ms=int(message.version.hlc_ms),
        attributes={k: attributes[k] for k in INSTANCE_KEYWORDS if k in attributes},
        version_logical=int(message.version.hlc_logical),
        version_node=message.version.coordinator_id,
    )


def version_to_wire(version: Version) -> pb.Version:
    return pb.Version(hlc_ms=version.ms, hlc_logical=version.logical, coordinator_id=version.node)


def version_from_wire(message: pb.Version) -> Version:
    return Version(int(message.hlc_ms), int(message.hlc_logical), message.coordinator_id)


def tombstone_request(env: pb.Envelope, tombstones: Sequence[Tombstone], scope: DeleteScope | None,
                      hint_for: str) -> pb.TombstoneRequest:
    """One request: `tombstones` share one study and one version (delete_coordinator.batches)."""
    first = tombstones[0]
    request = pb.TombstoneRequest(envelope=env, study_instance_uid=first.study_instance_uid,
                                  version=version_to_wire(first.version), hint_for=hint_for,
                                  listed_only=scope is None)
    if scope is not None:
        request.series_instance_uid = scope.series_instance_uid
        request.sop_instance_uid = scope.sop_instance_uid
    request.instances.extend(pb.TombstoneEntry(series_instance_uid=t.series_instance_uid,
                                               sop_instance_uid=t.sop_instance_uid) for t in tombstones)
    return request


def tombstones_from_wire(request: pb.TombstoneRequest) -> tuple[list[Tombstone], DeleteScope | None]:
    """The tombstones a request names and the scope an owner expands (None: listed only).
    ValueError on a request without a study or with an entry without a SOP Instance UID."""
    study = request.study_instance_uid
    if not study or len(study) > 64:
        raise ValueError("study_instance_uid is required (at most 64 characters)")
    version = version_from_wire(request.version)
    tombstones = []
    for entry in request.instances:
        if not entry.sop_instance_uid or len(entry.sop_instance_uid) > 64:
            raise ValueError("every instance needs a sop_instance_uid of at most 64 characters")
        tombstones.append(Tombstone(study, entry.sop_instance_uid, version, entry.series_instance_uid))
    if not tombstones and request.sop_instance_uid:  # A single-instance request without a list.
        tombstones.append(Tombstone(study, request.sop_instance_uid, version, request.series_instance_uid))
    scope = None if request.listed_only else DeleteScope(study, request.series_instance_uid,
                                                         request.sop_instance_uid)
    return tombstones, scope


def bucket_entry_to_wire(study_uid: str, sop_uid: str, content: str) -> pb.BucketEntry:
    """A ListBucket entry; a tombstone's (content: its version mark) has tombstone and version set."""
    entry = pb.BucketEntry(study_instance_uid=study_uid, sop_instance_uid=sop_uid, content_hash=content)
    if is_mark(content):
        entry.tombstone = True
        entry.version.CopyFrom(version_to_wire(Version.from_mark(content)))
    return entry


def bucket_entry_from_wire(entry: pb.BucketEntry) -> tuple[str, str, str]:
    """(study uid, sop uid, content hash or a tombstone's version mark), as stores list entries."""
    if entry.tombstone:
        return entry.study_instance_uid, entry.sop_instance_uid, version_from_wire(entry.version).mark()
    return entry.study_instance_uid, entry.sop_instance_uid, entry.content_hash


def attributes_json(attributes: Attributes) -> bytes:
    return json.dumps(attributes, separators=(",", ":"), ensure_ascii=False).encode()


def attributes_from_json(data: bytes) -> Attributes:
    value = json.loads(data.decode("utf-8")) if data else {}
    if not isinstance(value, dict):
        raise ValueError("attributes must be a JSON object")
    return value


def store_header(stored: StoredInstance, hint_for: str, crc32: int | None = None) -> pb.StoreHeader:
    """The StoreHeader of a peer store; `crc32` (codec.payload_crc32 of the blob) lets the
    receiver check the payload without decompressing it."""
    header = pb.StoreHeader(
        record=record_to_wire(stored.record, len(stored.blob)),
        index_attributes_json=attributes_json(stored.attributes),
        hint_for=hint_for,
    )
    if crc32 is not None:
        header.payload_crc32 = crc32
    if stored.metadata_json is not None:
        header.metadata_json = stored.metadata_json
    return header


def metadata_from_wire(header: pb.StoreHeader) -> bytes | None:
    """A StoreHeader's /metadata entry when it is a JSON object; else None (the receiver
    builds its own: a sender's broken entry never reaches a viewer)."""
    if not header.HasField("metadata_json"):
        return None
    data = bytes(header.metadata_json)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(value, dict) else None


def payload_bytes(blob: Any) -> bytes:
    """The payload as `bytes`, which a protobuf bytes field takes: a blob a DIMSE worker
    wrote arrives as a read-only memory map of its file (node/archive_channel.py), which
    protobuf refuses (TypeError), so it is copied out once per message here."""
    return blob if isinstance(blob, bytes) else bytes(blob)


def store_whole(env: pb.Envelope, stored: StoredInstance, header: pb.StoreHeader) -> pb.StoreWholeRequest:
    """The StoreWholeInstance request: envelope, header and the whole payload in one message."""
    return pb.StoreWholeRequest(envelope=env, header=header, data=payload_bytes(stored.blob))


def store_chunks(env: pb.Envelope, stored: StoredInstance, hint_for: str,
                 header: pb.StoreHeader | None = None) -> Iterator[pb.StoreChunk]:
    """The StoreInstance request stream: header in the first chunk, ≤ 1 MiB of blob each."""
    blob = stored.blob
    if header is None:
        header = store_header(stored, hint_for)
    offsets = range(0, max(len(blob), 1), CHUNK_BYTES_MAX)
    last_offset = offsets[-1]
    for offset in offsets:
        chunk = pb.StoreChunk(data=blob[offset : offset + CHUNK_BYTES_MAX], last=offset == last_offset)
        if offset == 0:
            chunk.envelope.CopyFrom(env)
            chunk.header.CopyFrom(header)
        yield chunk


SIGNATURE_BYTES_MAX = 256  # proto/pacsnode.proto MemberUpdate.signature
CERTIFICATE_BYTES_MAX = 4_096  # MemberUpdate.signer_certificate


def update_to_wire(update: swim.MemberUpdate) -> pb.MemberUpdate:
    """One SWIM member record as the peer protocol carries it."""
    member = update.info
    return pb.MemberUpdate(
        node_id=member.node_id,
        peer_address=pb.Address(host=member.peer_host, port=member.peer_port),
        dicom_address=pb.DicomAddress(host=member.dicom_host, port=member.dicom_port, ae_title=member.ae_title),
        site=member.site,
        host=member.host,
        vnodes=member.vnodes,
        state=STATE_TO_WIRE[update.state.value],
        incarnation=update.incarnation,
        generation=member.generation,
        updated_at_ms=member.updated_at_ms,
        reporter_id=update.reporter_id,
        lamport=update.lamport,
        leaving=update.leaving,
        signature=update.signature,
        signer_certificate=update.certificate,
        token_salt=member.token_salt,
    )


def update_from_wire(message: pb.MemberUpdate) -> swim.MemberUpdate:
    """A member record from a peer; ValueError when it is not one we can use."""
    if not message.node_id or len(message.node_id) > 64:
        raise ValueError("member update without a node id (or one over 64 characters)")
    if not message.peer_address.host or not 0 < message.peer_address.port < 65536:
        raise ValueError(f"member update for {message.node_id[:64]!r} without a peer address")
    state = STATE_FROM_WIRE.get(message.state)
    if state is None:
        raise ValueError(f"member update for {message.node_id[:64]!r} with state {message.state}")
    info = MemberInfo(
        node_id=message.node_id,
        peer_host=message.peer_address.host,
        peer_port=int(message.peer_address.port),
        dicom_host=message.dicom_address.host,
        dicom_port=int(message.dicom_address.port),
        ae_title=message.dicom_address.ae_title,
        site=message.site or "default",
        host=message.host,
        vnodes=int(message.vnodes) or 64,
        generation=int(message.generation),
        updated_at_ms=int(message.updated_at_ms),
        state=state,
        token_salt=int(message.token_salt),
    )
    if len(message.signature) > SIGNATURE_BYTES_MAX or len(message.signer_certificate) > CERTIFICATE_BYTES_MAX:
        raise ValueError(f"member update for {message.node_id[:64]!r} with an oversized signature or certificate")
    return swim.MemberUpdate(info, swim.State(state), int(message.incarnation), reporter_id=message.reporter_id,
                             lamport=int(message.lamport), leaving=bool(message.leaving),
                             signature=bytes(message.signature), certificate=bytes(message.signer_certificate))


def updates_from_wire(messages: Iterable[pb.MemberUpdate]) -> tuple[tuple[swim.MemberUpdate, ...], list[str]]:
    """The usable records of a list, and why the others were skipped."""
    updates, problems = [], []
    for message in messages:
        try:
            updates.append(update_from_wire(message))
        except ValueError as error:
            problems.append(str(error))
    return tuple(updates), problems


# ----------------------------------------------------------------- SWIM messages <-> Membership RPCs
# Ping and Gossip -> Membership.Ping (Gossip: sequence_number 0), IndirectPing ->
# IndirectPing, PushPullRequest -> PushPull, JoinRequest -> Join, LeaveRequest -> Leave.
# Ack and Nack come back as pb.Ack (nack=true for Nack), the others as their replies.

MembershipRequest = pb.PingRequest | pb.IndirectPingRequest | pb.PushPullRequest | pb.JoinRequest | pb.LeaveRequest


def request_to_wire(message: swim.Message, target_id: str, env: pb.Envelope) -> tuple[str, MembershipRequest]:
    """(Membership method, request) for a SWIM message this node sends."""
    match message:
        case swim.Ping():
            return "Ping", pb.PingRequest(envelope=env, target_id=message.target_id,
                                          sequence_number=message.sequence_number,
                                          updates=[update_to_wire(u) for u in message.updates])
        case swim.Gossip():
            return "Ping", pb.PingRequest(envelope=env, target_id=target_id, sequence_number=0,
                                          updates=[update_to_wire(u) for u in message.updates])
        case swim.IndirectPing():
            target = message.target
            return "IndirectPing", pb.IndirectPingRequest(
                envelope=env, target_id=target.node_id,
                target_address=pb.Address(host=target.peer_host, port=target.peer_port),
                sequence_number=message.sequence_number, probe_timeout_ms=message.probe_timeout_ms,
                updates=[update_to_wire(u) for u in message.updates])
        case swim.PushPullRequest():
            return "PushPull", pb.PushPullRequest(envelope=env, members=[update_to_wire(u) for u in message.members])
        case swim.JoinRequest():
            return "Join", pb.JoinRequest(envelope=env, member=update_to_wire(message.member))
        case swim.LeaveRequest():
            return "Leave", pb.LeaveRequest(envelope=env, member=update_to_wire(message.member))
    raise ValueError(f"{type(message).__name__} is a reply, not a request")


def placement_mismatch(own: pb.ReplicationSettings, joiner: pb.ReplicationSettings) -> str | None:
    """Why a joiner with `joiner` settings may not join a cluster placing by `own`, or None.
    Only placement is compared: site_replicas, or replication_factor when neither side
    sets them (W, R and vnodes are each node's own and may differ)."""
    def placement(settings: pb.ReplicationSettings) -> str:
        if settings.site_replicas:
            return f"site_replicas={settings.site_replicas}"
        return f"replication_factor={settings.replication_factor}"

    if placement(own) == placement(joiner):
        return None
    return (f"replication settings differ: this cluster places {placement(own)}, the joining node "
            f"{placement(joiner)}; start it with the cluster's (--site-replicas / --replicas) or it "
            f"would compute other owners for every study")


def reply_from_wire(method: str, reply: Any) -> tuple[swim.Message | None, list[str]]:
    """The SWIM reply in a Membership RPC's answer (None for a gossip's empty Ack)."""
    if method in ("Ping", "IndirectPing"):
        updates, problems = updates_from_wire(reply.updates)
        if reply.nack:
            return swim.Nack(int(reply.sequence_number), updates), problems
        return swim.Ack(int(reply.sequence_number), updates), problems
    if method == "PushPull":
        members, problems = updates_from_wire(reply.members)
        return swim.PushPullReply(members), problems
    if method == "Join":
        members, problems = updates_from_wire(reply.members)
        return swim.JoinReply(bool(reply.accepted), reply.reason, members), problems
    if method == "Leave":
        return swim.LeaveReply(bool(reply.accepted)), []
    raise ValueError(f"no Membership method {method!r}")


def ack_to_wire(message: swim.Ack | swim.Nack, env: pb.Envelope) -> pb.Ack:
    return pb.Ack(envelope=env, sequence_number=message.sequence_number, nack=isinstance(message, swim.Nack),
                  updates=[update_to_wire(u) for u in message.updates])


def ranges_to_wire(ranges: Any) -> list[pb.TokenRange]:
    return [pb.TokenRange(start=r.start, end=r.end) for r in ranges]


def ranges_from_wire(ranges: Any) -> list[TokenRange]:
    return [TokenRange(int(r.start), int(r.end)) for r in ranges]
