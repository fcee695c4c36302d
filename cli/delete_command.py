"""`pacsnode delete`: ask any node to delete a study, a series or an instance."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc

from pacsnode.cli.status import _envelope
from pacsnode.node.tls import cli_channel
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc

# The answers, as printed, and the exit code of each (0 only when deleted).
_OUTCOMES = {
    pb.DELETE_OUTCOME_DELETED: ("deleted", 0),
    pb.DELETE_OUTCOME_NOT_FOUND: ("not found", 3),
    pb.DELETE_OUTCOME_INCOMPLETE: ("deleted what the owners asked hold; some could not be asked: run it again", 4),
    pb.DELETE_OUTCOME_QUORUM_FAILED: ("NOT deleted: too few replicas made the delete durable; retry", 1),
    pb.DELETE_OUTCOME_NOT_JOINED: ("NOT deleted: the node is still joining its cluster; retry", 1),
}


def add_parser(subparsers: Any) -> None:
    delete = subparsers.add_parser(
        "delete", help="delete a study, a series or an instance from every replica",
        description="Ask the node at --node (any member) to delete a study, a series or one instance. The "
        "delete is a tombstone on the study's owners, acknowledged once W of them hold it durably; owners that "
        "are down learn it when they are back. A later C-STORE of the same SOP Instance UID is a new instance. "
        "On a TLS cluster, --tls-dir must hold an admin certificate. Exit 0 when deleted, 3 when not found.")
    delete.add_argument("--node", default="127.0.0.1:7001", metavar="HOST:PEERPORT",
                        help="peer port of any live member (default: 127.0.0.1:7001)")
    delete.add_argument("--study", default="", metavar="UID", help="Study Instance UID")
    delete.add_argument("--series", default="", metavar="UID", help="Series Instance UID (with or without --study)")
    delete.add_argument("--instance", default="", metavar="UID", help="SOP Instance UID (with or without --study)")
    delete.add_argument("--cluster-id", default="pacsnode", help="cluster id (default: pacsnode)")
    delete.add_argument("--tls-dir", default=None, help="admin certificate directory (pacsnode cert issue --admin) "
                        "for a TLS cluster (default: none: plain text)")
    delete.add_argument("--timeout-s", type=float, default=600.0, help="give up waiting after (default: 600)")


def main(args: argparse.Namespace) -> int:
    if not (args.study or args.series or args.instance):
        print("pacsnode delete: name --study, --series or --instance", file=sys.stderr)
        return 2
    request = pb.DeleteRequest(envelope=_envelope(args.cluster_id), study_instance_uid=args.study,
                               series_instance_uid=args.series, sop_instance_uid=args.instance)
    try:
        with cli_channel(args.node, args.tls_dir) as channel:
            reply: pb.DeleteReply = pb_grpc.AdminStub(channel).Delete(request, timeout=args.timeout_s)
    except grpc.RpcError as error:
        print(f"pacsnode delete: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    text, code = _OUTCOMES.get(reply.outcome, ("unknown answer", 1))
    what = "study" if not (args.series or args.instance) else ("instance" if args.instance else "series")
    print(f"{what}: {text} ({reply.instances_deleted_count} instances)"
          + (f": {reply.message}" if reply.message and code else ""), file=sys.stdout if code == 0 else sys.stderr)
    return code
