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

from pynetdicom.pdu_items import PDU_ITEM_TYPES, PresentationContextItemRQ, UserInformationItem
from pynetdicom.presentation import PresentationContext

PRESENTATION_CONTEXT_RQ_ITEM = 0x20
USER_INFORMATION_ITEM = 0x50
USER_IDENTITY_RQ_SUB_ITEM = 0x58
_MEMO_ITEM_TYPES = frozenset({PRESENTATION_CONTEXT_RQ_ITEM, USER_INFORMATION_ITEM})


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
        template = self._template(entry)
        context = copy.copy(template)
        context._transfer_syntax = list(template._transfer_syntax)
        return context

    def user_information_primitive(self, item: UserInformationItem) -> list[Any]:
        """item.to_primitive(): for a kept item, copies of the sub-item primitives built
        the first time (their fields are strings, numbers and bytes)."""
        entry = self._by_item.get(id(item))
        if entry is None or entry.item is not item:
            return item.to_primitive()
        return [copy.copy(primitive) for primitive in self._template(entry)]

    def statistics(self) -> MemoStats:
        return MemoStats(entries=len(self._entries), hits=self._hits, misses=self._misses)

    @staticmethod
    def _template(entry: _Entry) -> Any:
        primitive = entry.primitive
        if primitive is None:
            with entry.lock:
                if entry.primitive is None:
                    entry.primitive = entry.item.to_primitive()
                primitive = entry.primitive
        return primitive


def _decode(item_type: int, item_bytes: bytes) -> Any:
    """pynetdicom 3.0.4's PDU._wrap_generate_items for one item."""
    item = PDU_ITEM_TYPES[item_type]()
    item.decode(item_bytes)
    return item
