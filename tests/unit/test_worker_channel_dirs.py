"""Channel directories a killed node left are removed by the next start (node/workers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pacsnode.node.workers import CHANNEL_DIRECTORY_PREFIX, remove_stale_channel_directories


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_nodes_channel_directory_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{CHANNEL_DIRECTORY_PREFIX}{_dead_pid()}-abc123"
    live = tmp_path / f"{CHANNEL_DIRECTORY_PREFIX}{os.getpid()}-def456"
    unnamed = tmp_path / f"{CHANNEL_DIRECTORY_PREFIX}xyz789"  # Made before names carried a PID.
    other = tmp_path / "something-else-1"
    for directory in (dead, live, unnamed, other):
        directory.mkdir()
        (directory / "archive.sock").write_bytes(b"")
    assert remove_stale_channel_directories(str(tmp_path)) == 1
    assert not dead.exists()
    assert live.exists() and unnamed.exists() and other.exists()
    assert remove_stale_channel_directories(str(tmp_path)) == 0
