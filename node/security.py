"""A node's security settings in one object: its TLS files, the peer guard, the audit trail.

The node shell (node/server.py) makes one `NodeSecurity` from its config; the peer server
and the DICOM front end call it through small hooks.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import grpc

from pacsnode.node import tls
from pacsnode.node.audit import AUDIT_FILE, MINOR_FAILURE, SUCCESS, AuditLog, Participant, Subject, record_delete, record_modify
from pacsnode.node.audit_syslog import AuditSyslog, client_context, parse_target
from pacsnode.node.config import ConfigError, NodeConfig
from pacsnode.node.member_signing import MemberSigner, MemberVerifier

log = logging.getLogger(__name__)


class NodeSecurity:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        try:
            self.files = tls.node_files(config.tls_dir, config.node_id)
        except tls.TlsError as error:
            raise ConfigError(f"tls_dir: {error}") from None
        if self.files is not None and not tls.key_file_private(self.files.key_path):
            raise ConfigError(f"{self.files.key_path} is readable by others: chmod 600 it")
        self.audit = AuditLog(self.audit_path(config), config.node_id,
                              segment_bytes=config.audit_log_segment_bytes)
        self.syslog: AuditSyslog | None = None
        if config.audit_syslog and self.files is not None:
            host, port = parse_target(config.audit_syslog)
            context = client_context(self.files.ca_path, self.files.cert_path, self.files.key_path)
            self.syslog = AuditSyslog(host, port, context)
            self.audit.forward = self.syslog.send
        self.guard = tls.PeerGuard(self.files is not None, alert=self._peer_refused)
        # Signed member records (node/member_signing.py): with TLS, every SWIM record this
        # node sets is signed, and a peer's record is used only with a valid signature.
        self.member_signer: MemberSigner | None = None
        self.member_verifier: MemberVerifier | None = None
        if self.files is not None:
            self.member_signer = MemberSigner(config.cluster_id, self.files)
            self.member_verifier = MemberVerifier(config.cluster_id, self.files.read()[0])
        self._stamp = self.files.stamp() if self.files is not None else ()

    @staticmethod
    def audit_path(config: NodeConfig) -> Path | None:
        if config.audit_log == "off":
            return None
        return Path(config.audit_log) if config.audit_log else config.data_dir / AUDIT_FILE

    @property
    def peer_tls(self) -> bool:
        return self.files is not None

    # ------------------------------------------------------------------ peer port
    def add_peer_port(self, server: Any, address: str) -> int:
        if self.files is None:
            return int(server.add_insecure_port(address))
        credentials = tls.server_credentials(self.files)  # Re-reads the files at a handshake after a change.
        return int(server.add_secure_port(address, credentials))

    # ------------------------------------------------------------------ HTTP port
    def http_context(self) -> ssl.SSLContext | None:
        """HTTPS on the HTTP port with the node's certificate (None: plain HTTP, no tls_dir)."""
        if self.files is None:
            return None
        return tls.http_server_context(self.files, self.config.http_tls_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        return tls.channel_credentials(self.files) if self.files is not None else None

    async def refuse(self, context: Any, reason: str | None) -> None:
        """Abort the call with PERMISSION_DENIED when there is a reason (logged and audited)."""
        if reason is None:
            return
        self._peer_refused("", "", "", reason, peer=str(context.peer()))
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

    def _peer_refused(self, method: str, sender: str, certificate: str, reason: str, peer: str = "") -> None:
        log.warning("security.peer.refused method=%s sender=%s certificate=%s peer=%s reason=%s",
                    method, sender[:64], certificate, peer, reason)
        self.audit.record("security-alert", outcome=MINOR_FAILURE, event_type="node-authentication",
                          participants=[Participant(certificate or sender[:64], peer)],
                          description=f"{method + ': ' if method else ''}{reason}")

    def admin_action(self, action: str, context: Any, target: str, accepted: bool, reason: str = "") -> None:
        """A membership change asked over the peer port (join, leave, left, remove): audited."""
        identity = tls.peer_identity(context)
        who = f"{identity.role}:{identity.name}" if identity else "plain-text"
        self.audit.record("security-alert", action="E", outcome=SUCCESS if accepted else MINOR_FAILURE,
                          event_type="network-configuration",
                          participants=[Participant(who, str(context.peer()))],
                          subject=Subject(description=f"node:{target}"),
                          description=f"{action} {target}" + (f": {reason}" if reason else ""))

    def delete_action(self, context: Any, scope: Any, result: Any) -> None:
        """`pacsnode delete` over the peer port: audited (the log line has no UIDs)."""
        identity = tls.peer_identity(context)
        who = f"{identity.role}:{identity.name}" if identity else "plain-text"
        record_delete(self.audit, Participant(who, str(context.peer())), study_instance_uid=scope.study_instance_uid,
                      level=scope.level, status=result.status.value, instances=result.instances, via="pacsnode")

    def modify_action(self, context: Any, study_instance_uid: str, level: str, result: Any) -> None:
        """`pacsnode modify` / `merge-patient` over the peer port: audited (attribute names only)."""
        identity = tls.peer_identity(context)
        who = f"{identity.role}:{identity.name}" if identity else "plain-text"
        record_modify(self.audit, Participant(who, str(context.peer())), study_instance_uid=study_instance_uid,
                      level=level, status=result.status.value, studies=result.studies,
                      attributes=result.attributes, via="pacsnode")

    def reload_certificates(self) -> bool:
        """Read the tls_dir files again when they changed (SIGHUP, or the node's 10 s poll):
        True when a new, valid certificate of this node is now in use for new connections.
        A certificate that is not this node's, not the CA's or not valid now is refused
        (logged), and the one in use stays."""
        if self.files is None:
            return False
        stamp = self.files.stamp()
        if not stamp or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            tls.node_files(self.config.tls_dir, self.config.node_id)
            self.dicom_context()
            if self.member_signer is not None and self.member_verifier is not None:
                self.member_signer.reload()
                self.member_verifier.set_authority(self.files.read()[0])
        except (tls.TlsError, ssl.SSLError, OSError, ValueError) as error:
            log.error("security.tls.reload_failed tls_dir=%s error=%s", self.files.directory, error)
            return False
        log.warning("security.tls.reloaded tls_dir=%s node_id=%s", self.files.directory, self.config.node_id)
        self._reloaded(str(self.files.directory))
        return True

    def dicom_context(self) -> ssl.SSLContext:
        assert self.files is not None
        return tls.dicom_server_context(self.files, self.config.dicom_tls_client_cert)

    def _reloaded(self, directory: str) -> None:
        self.audit.record("security-alert", event_type="security-configuration",
                          participants=[Participant(self.config.node_id, requestor=False)],
                          subject=Subject(description=f"tls_dir:{directory}"),
                          description="certificate changed: reloaded for new peer, DICOM TLS and HTTPS connections")

    # ------------------------------------------------------------------ start and stop
    def started(self, dicom_tls_port: int) -> None:
        warning = tls.unprotected_warning(self.config.tls_dir)
        if warning is not None:
            log.warning("%s", warning)
            log.warning("security.unprotected node_id=%s peer_tls=off dicom_tls=off http=plain http_port=%d "
                        "http_access=%s audit=%s", self.config.node_id, self.config.http_port,
                        "closed" if self.config.access_mode == "strict" else "open",
                        self.audit.path or "off")
        else:
            log.info("security.tls node_id=%s peer_tls=mutual dicom_tls_port=%d client_cert=%s http=https "
                     "http_client_cert=%s audit=%s", self.config.node_id, dicom_tls_port,
                     self.config.dicom_tls_client_cert, self.config.http_tls_client_cert, self.audit.path or "off")
        self.audit.record("application-activity", event_type="application-start",
                          participants=[Participant(self.config.node_id, requestor=False)],
                          description=f"peer_tls={'on' if self.peer_tls else 'off'} dicom_tls_port={dicom_tls_port}")

    def stopped(self) -> None:
        self.audit.record("application-activity", event_type="application-stop",
                          participants=[Participant(self.config.node_id, requestor=False)])
        self.audit.close()
        if self.syslog is not None:
            self.syslog.close()
