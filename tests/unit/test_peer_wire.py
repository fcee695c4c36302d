"""node/peer_wire.py: SWIM member records and messages to and from the peer protocol."""

from __future__ import annotations

import pytest

from pacsnode.node import peer_wire
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.ring import swim
from pacsnode.ring.members import MemberInfo
from pacsnode.ring.swim import State

INFO = MemberInfo(node_id="n2", peer_host="10.0.0.2", peer_port=7001, dicom_host="10.0.0.2", dicom_port=11112,
                  ae_title="PACS2", site="campus-b", host="rack1", vnodes=32, generation=4,
                  updated_at_ms=1_764_000_000_000)
ENV = peer_wire.envelope("pacsnode", "n1", 3, 0xABC, incarnation=2)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("leaving", [False, True])
def test_member_records_round_trip(state: State, leaving: bool) -> None:
    update = swim.MemberUpdate(INFO, state, 7, reporter_id="n3", lamport=5, leaving=leaving)
    wire = peer_wire.update_to_wire(update)
    assert wire.state == peer_wire.STATE_TO_WIRE[state.value] and wire.incarnation == 7 and wire.generation == 4
    back = peer_wire.update_from_wire(pb.MemberUpdate.FromString(wire.SerializeToString()))
    assert back == update
    assert back.in_ring == (state in (State.ALIVE, State.SUSPECT, State.DEAD) and not back.leaving)


