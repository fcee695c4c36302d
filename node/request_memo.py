"""The decoded items of A-ASSOCIATE-RQs, kept by their bytes (issue 10: association set-up).

A requestor proposes the same presentation contexts and user information on every
association (dcmtk's getscu ~120 contexts with a role item each, a modality its storage
classes). pynetdicom 3.0.4 decodes every item again and builds its request primitive again,
and each step validates every UID through pydicom: for getscu that was most of the ~20 ms
of node CPU per association. Here an item's bytes are decoded once: later requests with
the same bytes get the same decoded item (never changed afterwards: nothing in the node
or in pynetdicom's acceptor writes to a received item) and a fresh copy of its primitive
(a PresentationContext, or the user information sub-item primitives), made without
validation from the one built the first time.

What is not kept: user information carrying a User Identity sub-item (a password or a
token does not stay in memory after its association), items of other types (the
application context name is one UID), and anything beyond `entries_max` items (then
items are decoded as pynetdicom would, each time).
"""

from __future__ import annotations

import copy
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_items import PDU_ITEM_TYPES, PresentationContextItemRQ, UserInformationItem
from pynetdicom.pdu_primitives import (
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

PRESENTATION_CONTEXT_RQ_ITEM = 0x20
USER_INFORMATION_ITEM = 0x50
USER_IDENTITY_RQ_SUB_ITEM = 0x58
_MEMO_ITEM_TYPES = frozenset({PRESENTATION_CONTEXT_RQ_ITEM, USER_INFORMATION_ITEM})
# The user information an A-ASSOCIATE-AC is kept for: nothing else (user identity, extended
# negotiation) is answered from the memo.
_PLAIN_USER_INFORMATION = (MaximumLengthNotification, ImplementationClassUIDNotification,
                           ImplementationVersionNameNotification, SCP_SCU_RoleSelectionNegotiation)


@dataclass
class _Entry:
    item: Any
    primitive: Any = None  # Built on first use: PresentationContext or a list of sub-item primitives.
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class MemoStats:
    entries: int
    hits: int
    misses: int
    negotiations: int      # Negotiation results kept.
    negotiation_hits: int  # Negotiations answered from them.
    accepts: int           # Encoded A-ASSOCIATE-ACs kept.
    accept_hits: int       # A-ASSOCIATE-ACs sent from them.


def has_user_identity(item_bytes: bytes) -> bool:
    """True if a User Information item's bytes hold a User Identity (RQ) sub-item."""
    offset = 4
    while offset + 4 <= len(item_bytes):
        if item_bytes[offset] == USER_IDENTITY_RQ_SUB_ITEM:
            return True
        offset += 4 + struct.unpack_from(">H", item_bytes, offset + 2)[0]
    return False


class RequestItemMemo:
    """Decoded A-ASSOCIATE-RQ items by their bytes, and their primitives (module docstring)."""

    def __init__(self, entries_max: int = 4096) -> None:
        self._entries: dict[bytes, _Entry] = {}
        self._by_item: dict[int, _Entry] = {}  # id(item) of every kept item: kept alive by _entries.
        self._entries_max = entries_max
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        # Negotiation results by (proposed contexts, roles, id(supported table)), with the table.
        self._negotiations: dict[Any, tuple[Any, list[PresentationContext], list[Any]]] = {}
        self._negotiations_max = 256
        self._negotiation_hits = 0
        self._accepts: dict[Any, bytes] = {}
        self._accept_hits = 0

    def decode_item(self, item_type: int, item_bytes: bytes) -> Any:
        """The decoded item of these bytes: kept one if any, else decoded (and kept if of a
        kept type and there is room). Raises as pynetdicom's decoding does."""
        if item_type not in _MEMO_ITEM_TYPES:
            return _decode(item_type, item_bytes)
        key = bytes(item_bytes)
        entry = self._entries.get(key)
        if entry is not None:
            self._hits += 1
            return entry.item
        item = _decode(item_type, item_bytes)
        self._misses += 1
        if item_type == USER_INFORMATION_ITEM and has_user_identity(key):
            return item
        with self._lock:
            if len(self._entries) < self._entries_max and key not in self._entries:
                entry = _Entry(item)
                self._entries[key] = entry
                self._by_item[id(item)] = entry
        return item

    def context_primitive(self, item: PresentationContextItemRQ) -> PresentationContext:
        """item.to_primitive(): for a kept item, a copy of the one built the first time."""
        entry = self._by_item.get(id(item))
        if entry is None or entry.item is not item:
            return item.to_primitive()
        return clone_context(self._template(entry))

    def user_information_primitive(self, item: UserInformationItem) -> list[Any]:
        """item.to_primitive(): for a kept item, copies of the sub-item primitives built
        the first time (their fields are strings, numbers and bytes)."""
        entry = self._by_item.get(id(item))
        if entry is None or entry.item is not item:
            return item.to_primitive()
        return [copy.copy(primitive) for primitive in self._template(entry)]

    def statistics(self) -> MemoStats:
        return MemoStats(entries=len(self._entries), hits=self._hits, misses=self._misses,
                         negotiations=len(self._negotiations), negotiation_hits=self._negotiation_hits,
                         accepts=len(self._accepts), accept_hits=self._accept_hits)

    def accept_pdu(self, primitive: Any) -> bytes | None:
        """The encoded A-ASSOCIATE-AC PDU of an A-ASSOCIATE (accept) primitive, as
        pynetdicom's AE-7 encodes it (`A_ASSOCIATE_AC(primitive).encode()`), kept for the
        same AE titles, results and plain user information; None when the primitive has
        other user information (the caller then takes pynetdicom's way)."""
        user_information = primitive.user_information
        if any(type(item) not in _PLAIN_USER_INFORMATION for item in user_information):
            return None
        key = (primitive.called_ae_title, primitive.calling_ae_title, primitive.application_context_name,
               tuple((cx.context_id, cx.result, tuple(cx.transfer_syntax))
                     for cx in primitive.presentation_context_definition_results_list),
               tuple((type(item).__name__, tuple(sorted(vars(item).items()))) for item in user_information))
        encoded = self._accepts.get(key)
        if encoded is not None:
            self._accept_hits += 1
            return encoded
        encoded = A_ASSOCIATE_AC(primitive).encode()
        with self._lock:
            if len(self._accepts) < self._negotiations_max:
                self._accepts[key] = encoded
        return encoded

    def negotiate(self, rq_contexts: list[PresentationContext], ac_contexts: list[PresentationContext],
                  rq_roles: dict[Any, tuple[Any, Any]]) -> tuple[list[PresentationContext], list[Any]]:
        """pynetdicom's presentation.negotiate_as_acceptor, its result kept for the same
        proposed contexts, roles and supported-context table (the server's one table,
        never changed: AcceptorServer.shared_contexts); copies of it returned."""
        key = (tuple((cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in rq_contexts),
               tuple(sorted((str(uid), roles) for uid, roles in rq_roles.items())), id(ac_contexts))
        kept = self._negotiations.get(key)
        if kept is None or kept[0] is not ac_contexts:
            result, reply_roles = negotiate_as_acceptor(rq_contexts, ac_contexts, rq_roles)
            with self._lock:
                if len(self._negotiations) < self._negotiations_max:
                    self._negotiations[key] = (ac_contexts, result, reply_roles)
            kept = (ac_contexts, result, reply_roles)
        else:
            self._negotiation_hits += 1
        _, result, reply_roles = kept
        return [clone_context(cx) for cx in result], [copy.copy(role) for role in reply_roles]

    @staticmethod
    def _template(entry: _Entry) -> Any:
        primitive = entry.primitive
        if primitive is None:
            with entry.lock:
                if entry.primitive is None:
                    entry.primitive = entry.item.to_primitive()
                primitive = entry.primitive
        return primitive


def clone_context(template: PresentationContext) -> PresentationContext:
    """A PresentationContext equal to `template`, made without pynetdicom's setters (which
    validate every UID again): its fields are copied, its transfer syntax list is its own."""
    context = PresentationContext.__new__(PresentationContext)
    context.__dict__.update(template.__dict__)
    context._transfer_syntax = list(template._transfer_syntax)
    return context


def _decode(item_type: int, item_bytes: bytes) -> Any:
    """pynetdicom 3.0.4's PDU._wrap_generate_items for one item."""
    item = PDU_ITEM_TYPES[item_type]()
    item.decode(item_bytes)
    return item
