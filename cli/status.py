"""`pacsnode status --node HOST:PORT [--json]`: ask a running node over its peer port.

The node asked gives the member list (state, incarnation, generation) and ring ownership;
every member is then asked for its own local figures (instances, bytes, pending hints).
A member that does not answer is shown as unreachable, never skipped; one that left or
was removed is listed but not asked.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import grpc

from pacsnode.node.tls import CLI_SENDER_ID, cli_channel
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc

STATE_NAMES = {
    pb.MEMBER_STATE_ALIVE: "alive",
    pb.MEMBER_STATE_SUSPECT: "suspect",
    pb.MEMBER_STATE_DEAD: "dead",
    pb.MEMBER_STATE_LEFT: "left",
    pb.MEMBER_STATE_REMOVED: "removed",
    pb.MEMBER_STATE_LEAVING: "leaving",
}


UNPROTECTED = ("WARNING: this cluster is UNPROTECTED: its peer port answered in plain text (no TLS), so anyone "
               "who reaches it can read or change the archive. See README, 'A TLS cluster'.")


class StatusError(Exception):
    pass


def _envelope(cluster_id: str, sender_id: str = CLI_SENDER_ID) -> pb.Envelope:
    return pb.Envelope(cluster_id=cluster_id, protocol_version=PROTOCOL_VERSION, sender_id=sender_id,
                       sent_at_ms=int(time.time() * 1000))


def ask(address: str, cluster_id: str, timeout_s: float, tls_dir: str | None = None,
        sender_id: str = CLI_SENDER_ID) -> pb.StatusReply:
    with cli_channel(address, tls_dir) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            reply: pb.StatusReply = stub.Status(pb.StatusRequest(envelope=_envelope(cluster_id, sender_id)),
                                                timeout=timeout_s)
            return reply
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            details = error.details() if hasattr(error, "details") else str(error)
            raise StatusError(f"{address}: {code.name if code else 'error'}: {details}") from None


def collect(address: str, cluster_id: str = "pacsnode", timeout_s: float = 5.0,
            tls_dir: str | None = None, sender_id: str = CLI_SENDER_ID) -> dict[str, Any]:
    """The cluster as the node at `address` sees it, with every member's local figures.

    `tls_dir` is an admin's certificate (the CLI), or a node's own with `sender_id` its node
    id (a node's /api/cluster: the peer guard lets a node certificate speak as its node)."""
    first = ask(address, cluster_id, timeout_s, tls_dir, sender_id)
    nodes = []
    for status in first.members:
        member = status.member
        peer = f"{member.peer_address.host}:{member.peer_address.port}"
        entry: dict[str, Any] = {
            "node_id": member.node_id,
            "state": STATE_NAMES.get(member.state, "unknown"),
            "site": member.site,
            "peer_address": peer,
            "dicom_address": f"{member.dicom_address.ae_title}@{member.dicom_address.host}:{member.dicom_address.port}",
            "generation": member.generation,
            "incarnation": member.incarnation,
            "ring_ownership": round(status.ring_ownership_fraction, 4),
            "reachable": False,
        }
        if entry["state"] in ("left", "removed") and member.node_id != first.envelope.sender_id:
            entry.update(local_instances=None, error=f"{entry['state']}: not asked")  # Gone from the cluster.
            nodes.append(entry)
            continue
        try:
            reply = first if member.node_id == first.envelope.sender_id else ask(peer, cluster_id, timeout_s, tls_dir, sender_id)
            local = reply.local
            entry.update(
                reachable=True,
                local_instances=local.instance_count,
                local_studies=local.study_count,
                received_bytes=local.received_bytes,
                stored_bytes=local.stored_bytes,
                pending_hints=local.hint_count,
                hint_bytes=local.hint_bytes,
                under_replicated_studies=local.under_replicated_study_count,
                transfers=[{"range": [t.range.start, t.range.end], "source": t.source_id,
                            "done_bytes": t.done_bytes, "total_bytes": t.total_bytes} for t in local.transfers],
                disk_free_bytes=local.disk_free_bytes,
                healthy=not local.health.unhealthy,
                health_reason=local.health.reason or "healthy",
                health_detail=local.health.detail,
                io_threads_running=local.health.io_running,
                io_tasks_queued=local.health.io_queued,
                hints_by_owner=[{"owner": h.owner_id, "instances": h.hint_count, "bytes": h.hint_bytes,
                                 "oldest_stored_at_ms": h.oldest_stored_at_ms} for h in local.hints_by_owner],
            )
        except StatusError as error:
            entry.update(local_instances=None, error=str(error))
        nodes.append(entry)
    settings = first.settings
    return {
        "asked": address,
        "node_id": first.envelope.sender_id,
        "cluster_id": cluster_id,
        "ring_version": f"{first.envelope.ring_version:016x}",
        "replication_factor": settings.replication_factor,
        "effective_replication_factor": settings.effective_replication_factor,
        "site_replicas": settings.site_replicas,
        "write_quorum": settings.write_quorum,
        "read_quorum": settings.read_quorum,
        "vnodes": settings.vnodes,
        "peer_tls": bool(tls_dir),  # A TLS node refuses plain text: an answer without TLS means none.
        "nodes": nodes,
        "undelivered_by_site_pair": site_pairs(nodes, int(time.time() * 1000)),
    }


def site_pairs(nodes: list[dict[str, Any]], now_ms: int) -> list[dict[str, Any]]:
    """Copies not yet delivered, per (site holding the hint, site of its owner), with the
    oldest one's age: from every reachable member's hints per owner. A local-scope write
    leaves one such copy per other site until it is delivered."""
    site_of = {node["node_id"]: node["site"] for node in nodes}
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for node in nodes:
        for hint in node.get("hints_by_owner") or []:
            key = (node["site"], site_of.get(hint["owner"], "?"))
            pair = pairs.setdefault(key, {"from_site": key[0], "to_site": key[1], "instances": 0, "bytes": 0,
                                          "oldest_age_ms": 0})
            pair["instances"] += hint["instances"]
            pair["bytes"] += hint["bytes"]
            if hint["oldest_stored_at_ms"]:
                pair["oldest_age_ms"] = max(pair["oldest_age_ms"], max(0, now_ms - hint["oldest_stored_at_ms"]))
    return [pairs[key] for key in sorted(pairs)]


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000  # type: ignore[assignment]
    return str(value)


def render(data: dict[str, Any]) -> str:
    copies = f"N={data['replication_factor']}"
    if data.get("site_replicas"):
        copies += f" per site {data['site_replicas']}"
    lines = [
        f"cluster {data['cluster_id']}  asked {data['node_id']} at {data['asked']}  ring {data['ring_version']}",
        f"{copies} (effective {data['effective_replication_factor']})  "
        f"W={data['write_quorum']}  R={data['read_quorum']}  V={data['vnodes']}",
        "",
    ]
    header = ("NODE", "STATE", "HEALTH", "INC", "GEN", "SITE", "PEER", "DICOM", "RING %", "INSTANCES", "STORED",
              "HINTS")
    rows = [header]
    for node in data["nodes"]:
        state = node["state"] if node["reachable"] else f"{node['state']} (unreachable)"
        if "healthy" not in node:
            health = "-"
        else:
            health = "ok" if node["healthy"] else f"UNHEALTHY ({node['health_reason']})"
        rows.append((
            node["node_id"], state, health, str(node["incarnation"]), str(node["generation"]), node["site"],
            node["peer_address"], node["dicom_address"],
            f"{100 * node['ring_ownership']:.1f}",
            "-" if node.get("local_instances") is None else str(node["local_instances"]),
            _size(node.get("stored_bytes")),
            "-" if node.get("pending_hints") is None else str(node["pending_hints"]),
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not data.get("peer_tls", True):
        lines.append("")
        lines.append(UNPROTECTED)
    pairs = data.get("undelivered_by_site_pair") or []
    if pairs:
        lines.append("")
        lines.append("copies not yet delivered (hints), per site pair:")
        for pair in pairs:
            lines.append(f"  {pair['from_site']} -> {pair['to_site']}: {pair['instances']} instances, "
                         f"{_size(pair['bytes'])}, oldest {pair['oldest_age_ms'] / 1000:.1f} s")
    under = sum(n.get("under_replicated_studies") or 0 for n in data["nodes"])
    lines.append("")
    lines.append(f"under-replicated studies (as their owners count them): {under}")
    for node in data["nodes"]:
        if node.get("healthy") is False:
            lines.append(f"  {node['node_id']} is unhealthy: {node.get('health_detail') or node['health_reason']}; "
                         "it does not ack probes or refute suspicion until its store path answers")
    for node in data["nodes"]:
        for transfer in node.get("transfers") or []:
            done, total = transfer["done_bytes"], transfer["total_bytes"]
            share = f"{100 * done / total:.0f}%" if total else "listing"
            lines.append(f"  {node['node_id']} filling a range from {transfer['source']}: {_size(done)} ({share})")
    return "\n".join(lines)


def main(address: str, *, as_json: bool, cluster_id: str, timeout_s: float, tls_dir: str | None = None) -> int:
    try:
        data = collect(address, cluster_id, timeout_s, tls_dir)
    except StatusError as error:
        print(f"pacsnode status: cannot reach {error}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if as_json else render(data))
    return 0


def metrics(address: str, cluster_id: str = "pacsnode", timeout_s: float = 5.0, prefix: str = "",
            tls_dir: str | None = None) -> dict[str, float]:
    """A node's metrics (Admin.Metrics): dotted names ending with their unit."""
    with cli_channel(address, tls_dir) as channel:
        reply = pb_grpc.AdminStub(channel).Metrics(
            pb.MetricsRequest(envelope=_envelope(cluster_id), name_prefix=prefix), timeout=timeout_s)
    return dict(reply.values)
