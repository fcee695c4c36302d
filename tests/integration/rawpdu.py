"""Hand-built DICOM Upper Layer PDUs (PS3.8 section 9.3) for raw-socket tests.

A conformance tester, an old modality or an attacker sends bytes, not pynetdicom
objects: these helpers build exactly the bytes a test wants, malformed ones included,
and read what the node answers.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

PDU_ASSOCIATE_RQ = 0x01
PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_P_DATA = 0x04
PDU_RELEASE_RQ = 0x05
PDU_RELEASE_RP = 0x06
PDU_ABORT = 0x07


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def presentation_context(context_id: int, abstract_syntax: str, transfer_syntaxes: list[str]) -> bytes:
    body = struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x30, _uid(abstract_syntax))
    for syntax in transfer_syntaxes:
        body += _item(0x40, _uid(syntax))
    return _item(0x20, body)


def user_information(max_pdu: int = 16384, implementation_class_uid: str = "1.2.826.0.1.3680043.9.3811.1",
                     scp_roles: tuple[str, ...] = ()) -> bytes:
    body = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _uid(implementation_class_uid))
    for sop_class in scp_roles:  # SCP/SCU role selection: we act as SCP of these (C-GET).
        uid = _uid(sop_class)
        body += _item(0x54, struct.pack(">H", len(uid)) + uid + b"\x00\x01")
    return _item(0x50, body)


def associate_rq(
    contexts: list[bytes] | None = None,
    *,
    called: str = "PACSNODE",
    calling: str = "RAWSCU",
    application_context: str = APPLICATION_CONTEXT,
    max_pdu: int = 16384,
    scp_roles: tuple[str, ...] = (),
    protocol_version: int = 1,
) -> bytes:
    if contexts is None:
        contexts = [presentation_context(1, VERIFICATION, [IMPLICIT_VR_LE])]
    header = struct.pack(">HH", protocol_version, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32
    items = _item(0x10, _uid(application_context)) + b"".join(contexts) + user_information(max_pdu, scp_roles=scp_roles)
    body = header + items
    return struct.pack(">BBL", PDU_ASSOCIATE_RQ, 0, len(body)) + body


def p_data(context_id: int, fragment: bytes, *, command: bool, last: bool) -> bytes:
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", PDU_P_DATA, 0, len(pdv)) + pdv


def release_rq() -> bytes:
    return struct.pack(">BBL", PDU_RELEASE_RQ, 0, 4) + b"\x00" * 4


def _element(group: int, elem: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element (value padded to even length)."""
    if len(value) % 2:
        value += b"\x00" if (group, elem) in _UID_ELEMENTS else b" "
    return struct.pack("<HHL", group, elem, len(value)) + value


_UID_ELEMENTS = {(0x0000, 0x0002), (0x0020, 0x000D)}


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def echo_command(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set (Implicit VR Little Endian)."""
    return _command(
        _element(0x0000, 0x0002, _uid(VERIFICATION)),
        _element(0x0000, 0x0100, struct.pack("<H", 0x0030)),
        _element(0x0000, 0x0110, struct.pack("<H", message_id)),
        _element(0x0000, 0x0800, struct.pack("<H", 0x0101)),
    )


STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def get_command(message_id: int = 1) -> bytes:
    """A C-GET-RQ command set (Study Root), with a dataset to follow."""
    return _command(
        _element(0x0000, 0x0002, _uid(STUDY_ROOT_GET)),
        _element(0x0000, 0x0100, struct.pack("<H", 0x0010)),
        _element(0x0000, 0x0110, struct.pack("<H", message_id)),
        _element(0x0000, 0x0700, struct.pack("<H", 0)),
        _element(0x0000, 0x0800, struct.pack("<H", 0x0000)),
    )


def study_identifier(study_uid: str) -> bytes:
    """QueryRetrieveLevel=STUDY, StudyInstanceUID (Implicit VR Little Endian dataset)."""
    return _element(0x0008, 0x0052, b"STUDY") + _element(0x0020, 0x000D, _uid(study_uid))


@dataclass
class Pdu:
    pdu_type: int
    body: bytes

    @property
    def reject_reason(self) -> tuple[int, int, int]:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        return self.body[1], self.body[2], self.body[3]

    @property
    def abort_reason(self) -> tuple[int, int]:
        """(source, reason) of an A-ABORT."""
        return self.body[2], self.body[3]


class RawAssociation:
    """One TCP connection to the node, speaking PDUs by hand."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout_s: float = 10.0,
                 receive_buffer_bytes: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer_bytes is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        self.sock.settimeout(timeout_s)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __enter__(self) -> "RawAssociation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return data

    def read_pdu(self, timeout_s: float = 10.0) -> Pdu | None:
        """The next PDU, or None when the node closed the connection."""
        self.sock.settimeout(timeout_s)
        try:
            header = self._read_exactly(6)
        except ConnectionError:
            return None
        except ConnectionResetError:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        return Pdu(pdu_type, self._read_exactly(length))

    def closed_within(self, timeout_s: float) -> float | None:
        """Seconds until the node closed the connection (reading and dropping any PDUs), or None."""
        start = time.monotonic()
        self.sock.settimeout(0.2)
        while time.monotonic() - start < timeout_s:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return time.monotonic() - start
            if not data:
                return time.monotonic() - start
        return None

    def associate(self, contexts: list[bytes] | None = None, **kwargs: object) -> Pdu | None:
        self.send(associate_rq(contexts, **kwargs))  # type: ignore[arg-type]
        return self.read_pdu()
