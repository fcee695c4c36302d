"""Point-read CPU of a RocksStore right after a big ingest, for one tree's store options. By hand:

    <tree>/.venv/bin/python bench/store_point_reads.py build --source STORE --out DIR [--seed 1]
    <tree>/.venv/bin/python bench/store_point_reads.py read --store DIR [--reads 20000]

`build` copies every key and value of STORE (a kept store's directory with rocksdb/ under it,
e.g. what bench/ingest_scale.py or bench/find_cpu.py --store left, opened read-only, never
written) into a new RocksStore at DIR, opened with the running tree's options: one
WriteBatch per study (its s, e, m, b, x... keys together), studies in a shuffled order, as an
ingest writes them, so the memtable fills and flushes to level-0 files as a big ingest's do
(a store fresh from ingest: a few level-0 files whose key ranges all overlap), waiting every
2 000 studies for RocksDB's own compactions to finish, as a real ingest's pace lets them. No
compaction is asked for.

`read` opens DIR with the running tree's options and reads --reads random study (s),
series (e) and instance (m) records by key, one `get` each, and as many keys that are not
there (a study UID one byte off); prints the thread CPU per read (time.thread_time) for each
kind, the level-0 file count and the filter blocks' size (RocksDB properties). Each tree can
read the other's build: a filter in a file is used only by a tree whose options name one.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from rocksdict import AccessType, Options, Rdict, WriteBatch

from pacsnode.node.store import RocksStore

KEY_KINDS = {"study": b"s", "series": b"e", "instance": b"m"}


def _study_of(key: bytes) -> bytes:
    """The token8 + study uid part of a data key (kinds whose key starts <kind><token8><study uid>)."""
    end = key.find(b"\x00", 9)
    return key[1:] if end < 0 else key[1:end]


def build(source: Path, out: Path, seed: int) -> None:
    src = Rdict(str(source / "rocksdb"), Options(raw_mode=True), access_type=AccessType.read_only())
    groups: dict[bytes, list[tuple[bytes, bytes]]] = {}
    others: list[tuple[bytes, bytes]] = []
    for key, value in src.items():
        kind = key[:1]
        if kind in (b"s", b"e", b"m", b"b", b"j", b"t", b"r", b"c"):
            groups.setdefault(_study_of(key), []).append((key, value))
        elif kind == b"x":
            study = key[key.find(b"\x00", key.find(b"\x00") + 1) + 1:]
            groups.setdefault(study, []).append((key, value))
        else:
            others.append((key, value))
    src.close()
    order = list(groups)
    random.Random(seed).shuffle(order)
    store = RocksStore(out)
    db = store._db  # a bench: the store's own RocksDB handle, its options as the tree opens it
    started = time.monotonic()
    for number, study in enumerate(order):
        if number % 2000 == 0:
            _wait_for_compactions(db)
        batch = WriteBatch(raw_mode=True)
        for key, value in groups[study]:
            batch.put(key, value)
        db.write(batch)
    batch = WriteBatch(raw_mode=True)
    for key, value in others:
        batch.put(key, value)
    db.write(batch)
    store.close()
    print(f"built {len(order)} studies, {sum(len(g) for g in groups.values()) + len(others)} keys "
          f"in {time.monotonic() - started:.1f} s")


def _table_property(db: Rdict, name: str) -> str:
    """One of the aggregated table properties of every SST file (RocksDB's text form)."""
    text = db.property_value("rocksdb.aggregated-table-properties") or ""
    for item in text.split("; "):
        if item.startswith(name + "="):
            return item.split("=", 1)[1]
    return "?"


def _wait_for_compactions(db: Rdict) -> None:
    """Let RocksDB's compactions keep up, as they do with a real ingest (~350-650 studies
    a second here; this copy writes ~5 000 a second)."""
    while db.property_int_value("rocksdb.compaction-pending") or \
            db.property_int_value("rocksdb.num-running-compactions"):
        time.sleep(0.05)


def read(path: Path, reads: int, seed: int) -> None:
    store = RocksStore(path)
    db = store._db
    keys: dict[str, list[bytes]] = {name: [] for name in KEY_KINDS}
    for name, prefix in KEY_KINDS.items():
        for key in db.keys(from_key=prefix):
            if not key.startswith(prefix):
                break
            keys[name].append(key)
    rng = random.Random(seed)
    print(f"L0 files {db.property_int_value('rocksdb.num-files-at-level0')}, "
          f"SST bytes {db.property_int_value('rocksdb.total-sst-files-size')}, "
          f"filter block bytes {_table_property(db, 'filter block size')}, "
          f"block cache {db.property_int_value('rocksdb.block-cache-capacity')} bytes")
    # A warm-up over other keys so the index blocks are in memory for every kind alike.
    for key in rng.sample(keys["study"], min(2000, len(keys["study"]))):
        db.get(key)
    for name in ("study", "series", "instance", "missing"):
        pool = keys["study" if name == "missing" else name]
        sample = rng.sample(pool, min(reads, len(pool)))
        if name == "missing":
            sample = [key[:-1] + bytes([key[-1] ^ 1]) for key in sample]
        found = 0
        started = time.thread_time()
        for key in sample:
            found += db.get(key) is not None
        cpu = time.thread_time() - started
        print(f"{name:9s} {len(sample)} reads {found} found: {cpu / len(sample) * 1e6:.2f} us CPU a read")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--source", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=1)
    r = sub.add_parser("read")
    r.add_argument("--store", type=Path, required=True)
    r.add_argument("--reads", type=int, default=20_000)
    r.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()
    if args.command == "build":
        if args.out.exists():
            sys.exit(f"{args.out} exists")
        build(args.source, args.out, args.seed)
    else:
        read(args.store, args.reads, args.seed)


if __name__ == "__main__":
    main()
