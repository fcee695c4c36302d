"""`pacsnode modify` and `pacsnode merge-patient`: ask any node to correct patient/study attributes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc

from pacsnode.cli.status import _envelope
from pacsnode.node.tls import cli_channel
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.replication.correction import CORRECTABLE, InvalidCorrection, check_changes

# The answers, as printed, and the exit code of each (0 only when modified).
_OUTCOMES = {
    pb.MODIFY_OUTCOME_MODIFIED: ("modified", 0),
    pb.MODIFY_OUTCOME_NOT_FOUND: ("not found", 3),
    pb.MODIFY_OUTCOME_INCOMPLETE: ("modified what could be asked; some owners or studies could not be: run it again", 4),
    pb.MODIFY_OUTCOME_QUORUM_FAILED: ("NOT modified: too few replicas made the correction durable; retry", 1),
    pb.MODIFY_OUTCOME_INVALID: ("NOT modified: refused", 2),
    pb.MODIFY_OUTCOME_NOT_JOINED: ("NOT modified: the node is still joining its cluster; retry", 1),
}
_ALLOWED = ", ".join(sorted(CORRECTABLE))


def _common(parser: Any) -> None:
    parser.add_argument("--node", default="127.0.0.1:7001", metavar="HOST:PEERPORT",
                        help="peer port of any live member (default: 127.0.0.1:7001)")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEYWORD=VALUE",
                        help=f"an attribute to change (repeatable); allowed: {_ALLOWED}")
    parser.add_argument("--cluster-id", default="pacsnode", help="cluster id (default: pacsnode)")
    parser.add_argument("--tls-dir", default=None, help="admin certificate directory (pacsnode cert issue --admin) "
                        "for a TLS cluster (default: none: plain text)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up waiting after (default: 600)")


def add_parser(subparsers: Any) -> None:
    modify = subparsers.add_parser(
        "modify", help="correct patient/study attributes of a study on every replica",
        description="Ask the node at --node (any member) to correct attributes of one study. The correction is "
        "a versioned overlay kept on the study's owners (acknowledged once W hold it durably): C-FIND, QIDO and "
        "every retrieval (C-GET, C-MOVE, WADO) return the new values; the bytes received stay stored unchanged. "
        "A later correction of the same attribute wins. On a TLS cluster, --tls-dir must hold an admin "
        "certificate. Exit 0 when modified, 2 when refused, 3 when not found.")
    modify.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    _common(modify)
    merge = subparsers.add_parser(
        "merge-patient", help="move every study of one PatientID under another",
        description="Ask the node at --node to correct every study of PatientID --from to PatientID --to (and "
        "the --set attributes, e.g. the surviving patient's name), as `pacsnode modify` does for one study. "
        "Exit 0 when every study was modified, 3 when no study has that PatientID.")
    merge.add_argument("--from", dest="from_patient", required=True, metavar="PATIENTID")
    merge.add_argument("--to", dest="to_patient", required=True, metavar="PATIENTID")
    _common(merge)


def _changes(pairs: list[str]) -> dict[str, str] | None:
    changes: dict[str, str] = {}
    for pair in pairs:
        keyword, sep, value = pair.partition("=")
        if not sep or not keyword.strip():
            print(f"--set takes KEYWORD=VALUE (got no '=' in an argument; allowed: {_ALLOWED})", file=sys.stderr)
            return None
        changes[keyword.strip()] = value
    return changes


def main(args: argparse.Namespace) -> int:
    name = f"pacsnode {args.command}"
    changes = _changes(args.changes)
    if changes is None:
        return 2
    if args.command == "merge-patient":
        changes["PatientID"] = args.to_patient
    try:
        check_changes(changes)  # The node checks too; this answers at once, naming the attribute.
    except InvalidCorrection as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    if args.command == "merge-patient":
        request = pb.ModifyRequest(envelope=_envelope(args.cluster_id), from_patient_id=args.from_patient,
                                   attributes=changes)
    else:
        request = pb.ModifyRequest(envelope=_envelope(args.cluster_id), study_instance_uid=args.study,
                                   attributes=changes)
    try:
        with cli_channel(args.node, args.tls_dir) as channel:
            reply: pb.ModifyReply = pb_grpc.AdminStub(channel).Modify(request, timeout=args.timeout_s)
    except grpc.RpcError as error:
        print(f"{name}: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    text, code = _OUTCOMES.get(reply.outcome, ("unknown answer", 1))
    print(f"{text} ({reply.studies_count} studies)" + (f": {reply.message}" if reply.message and code else ""),
          file=sys.stdout if code == 0 else sys.stderr)
    return code
