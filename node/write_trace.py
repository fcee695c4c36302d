"""Timestamps along one instance's write path, for bench/cluster.py --trace (off by default).

Off unless the environment variable PACSNODE_WRITE_TRACE names a file prefix when the node
starts: then `mark(event, sop_instance_uid)` records (CLOCK_MONOTONIC ns, event, UID), and
the records go to `<prefix>.<pid>` as JSON lines, every WRITE_EVERY records and at exit.
CLOCK_MONOTONIC is one clock for every process of the machine, so the entry node's and
an owner's marks of the same instance can be subtracted (bench/write_trace.py does).
Off, a mark is one function call and one test. Not for production: the records hold
SOP Instance UIDs.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time

ENVIRONMENT = "PACSNODE_WRITE_TRACE"
WRITE_EVERY = 4096

_prefix = os.environ.get(ENVIRONMENT) or None
_records: list[tuple[int, str, str]] | None = [] if _prefix else None
_lock = threading.Lock()


def enabled() -> bool:
    return _records is not None


def mark(event: str, uid: str) -> None:
    """Record that `event` happened now for the instance `uid` (nothing when tracing is off)."""
    if _records is None:
        return
    _records.append((time.monotonic_ns(), event, uid))  # list.append is atomic under the GIL.
    if len(_records) >= WRITE_EVERY:
        flush()


def flush() -> None:
    """Append the records so far to `<prefix>.<pid>`."""
    global _records
    if _records is None or _prefix is None:
        return
    with _lock:
        records, _records = _records, []
        if records:
            with open(f"{_prefix}.{os.getpid()}", "a", encoding="utf-8") as out:
                out.writelines(json.dumps(record) + "\n" for record in records)


if _records is not None:
    atexit.register(flush)
