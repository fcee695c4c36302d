"""Fixtures for the archive-core unit tests: synthetic instances in memory, stores in tmp_path.

Instances come from sim/datagen (deterministic), turned into `Instance` objects the way
the front end does it: Part-10 bytes + the offset where the dataset starts.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble

from pacsnode.node.ingest import instance_from_part10
from pacsnode.node.store import RocksStore
from pacsnode.replication.model import Instance


def dataset_offset(part10: bytes) -> tuple[int, str]:
    """(offset of the dataset after preamble + file meta, transfer syntax UID)."""
    stream = io.BytesIO(part10)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    return stream.tell(), str(meta.TransferSyntaxUID)


def to_instance(part10: bytes) -> Instance:
    offset, transfer_syntax_uid = dataset_offset(part10)
    return instance_from_part10(part10, offset, transfer_syntax_uid)


@pytest.fixture(scope="session")
def make_instance() -> Callable[[bytes], Instance]:
    """Part-10 bytes -> Instance, as the front end builds it."""
    return to_instance


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., RocksStore]]:
    """Open RocksStores under tmp_path (no free-disk floor unless asked); all closed at the end."""
    opened: list[RocksStore] = []

    def _open(name: str = "store", **options: int) -> RocksStore:
        options.setdefault("disk_free_bytes_min", 0)
        store = RocksStore(tmp_path / name, **options)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()
