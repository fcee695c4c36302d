"""node/write_trace.py: marks are recorded only when PACSNODE_WRITE_TRACE is set, and reach its file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = ("from pacsnode.node import write_trace\n"
          "write_trace.mark('rx', '1.2.3')\n"
          "write_trace.mark('stored', '1.2.3')\n"
          "print(write_trace.enabled())\n")


def _run(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def test_marks_go_to_the_named_file_at_exit(tmp_path: Path) -> None:
    prefix = tmp_path / "trace"
    assert _run({**os.environ, "PACSNODE_WRITE_TRACE": str(prefix)}) == "True"
    files = list(tmp_path.glob("trace.*"))
    assert len(files) == 1 and files[0].suffix[1:].isdigit()  # <prefix>.<pid>
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [(event, uid) for _ns, event, uid in records] == [("rx", "1.2.3"), ("stored", "1.2.3")]
    assert records[0][0] <= records[1][0]


def test_off_by_default_records_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PACSNODE_WRITE_TRACE"}
    assert _run({**env, "TMPDIR": str(tmp_path)}) == "False"
    assert list(tmp_path.iterdir()) == []
