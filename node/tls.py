"""TLS for the peer port (mutual TLS, gRPC) and the DICOM TLS port, from one `--tls-dir`.

The directory holds `ca.pem` (the cluster CA), `cert.pem` and `key.pem` (this node's or
the admin's certificate), as `pacsnode cert issue` writes it (node/ca.py).

Peer port: the server asks every client for a certificate of the cluster CA (gRPC refuses
the handshake otherwise: plain text, another CA, an expired certificate); the server's
certificate files are read again when they change (the next handshake uses the new ones,
no restart). Every peer channel checks the server's certificate under the name every node
certificate carries (`PEER_TLS_NAME`), whatever address it dials. `PeerGuard` then
checks, per call, that the envelope's sender is the node the client certificate names and
that an admin certificate (the CLI) calls only what an operator may.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from cryptography import x509
from pacsnode.node.acceptor import ACCEPT_POLL_S, AcceptorServer

from pacsnode.node import ca
from pacsnode.node.ca import PEER_TLS_NAME, CertIdentity

log = logging.getLogger(__name__)


class TlsError(Exception):
    """The TLS directory is missing a file, or its certificate does not fit this use."""


@dataclass(frozen=True)
class TlsFiles:
    """The three PEM files of a `--tls-dir`."""

    directory: Path

    @property
    def ca_path(self) -> Path:
        return self.directory / ca.CA_CERT_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / ca.CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / ca.KEY_FILE

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, certificate, key) bytes."""
        try:
            return self.ca_path.read_bytes(), self.cert_path.read_bytes(), self.key_path.read_bytes()
        except OSError as error:
            raise TlsError(f"cannot read {error.filename}: {error.strerror} (tls_dir {self.directory} must hold "
                           "ca.pem, cert.pem and key.pem, as `pacsnode cert issue` writes them)") from None

    def stamp(self) -> tuple[float, ...]:
        """Modification times of the three files (a change means: read them again)."""
        try:
            return tuple(path.stat().st_mtime_ns for path in (self.ca_path, self.cert_path, self.key_path))
        except OSError:
            return ()

    def identity(self) -> CertIdentity:
        """The identity our certificate names, after checking it is the CA's and valid now."""
        ca_pem, cert_pem, _key = self.read()
        try:
            authority = x509.load_pem_x509_certificate(ca_pem)
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as error:
            raise TlsError(f"cannot parse a certificate in {self.directory}: {error}") from None
        try:
            certificate.verify_directly_issued_by(authority)
        except (ValueError, TypeError, Exception) as error:  # InvalidSignature has no common base
            raise TlsError(f"{self.cert_path} was not issued by {self.ca_path}: {type(error).__name__}") from None
        now = datetime.datetime.now(datetime.timezone.utc)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise TlsError(f"{self.cert_path} is not valid now (valid {certificate.not_valid_before_utc:%Y-%m-%d} "
                           f"to {certificate.not_valid_after_utc:%Y-%m-%d})")
        identity = ca.identity_of(certificate)
        if identity is None:
            raise TlsError(f"{self.cert_path} is not a pacsnode certificate (no node or admin identity)")
        return identity


def node_files(tls_dir: str, node_id: str) -> TlsFiles | None:
    """A node's TLS files (None without tls_dir); its certificate must name this node."""
    if not tls_dir:
        return None
    files = TlsFiles(Path(tls_dir))
    identity = files.identity()
    if not identity.is_node or identity.name != node_id:
        raise TlsError(f"{files.cert_path} names {identity.role} {identity.name!r}, not node {node_id!r}")
    return files


# --------------------------------------------------------------------------- peer port

CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", PEER_TLS_NAME)]


