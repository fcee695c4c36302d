"""Conversions between the archive's types and the peer protocol's messages."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from pacsnode.proto import CHUNK_BYTES_MAX, PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.replication.model import Attributes, InstanceRecord, StoredInstance
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
}
OUTCOME_FROM_WIRE = {value: key for key, value in OUTCOME_TO_WIRE.items()}


def now_ms() -> int:
    return int(time.time() * 1000)


def envelope(cluster_id: str, sender_id: str, generation: int, ring_version: int) -> pb.Envelope:
    return pb.Envelope(
        cluster_id=cluster_id,
        protocol_version=PROTOCOL_VERSION,
        sender_id=sender_id,
        sender_generation=generation,
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
        version=pb.Version(hlc_ms=record.stored_at_ms),
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
    )


def attributes_json(attributes: Attributes) -> bytes:
    return json.dumps(attributes, separators=(",", ":"), ensure_ascii=False).encode()


def attributes_from_json(data: bytes) -> Attributes:
    value = json.loads(data.decode("utf-8")) if data else {}
    if not isinstance(value, dict):
        raise ValueError("attributes must be a JSON object")
    return value


def store_chunks(env: pb.Envelope, stored: StoredInstance, hint_for: str) -> Iterator[pb.StoreChunk]:
    """The StoreInstance request stream: header in the first chunk, ≤ 1 MiB of blob each."""
    blob = stored.blob
    header = pb.StoreHeader(
        record=record_to_wire(stored.record, len(blob)),
        index_attributes_json=attributes_json(stored.attributes),
        hint_for=hint_for,
    )
    offsets = range(0, max(len(blob), 1), CHUNK_BYTES_MAX)
    last_offset = offsets[-1]
    for offset in offsets:
        chunk = pb.StoreChunk(data=blob[offset : offset + CHUNK_BYTES_MAX], last=offset == last_offset)
        if offset == 0:
            chunk.envelope.CopyFrom(env)
            chunk.header.CopyFrom(header)
        yield chunk


def member_to_wire(member: MemberInfo) -> pb.MemberUpdate:
    return pb.MemberUpdate(
        node_id=member.node_id,
        peer_address=pb.Address(host=member.peer_host, port=member.peer_port),
        dicom_address=pb.DicomAddress(host=member.dicom_host, port=member.dicom_port, ae_title=member.ae_title),
        site=member.site,
        host=member.host,
        vnodes=member.vnodes,
        state=STATE_TO_WIRE.get(member.state, pb.MEMBER_STATE_ALIVE),
        generation=member.generation,
        updated_at_ms=member.updated_at_ms,
    )


def member_from_wire(message: pb.MemberUpdate) -> MemberInfo:
    if not message.node_id or not message.peer_address.host or not message.peer_address.port:
        raise ValueError("member update without node id or peer address")
    return MemberInfo(
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
        state=STATE_FROM_WIRE.get(message.state, "alive"),
    )


def ranges_to_wire(ranges: Any) -> list[pb.TokenRange]:
    return [pb.TokenRange(start=r.start, end=r.end) for r in ranges]


def ranges_from_wire(ranges: Any) -> list[TokenRange]:
    return [TokenRange(int(r.start), int(r.end)) for r in ranges]
