"""`pacsnode ca init`, `pacsnode cert issue|show` and `pacsnode audit`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pacsnode.node.config import ConfigError, load_toml


def add_parsers(subparsers: Any) -> None:
    ca = subparsers.add_parser("ca", help="the cluster certificate authority",
                               description="Create the cluster CA whose certificates nodes and the CLI present.")
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="COMMAND")
    init = ca_commands.add_parser("init", help="create a CA key and certificate in DIR",
                                  description="Write DIR/ca.pem and DIR/ca-key.pem (mode 0600). Keep DIR offline: "
                                  "whoever holds ca-key.pem can make certificates for any node.")
    init.add_argument("directory", type=Path, metavar="DIR")
    init.add_argument("--cluster-id", default="pacsnode", help="named in the CA's subject (default: pacsnode)")
    init.add_argument("--days", type=int, default=3650, help="validity (default: 3650)")

    cert = subparsers.add_parser("cert", help="issue or show node and admin certificates")
    cert_commands = cert.add_subparsers(dest="cert_command", metavar="COMMAND")
    issue = cert_commands.add_parser(
        "issue", help="issue a certificate for node NAME (or an admin) into OUTDIR",
        description="Write OUTDIR/ca.pem, OUTDIR/cert.pem and OUTDIR/key.pem (0600): the directory a node "
        "(--tls-dir) or the CLI (status/join/leave/remove --tls-dir) uses. A node certificate's identity is the "
        "node id NAME: that node may only speak as NAME.")
    issue.add_argument("name", metavar="NAME", help="the node id (or the admin's name with --admin)")
    issue.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the CA directory (pacsnode ca init)")
    issue.add_argument("--out", type=Path, required=True, metavar="OUTDIR", help="where to write the files")
    issue.add_argument("--admin", action="store_true", help="an admin certificate for the CLI, not a node")
    issue.add_argument("--dicom-client", action="store_true",
                       help="a DICOM TLS client certificate (modality, viewer); refused on the peer port")
    issue.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                       help="extra DNS name or IP address in the certificate (for DICOM TLS clients that check "
                       "the host name), repeatable (default: localhost and 127.0.0.1 only)")
    issue.add_argument("--days", type=int, default=825, help="validity (default: 825)")
    show = cert_commands.add_parser("show", help="print a certificate's identity and validity")
    show.add_argument("path", type=Path, metavar="CERT_OR_DIR")

    audit = subparsers.add_parser(
        "audit", help="read the audit trail (who stored, queried, retrieved, moved; admin actions)",
        description="Print the node's audit messages (PS3.15 A.5 JSON, one per line in DATA_DIR/audit.jsonl).")
    audit.add_argument("--data-dir", type=Path, default=None, help="the node's data dir (default: pacsnode-data)")
    audit.add_argument("--config", type=Path, default=None, help="the node's TOML file (for data_dir / audit_log)")
    audit.add_argument("--file", type=Path, default=None, help="an audit file to read instead")
    audit.add_argument("--since", default="", help="ISO date/time, or a duration ago such as 2h or 7d")
    audit.add_argument("--patient", default="", metavar="PATIENT_ID",
                       help="only messages about this patient (and the studies the log ties to it)")
    audit.add_argument("--event", default="", help="only this event: query, instances-transferred, "
                       "security-alert, user-authentication, ...")
    audit.add_argument("--json", action="store_true", help="print the messages as JSON lines")


def main(args: argparse.Namespace) -> int:
    from pacsnode.node import ca

    try:
        if args.command == "ca":
            if args.ca_command != "init":
                print("usage: pacsnode ca init DIR", file=sys.stderr)
                return 2
            path = ca.init_ca(args.directory, cluster_name=args.cluster_id, valid_days=args.days)
            print(f"CA written: {path} (key {args.directory / ca.CA_KEY_FILE}, readable by you only)")
            return 0
        if args.command == "cert":
            if args.cert_command == "issue":
                identity = ca.issue(args.ca, args.out, args.name, admin=args.admin, dicom_client=args.dicom_client,
                                    valid_days=args.days, hosts=args.host)
                kind = identity.role.removeprefix("pacsnode-")
                print(f"{kind} certificate for {identity.name} written to {args.out}/ (ca.pem, cert.pem, key.pem)")
                return 0
            if args.cert_command == "show":
                path = args.path / ca.CERT_FILE if args.path.is_dir() else args.path
                print(json.dumps(ca.describe(path), indent=2))
                return 0
            print("usage: pacsnode cert issue|show ...", file=sys.stderr)
            return 2
    except (ca.CaError, OSError, ValueError) as error:
        print(f"pacsnode {args.command}: {error}", file=sys.stderr)
        return 1
    if args.command == "audit":
        return audit_main(args)
    return 2


def audit_file(args: argparse.Namespace) -> Path:
    from pacsnode.node.audit import AUDIT_FILE

    if args.file is not None:
        return Path(args.file)
    values: dict[str, Any] = load_toml(args.config) if args.config is not None else {}
    if values.get("audit_log") and values["audit_log"] != "off":
        return Path(values["audit_log"])
    data_dir = args.data_dir or Path(values.get("data_dir", "pacsnode-data"))
    return Path(data_dir) / AUDIT_FILE


def audit_main(args: argparse.Namespace) -> int:
    from pacsnode.node import audit

    try:
        path = audit_file(args)
        since = audit.parse_since(args.since) if args.since else None
        messages = audit.select(audit.read(path, since), since=since, patient_id=args.patient, event=args.event)
    except (ConfigError, ValueError) as error:
        print(f"pacsnode audit: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"pacsnode audit: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    if args.json:
        for message in messages:
            print(json.dumps(message))
    else:
        print(audit.render(messages))
    return 0
