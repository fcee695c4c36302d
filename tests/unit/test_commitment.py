"""Storage Commitment: the N-ACTION parsing and N-EVENT-REPORT building of node/commitment.py,
and the recent SOP -> study map (the cluster check runs against real nodes in
tests/integration/test_storage_commitment.py)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pacsnode.node import commitment
from pacsnode.node.commitment import InvalidRequest, event_report, parse_request
from pacsnode.replication.commitment import CommitResult, FailureReason, RecentStudies, Reference

CT = "1.2.840.10008.5.1.4.1.1.2"


def _info(transaction_uid: str = "1.2.3", items: list[tuple[str, str]] | None = None) -> Dataset:
    info = Dataset()
    if transaction_uid:
        info.TransactionUID = transaction_uid
    if items is not None:
        sequence = []
        for sop_class, sop_instance in items:
            item = Dataset()
            if sop_class:
                item.ReferencedSOPClassUID = sop_class
            if sop_instance:
                item.ReferencedSOPInstanceUID = sop_instance
            sequence.append(item)
        info.ReferencedSOPSequence = sequence
    return info


def test_a_request_gives_its_transaction_and_references_in_order() -> None:
    uid, references = parse_request(1, commitment.SOP_INSTANCE_UID, _info("9.8.7", [(CT, "1.1"), (CT, "1.2")]))
    assert uid == "9.8.7"
    assert references == [Reference(CT, "1.1"), Reference(CT, "1.2")]


@pytest.mark.parametrize("action, instance, info, status", [
    (2, commitment.SOP_INSTANCE_UID, _info("1", [(CT, "1.1")]), 0x0123),
    (1, "1.2.3.4", _info("1", [(CT, "1.1")]), 0x0112),
    (1, commitment.SOP_INSTANCE_UID, None, 0x0120),
    (1, commitment.SOP_INSTANCE_UID, _info("", [(CT, "1.1")]), 0x0120),
    (1, commitment.SOP_INSTANCE_UID, _info("1", None), 0x0120),
    (1, commitment.SOP_INSTANCE_UID, _info("1", []), 0x0120),
    (1, commitment.SOP_INSTANCE_UID, _info("1", [(CT, "")]), 0x0120),
    (1, commitment.SOP_INSTANCE_UID, _info("1", [("", "1.1")]), 0x0120),
])
def test_a_request_the_node_cannot_take_is_refused_with_its_status(action: int, instance: str, info: Dataset | None,
                                                                   status: int) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_request(action, instance, info)
    assert raised.value.status == status


def test_too_many_references_are_refused() -> None:
    info = _info("1", [(CT, f"1.{i}") for i in range(commitment.REFERENCES_MAX + 1)])
    with pytest.raises(InvalidRequest) as raised:
        parse_request(1, commitment.SOP_INSTANCE_UID, info)
    assert raised.value.status == 0x0115


def test_all_committed_is_event_type_1_without_a_failed_sequence() -> None:
    result = CommitResult(committed=(Reference(CT, "1.1"), Reference(CT, "1.2")), failed=())
    event_type, info = event_report("5.5", result, "PACSNODE")
    assert event_type == 1
    assert info.TransactionUID == "5.5" and info.RetrieveAETitle == "PACSNODE"
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == ["1.1", "1.2"]
    assert "FailedSOPSequence" not in info


def test_failures_are_event_type_2_with_their_reasons() -> None:
    result = CommitResult(committed=(Reference(CT, "1.1"),),
                          failed=((Reference(CT, "1.2"), FailureReason.NO_SUCH_INSTANCE),
                                  (Reference(CT, "1.3"), FailureReason.CLASS_CONFLICT),
                                  (Reference(CT, "1.4"), FailureReason.NOT_ON_ALL_OWNERS)))
    event_type, info = event_report("5.5", result, "PACSNODE")
    assert event_type == 2
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == ["1.1"]
    assert {i.ReferencedSOPInstanceUID: (i.ReferencedSOPClassUID, i.FailureReason)
            for i in info.FailedSOPSequence} == {"1.2": (CT, 0x0112), "1.3": (CT, 0x0119), "1.4": (CT, 0x0110)}


def test_nothing_committed_has_no_referenced_sequence() -> None:
    event_type, info = event_report("5.5", CommitResult(committed=(), failed=(
        (Reference(CT, "1.2"), FailureReason.NO_SUCH_INSTANCE),)), "PACSNODE")
    assert event_type == 2 and "ReferencedSOPSequence" not in info and len(info.FailedSOPSequence) == 1


def test_recent_studies_keep_the_last_instances_only() -> None:
    recent = RecentStudies(3)
    for index in range(5):
        recent.add(f"sop.{index}", f"study.{index % 2}")
    recent.add("sop.2", "study.0")  # Touched again: now the newest.
    assert len(recent) == 3
    assert recent.lookup(["sop.0", "sop.1", "sop.2", "sop.3", "sop.4", "sop.9"]) == {
        "sop.2": "study.0", "sop.3": "study.1", "sop.4": "study.0"}
