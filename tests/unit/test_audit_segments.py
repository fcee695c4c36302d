"""The audit file is closed into gzip-compressed segments (node/audit.py): nothing lost
while many threads write across a rotation, every message readable in order, a crash's
leftovers finished at the next start, and the CLI reading them all."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from pacsnode.node import audit


def _record(log: audit.AuditLog, n: int) -> None:
    log.record("instances-transferred", action="C", participants=[audit.Participant("CT1", "10.0.0.1")],
               subject=audit.Subject(patient_id=f"P{n}", study_instance_uids=[f"1.2.{n}"], instance_count=1))


def _numbers(path: Path) -> list[int]:
    return [int(next(iter(audit.patients_of(m)))[1:]) for m in audit.read(path)]


def _wait_compressed(path: Path, count: int) -> list[Path]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = audit.segments(path)
        if len(found) >= count and all(p.name.endswith(".gz") for p in found):
            return found
        time.sleep(0.02)
    raise AssertionError(f"segments not compressed: {audit.segments(path)}")


def test_segments_are_closed_compressed_and_read_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, "n1", segment_bytes=4096)
    for n in range(200):  # ~480 bytes a message: ~23 segments.
        _record(log, n)
    found = _wait_compressed(path, 20)
    log.close()
    assert log.segments_closed == len(found) >= 20
    assert path.stat().st_size < 4096
    for segment in found:
        with gzip.open(segment, "rt", encoding="utf-8") as handle:  # What zcat reads.
            lines = handle.read().splitlines()
        assert lines and all(json.loads(line)["AuditSourceIdentification"]["AuditSourceID"] == "n1" for line in lines)
        assert not segment.with_name(segment.name[:-3]).exists()  # The plain copy is gone.
    assert _numbers(path) == list(range(200))
    # Compressed: 200 messages take far less than the bytes written.
    assert sum(p.stat().st_size for p in found) < 200 * 480 / 4


def test_no_line_is_lost_or_split_when_threads_write_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, "n1", segment_bytes=8192)
    threads = [threading.Thread(target=lambda base=base: [_record(log, base + i) for i in range(250)])
               for base in range(0, 2000, 250)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    numbers = _numbers(path)
    assert sorted(numbers) == list(range(2000))
    assert log.written == 2000 and log.failed == 0 and log.segments_closed >= 50


def test_a_crash_before_compression_is_finished_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, "n1", segment_bytes=0)  # Never rotates itself.
    for n in range(5):
        _record(log, n)
    log.close()
    # What a crash can leave: a segment renamed but not compressed, and one compressed
    # whose plain copy was not yet removed, and a half-written .gz.tmp.
    older = path.with_name("audit-20261201T000000000000Z.jsonl")
    newer = path.with_name("audit-20261202T000000000000Z.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    older.write_text("".join(lines[:2]))
    newer.write_text("".join(lines[2:4]))
    path.write_text(lines[4])
    with gzip.open(newer.with_name(newer.name + ".gz"), "wt", encoding="utf-8") as handle:
        handle.write("".join(lines[2:4]))
    newer.with_name(newer.name + ".gz.tmp").write_bytes(b"\x1f\x8b half")
    assert _numbers(path) == [0, 1, 2, 3, 4]  # Readable as it is: the complete .gz counts once.
    log = audit.AuditLog(path, "n1")
    found = _wait_compressed(path, 2)
    _record(log, 5)
    log.close()
    assert [p.name for p in found] == [older.name + ".gz", newer.name + ".gz"]
    assert not older.exists() and not newer.exists()
    assert _numbers(path) == [0, 1, 2, 3, 4, 5]


def test_since_skips_segments_closed_before_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = path.with_name("audit-20200101T000000000000Z.jsonl.gz")
    with gzip.open(old, "wt", encoding="utf-8") as handle:
        handle.write("not json, and never read\n" * 3)
    log = audit.AuditLog(path, "n1")
    _record(log, 7)
    log.close()
    since = datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc)
    assert audit.segment_closed_at(old) == datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    read = list(audit.read(path, since))
    assert len(read) == 1 and audit.patients_of(read[0]) == {"P7"}


def test_pacsnode_audit_reads_compressed_segments(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, "n1", segment_bytes=2048)
    for n in range(12):
        _record(log, n)
    _wait_compressed(path, 2)
    log.close()
    result = subprocess.run([sys.executable, "-m", "pacsnode.cli.main", "audit", "--file", str(path), "--json",
                             "--patient", "P3"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [audit.patients_of(m) for m in printed] == [{"P3"}]
    assert audit.segments(path)[0].name.endswith(".gz")
