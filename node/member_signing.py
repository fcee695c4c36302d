"""Signed member records: who may say what about a member, checked against the cluster CA.

With TLS on, every SWIM member record (ring/swim.py `MemberUpdate`: state, incarnation,
generation, addresses) carries an ECDSA P-256 signature by the node that set it and that
node's certificate (DER). A node relays records unchanged, so a record about node X that
reaches a third node still proves who set it. The rules (`allowed`), SWIM's:

- ALIVE, LEAVING, LEFT (and every refutation: a higher incarnation): only X itself;
- SUSPECT, DEAD, REMOVED: any node of the cluster, under its own name (the record's
  reporter must be the certificate's node). An operator's `pacsnode remove` is declared by
  the node the admin certificate asked, which checked that certificate (node/tls.py);
- the certificate must be a node certificate issued by the cluster CA and valid now.

The signed bytes name the cluster id, so a record cannot be replayed into another cluster
of the same CA. ring/swim.py stays pure: it gets `MemberSigner.sign` and `MemberVerifier`
as its signer and verifier, and checks only records that would change its view.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading
from dataclasses import replace
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pacsnode.node import ca
from pacsnode.node.tls import TlsError, TlsFiles
from pacsnode.ring.swim import MemberUpdate, State

DOMAIN = "pacsnode-member-record-v1"
SELF_ONLY = frozenset({State.ALIVE, State.LEAVING, State.LEFT})  # Only the member itself says these.
_SIGNATURE = ec.ECDSA(hashes.SHA256())
_CACHE_MAX = 4_096


def signed_bytes(cluster_id: str, update: MemberUpdate) -> bytes:
    """The canonical bytes a record's signature covers: every field but the proof itself.
    `site` and `vnodes` as node/peer_wire.py decodes them (empty site = "default", 0 = 64);
    `token_salt` only when set, so a record without one signs as it did before salts."""
    info = update.info
    fields = [DOMAIN, cluster_id, info.node_id, info.peer_host, info.peer_port, info.dicom_host, info.dicom_port,
              info.ae_title, info.site or "default", info.host, info.vnodes or 64, info.generation,
              info.updated_at_ms, update.state.value, update.incarnation, update.reporter_id, update.lamport,
              bool(update.leaving)]
    if info.token_salt:
        fields.append(f"token_salt={info.token_salt}")
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()


def allowed(state: State, node_id: str, reporter_id: str, signer: ca.CertIdentity) -> str | None:
    """Why `signer` may not set this record, or None when SWIM lets it."""
    if not signer.is_node:
        return f"signed by a {signer.role} certificate ({signer.name}), not a node's"
    if reporter_id != signer.name:
        return f"reporter {reporter_id[:64]!r} but signed by {signer.name}"
    if state in SELF_ONLY and node_id != signer.name:
        return f"only {node_id[:64]} may say it is {state.value}, not {signer.name}"
    return None


class MemberSigner:
    """Signs the records this node sets, with its tls_dir key (read again by `reload`)."""

    def __init__(self, cluster_id: str, files: TlsFiles) -> None:
        self.cluster_id = cluster_id
        self.files = files
        self.signed = 0
        self._lock = threading.Lock()
        self._key, self._certificate = self._load()

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
        _ca_pem, cert_pem, key_pem = self.files.read()
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TlsError(f"{self.files.key_path} is not an EC key (pacsnode cert issue writes P-256)")
        certificate = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        return key, certificate

    def reload(self) -> None:
        """Sign with the tls_dir's current key and certificate (after a certificate reload)."""
        loaded = self._load()
        with self._lock:
            self._key, self._certificate = loaded

    def sign(self, update: MemberUpdate) -> MemberUpdate:
        with self._lock:
            key, certificate = self._key, self._certificate
        signature = key.sign(signed_bytes(self.cluster_id, update), _SIGNATURE)
        self.signed += 1
        return replace(update, signature=signature, certificate=certificate)


class _Signer(NamedTuple):
    identity: ca.CertIdentity | None
    public_key: ec.EllipticCurvePublicKey | None
    not_before: datetime.datetime
    not_after: datetime.datetime
    problem: str


class MemberVerifier:
    """Checks a peer's record (ring/swim.py's verifier): None when it may be used, else why not.

    Certificates are checked against the CA once and cached (by their bytes); signatures
    already checked are cached too (a record is relayed many times). Both caches are bounded.
    """

    def __init__(self, cluster_id: str, ca_pem: bytes) -> None:
        self.cluster_id = cluster_id
        self._authority = x509.load_pem_x509_certificate(ca_pem)
        self._signers: dict[bytes, _Signer] = {}
        self._checked: dict[bytes, bytes] = {}  # Digests of (payload, signature, certificate) verified.
        self.verified = 0  # ECDSA verifications run (cache misses).
        self.refused = 0

    def set_authority(self, ca_pem: bytes) -> None:
        self._authority = x509.load_pem_x509_certificate(ca_pem)
        self._signers.clear()
        self._checked.clear()

    def __call__(self, update: MemberUpdate) -> str | None:
        reason = self._problem(update)
        if reason is not None:
            self.refused += 1
        return reason

    def _problem(self, update: MemberUpdate) -> str | None:
        if not update.signature or not update.certificate:
            return "unsigned"
        signer = self._signer(update.certificate)
        if signer.identity is None or signer.public_key is None:
            return signer.problem
        now = datetime.datetime.now(datetime.timezone.utc)
        if not signer.not_before <= now <= signer.not_after:
            return f"certificate of {signer.identity.name} is not valid now"
        reason = allowed(update.state, update.node_id, update.reporter_id, signer.identity)
        if reason is not None:
            return reason
        payload = signed_bytes(self.cluster_id, update)
        key = hashlib.sha256(payload + update.signature + update.certificate).digest()
        if key in self._checked:
            return None
        try:
            signer.public_key.verify(update.signature, payload, _SIGNATURE)
        except InvalidSignature:
            return f"bad signature (claims {signer.identity.name})"
        self.verified += 1
        if len(self._checked) >= _CACHE_MAX:
            self._checked.clear()
        self._checked[key] = b""
        return None

    def _signer(self, der: bytes) -> _Signer:
        cached = self._signers.get(der)
        if cached is not None:
            return cached
        never = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
        signer = _Signer(None, None, never, never, "")
        try:
            certificate = x509.load_der_x509_certificate(der)
            certificate.verify_directly_issued_by(self._authority)
        except ValueError:
            signer = signer._replace(problem="not a certificate")
        except Exception as error:  # InvalidSignature, TypeError: not the cluster CA's.
            signer = signer._replace(problem=f"certificate not issued by the cluster CA ({type(error).__name__})")
        else:
            identity = ca.identity_of(certificate)
            key = certificate.public_key()
            if identity is None:
                signer = signer._replace(problem="not a pacsnode certificate")
            elif not isinstance(key, ec.EllipticCurvePublicKey):
                signer = signer._replace(problem="not an EC certificate")
            else:
                signer = _Signer(identity, key, certificate.not_valid_before_utc, certificate.not_valid_after_utc, "")
        if len(self._signers) >= _CACHE_MAX:
            self._signers.clear()
        self._signers[der] = signer
        return signer
