"""RocksStore's table options are in effect, at creation and after a reopen: every SST file
written carries a whole-key Bloom filter of BLOOM_BITS_PER_KEY bits a key, the block cache
is BLOCK_CACHE_BYTES and block compression stays zstd (RocksDB's table properties and the
OPTIONS file it writes at open). What the filters save: bench/store_point_reads.py."""

from __future__ import annotations

from collections.abc import Callable
import pytest

from pacsnode.node.store import BLOCK_CACHE_BYTES, BLOOM_BITS_PER_KEY, RocksStore
from pacsnode.replication.model import Instance, StoreOutcome
from pacsnode.sim.datagen import StudySetSpec, iter_part10

OpenStore = Callable[..., RocksStore]

SPEC = StudySetSpec(patients=40, studies_per_patient=2, series_per_study=2, instances_per_series=2, rows=4, cols=4,
                    seed=11)


def _table_properties(store: RocksStore) -> dict[str, str]:
    """RocksDB's aggregated table properties of every SST file of the store."""
    text = store._db.property_value("rocksdb.aggregated-table-properties") or ""
    return dict(item.split("=", 1) for item in text.split("; ") if "=" in item)


def _latest_options_file(store: RocksStore) -> str:
    """The OPTIONS file RocksDB wrote when the store opened (the newest one)."""
    files = sorted((store.path / "rocksdb").glob("OPTIONS-*"), key=lambda path: int(path.name.split("-")[1]))
    return files[-1].read_text()


@pytest.fixture(scope="module")
def instances(make_instance: Callable[[bytes], Instance]) -> list[Instance]:
    return [make_instance(part10) for _entry, part10 in iter_part10(SPEC)]


@pytest.mark.parametrize("reopen", [False, True], ids=["created", "reopened"])
def test_sst_files_carry_bloom_filters_and_the_cache_is_set(open_store: OpenStore, instances: list[Instance],
                                                            reopen: bool) -> None:
    store = open_store()
    if reopen:
        store.close()
        store = open_store()
    for instance in instances:
        assert store.put_instance(instance, now_ms=1) == StoreOutcome.STORED
    store._db.flush()  # the memtable to an SST file, written with the options in effect
    properties = _table_properties(store)
    entries, filter_bytes = int(properties["# entries for filter"]), int(properties["filter block size"])
    assert entries >= 3 * len(instances)  # every key of the store's data (blob, record, metadata...), not a few
    # ~BLOOM_BITS_PER_KEY bits a key (rounded up to 64-byte lines, a few bytes of metadata).
    assert BLOOM_BITS_PER_KEY * 0.9 <= filter_bytes * 8 / entries <= BLOOM_BITS_PER_KEY * 1.5
    assert store._db.property_int_value("rocksdb.block-cache-capacity") == BLOCK_CACHE_BYTES
    options_file = _latest_options_file(store)
    assert "filter_policy=bloomfilter" in options_file
    assert "compression=kZSTD" in options_file
