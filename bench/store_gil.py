"""How long RocksDB's synced commit keeps other Python threads from running.

    .venv/bin/python bench/store_gil.py [--writes 200] [--pairs 3]

rocksdict's `Rdict.write(batch, sync=True)` holds the GIL for the whole call, fsync
included; `write(batch, sync=False)` followed by `flush_wal(True)` gives the same
durability (the WAL is on disk when flush_wal returns) and releases the GIL during the
sync. node/store.py commits the second way. For each way this writes `--writes` batches
of one 450 KB value (a compressed CT slice) with the store's blob-file options while a
second thread counts as fast as it can; the count per second is how much of the time the
other threads of a node (receiving PDUs, hashing, compressing) could run. Printed in
pairs, the two ways in turn, because the machine's disk and load vary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

from rocksdict import Options, Rdict, WriteBatch, WriteOptions


def measure(way: str, writes: int) -> tuple[float, float]:
    """(ms per commit, other thread's count in millions per second)."""
    directory = tempfile.mkdtemp(prefix="pacsnode-store-gil-")
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_enable_blob_files(True)
    options.set_min_blob_size(8192)
    db = Rdict(os.path.join(directory, "db"), options)
    synced, unsynced = WriteOptions(), WriteOptions()
    synced.sync, unsynced.sync = True, False
    value = os.urandom(450_000)
    stop = threading.Event()
    count = [0]

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
        count[0] = n

    spinner = threading.Thread(target=spin)
    spinner.start()
    started = time.perf_counter()
    try:
        for i in range(writes):
            batch = WriteBatch(raw_mode=True)
            batch.put(b"blob%d" % i, value)
            batch.put(b"meta%d" % i, b"m" * 300)
            if way == "write-sync":
                db.write(batch, synced)
            else:
                db.write(batch, unsynced)
                db.flush_wal(True)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        spinner.join()
        db.close()
        shutil.rmtree(directory, ignore_errors=True)
    return elapsed / writes * 1000, count[0] / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    sys.setswitchinterval(0.0005)
    print(f"load {os.getloadavg()[0]:.1f}")
    for _ in range(args.pairs):
        for way in ("write-sync", "write+flush_wal"):
            ms, rate = measure(way, args.writes)
            print(f"{way:16} {ms:7.2f} ms/commit   other thread {rate:5.2f} M counts/s")


if __name__ == "__main__":
    main()
