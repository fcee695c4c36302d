"""Fuzz (Hypothesis) of every peer message decoder and of the DICOM port's ingest path.

Each decoder either gives a value or raises one of the errors its caller catches and
answers (never another exception, never a hang); ingest accepts a dataset only when its
UIDs are valid and keeps its bytes exactly (no stored garbage).

CI runs a short run (150 inputs per target by default). The long run, at least 100,000
inputs per target (hours on 2 cores: about 70 inputs/s per target on a busy machine;
--timeout 0 lifts pytest's 300 s limit, which otherwise fails the test), is:

    PACSNODE_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/property/test_fuzz.py -p no:cacheprovider --timeout 0
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filereader import _read_file_meta_info, read_preamble

from pacsnode.node import codec, peer_wire
from pacsnode.node.ingest import InvalidInstance, instance_from_part10
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.replication.matching import Query, QueryError
from pacsnode.sim.datagen import StudySetSpec, iter_part10

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom quotes the mutated values it reads.
FUZZ_EXAMPLES = int(os.environ.get("PACSNODE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# What peer_server.py catches and answers for each decoder (anything else is a bug).
HEADER_ERRORS = (ValueError, TypeError, UnicodeDecodeError)
QUERY_ERRORS = (ValueError, KeyError, TypeError, QueryError, UnicodeDecodeError)

REQUEST_TYPES = [pb.StoreChunk, pb.FetchRequest, pb.QueryRequest, pb.ListStudyRequest, pb.RangeDigestRequest,
                 pb.ListBucketRequest, pb.PingRequest, pb.IndirectPingRequest, pb.PushPullRequest, pb.JoinRequest,
                 pb.LeaveRequest, pb.StatusRequest, pb.RingViewRequest, pb.MetricsRequest]
REPLY_TYPES = [pb.StoreReply, pb.FetchChunk, pb.QueryRow, pb.ListStudyReply, pb.RangeDigestReply,
               pb.ListBucketReply, pb.Ack, pb.PushPullReply, pb.JoinReply, pb.LeaveReply, pb.StatusReply]


def _valid_member() -> bytes:
    return pb.MemberUpdate(node_id="n1", state=pb.MEMBER_STATE_ALIVE, incarnation=3,
                           peer_address=pb.Address(host="10.0.0.1", port=7001)).SerializeToString()


def _mutate(seed: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(seed)
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    return bytes(data[: max(0, len(data) - cut)])


wire_bytes = st.one_of(
    st.binary(max_size=512),
    st.builds(_mutate, st.just(_valid_member()), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                          max_size=8), st.integers(0, 8)),
)


def decode_request(message_type: Any, data: bytes) -> None:
    """Parse as the gRPC server does, then run the decoders peer_server.py runs on it."""
    try:
        message = message_type.FromString(data)
    except DecodeError:
        return  # gRPC answers INTERNAL for an unparsable request: no handler runs.
    if message_type is pb.StoreChunk and message.HasField("header"):
        try:
            attributes = peer_wire.attributes_from_json(message.header.index_attributes_json)
            peer_wire.record_from_wire(message.header.record, attributes)
        except HEADER_ERRORS:
            pass
    if message_type is pb.QueryRequest:
        try:
            Query.from_json(json.loads(message.query_json.decode("utf-8")))
        except QUERY_ERRORS:
            pass
        peer_wire.ranges_from_wire(message.token_ranges)
    if message_type in (pb.PingRequest, pb.IndirectPingRequest):
        peer_wire.updates_from_wire(message.updates)
    if message_type is pb.PushPullRequest:
        peer_wire.updates_from_wire(message.members)
    if message_type in (pb.JoinRequest, pb.LeaveRequest):
        try:
            peer_wire.update_from_wire(message.member)
        except ValueError:
            pass


@FUZZ
@given(st.sampled_from(REQUEST_TYPES), wire_bytes)
def test_peer_request_decoders_never_fail_otherwise(message_type: Any, data: bytes) -> None:
    decode_request(message_type, data)


@FUZZ
@given(st.sampled_from(REQUEST_TYPES), st.binary(max_size=64), st.binary(max_size=64))
def test_peer_store_and_query_payloads(message_type: Any, attributes_json: bytes, query_json: bytes) -> None:
    """Well-formed messages with arbitrary JSON payloads (what a peer can most easily vary)."""
    chunk = pb.StoreChunk(header=pb.StoreHeader(index_attributes_json=attributes_json))
    decode_request(pb.StoreChunk, chunk.SerializeToString())
    decode_request(pb.QueryRequest, pb.QueryRequest(query_json=query_json).SerializeToString())


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)


@FUZZ
@given(json_values)
def test_query_from_any_json(value: Any) -> None:
    data = json.dumps(value).encode()
    try:
        Query.from_json(json.loads(data))
    except QUERY_ERRORS:
        pass
    try:
        peer_wire.attributes_from_json(data)
    except HEADER_ERRORS:
        pass


@FUZZ
@given(st.sampled_from(REPLY_TYPES), wire_bytes)
def test_peer_reply_decoders_never_fail_otherwise(message_type: Any, data: bytes) -> None:
    """The client side (grpc_transport.py, swim_membership.py) decodes replies the same way."""
    try:
        message = message_type.FromString(data)
    except DecodeError:
        return
    method = {pb.Ack: "Ping", pb.PushPullReply: "PushPull", pb.JoinReply: "Join", pb.LeaveReply: "Leave"}.get(
        message_type)
    if method is not None:
        peer_wire.reply_from_wire(method, message)
    if message_type is pb.FetchChunk and message.HasField("record"):
        try:
            attributes = peer_wire.attributes_from_json(message.index_attributes_json)
            peer_wire.record_from_wire(message.record, attributes)
        except HEADER_ERRORS:
            pass


# --------------------------------------------------------------------------- DICOM ingest
_SEED_PART10 = next(iter_part10(StudySetSpec(patients=1, rows=8, cols=8, seed=41, modalities=("CT",))))[1]
_STREAM = io.BytesIO(_SEED_PART10)
read_preamble(_STREAM, False)
_META = _read_file_meta_info(_STREAM)
_SEED_DATASET = _SEED_PART10[_STREAM.tell():]
_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
             "1.2.840.10008.1.2.4.50"]


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=12), st.integers(0, 400),
       st.binary(max_size=32), st.sampled_from(_SYNTAXES), st.booleans())
def test_dicom_ingest_accepts_only_whole_datasets_with_valid_uids(
        edits: list[tuple[int, int]], cut: int, tail: bytes, transfer_syntax_uid: str, random_only: bool) -> None:
    """The C-STORE handler's path: the received dataset bytes behind our Part-10 prefix."""
    dataset = tail if random_only else _mutate(_SEED_DATASET, edits, cut) + tail[: len(tail) // 4]
    prefix = codec.part10_prefix(str(_META.MediaStorageSOPClassUID), str(_META.MediaStorageSOPInstanceUID),
                                 transfer_syntax_uid, "FUZZ")
    try:
        instance = instance_from_part10(prefix + dataset, len(prefix), transfer_syntax_uid,
                                        affected_sop_class_uid=str(_META.MediaStorageSOPClassUID),
                                        affected_sop_instance_uid=str(_META.MediaStorageSOPInstanceUID))
    except InvalidInstance as error:
        assert error.status in (0xA900, 0xC000, 0xA700)
        return
    assert instance.dataset_bytes == dataset  # Stored exactly as received.
    for uid in (instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid):
        assert _UID.match(uid) and len(uid) <= 64