def server_credentials(files: TlsFiles, on_reload: Callable[[str], None] | None = None) -> grpc.ServerCredentials:
    """Mutual TLS server credentials; the files are read again when they change."""
    ca_pem, cert_pem, key_pem = files.read()
    state = {"stamp": files.stamp()}
    lock = threading.Lock()

    def configuration(ca_bytes: bytes, cert_bytes: bytes, key_bytes: bytes) -> Any:
        return grpc.ssl_server_certificate_configuration([(key_bytes, cert_bytes)], root_certificates=ca_bytes)

    def fetch() -> Any:
        """Called by gRPC before each handshake: None = keep the current files."""
        stamp = files.stamp()
        with lock:
            if not stamp or stamp == state["stamp"]:
                return None
            state["stamp"] = stamp
        try:
            identity = files.identity()
            new = configuration(*files.read())
        except (TlsError, ValueError) as error:
            log.error("security.tls.reload_failed tls_dir=%s error=%s", files.directory, error)
            return None
        log.warning("security.tls.reloaded tls_dir=%s name=%s", files.directory, identity.name)
        if on_reload is not None:
            on_reload(str(files.directory))
        return new

    return grpc.dynamic_ssl_server_credentials(configuration(ca_pem, cert_pem, key_pem), fetch,
                                               require_client_authentication=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca_pem, cert_pem, key_pem = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


def cli_channel(address: str, tls_dir: str | None, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A blocking channel for the CLI: mutual TLS with the admin certificate when tls_dir is set."""
    if not tls_dir:
        return grpc.insecure_channel(address, options=options or [])
    files = TlsFiles(Path(tls_dir))
    return grpc.secure_channel(address, channel_credentials(files), options=(options or []) + CHANNEL_OPTIONS)


_IDENTITIES: dict[bytes, CertIdentity | None] = {}
_IDENTITIES_MAX = 1024


def peer_identity(context: Any) -> CertIdentity | None:
    """The identity of the client certificate of a gRPC call (None: no certificate)."""
    try:
        pems = context.auth_context().get("x509_pem_cert") or []
    except Exception:  # No auth context (an insecure port).
        return None
    if not pems:
        return None
    pem = pems[0]
    identity = _IDENTITIES.get(pem)
    if identity is None and pem not in _IDENTITIES:
        identity = ca.identity_of_pem(pem)
        if len(_IDENTITIES) >= _IDENTITIES_MAX:
            _IDENTITIES.clear()
        _IDENTITIES[pem] = identity
    return identity


# What an admin certificate (the CLI) may call; node certificates may call everything.
ADMIN_METHODS = frozenset({"Status", "RingView", "Metrics", "Leave", "ListStudy", "Delete"})
CLI_SENDER_ID = "pacsnode-cli"


class PeerGuard:
    """Per-call identity checks on the peer port (all pass when the port is plain text)."""

    def __init__(self, enabled: bool, alert: Callable[[str, str, str, str], None] | None = None) -> None:
        self.enabled = enabled
        self._alert = alert  # (method, claimed sender, certificate name, reason): the audit trail.
        self.refused = 0

    def _refuse(self, method: str, sender: str, identity: CertIdentity | None, reason: str
                ) -> tuple[grpc.StatusCode, str]:
        self.refused += 1
        if self._alert is not None:
            self._alert(method, sender, identity.name if identity else "", reason)
        return grpc.StatusCode.PERMISSION_DENIED, reason

    def problem(self, sender_id: str, context: Any, method: str) -> tuple[grpc.StatusCode, str] | None:
        """Why this call may not go on, or None. The sender must be the certificate's node."""
        if not self.enabled:
            return None
        identity = peer_identity(context)
        if identity is None:
            return self._refuse(method, sender_id, None, "no pacsnode certificate")
        if not identity.is_admin and not identity.is_node:
            return self._refuse(method, sender_id, identity, f"a {identity.role} certificate may not use the peer port")
        if identity.is_admin:
            if method not in ADMIN_METHODS:
                return self._refuse(method, sender_id, identity, f"an admin certificate may not call {method}")
            if sender_id not in (identity.name, CLI_SENDER_ID):
                return self._refuse(method, sender_id, identity,
                                    f"admin {identity.name} cannot send as {sender_id[:64]!r}")
            return None
        if sender_id != identity.name:
            return self._refuse(method, sender_id, identity,
                                f"certificate of node {identity.name} cannot send as {sender_id[:64]!r}")
        return None

    def is_admin(self, context: Any) -> bool:
        identity = peer_identity(context)
        return identity is not None and identity.is_admin

    def leave_problem(self, context: Any, *, target: str, removing: bool, me: str) -> str | None:
        """`Leave` asking this node to leave, or removing a member: an admin's call only.
        (A member announcing its own LEFT passed problem(): its sender is its certificate.)"""
        if not self.enabled or self.is_admin(context):
            return None
        if removing:
            return "only an admin certificate may remove a member"
        if target in ("", me):
            return "only an admin certificate may ask a node to leave"
        return None

    def delete_problem(self, context: Any) -> str | None:
        """`Delete` (`pacsnode delete`): an admin's call only."""
        if not self.enabled or self.is_admin(context):
            return None
        return "only an admin certificate may delete"

    def modify_problem(self, context: Any) -> str | None:
        """`Modify` (`pacsnode modify`, `pacsnode merge-patient`): an admin's call only."""
        if not self.enabled or self.is_admin(context):
            return None
        return "only an admin certificate may modify"

    def join_problem(self, member_id: str, sender_id: str) -> str | None:
        """A node joins as itself only."""
        if self.enabled and member_id != sender_id:
            return f"{sender_id[:64]} cannot join as {member_id[:64]!r}"
        return None


# --------------------------------------------------------------------------- failed handshakes

# OpenSSL's reason codes (ssl.SSLError.reason: stable symbols, not message text) by class.
_HANDSHAKE_REASONS = {
    "plain-text": ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL",
                   "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH"),
    "protocol-version": ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE",
                         "VERSION_TOO_LOW"),
    "no-certificate": ("PEER_DID_NOT_RETURN_A_CERTIFICATE",),
    "certificate": ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_DECRYPT_ERROR", "TLSV1_ALERT_ACCESS_DENIED"),
    "cipher": ("NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_SUITABLE_SIGNATURE_ALGORITHM"),
    "closed": ("UNEXPECTED_EOF_WHILE_READING", "UNEXPECTED_RECORD"),
}
_REASON_CLASS = {code: name for name, codes in _HANDSHAKE_REASONS.items() for code in codes}


