"""The cluster certificate authority: one CA key and certificate, node and admin certificates.

`pacsnode ca init DIR` writes `DIR/ca.pem` and `DIR/ca-key.pem`; `pacsnode cert issue
--ca DIR --out OUTDIR NAME [--admin]` writes `OUTDIR/ca.pem`, `OUTDIR/cert.pem` and
`OUTDIR/key.pem`, the directory a node or the CLI takes as `--tls-dir`.

A certificate's identity is its subject: CN = the node id (or the admin's name) and
OU = `pacsnode-node` or `pacsnode-admin`. Node certificates also name, as DNS names,
`PEER_TLS_NAME` (peers dial each other under that name, whatever their address), the
node id and `localhost`, and 127.0.0.1, so that DICOM TLS clients on the machine can check
the host name; `--host` adds more names or addresses.

Keys are ECDSA P-256 (fast handshakes, accepted by OpenSSL/dcmtk and BoringSSL/gRPC),
written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEER_TLS_NAME = "pacsnode-peer"  # Every node certificate names it; every peer channel checks it.
ROLE_NODE = "pacsnode-node"
ROLE_ADMIN = "pacsnode-admin"
ROLE_DICOM = "pacsnode-dicom"  # A DICOM TLS client (modality, viewer): refused on the peer port.
ROLES = (ROLE_NODE, ROLE_ADMIN, ROLE_DICOM)
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
ISSUED_LOG = "issued.jsonl"  # The CA directory's record of what it issued (an audit trail of its own).

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # Same rule as node_id.


class CaError(Exception):
    """The CA or a certificate cannot be made or read (missing files, bad name, ...)."""


@dataclass(frozen=True)
class CertIdentity:
    """Who a certificate names: a node id or an admin name, and which of the two."""

    name: str
    role: str  # ROLE_NODE, ROLE_ADMIN or ROLE_DICOM

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN

    @property
    def is_node(self) -> bool:
        return self.role == ROLE_NODE


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only (created 0600, never world-readable in between)."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def _write_public(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: Path, *, cluster_name: str = "pacsnode", valid_days: int = 3650) -> Path:
    """Create a CA key and self-signed certificate in `directory`; refuses to overwrite one."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_KEY_FILE).exists():
        raise CaError(f"{directory / CA_KEY_FILE} exists: a CA is already there (refusing to overwrite it)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacsnode"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} cluster CA"),
    ])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / CA_KEY_FILE, _key_pem(key))
    _write_public(directory / CA_CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
    return directory / CA_CERT_FILE


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        certificate = x509.load_pem_x509_certificate((ca_dir / CA_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), password=None)
    except FileNotFoundError as error:
        raise CaError(f"no CA in {ca_dir}: {error.filename} is missing (run `pacsnode ca init {ca_dir}`)") from None
    except ValueError as error:
        raise CaError(f"cannot read the CA in {ca_dir}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{ca_dir / CA_KEY_FILE} is not an EC key")
    return certificate, key


def _subject_alternative_names(name: str, client_only: bool, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[str] = [] if client_only else [PEER_TLS_NAME, name, "localhost", "127.0.0.1"]
    names += list(hosts)
    result: list[x509.GeneralName] = []
    for item in dict.fromkeys(names):
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            result.append(x509.DNSName(item))
    return result


def issue(ca_dir: Path, out_dir: Path, name: str, *, admin: bool = False, dicom_client: bool = False,
          valid_days: int = 825, hosts: Sequence[str] = (), not_before: datetime.datetime | None = None
          ) -> CertIdentity:
    """Issue a node certificate (or an admin's, or a DICOM TLS client's) signed by the CA in
    `ca_dir` into `out_dir`.

    `not_before` is for tests (an already expired certificate); by default it is now.
    """
    if not _NAME.match(name):
        raise CaError(f"name must be 1-64 of [A-Za-z0-9_.-] (a node id), got {name!r}")
    if valid_days < 1 and not_before is None:
        raise CaError(f"valid_days must be >= 1, got {valid_days}")
    ca_certificate, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    if admin and dicom_client:
        raise CaError("a certificate is for an admin or a DICOM client, not both")
    role = ROLE_ADMIN if admin else ROLE_DICOM if dicom_client else ROLE_NODE
    client_only = admin or dicom_client
    start = not_before or (_now() - datetime.timedelta(minutes=5))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client_only else [ExtendedKeyUsageOID.SERVER_AUTH,
                                                                     ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacsnode"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    sans = _subject_alternative_names(name, client_only, hosts)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_private(out_dir / KEY_FILE, _key_pem(key))
    _write_public(out_dir / CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM))
    _write_public(out_dir / CA_CERT_FILE, ca_certificate.public_bytes(serialization.Encoding.PEM))
    record = {"time": _now().isoformat(timespec="seconds"), "action": "issue", "name": name, "role": role,
              "serial": f"{certificate.serial_number:x}", "not_after": certificate.not_valid_after_utc.isoformat(),
              "out_dir": str(out_dir)}
    with open(ca_dir / ISSUED_LOG, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return CertIdentity(name, role)


def identity_of(certificate: x509.Certificate) -> CertIdentity | None:
    """The identity a pacsnode certificate names, or None when it names none."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(names) != 1 or len(units) != 1:
        return None
    name, role = str(names[0].value), str(units[0].value)
    if role not in ROLES or not _NAME.match(name):
        return None
    return CertIdentity(name, role)


def identity_of_pem(pem: bytes) -> CertIdentity | None:
    try:
        return identity_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


def describe(path: Path) -> dict[str, str]:
    """A certificate file's identity and validity, for logs and `pacsnode cert show`."""
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    identity = identity_of(certificate)
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "name": identity.name if identity else "",
        "role": identity.role if identity else "",
        "serial": f"{certificate.serial_number:x}",
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
    }
