"""The audit trail to a syslog receiver over TLS: a real TLS receiver (Python ssl server)
on a free loopback port, certificates from the cluster CA (node/ca.py)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from pacsnode.node import ca
from pacsnode.node.audit import AuditLog, Participant
from pacsnode.node.audit_syslog import AuditSyslog, SyslogTargetError, client_context, frame, parse_target
from pacsnode.sim.process import free_port, wait_until


class Receiver:
    """An RFC 5425 receiver: TLS server, reads octet-counted frames into `messages`."""

    def __init__(self, tls_dir: Path, port: int, host: str = "127.0.0.1") -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tls_dir / "cert.pem", tls_dir / "key.pem")
        self.context.load_verify_locations(tls_dir / "ca.pem")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.messages: list[bytes] = []
        self.peers: list[str] = []
        self.listener = socket.create_server((host, port))
        self.listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except OSError:
                continue
            try:
                connection = self.context.wrap_socket(raw, server_side=True)
            except (OSError, ValueError):
                raw.close()
                continue
            identity = ca.identity_of_pem(ssl.DER_cert_to_PEM_cert(connection.getpeercert(True)).encode())
            self.peers.append(identity.name if identity else "")
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: ssl.SSLSocket) -> None:
        buffer = b""
        with connection:
            while True:
                try:
                    data = connection.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b" " in buffer:
                    length, rest = buffer.split(b" ", 1)
                    if len(rest) < int(length):
                        break
                    self.messages.append(rest[: int(length)])
                    buffer = rest[int(length):]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("syslog-pki")
    ca.init_ca(root / "ca")
    ca.init_ca(root / "other-ca")
    dirs = {"n1": root / "n1", "receiver": root / "receiver", "other": root / "other"}
    ca.issue(root / "ca", dirs["n1"], "n1")
    ca.issue(root / "ca", dirs["receiver"], "syslog", hosts=["127.0.0.1"])  # Node certificates name 127.0.0.1.
    ca.issue(root / "other-ca", dirs["other"], "syslog")
    return dirs


def sender(pki: dict[str, Path], port: int, queue_max: int = 100) -> AuditSyslog:
    files = pki["n1"]
    return AuditSyslog("127.0.0.1", port, client_context(files / "ca.pem", files / "cert.pem", files / "key.pem"),
                       queue_max=queue_max)


def test_frame_is_rfc5424_in_octet_counting() -> None:
    data = frame('{"a":"é"}\n', hostname="h1", procid=7)
    length, message = data.split(b" ", 1)
    assert int(length) == len(message)
    assert message.startswith(b"<85>1 ") and b" h1 pacsnode 7 DICOM+JSON - \xef\xbb\xbf{" in message
    assert message.endswith('{"a":"é"}'.encode())
    assert parse_target("[::1]:6514") == ("::1", 6514)
    with pytest.raises(SyslogTargetError):
        parse_target("syslog.example")


def test_audit_messages_reach_a_tls_receiver_that_checks_our_certificate(pki: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    receiver = Receiver(pki["receiver"], free_port())
    syslog = sender(pki, receiver.listener.getsockname()[1])
    audit = AuditLog(tmp_path / "audit.jsonl", "n1")
    audit.forward = syslog.send
    try:
        for number in range(5):
            audit.record("security-alert", participants=[Participant(f"AE{number}", "127.0.0.1")])
        assert wait_until(lambda: len(receiver.messages) == 5, 10), receiver.messages
        sent = [json.loads(m.split(b"\xef\xbb\xbf", 1)[1]) for m in receiver.messages]
        written = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert sent == written  # The same PS3.15 messages, in order.
        assert receiver.peers == ["n1"] and syslog.sent == 5 and syslog.dropped == 0
    finally:
        syslog.close()
        receiver.close()
        audit.close()


@pytest.mark.parametrize("certificate", ["other", "elsewhere"])
def test_a_receiver_of_another_ca_or_another_host_name_gets_nothing(pki: dict[str, Path], certificate: str) -> None:
    if certificate == "elsewhere":  # Our CA's certificate, at an address it does not name.
        receiver = Receiver(pki["receiver"], free_port(), host="127.0.0.2")
        files = pki["n1"]
        syslog = AuditSyslog("127.0.0.2", receiver.listener.getsockname()[1],
                             client_context(files / "ca.pem", files / "cert.pem", files / "key.pem"))
    else:
        receiver = Receiver(pki[certificate], free_port())
        syslog = sender(pki, receiver.listener.getsockname()[1])
    try:
        syslog.send("{}")
        assert wait_until(lambda: syslog.connect_failures >= 1, 10)
        time.sleep(0.3)
        assert receiver.messages == [] and syslog.sent == 0
    finally:
        syslog.close()
        receiver.close()


def test_a_full_queue_drops_and_counts_never_blocks_then_reconnects(pki: dict[str, Path]) -> None:
    port = free_port()  # Nothing listens yet.
    syslog = sender(pki, port, queue_max=3)
    try:
        started = time.monotonic()
        for number in range(10):
            syslog.send(json.dumps({"n": number}))
        assert time.monotonic() - started < 0.5  # Never waits for the receiver.
        assert wait_until(lambda: syslog.connect_failures >= 1, 10)
        assert syslog.dropped >= 6  # 3 queued, (at most) 1 held by the sender thread.
        receiver = Receiver(pki["receiver"], port)  # The receiver comes up: the sender reconnects.
        try:
            assert wait_until(lambda: len(receiver.messages) == 10 - syslog.dropped, 15), (receiver.messages,
                                                                                          syslog.dropped)
            assert syslog.sent == 10 - syslog.dropped
        finally:
            receiver.close()
    finally:
        syslog.close()
