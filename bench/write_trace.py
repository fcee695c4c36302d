"""Where one instance's write time goes: p50/p90 of each segment from node/write_trace.py records.

    .venv/bin/python bench/write_trace.py DIR/<setup>-*   (bench/cluster.py --trace DIR prints this itself)

Each file is one node process's records (`<setup>-<node>.<pid>`: JSON lines of
[monotonic ns, event, SOP Instance UID]). The entry node is the one with `rx` marks (its
DICOM front end); every other node's marks are an owner's copy. Segments, in path order:

entry:  rx -> archive: the C-STORE handler (header read, compression on the compressor thread)
        archive -> hop: the ClusterArchive's stamp and /metadata entry
        hop -> plan: the association thread's hand-off to the node's event loop
        plan -> put.start: the loop's hand-off of the local copy to a store thread
        put.start -> put.file: the blob file written and fsync'ed
        put.file -> put.end: the RocksDB batch (group commit) with its WAL fsync
        plan -> remote.call: until the send of each owner's copy starts
owner:  remote.call -> peer.rx: the gRPC request, sender to the owner's handler
        peer.rx -> peer.checked: the hop to a store thread and the CRC-32 check
        peer.checked -> put.start: nothing between them since the check and write share a hop
        put.start -> put.file -> put.end: as on the entry node
        put.end -> peer.stored: the hop back to the owner's loop
        peer.stored -> remote.done: the reply, owner to the sender's coroutine
entry:  plan -> quorum: the coordinator's store, until W durable copies
        quorum -> stored: the loop's hand-back to the association thread
        stored -> next rx: the C-STORE-RSP, storescu's next request and its data set
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path


def load(paths: list[Path]) -> dict[str, dict[str, dict[str, int]]]:
    """node -> UID -> event -> ns (the first of each event)."""
    nodes: dict[str, dict[str, dict[str, int]]] = collections.defaultdict(lambda: collections.defaultdict(dict))
    for path in paths:
        node = path.name.rsplit(".", 1)[0].rsplit("-", 1)[-1]
        for line in path.read_text().splitlines():
            ns, event, uid = json.loads(line)
            nodes[node][uid].setdefault(event, ns)
    return nodes


def percentiles(values: list[float]) -> str:
    if not values:
        return "| - | - | 0 |"
    values.sort()
    return f"| {statistics.median(values):.2f} | {values[int(0.9 * (len(values) - 1))]:.2f} | {len(values)} |"


def summary(paths: list[Path]) -> str:
    nodes = load(paths)
    entry = next((n for n, uids in nodes.items() if any("rx" in e for e in uids.values())), None)
    if entry is None:
        return "no entry node (no rx marks) in the trace"
    own = nodes[entry]
    owners = sorted(n for n in nodes if n != entry)
    rows: list[tuple[str, list[float]]] = []

    def segment(label: str, pairs: list[tuple[dict[str, int], str, dict[str, int], str]]) -> None:
        rows.append((label, [(b[eb] - a[ea]) / 1e6 for a, ea, b, eb in pairs if ea in a and eb in b]))

    uids = [u for u, events in own.items() if "rx" in events and "stored" in events]
    for first, second, label in (("rx", "archive", "C-STORE handler: header read, compression"),
                                 ("archive", "hop", "stamp, /metadata entry"),
                                 ("hop", "plan", "association thread -> loop"),
                                 ("plan", "put.start", "loop -> store thread (local copy)"),
                                 ("put.start", "put.file", "local blob file write + fsync"),
                                 ("put.file", "put.end", "local RocksDB batch + WAL fsync")):
        segment(f"entry: {label}", [(own[u], first, own[u], second) for u in uids])
    for owner in owners:
        theirs = nodes[owner]
        call, done = f"remote.call:{owner}", f"remote.done:{owner}"
        segment(f"entry: loop -> send to {owner} starts", [(own[u], "plan", own[u], call) for u in uids])
        for a_side, first, second, label in (
                ("entry", call, "peer.rx", "gRPC request in"),
                ("owner", "peer.rx", "peer.checked", "loop -> store thread, CRC-32 check"),
                ("owner", "peer.checked", "put.start", "check -> write"),
                ("owner", "put.start", "put.file", "blob file write + fsync"),
                ("owner", "put.file", "put.end", "RocksDB batch + WAL fsync"),
                ("owner", "put.end", "peer.stored", "store thread -> loop"),
                ("owner", "peer.stored", done, "gRPC reply back")):
            pairs = [((own if a_side == "entry" else theirs)[u], first,
                      (own if second.startswith("remote.") else theirs)[u], second) for u in uids if u in theirs]
            segment(f"{owner}: {label}", pairs)
        segment(f"entry: whole copy on {owner} (send to reply)", [(own[u], call, own[u], done) for u in uids])
    segment("entry: local copy (loop hand-off to durable)", [(own[u], "plan", own[u], "put.end") for u in uids])
    segment("entry: coordinator until W durable copies", [(own[u], "plan", own[u], "quorum") for u in uids])
    segment("entry: loop -> association thread", [(own[u], "quorum", own[u], "stored") for u in uids])
    segment("entry: whole C-STORE handler (rx -> stored)", [(own[u], "rx", own[u], "stored") for u in uids])
    ordered = sorted(uids, key=lambda u: own[u]["rx"])
    segment("between: stored -> next rx (response, storescu, next data set)",
            [(own[a], "stored", own[b], "rx") for a, b in zip(ordered, ordered[1:])])
    segment("per instance: rx -> next rx", [(own[a], "rx", own[b], "rx") for a, b in zip(ordered, ordered[1:])])
    lines = [f"entry node {entry}, owners {', '.join(owners) or '-'}; {len(uids)} instances; ms", "",
             "| segment | p50 ms | p90 ms | instances |", "|---|---|---|---|"]
    lines += [f"| {label} {percentiles(values)}" for label, values in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary([Path(p) for p in sys.argv[1:]]))
