"""issue 10 item 2: an A-ASSOCIATE-RQ's items are decoded once by their bytes
(node/request_memo.py), and what the node answers is what it answered without the memo."""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification  # type: ignore[attr-defined]

from pacsnode.node import acceptor, request_memo
from pacsnode.node.dicom import TRANSFER_SYNTAXES
from pacsnode.sim.process import free_port
from tests.integration import rawpdu

# As dcmtk's getscu: many storage contexts, several transfer syntaxes each, a role item
# for each (it acts as their Storage SCP); plus one abstract syntax nobody supports and
# one the node supports with none of the proposed transfer syntaxes.
_SYNTAXES = [rawpdu.EXPLICIT_VR_LE, rawpdu.IMPLICIT_VR_LE, "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5"]
_STORAGE = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts[:60]]


def _getscu_like_request(called: str) -> bytes:
    contexts = [rawpdu.presentation_context(1, str(StudyRootQueryRetrieveInformationModelGet), _SYNTAXES[:2])]
    contexts += [rawpdu.presentation_context(3 + 2 * i, uid, _SYNTAXES) for i, uid in enumerate(_STORAGE)]
    contexts.append(rawpdu.presentation_context(201, "1.2.3.4.5.6", _SYNTAXES))
    contexts.append(rawpdu.presentation_context(203, str(Verification), ["1.2.840.10008.1.2.4.90"]))
    return rawpdu.associate_rq(contexts, called=called, calling="GETSCU", scp_roles=tuple(_STORAGE))


def _node_like_ae(ae_title: str) -> acceptor.NodeAE:
    ae = acceptor.NodeAE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    return ae


def _accept_bytes(port: int, request: bytes) -> bytes:
    with rawpdu.RawAssociation(port) as raw:
        raw.send(request)
        answer = raw.read_pdu()
        assert answer is not None and answer.pdu_type == rawpdu.PDU_ASSOCIATE_AC, answer
        raw.send(rawpdu.release_rq())
        released = raw.read_pdu()
        assert released is not None and released.pdu_type == rawpdu.PDU_RELEASE_RP
        return struct.pack(">BBL", answer.pdu_type, 0, len(answer.body)) + answer.body


def test_the_acceptance_is_byte_identical_with_and_without_the_memo() -> None:
    """Three requests to a node with the memo and three to one without (pynetdicom's own
    decoding, negotiation and A-ASSOCIATE-AC encoding each time): every A-ASSOCIATE-AC is
    the same bytes, and the second and third requests to the first node were served from
    the memo: items decoded once, negotiated once, the answer encoded once."""
    with_memo, without_memo = _node_like_ae("MEMO"), _node_like_ae("MEMO")
    without_memo.request_memo = None  # type: ignore[assignment]
    servers = [acceptor.start_server(ae, ("127.0.0.1", free_port()), []) for ae in (with_memo, without_memo)]
    request = _getscu_like_request("MEMO")
    try:
        answers = [_accept_bytes(server.server_address[1], request) for server in servers for _ in range(3)]
        assert len(set(answers)) == 1
        stats = with_memo.request_memo.statistics()
        item_count = 1 + len(_STORAGE) + 2 + 1  # Presentation contexts + user information.
        assert stats.entries == item_count and stats.misses == item_count and stats.hits == 2 * item_count
        assert stats.negotiations == 1 and stats.negotiation_hits == 2
        assert stats.accepts == 1 and stats.accept_hits == 2
    finally:
        with_memo.shutdown()
        without_memo.shutdown()


def test_kept_items_give_each_request_its_own_equal_primitive() -> None:
    memo = request_memo.RequestItemMemo()
    request = _getscu_like_request("MEMO")
    plain = A_ASSOCIATE_RQ()
    plain.decode(request)
    expected = plain.to_primitive()

    primitives = []
    pdus = []
    for _ in range(2):
        pdu = acceptor._AssociateRQ()
        pdu.memo = memo
        pdu.decode(request)
        pdus.append(pdu)
        primitives.append(pdu.to_primitive())
    first, second = primitives
    assert all(a is b for a, b in zip(pdus[0].variable_items[1:], pdus[1].variable_items[1:]))  # Decoded once.
    for primitive in primitives:
        assert [cx.as_tuple for cx in primitive.presentation_context_definition_list] == \
            [cx.as_tuple for cx in expected.presentation_context_definition_list]
        assert [vars(item) for item in primitive.user_information] == \
            [vars(item) for item in expected.user_information]
    # Each request has its own objects: changing one leaves the other and the memo alone.
    first.presentation_context_definition_list[1].add_transfer_syntax("1.2.840.10008.1.2.4.70")
    first.user_information[0].maximum_length_received = 1
    assert second.presentation_context_definition_list[1].as_tuple == \
        expected.presentation_context_definition_list[1].as_tuple
    assert second.user_information[0].maximum_length_received == 16384
    third = acceptor._AssociateRQ()
    third.memo = memo
    third.decode(request)
    assert [cx.as_tuple for cx in third.to_primitive().presentation_context_definition_list] == \
        [cx.as_tuple for cx in expected.presentation_context_definition_list]


