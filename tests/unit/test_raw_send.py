"""node/raw_send.py StoreRequest: the C-STORE-RQ of a sub-operation is encoded from its
fields without pynetdicom's C_STORE primitive (whose setters validated each UID again),
so its own check must refuse and keep what pynetdicom 3.0.4's setters refuse and keep."""

from __future__ import annotations

from typing import Callable

import pytest
from pynetdicom.dimse_primitives import C_STORE

from pacsnode.node import pdata
from pacsnode.node.raw_send import StoreRequest

CT = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.826.0.1.3680043.8.498.1"


def _pynetdicoms(request: StoreRequest) -> C_STORE | None:
    """pynetdicom's primitive of the same fields; None when a setter refuses one."""
    primitive = C_STORE()
    try:
        primitive.MessageID = request.message_id
        primitive.Priority = request.priority
        primitive.AffectedSOPClassUID = request.sop_class_uid
        primitive.AffectedSOPInstanceUID = request.sop_instance_uid
        primitive.MoveOriginatorApplicationEntityTitle = request.move_originator_aet
        primitive.MoveOriginatorMessageID = request.move_originator_message_id
    except (ValueError, TypeError):
        return None
    return primitive


@pytest.mark.parametrize("request_", [
    StoreRequest(1, 2, CT, INSTANCE, "PACSNODE", 7),
    StoreRequest(65535, 0, CT, INSTANCE),
    StoreRequest(65536, 2, CT, INSTANCE),
    StoreRequest(-1, 2, CT, INSTANCE),
    StoreRequest(1, 3, CT, INSTANCE),
    StoreRequest(1, 2, "", INSTANCE),
    StoreRequest(1, 2, CT, "1." * 32 + "1"),  # 65 characters.
    StoreRequest(1, 2, CT, "1." * 31 + "12"),  # 64 characters.
    StoreRequest(1, 2, CT, "1.2.3.é"),
    StoreRequest(1, 2, CT, "1.2.x.3"),  # Not conformant, but pynetdicom only warns.
    StoreRequest(1, 2, CT, INSTANCE, "A" * 17, 7),
    StoreRequest(1, 2, CT, INSTANCE, "BACK\\SLASH", 7),
    StoreRequest(1, 2, CT, INSTANCE, "TAB\tAE", 7),
    StoreRequest(1, 2, CT, INSTANCE, "ÄE", 7),
    StoreRequest(1, 2, CT, INSTANCE, "  PADDED  ", 7),
    StoreRequest(1, 2, CT, INSTANCE, "PACSNODE", 70000),
])
def test_checked_refuses_and_keeps_what_pynetdicoms_setters_do(request_: StoreRequest) -> None:
    theirs = _pynetdicoms(request_)
    if theirs is None or not request_.sop_class_uid:  # Empty: pynetdicom left it out; refused here.
        with pytest.raises(ValueError):
            request_.checked()
        return
    ours = request_.checked()
    assert ours.move_originator_aet == theirs.MoveOriginatorApplicationEntityTitle
    # The command set sent is the one pynetdicom's fields give (or neither can be encoded).
    assert _encoded(lambda: pdata.store_command_pdu(
        1, 16_384, message_id=ours.message_id, priority=ours.priority, sop_class_uid=ours.sop_class_uid,
        sop_instance_uid=ours.sop_instance_uid, move_originator_aet=ours.move_originator_aet,
        move_originator_message_id=ours.move_originator_message_id,
    )) == _encoded(lambda: pdata.store_command_pdu(
        1, 16_384, message_id=int(theirs.MessageID), priority=int(theirs.Priority),
        sop_class_uid=str(theirs.AffectedSOPClassUID), sop_instance_uid=str(theirs.AffectedSOPInstanceUID),
        move_originator_aet=theirs.MoveOriginatorApplicationEntityTitle,
        move_originator_message_id=theirs.MoveOriginatorMessageID))


def _encoded(encode: Callable[[], bytes | None]) -> bytes | None | type[Exception]:
    try:
        return encode()
    except ValueError as error:  # UnicodeEncodeError: a UID that is not ASCII.
        return type(error)


def test_primitive_is_pynetdicoms_with_the_payload() -> None:
    primitive = StoreRequest(3, 1, CT, INSTANCE, "PACSNODE", 9).primitive(b"\x08\x00")
    assert (primitive.MessageID, primitive.Priority, primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID,
            primitive.MoveOriginatorApplicationEntityTitle, primitive.MoveOriginatorMessageID) == \
        (3, 1, CT, INSTANCE, "PACSNODE", 9)
    assert primitive.DataSet.getvalue() == b"\x08\x00"
