"""How long one RocksDB write of image blobs holds the GIL (node/store.py's commit).

    .venv/bin/python bench/store_write_hold.py [--commits 500] [--values 4] [--value-bytes 500000]

rocksdict's `Rdict.write(batch, WriteOptions(sync=False))` holds the GIL for the whole
call: the WAL write() and the memtable insert of every value. With image-sized values
that write() can block in the kernel (dirty-page write-back on a busy disk), and while it
does no other thread of the node runs (associations, gRPC handlers, the membership
loop). This writes `--commits` batches of `--values` random values (a group commit of
CT slices) with the store's options, each followed by `flush_wal(True)` (which releases
the GIL), and prints the distribution of the write() call alone and of the sync.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from rocksdict import Options, Rdict, WriteBatch, WriteOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--values", type=int, default=4)
    parser.add_argument("--value-bytes", type=int, default=500_000)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="pacsnode-write-hold-")
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_enable_blob_files(True)
    options.set_min_blob_size(8192)
    db = Rdict(os.path.join(directory, "db"), options)
    unsynced = WriteOptions()
    unsynced.sync = False
    values = [os.urandom(args.value_bytes) for _ in range(args.values)]
    writes: list[float] = []
    syncs: list[float] = []
    print(f"load {os.getloadavg()[0]:.1f}")
    try:
        for commit in range(args.commits):
            batch = WriteBatch(raw_mode=True)
            for index, value in enumerate(values):
                batch.put(b"k%d-%d" % (commit, index), value)
            started = time.perf_counter()
            db.write(batch, unsynced)
            written = time.perf_counter()
            db.flush_wal(True)
            writes.append((written - started) * 1000)
            syncs.append((time.perf_counter() - written) * 1000)
    finally:
        db.close()
        shutil.rmtree(directory, ignore_errors=True)
    for name, values_ms in (("write (GIL held)", writes), ("flush_wal (GIL released)", syncs)):
        ordered = sorted(values_ms)
        pick = lambda q: ordered[int(q * (len(ordered) - 1))]  # noqa: E731
        print(f"{name:25} ms per batch: p50 {pick(0.5):6.2f}  p90 {pick(0.9):6.2f}  p99 {pick(0.99):7.2f}  "
              f"max {ordered[-1]:7.1f}  total {sum(ordered):7.0f}")


if __name__ == "__main__":
    main()