def test_a_kept_negotiation_is_pynetdicoms_and_each_association_gets_its_own_copy() -> None:
    from pynetdicom.presentation import negotiate_as_acceptor

    ae = _node_like_ae("MEMO")
    table = list(ae.supported_contexts)
    plain = A_ASSOCIATE_RQ()
    plain.decode(_getscu_like_request("MEMO"))
    primitive = plain.to_primitive()
    contexts = primitive.presentation_context_definition_list
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in primitive.user_information
             if type(item).__name__ == "SCP_SCU_RoleSelectionNegotiation"}
    expected, expected_roles = negotiate_as_acceptor(contexts, table, roles)
    memo = request_memo.RequestItemMemo()
    first, first_roles = memo.negotiate(contexts, table, roles)
    first[0].transfer_syntax = ["1.2.840.10008.1.2.2"]
    first_roles[0].scu_role = False
    second, second_roles = memo.negotiate(contexts, table, roles)

    def shape(result: list[Any], reply_roles: list[Any]) -> tuple[Any, ...]:
        return ([(cx.context_id, cx.abstract_syntax, cx.transfer_syntax, cx.result, cx.as_scu, cx.as_scp)
                 for cx in result], [(r.sop_class_uid, r.scu_role, r.scp_role) for r in reply_roles])

    assert shape(second, second_roles) == shape(expected, expected_roles)
    assert memo.statistics().negotiation_hits == 1
    # Another table (another server, or a changed one) is negotiated against, not looked up.
    other = [cx for cx in table if str(cx.abstract_syntax) != _STORAGE[0]]
    assert shape(*memo.negotiate(contexts, other, roles)) == shape(*negotiate_as_acceptor(contexts, other, roles))


def test_user_identity_is_not_kept() -> None:
    memo = request_memo.RequestItemMemo()
    plain = rawpdu.user_information()
    identity = struct.pack(">BBH", 0x58, 0, 10) + struct.pack(">BBH", 1, 0, 4) + b"user" + b"\x00\x00"
    with_identity = plain[:2] + struct.pack(">H", len(plain) - 4 + len(identity)) + plain[4:] + identity
    assert request_memo.has_user_identity(with_identity) and not request_memo.has_user_identity(plain)
    assert memo.decode_item(0x50, with_identity) is not memo.decode_item(0x50, with_identity)
    assert memo.decode_item(0x50, plain) is memo.decode_item(0x50, plain)
    assert memo.statistics().entries == 1


def test_the_memo_stops_growing_at_its_bound() -> None:
    memo = request_memo.RequestItemMemo(entries_max=2)
    items = [rawpdu.presentation_context(1, rawpdu.VERIFICATION, [syntax])
             for syntax in (rawpdu.IMPLICIT_VR_LE, rawpdu.EXPLICIT_VR_LE, "1.2.840.10008.1.2.2")]
    for item in items:
        memo.decode_item(0x20, item)
    assert memo.statistics().entries == 2
    assert memo.decode_item(0x20, items[2]) is not memo.decode_item(0x20, items[2])


def test_the_accept_goes_pynetdicoms_way_while_something_watches_sent_pdus() -> None:
    """AcceptorDUL._send_accept does not trigger EVT_PDU_SENT: with a handler bound to it,
    the A-ASSOCIATE-AC is pynetdicom's AE-7 (the handler sees it), the same bytes."""
    from pynetdicom import evt

    sent: list[str] = []
    ae = _node_like_ae("MEMO")
    server = acceptor.start_server(ae, ("127.0.0.1", free_port()), [])
    request = _getscu_like_request("MEMO")
    try:
        direct = _accept_bytes(server.server_address[1], request)
        server.bind(evt.EVT_PDU_SENT, lambda event: sent.append(type(event.pdu).__name__))
        assert _accept_bytes(server.server_address[1], request) == direct
        # The first association may still report its A-RELEASE-RP (sent before its event).
        assert sent.count("A_ASSOCIATE_AC") == 1
        assert ae.request_memo.statistics().accept_hits == 0  # The first was encoded, the second not asked.
    finally:
        ae.shutdown()
