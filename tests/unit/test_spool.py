"""node/spool.py: a data set moves to a file past the threshold, the in-memory budget is
reserved and given back, refusals keep nothing, and the one-pass hash and compression
match what the in-memory path computes."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest

from pacsnode.node import codec, spool
from pacsnode.replication.model import content_hash


def _buffer(tmp_path: Path, budget: spool.InflightBudget, *, threshold: int = 10, size_max: int = 1000,
            prefix: bytes | None = b"PREFIX") -> spool.SpoolBuffer:
    return spool.SpoolBuffer(threshold_bytes=threshold, size_max_bytes=size_max, budget=budget,
                             directory=tmp_path / "spool", prefix=lambda: prefix)


def test_small_data_sets_stay_in_memory_within_the_budget(tmp_path: Path) -> None:
    budget = spool.InflightBudget(100)
    buffer = _buffer(tmp_path, budget)
    buffer.write(b"abc")
    buffer.write(b"defg")
    assert not buffer.spooled and buffer.getvalue() == b"abcdefg" and budget.used_bytes == 7
    buffer.close()
    assert budget.used_bytes == 0


def test_past_the_threshold_the_bytes_move_to_a_file_behind_the_prefix(tmp_path: Path) -> None:
    budget = spool.InflightBudget(100)
    buffer = _buffer(tmp_path, budget)
    buffer.write(b"0123456")
    buffer.write(b"789abcdef")
    assert buffer.spooled and budget.used_bytes == 0 and buffer.size_bytes == 16
    path = buffer.finish()
    assert path.read_bytes() == b"PREFIX0123456789abcdef" and buffer.dataset_offset == 6
    assert buffer.getvalue() == b"0123456789abcdef"
    buffer.close()
    assert not path.exists()


def test_a_message_that_is_not_a_c_store_stays_in_memory(tmp_path: Path) -> None:
    budget = spool.InflightBudget(100)
    buffer = _buffer(tmp_path, budget, prefix=None)
    buffer.write(b"x" * 30)
    assert not buffer.spooled and budget.used_bytes == 30
    buffer.close()


@pytest.mark.parametrize(("limit", "size_max", "refusal"), [(5, 1000, spool.Refusal.INFLIGHT),
                                                            (100, 12, spool.Refusal.TOO_LARGE)])
def test_refused_data_sets_keep_nothing(tmp_path: Path, limit: int, size_max: int, refusal: spool.Refusal) -> None:
    budget = spool.InflightBudget(limit)
    buffer = _buffer(tmp_path, budget, size_max=size_max)
    for _ in range(5):
        buffer.write(b"abcdefgh")
    assert buffer.refusal is refusal and buffer.size_bytes == 40
    assert budget.used_bytes == 0 and not buffer.spooled
    assert list((tmp_path / "spool").glob("*")) == []


def test_a_buffer_dropped_without_close_is_cleaned_up(tmp_path: Path) -> None:
    budget = spool.InflightBudget(100)
    buffer = _buffer(tmp_path, budget)
    buffer.write(b"x" * 50)
    path = buffer.finish()
    del buffer
    gc.collect()
    assert not path.exists()


def test_digest_and_compress_match_the_in_memory_path(tmp_path: Path) -> None:
    prefix = codec.part10_prefix("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1")
    dataset = random.Random(5).randbytes(3_000_000) + bytes(2_000_000)  # 5 MB: several chunks.
    path = tmp_path / "instance.dcm"
    path.write_bytes(prefix + dataset)
    budget = spool.InflightBudget(1 << 30)
    hash_value, blob, reserved = spool.digest_and_compress(path, len(prefix), "1.2.840.10008.1.2.1", budget, 1)
    assert hash_value == content_hash("1.2.840.10008.1.2.1", dataset)
    assert codec.decompress(blob) == prefix + dataset
    codec.check_payload(blob, len(prefix) + len(dataset), None)  # Content size and checksum in the frame.
    assert reserved == len(blob) == budget.used_bytes
    with pytest.raises(spool.OverBudget):
        spool.digest_and_compress(path, len(prefix), "1.2.840.10008.1.2.1", spool.InflightBudget(1000), 1)
