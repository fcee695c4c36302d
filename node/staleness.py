"""The stale-store rule: a node whose store was out of the cluster longer than the
tombstone grace does not serve it.

Tombstones are purged `tombstone_grace_s` after their delete once every owner holds them
(replication/repair.py). A node that was stopped (or cut off) longer than that may hold an
instance whose tombstone is gone everywhere else: served, or pulled by anti-entropy from
it, that instance would come back. So a running node stamps DATA_DIR/alive.json every
ALIVE_STAMP_INTERVAL_S; at start, a stamp older than the grace means the store is stale:
it is moved aside to DATA_DIR/store.stale-<stamp ms> (kept for the operator, never read)
and the node starts with an empty store, which marks every range it owns pending and
fills it from the current owners before it answers reads for it (as a wiped node does).
Anything acknowledged is on W nodes, so a store set aside loses nothing acknowledged
that the cluster still holds.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ALIVE_FILE = "alive.json"
ALIVE_STAMP_INTERVAL_S = 60.0


def stamp_alive(data_dir: Path, now_ms: int) -> None:
    """Record that the store is in use now (atomic: a crash leaves the old or the new stamp)."""
    path = data_dir / ALIVE_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"at_ms": int(now_ms)}))
    os.replace(temporary, path)


def last_alive_ms(data_dir: Path) -> int | None:
    """The last stamp, or None (a new data dir, or one from before stamps)."""
    try:
        value = json.loads((data_dir / ALIVE_FILE).read_text()).get("at_ms")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def is_stale(last_ms: int | None, now_ms: int, grace_ms: int) -> bool:
    """Pure: whether a store last stamped at `last_ms` is past the grace at `now_ms`."""
    return last_ms is not None and grace_ms > 0 and now_ms - last_ms > grace_ms


def set_stale_store_aside(data_dir: Path, now_ms: int, grace_ms: int, store_name: str = "store") -> Path | None:
    """Apply the rule at start: the path the stale store was moved to, or None if it is not stale."""
    last = last_alive_ms(data_dir)
    store = data_dir / store_name
    if not is_stale(last, now_ms, grace_ms) or not store.exists():
        return None
    aside = data_dir / f"{store_name}.stale-{last}"
    os.replace(store, aside)
    log.error("node.store.stale last_alive_ms=%d down_s=%d tombstone_grace_s=%d moved_to=%s: the store was out of "
              "the cluster longer than the tombstone grace; starting empty and refilling from the owners",
              last, (now_ms - int(last or 0)) // 1000, grace_ms // 1000, aside)
    return aside