@pytest.mark.parametrize(("message", "problem"), [
    (pb.MemberUpdate(peer_address=pb.Address(host="h", port=1), state=pb.MEMBER_STATE_ALIVE), "without a node id"),
    (pb.MemberUpdate(node_id="x" * 65, peer_address=pb.Address(host="h", port=1), state=pb.MEMBER_STATE_ALIVE),
     "over 64"),
    (pb.MemberUpdate(node_id="n9", state=pb.MEMBER_STATE_DEAD), "without a peer address"),
    (pb.MemberUpdate(node_id="n9", peer_address=pb.Address(host="h", port=70000), state=pb.MEMBER_STATE_DEAD),
     "without a peer address"),
    (pb.MemberUpdate(node_id="n9", peer_address=pb.Address(host="h", port=1)), "with state 0"),
    (pb.MemberUpdate(node_id="n9", peer_address=pb.Address(host="h", port=1), state=42), "with state 42"),
])
def test_unusable_records_are_skipped_with_a_reason(message: pb.MemberUpdate, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        peer_wire.update_from_wire(message)
    good = peer_wire.update_to_wire(swim.MemberUpdate(INFO, State.ALIVE, 1))
    updates, problems = peer_wire.updates_from_wire([message, good])
    assert [u.node_id for u in updates] == ["n2"] and len(problems) == 1 and problem in problems[0]


def _updates() -> tuple[swim.MemberUpdate, ...]:
    return (swim.MemberUpdate(INFO, State.SUSPECT, 3, reporter_id="n1"),)


@pytest.mark.parametrize(("message", "method"), [
    (swim.Ping(11, "n2", _updates()), "Ping"),
    (swim.Gossip(_updates()), "Ping"),
    (swim.IndirectPing(12, INFO, 80, _updates()), "IndirectPing"),
    (swim.PushPullRequest(_updates()), "PushPull"),
    (swim.JoinRequest(swim.MemberUpdate(INFO, State.ALIVE, 0)), "Join"),
    (swim.LeaveRequest(swim.MemberUpdate(INFO, State.LEFT, 2, lamport=9)), "Leave"),
])
def test_requests_map_to_their_membership_rpc(message: swim.Message, method: str) -> None:
    got_method, request = peer_wire.request_to_wire(message, "n2", ENV)
    assert got_method == method
    assert request.envelope == ENV and request.envelope.sender_incarnation == 2
    match message:
        case swim.Ping():
            assert (request.target_id, request.sequence_number) == ("n2", 11)
            assert peer_wire.updates_from_wire(request.updates)[0] == message.updates
        case swim.Gossip():  # No RPC of its own: a Ping with sequence number 0.
            assert (request.target_id, request.sequence_number) == ("n2", 0)
        case swim.IndirectPing():
            assert (request.target_id, request.target_address.host, request.target_address.port) == (
                "n2", "10.0.0.2", 7001)
            assert (request.sequence_number, request.probe_timeout_ms) == (12, 80)
        case swim.PushPullRequest():
            assert peer_wire.updates_from_wire(request.members)[0] == message.members
        case swim.JoinRequest() | swim.LeaveRequest():
            assert peer_wire.update_from_wire(request.member) == message.member


def test_replies_come_back_as_swim_messages() -> None:
    updates = _updates()
    ack = peer_wire.ack_to_wire(swim.Ack(11, updates), ENV)
    nack = peer_wire.ack_to_wire(swim.Nack(12), ENV)
    assert not ack.nack and nack.nack and ack.envelope == ENV
    assert peer_wire.reply_from_wire("Ping", ack) == (swim.Ack(11, updates), [])
    assert peer_wire.reply_from_wire("IndirectPing", nack) == (swim.Nack(12), [])
    members = [peer_wire.update_to_wire(u) for u in updates]
    assert peer_wire.reply_from_wire("PushPull", pb.PushPullReply(members=members)) == (
        swim.PushPullReply(updates), [])
    assert peer_wire.reply_from_wire("Join", pb.JoinReply(accepted=False, reason="id in use")) == (
        swim.JoinReply(False, "id in use"), [])
    assert peer_wire.reply_from_wire("Leave", pb.LeaveReply(accepted=True)) == (swim.LeaveReply(True), [])
    with pytest.raises(ValueError):
        peer_wire.request_to_wire(swim.Ack(1), "n2", ENV)


def test_tombstone_requests_and_bucket_entries_round_trip() -> None:
    from pacsnode.replication.delete_coordinator import DeleteScope
    from pacsnode.replication.hlc import Version
    from pacsnode.replication.model import Tombstone

    version = Version(1_700_000_000_000, 3, "node-a")
    tombstones = [Tombstone("1.2", "1.2.3", version, "1.2.9"), Tombstone("1.2", "1.2.4", version, "1.2.9")]
    scope = DeleteScope("1.2", "1.2.9")
    request = peer_wire.tombstone_request(peer_wire.envelope("c", "n", 1, 0), tombstones, scope, "")
    assert peer_wire.tombstones_from_wire(pb.TombstoneRequest.FromString(request.SerializeToString())) \
        == (tombstones, scope)
    listed_only = peer_wire.tombstone_request(peer_wire.envelope("c", "n", 1, 0), tombstones, None, "node-b")
    assert peer_wire.tombstones_from_wire(listed_only) == (tombstones, None) and listed_only.hint_for == "node-b"
    with pytest.raises(ValueError):
        peer_wire.tombstones_from_wire(pb.TombstoneRequest(study_instance_uid=""))
    entry = peer_wire.bucket_entry_to_wire("1.2", "1.2.3", version.mark())
    assert entry.tombstone and entry.version.hlc_logical == 3
    assert peer_wire.bucket_entry_from_wire(entry) == ("1.2", "1.2.3", version.mark())
    plain = peer_wire.bucket_entry_to_wire("1.2", "1.2.4", "ab" * 16)
    assert not plain.tombstone and peer_wire.bucket_entry_from_wire(plain) == ("1.2", "1.2.4", "ab" * 16)


def test_a_store_header_carries_the_metadata_entry_and_a_broken_one_is_dropped() -> None:
    from pacsnode.replication.model import InstanceRecord, StoredInstance

    record = InstanceRecord(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            content_hash="ab" * 16, size_bytes=10, dataset_offset=0, stored_at_ms=1,
                            version_node="n1")
    stored = StoredInstance(record=record, attributes={}, blob=b"x" * 10, metadata_json=b'{"00080018":{"vr":"UI"}}')
    header = pb.StoreHeader.FromString(peer_wire.store_header(stored, "").SerializeToString())
    assert peer_wire.metadata_from_wire(header) == b'{"00080018":{"vr":"UI"}}'
    for broken in (b"[1, 2]", b"{not json", b"\xff\xfe"):
        header.metadata_json = broken
        assert peer_wire.metadata_from_wire(header) is None
    header.ClearField("metadata_json")
    assert peer_wire.metadata_from_wire(header) is None
    assert not peer_wire.store_header(StoredInstance(record=record, attributes={}, blob=b"x"), "").HasField(
        "metadata_json")
