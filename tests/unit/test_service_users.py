"""node/acceptor.py NodeServiceUser: the two ServiceUsers of every association are made from
User Information items the AE made and validated once, and hold what pynetdicom's
ServiceUser and its setters would (issue 10: ~45% of making an association)."""

from __future__ import annotations

from typing import Any

from pynetdicom._globals import DEFAULT_MAX_LENGTH, MODE_ACCEPTOR, MODE_REQUESTOR
from pynetdicom.association import ServiceUser

from pacsnode.node import acceptor


def _items(user: ServiceUser) -> list[tuple[str, dict[str, Any]]]:
    return [(type(item).__name__, dict(vars(item))) for item in user.user_information]


def _reference(assoc: Any, mode: str, maximum_length: int, version: str | None) -> ServiceUser:
    user = ServiceUser(assoc, mode)
    user.maximum_length = maximum_length
    user.implementation_class_uid = assoc.ae.implementation_class_uid
    if version is not None:
        user.implementation_version_name = version
    return user


def test_an_accepted_associations_users_hold_what_pynetdicoms_setters_give() -> None:
    ae = acceptor.NodeAE(ae_title="PACSNODE")
    ae.maximum_pdu_size = 32_768
    assoc = acceptor.AcceptorAssociation(ae, MODE_ACCEPTOR)
    assert isinstance(assoc.acceptor, acceptor.NodeServiceUser)
    assert _items(assoc.acceptor) == _items(_reference(assoc, MODE_ACCEPTOR, 32_768, ae.implementation_version_name))
    assert _items(assoc.requestor) == _items(_reference(assoc, MODE_REQUESTOR, DEFAULT_MAX_LENGTH, None))
    assert assoc.acceptor.maximum_length == 32_768 and assoc.acceptor.is_acceptor
    assert assoc.requestor.is_requestor and assoc.requestor.writeable
    # Extended negotiation as pynetdicom's __init__ leaves it (the requestor's has one kind more).
    assert assoc.acceptor._ext_neg.keys() == ServiceUser(assoc, MODE_ACCEPTOR)._ext_neg.keys()
    assert assoc.requestor._ext_neg.keys() == ServiceUser(assoc, MODE_REQUESTOR)._ext_neg.keys()


def test_each_association_has_its_own_copies_of_the_items() -> None:
    ae = acceptor.NodeAE(ae_title="PACSNODE")
    first = acceptor.AcceptorAssociation(ae, MODE_ACCEPTOR)
    second = acceptor.AcceptorAssociation(ae, MODE_ACCEPTOR)
    first.acceptor.maximum_length = 1_000
    first.acceptor.implementation_version_name = "OTHER_1"
    assert second.acceptor.maximum_length == ae.maximum_pdu_size
    assert second.acceptor.implementation_version_name == ae.implementation_version_name
    assert acceptor.AcceptorAssociation(ae, MODE_ACCEPTOR).acceptor.maximum_length == ae.maximum_pdu_size


def test_a_changed_ae_setting_gives_new_items() -> None:
    ae = acceptor.NodeAE(ae_title="PACSNODE")
    acceptor.AcceptorAssociation(ae, MODE_ACCEPTOR)
    ae.maximum_pdu_size = 65_536
    ae.implementation_version_name = "PACSNODE_TEST"
    assoc = acceptor.AcceptorAssociation(ae, MODE_ACCEPTOR)
    assert assoc.acceptor.maximum_length == 65_536
    assert assoc.acceptor.implementation_version_name == "PACSNODE_TEST"


def test_a_requested_association_states_our_settings() -> None:
    """NodeAE.associate's requestor side, as pynetdicom's AE.associate sets it."""
    ae = acceptor.NodeAE(ae_title="PACSNODE")
    assoc = acceptor.RequestorAssociation(ae, MODE_REQUESTOR)
    user = acceptor._service_user(assoc, MODE_REQUESTOR, 16_384, version_name=True)
    assert _items(user) == _items(_reference(assoc, MODE_REQUESTOR, 16_384, ae.implementation_version_name))


def test_a_peer_address_reads_as_pynetdicoms_resolution_gives_it() -> None:
    """PeerAddress (accepted connections' peers, C-MOVE destinations) takes a numeric address
    as inet_ntop writes it, which is what getaddrinfo gives back; names and scoped IPv6
    addresses are still resolved by pynetdicom's setter."""
    from pynetdicom.transport import AddressInformation

    for address in ("127.0.0.1", "10.0.0.255", "::1", "::ffff:127.0.0.1", "fe80::1", "2001:db8:0:0::1", "localhost"):
        ours, theirs = acceptor.PeerAddress.from_tuple((address, 104)), AddressInformation.from_tuple((address, 104))
        assert (ours.address, ours.port, ours.is_ipv4, ours.as_tuple) == \
            (theirs.address, theirs.port, theirs.is_ipv4, theirs.as_tuple), address
    assert acceptor.PeerAddress.from_addr_port("127.0.0.1", 11112).as_tuple == ("127.0.0.1", 11112)


def test_requested_associations_bind_a_copy_of_the_resolved_any_address() -> None:
    ae = acceptor.NodeAE(ae_title="PACSNODE")
    first, second = ae._bind_address(("", 0)), ae._bind_address(("", 0))
    assert first is not second and first.as_tuple == second.as_tuple == ("0.0.0.0", 0)