def handshake_failure(error: BaseException) -> tuple[str, str]:
    """(reason class, detail) of a failed TLS handshake, for one log line without a traceback.

    Classes: plain-text, protocol-version, no-certificate, certificate, cipher, timeout,
    closed, other. The detail is OpenSSL's reason code, or the exception's type."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return "certificate", str(getattr(error, "verify_message", "") or "CERTIFICATE_VERIFY_FAILED").replace(" ", "_")
    if isinstance(error, ssl.SSLError):
        code = str(error.reason or type(error).__name__)
        if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return "closed", code
        return _REASON_CLASS.get(code, "other"), code
    if isinstance(error, (TimeoutError, socket.timeout, ConnectionAbortedError)):
        return "timeout", type(error).__name__  # asyncio aborts a handshake past its timeout.
    if isinstance(error, (ConnectionError, EOFError)):
        return "closed", type(error).__name__
    return "other", type(error).__name__


# --------------------------------------------------------------------------- DICOM TLS

CLIENT_CERT_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# BCP 195 (RFC 9325) for TLS 1.2: ECDHE with AEAD ciphers only; TLS 1.3 suites are all fine.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def dicom_server_context(files: TlsFiles, client_cert: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(files.cert_path, files.key_path)
    context.load_verify_locations(cafile=files.ca_path)
    context.verify_mode = CLIENT_CERT_MODES[client_cert]
    return context


def http_server_context(files: TlsFiles, client_cert: str) -> ssl.SSLContext:
    """HTTPS on the HTTP port: the same profile and certificate as DICOM TLS (TLS 1.2+, BCP 195);
    a client certificate, when sent (or when required), must be of the cluster CA."""
    return dicom_server_context(files, client_cert)


def dicom_client_context(files: TlsFiles) -> ssl.SSLContext:
    """For C-MOVE to a TLS destination: our certificate, the cluster CA as trust anchor."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_path))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert_path, files.key_path)
    return context


class TlsAssociationServer(AcceptorServer):
    """The hardened acceptor (node/acceptor.py) with the TLS handshake moved off the accept loop.

    pynetdicom wraps an accepted socket on the accepting thread with the handshake done at
    once, without a timeout: one client that connects and says nothing would stop every
    later accept. Here the accept thread only wraps; the handshake runs on the
    association's own thread with `handshake_timeout_s`, and a failed one (plain text,
    an unknown CA, an old TLS version) is logged and closed.
    """

    handshake_timeout_s = 10.0
    on_refused: Callable[[str, str], None] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener, context = self.socket, self.ssl_context
        if listener is None or context is None:  # make_server always gives both to this class.
            raise OSError("the TLS association server has no socket or no TLS context")
        client_socket, address = listener.accept()
        wrapped = context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.handshake_timeout_s)
            request.do_handshake()
            request.settimeout(None)
        except (OSError, ValueError) as error:  # ssl.SSLError and socket.timeout are OSErrors.
            reason_class, reason = handshake_failure(error)
            log.warning("dicom.tls.refused address=%s reason=%s reason_class=%s", client_address[0], reason,
                        reason_class)
            if self.on_refused is not None:
                self.on_refused(str(client_address[0]), str(reason))
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def start_dicom_tls_server(ae: Any, address: tuple[str, int], context: ssl.SSLContext, handlers: list[Any],
                           on_refused: Callable[[str, str], None] | None = None,
                           server_class: type[TlsAssociationServer] = TlsAssociationServer) -> Any:
    """Start a DICOM TLS listener on `ae` (pynetdicom's make_server with our server class)."""
    server = ae.make_server(address, ssl_context=context, evt_handlers=handlers, server_class=server_class)
    server.on_refused = on_refused
    thread = threading.Thread(target=functools.partial(server.serve_forever, poll_interval=ACCEPT_POLL_S),
                              name="pacsnode-dicom-tls", daemon=True)
    thread.start()
    ae._servers.append(server)  # So that ae.shutdown() and our stop() see it, as start_server does.
    return server


def unprotected_warning(tls_dir: str) -> str | None:
    return None if tls_dir else (
        "security.unprotected peer, DICOM and HTTP traffic is plain text and any client that reaches the peer port "
        "or the HTTP port (DICOMweb) can read or change the archive: set tls_dir (pacsnode ca init / cert issue) "
        "outside loopback development")


def key_file_private(path: Path) -> bool:
    """True when the key is readable by its owner only."""
    return (os.stat(path).st_mode & 0o077) == 0


def stop_dicom_server(ae: Any, server: Any, grace_s: float) -> None:
    """Stop a DICOM listener: no new associations; open ones get `grace_s`, then are aborted."""
    if server is None:
        return
    import socketserver
    import time

    socketserver.BaseServer.shutdown(server)
    deadline = time.monotonic() + grace_s
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    for assoc in list(server.active_associations):
        assoc.abort()
    server.server_close()
    if server in ae._servers:
        ae._servers.remove(server)
