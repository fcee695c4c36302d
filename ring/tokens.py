"""Ring tokens: where a study and a virtual node sit on the 64-bit ring. Pure code.

A token is the upper 64 bits of mmh3's 128-bit x64 hash, read unsigned. Every process
computes the same tokens from the same inputs, so every node builds the same ring.
"""

from __future__ import annotations

import mmh3

TOKEN_BITS = 64
TOKEN_SPACE = 1 << TOKEN_BITS


def token_of(key: bytes) -> int:
    """The ring token of an arbitrary key: upper 64 bits of mmh3 x64 128-bit, seed 0."""
    return mmh3.hash128(key, 0, x64arch=True, signed=False) >> 64


def study_token(study_instance_uid: str) -> int:
    """The token that places a whole study: the hash of its StudyInstanceUID."""
    return token_of(study_instance_uid.encode("ascii", errors="replace"))


def vnode_token(cluster_id: str, node_id: str, index: int, salt: int = 0) -> int:
    """Token of a node's index-th virtual node; stable for a node that returns with its id.

    Fields are joined with a NUL separator so that distinct inputs never collide by
    concatenation (("ab", "c") and ("a", "bc") give different tokens). `salt` picks one of
    several token sets for the same node (ring/token_choice.py: a joining node takes the
    one that balances its site best); salt 0 is the token set of before salts existed.
    """
    parts = [cluster_id.encode(), node_id.encode(), str(index).encode()]
    if salt:
        parts.append(b"salt" + str(salt).encode())
    return token_of(b"\x00".join(parts))


def token_bytes(token: int) -> bytes:
    """Big-endian 8 bytes: store keys start with these so one range is one contiguous scan."""
    return token.to_bytes(8, "big")
