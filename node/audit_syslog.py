"""The audit trail sent to an RFC 5424 syslog receiver over TLS (RFC 5425), as IHE ATNA does.

`audit_syslog = "HOST:PORT"` (`--audit-syslog`): every audit message (node/audit.py) is
also queued for the receiver. The queue is bounded (`QUEUE_MAX`): a message that does
not fit is dropped and counted (`audit.syslog.dropped`, rate-limited, and
`pacsnode_security_audit_syslog_dropped_total` in /metrics), so a slow or absent receiver
never blocks a store. One thread sends: TLS 1.2+, the receiver's certificate checked
against the cluster CA (`ca.pem` of `tls_dir`) and its host name (HOST), the node's own
certificate offered as client certificate; on a failure it reconnects with backoff
(0.5 s doubling to 30 s) and sends the message it was holding again.

Frame (RFC 5425 octet counting): `LEN SP SYSLOG-MSG`; the message (RFC 5424):
`<85>1 TIME HOST pacsnode PROCID DICOM+JSON - BOM{json}`: facility 10 (security/authpriv),
severity 5 (notice), the PS3.15 message in its JSON form as MSG.
"""

from __future__ import annotations

import datetime
import logging
import os
import queue
import socket
import ssl
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

QUEUE_MAX = 10_000
PRI = 10 * 8 + 5  # facility authpriv (10), severity notice (5)
APP_NAME = "pacsnode"
MSG_ID = "DICOM+JSON"
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
CONNECT_TIMEOUT_S = 10.0


class SyslogTargetError(ValueError):
    """`audit_syslog` is not HOST:PORT."""


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SyslogTargetError(f"audit_syslog must be HOST:PORT, got {text!r}")
    return host, int(port)


def frame(json_line: str, *, hostname: str, now: datetime.datetime | None = None, procid: int = 0) -> bytes:
    """One RFC 5424 message in RFC 5425 octet-counting framing (pure)."""
    moment = (now or datetime.datetime.now(datetime.timezone.utc)).isoformat(timespec="milliseconds")
    moment = moment.replace("+00:00", "Z")
    header = f"<{PRI}>1 {moment} {hostname[:255] or '-'} {APP_NAME} {procid or '-'} {MSG_ID} - "
    message = header.encode("ascii", "replace") + b"\xef\xbb\xbf" + json_line.rstrip("\n").encode("utf-8")
    return str(len(message)).encode("ascii") + b" " + message


def client_context(ca_path: Path, cert_path: Path | None, key_path: Path | None) -> ssl.SSLContext:
    """TLS 1.2+, the receiver checked against the cluster CA and by host name."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_path))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_path is not None and key_path is not None:
        context.load_cert_chain(cert_path, key_path)
    return context


class AuditSyslog:
    """A bounded queue and one sender thread (see the module's text)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, *, queue_max: int = QUEUE_MAX) -> None:
        self.host = host
        self.port = port
        self._context = context
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=queue_max)
        self._stop = threading.Event()
        self._hostname = socket.gethostname()
        self.sent = 0
        self.dropped = 0
        self.connect_failures = 0
        self._last_drop_log = 0.0
        self._thread = threading.Thread(target=self._run, name="pacsnode-audit-syslog", daemon=True)
        self._thread.start()

    def send(self, json_line: str) -> None:
        """Queue one audit message; never blocks (a full queue drops it and counts it)."""
        try:
            self._queue.put_nowait(json_line)
        except queue.Full:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 10.0:
                self._last_drop_log = now
                log.warning("audit.syslog.dropped target=%s:%d dropped_total=%d", self.host, self.port, self.dropped)

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout_s)

    def _connect(self) -> ssl.SSLSocket | None:
        backoff = BACKOFF_MIN_S
        while not self._stop.is_set():
            try:
                raw = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
                try:
                    wrapped = self._context.wrap_socket(raw, server_hostname=self.host)
                except BaseException:
                    raw.close()
                    raise
                log.info("audit.syslog.connected target=%s:%d", self.host, self.port)
                return wrapped
            except (OSError, ValueError) as error:
                self.connect_failures += 1
                log.warning("audit.syslog.connect_failed target=%s:%d error=%s retry_s=%.1f", self.host, self.port,
                            type(error).__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
        return None

    def _run(self) -> None:
        connection: ssl.SSLSocket | None = None
        pending: str | None = None
        procid = os.getpid()
        try:
            while True:
                if pending is None:
                    pending = self._queue.get()
                    if pending is None:
                        return
                if connection is None:
                    connection = self._connect()
                    if connection is None:
                        return  # Stopping.
                try:
                    connection.sendall(frame(pending, hostname=self._hostname, procid=procid))
                    self.sent += 1
                    pending = None
                except OSError as error:
                    log.warning("audit.syslog.send_failed target=%s:%d error=%s", self.host, self.port,
                                type(error).__name__)
                    connection.close()
                    connection = None
        finally:
            if connection is not None:
                connection.close()
