"""Order-independent digests of what a replica holds, for anti-entropy. Pure code.

An entry is one instance: its hash is 128 bits of SHA-256 over (SOP Instance UID,
content hash). A set of entries digests to (XOR of their hashes, count): adding or
removing an entry is one XOR, so the store keeps the digest of every fixed *segment* of
the ring (the top SEGMENT_BITS bits of the token) up to date in the instance's own
WriteBatch. Any token range's digest is the XOR of the segments it covers, plus a short
scan of the two segments its ends cut through. Replicas that agree on a range's digest
hold the same instances there; where they differ, comparing segment digests finds the
few segments to list.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pacsnode.ring.tokens import TOKEN_BITS

SEGMENT_BITS = 16
SEGMENT_COUNT = 1 << SEGMENT_BITS
SEGMENT_SHIFT = TOKEN_BITS - SEGMENT_BITS


def segment_of(token: int) -> int:
    return token >> SEGMENT_SHIFT


def segment_bounds(segment: int) -> tuple[int, int]:
    """Inclusive [low, high] tokens of a segment."""
    low = segment << SEGMENT_SHIFT
    return low, low + (1 << SEGMENT_SHIFT) - 1


def entry_hash(sop_instance_uid: str, content_hash: str) -> int:
    digest = hashlib.sha256()
    digest.update(sop_instance_uid.encode("ascii", errors="replace"))
    digest.update(b"\x00")
    digest.update(content_hash.encode("ascii", errors="replace"))
    return int.from_bytes(digest.digest()[:16], "big")


@dataclass(frozen=True)
class Digest:
    xor: int = 0
    count: int = 0

    def add(self, value: int) -> "Digest":
        return Digest(self.xor ^ value, self.count + 1)

    def remove(self, value: int) -> "Digest":
        return Digest(self.xor ^ value, self.count - 1)

    def combine(self, other: "Digest") -> "Digest":
        return Digest(self.xor ^ other.xor, self.count + other.count)

    def to_bytes(self) -> bytes:
        return self.xor.to_bytes(16, "big") + self.count.to_bytes(8, "big", signed=True)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> "Digest":
        if not data:
            return cls()
        return cls(int.from_bytes(data[:16], "big"), int.from_bytes(data[16:24], "big", signed=True))

    @property
    def high(self) -> int:
        return self.xor >> 64

    @property
    def low(self) -> int:
        return self.xor & ((1 << 64) - 1)
