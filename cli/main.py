"""`pacsnode` command line: parse arguments into a NodeConfig and hand it to node/."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from pacsnode.node.config import ConfigError, Destination, NodeConfig, load_toml
from pacsnode.node import write_trace

DEFAULTS = NodeConfig(node_id="node-1")

# Every NodeConfig field is a `start` flag: --data-dir for data_dir, and so on. The help
# text and default come from NodeConfig itself (node/config.py), the one place for both.
START_OPTIONS: list[tuple[str, str, str]] = [
    ("--" + f.name.replace("_", "-"), f.name, str(f.metadata.get("help", "")))
    for f in dataclasses.fields(NodeConfig)
    if f.name not in ("destinations", "seeds", "peer_routes", "known_aes", "site_replicas")
]


def _default_text(name: str) -> str:
    if name == "node_id":
        return "host name"
    value = getattr(DEFAULTS, name)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _start_parser(subparsers: Any, name: str = "start") -> argparse.ArgumentParser:
    if name == "join":
        parser = subparsers.add_parser(
            "join",
            help="start a node that joins the cluster SEED belongs to",
            description="Start a node and join the cluster of SEED (HOST:PORT of any member's peer port). "
            "It becomes an owner of its ranges at once and pulls them from their old replicas; "
            "`pacsnode status` shows the progress. Takes every `start` option.",
        )
        parser.add_argument("seed", metavar="SEED", help="peer port (HOST:PORT) of any member")
    else:
        parser = subparsers.add_parser(
            "start",
            help="start a node (DICOM SCP on an embedded store)",
            description="Start a pacsnode node. Every option can also be set in a TOML file (--config) "
            "under the same name with '_' for '-'; command-line flags win.",
        )
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (default: none)")
    for flag, name, text in START_OPTIONS:
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                            help=f"{text} (default: {_default_text(name)})")
    parser.add_argument(
        "--destination",
        dest="destinations",
        action="append",
        default=argparse.SUPPRESS,
        metavar="AET=HOST:PORT",
        help="C-MOVE destination, repeatable (default: none)",
    )
    parser.add_argument(
        "--seed",
        dest="seeds",
        action="append",
        default=argparse.SUPPRESS,
        metavar="HOST:PORT",
        help="peer port of a node to join through, repeatable (default: none: a cluster of one until others join)",
    )
    parser.add_argument(
        "--peer-route",
        dest="peer_routes",
        action="append",
        default=argparse.SUPPRESS,
        metavar="ADDR=VIA",
        help="dial VIA whenever a peer's advertised address is ADDR (NAT, tunnels, the chaos runner's "
        "fault proxy), repeatable (default: none)",
    )
    parser.add_argument(
        "--known-ae",
        dest="known_aes",
        action="append",
        default=argparse.SUPPRESS,
        metavar="AET[@HOST,...][=SERVICE,...]",
        help="a known AE and what it may do (echo, store, find, get, move, move-to:AET), repeatable "
        "(default: none; see access_mode)",
    )
    parser.add_argument(
        "--site-replicas",
        dest="site_replicas",
        action="append",
        default=argparse.SUPPRESS,
        metavar="SITE=N",
        help="N copies of every study in SITE, on that site's own ring; repeatable, and every node of the cluster "
        "needs the same set; replaces the TOML [site_replicas] table (default: none: --replicas copies spread "
        "over the sites)",
    )
    parser.add_argument("--dead-grace", dest="dead_grace_s", default=argparse.SUPPRESS, metavar="SECONDS",
                        help=f"same as --dead-grace-s (default: {DEFAULTS.dead_grace_s})")
    parser.add_argument("--replicas", dest="replication_factor", default=argparse.SUPPRESS,
                        help=f"same as --replication-factor (N) (default: {DEFAULTS.replication_factor})")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacsnode",
        description="pacsnode: a peer-to-peer replicated DICOM archive (PACS). "
        "`pacsnode start` runs a complete mini-PACS on an embedded store.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _start_parser(subparsers)
    _start_parser(subparsers, "join")
    leave = subparsers.add_parser(
        "leave",
        help="hand a node's ranges to their new owners, then stop it",
        description="Ask the node at --node to leave: it stops owning ring tokens, the new owners pull its "
        "ranges, it drops each range once every new owner holds all of it, then it announces LEFT and exits. "
        "No study has fewer than N copies meanwhile.",
    )
    leave.add_argument("--node", default="127.0.0.1:7001", metavar="HOST:PORT",
                       help="peer port of the node that leaves (default: 127.0.0.1:7001)")
    leave.add_argument("--no-wait", action="store_true", help="return at once instead of showing progress")
    leave.add_argument("--cluster-id", default="pacsnode", help="cluster id (default: pacsnode)")
    leave.add_argument("--tls-dir", default=None, help="admin certificate directory (pacsnode cert issue --admin) "
                        "for a TLS cluster (default: none: plain text)")
    leave.add_argument("--timeout-s", type=float, default=3600.0, help="give up waiting after (default: 3600)")
    remove = subparsers.add_parser(
        "remove",
        help="take a dead node out of the ring at once (survivors re-replicate its data)",
        description="Remove NODE_ID from the ring now instead of after the dead grace period. Ask any live "
        "member (--node). A removed node that is restarted with its data rejoins cleanly.",
    )
    remove.add_argument("node_id", metavar="NODE_ID")
    remove.add_argument("--node", default="127.0.0.1:7001", metavar="HOST:PORT",
                        help="peer port of any live member (default: 127.0.0.1:7001)")
    remove.add_argument("--cluster-id", default="pacsnode", help="cluster id (default: pacsnode)")
    remove.add_argument("--tls-dir", default=None, help="admin certificate directory (pacsnode cert issue --admin) "
                        "for a TLS cluster (default: none: plain text)")
    from pacsnode.cli import delete_command

    delete_command.add_parser(subparsers)
    from pacsnode.cli import modify_command

    modify_command.add_parser(subparsers)
    from pacsnode.sim import cli as sim_cli

    sim_cli.add_parser(subparsers)
    from pacsnode.cli import security

    security.add_parsers(subparsers)
    status = subparsers.add_parser(
        "status",
        help="show a running cluster: members, ring ownership, local instances, pending hints",
        description="Ask a running node over its peer port, then every member it knows.",
    )
    status.add_argument("--node", default="127.0.0.1:7001", metavar="HOST:PORT",
                        help="peer port of any node (default: 127.0.0.1:7001)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table (default: table)")
    status.add_argument("--cluster-id", default="pacsnode", help="cluster id (default: pacsnode)")
    status.add_argument("--tls-dir", default=None, help="admin certificate directory (pacsnode cert issue --admin) "
                        "for a TLS cluster (default: none: plain text)")
    status.add_argument("--timeout-s", type=float, default=5.0, help="per-node timeout (default: 5)")
    return parser


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(load_toml(args.config))
    for _flag, name, _text in START_OPTIONS:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    if hasattr(args, "seeds"):
        values["seeds"] = list(args.seeds)
    if hasattr(args, "peer_routes"):
        values.pop("peer_route", None)
        values["peer_routes"] = list(args.peer_routes)
    if hasattr(args, "site_replicas"):
        values.pop("site_replica", None)
        values["site_replicas"] = list(args.site_replicas)  # Flags replace the TOML table whole.
    if hasattr(args, "known_aes"):
        values.pop("known_ae", None)
        merged_known = [*_as_list_of_known(values.get("known_aes")), *_as_list_of_known(args.known_aes)]
        values["known_aes"] = list({k.ae_title: k for k in merged_known}.values())  # Flags win.
    if hasattr(args, "destinations"):
        # The TOML file may name them `destinations` or `destination` (list or table).
        toml_destinations = [
            *_as_list(values.pop("destination", None) or []),
            *_as_list(values.get("destinations") or []),
        ]
        parsed = [Destination.parse(d) for d in args.destinations]
        merged = {d.ae_title: d for d in (Destination.parse(str(x)) if not isinstance(x, Destination) else x
                                           for x in _as_list(toml_destinations))}
        merged.update({d.ae_title: d for d in parsed})
        values["destinations"] = list(merged.values())
    return NodeConfig.from_mapping(values)


def _as_list_of_known(value: Any) -> list[Any]:
    """Known AEs from the TOML file (strings or a table), to merge with --known-ae flags."""
    from pacsnode.node.config import parse_known_aes

    return list(parse_known_aes(value)) if value else []


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    return list(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "join":
        args.seeds = list(getattr(args, "seeds", [])) + [args.seed]
        args.command = "start"
    if args.command == "leave":
        from pacsnode.cli import membership_commands

        return membership_commands.leave(args.node, cluster_id=args.cluster_id, wait=not args.no_wait,
                                         timeout_s=args.timeout_s, tls_dir=args.tls_dir)
    if args.command == "delete":
        from pacsnode.cli import delete_command

        return delete_command.main(args)
    if args.command in ("modify", "merge-patient"):
        from pacsnode.cli import modify_command

        return modify_command.main(args)
    if args.command == "remove":
        from pacsnode.cli import membership_commands

        return membership_commands.remove(args.node, args.node_id, cluster_id=args.cluster_id, tls_dir=args.tls_dir)
    if args.command == "start":
        try:
            config = config_from_args(args)
        except (ConfigError, ValueError) as error:
            print(f"pacsnode: configuration error: {error}", file=sys.stderr)
            return 2
        from pacsnode.node.server import Node, configure_logging
        from pacsnode.replication.model import StoreError

        configure_logging(config.log_level)
        try:
            node = Node(config)
        except (ConfigError, StoreError) as error:
            print(f"pacsnode: cannot start: {error}", file=sys.stderr)
            return 1
        try:
            node.run_forever()
        except OSError as error:
            print(f"pacsnode: cannot listen on {config.host}:{config.dicom_port}: {error}", file=sys.stderr)
            node.stop()
            return 1
        if node.exit_error:
            print(f"pacsnode: stopped: {node.exit_error}", file=sys.stderr)
            _leave_now(1)
        _leave_now(0)
    if args.command == "sim":
        from pacsnode.sim import cli as sim_cli

        return sim_cli.main(args)
    if args.command == "status":
        from pacsnode.cli import status

        return status.main(args.node, as_json=args.json, cluster_id=args.cluster_id, timeout_s=args.timeout_s,
                           tls_dir=args.tls_dir)
    if args.command in ("ca", "cert", "audit"):
        from pacsnode.cli import security

        return security.main(args)
    parser.print_help()
    return 2


def _leave_now(code: int) -> NoReturn:
    """End the process of a node that has stopped, without the interpreter's teardown.

    By now the node has closed its store (RocksDB flushed and closed), its audit trail and
    its servers, and joined or stopped every thread and worker process it started; what is
    left is the teardown of the modules and C extensions it loaded (gRPC's core, RocksDB,
    numpy, pydicom): measured, a node left 1.0-1.25 s after SIGTERM, 0.45-0.65 s of it after
    `node.stopped`; now 0.6. A restart, and a test suite that starts and stops a few hundred
    nodes, paid it each time. Log handlers are flushed first."""
    write_trace.flush()  # PACSNODE_WRITE_TRACE's marks, when on (they wait for atexit otherwise).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
