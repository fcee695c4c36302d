"""In-process microbenchmark (not CI) of StoreReads.stored_frame, the read behind an encoded
WADO-RS retrieve (Content-Encoding: zstd), over the 80 phantom CT 512 x 512 of bench/dicomweb.py:
thread CPU per 80 reads, the new one (one pread into a new bytes object) against a read into a
new zero-filled bytearray, in turn, then its pieces. With the node's malloc settings
(node/memory.py). Run: .venv/bin/python bench/zstd_frame_reads.py (from the repository root)."""
import sys, tempfile, time
from pathlib import Path
sys.path.insert(0, ".")
from pacsnode.node.http_views import StoreReads
from pacsnode.node.codec import crc32_of
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive
from pacsnode.sim.datagen import StudySetSpec, iter_part10
from tests.unit.conftest import to_instance
from pacsnode.node.memory import retain_freed_memory; print(retain_freed_memory(134217728))
tmp = Path(tempfile.mkdtemp(prefix="zstd-frame-reads-"))
store = RocksStore(tmp / "store", disk_free_bytes_min=0)
archive = Archive(store)
data = list(iter_part10(StudySetSpec(patients=1, instances_per_series=80, rows=512, cols=512, seed=202, modalities=("CT",), pixel_fill="phantom")))
for _e, p in data: archive.store(to_instance(p))
reads = StoreReads(store, 64*1024)
locs = archive.locate(__import__("pacsnode.replication.matching", fromlist=["Query"]).Query(level="STUDY", conditions=(__import__("pacsnode.replication.matching", fromlist=["Condition"]).Condition("StudyInstanceUID","UI",data[0][0]["study_uid"]),))).locations
def new():
    return [reads.stored_frame(l) for l in locs]
def old():
    out = []
    for l in locs:
        kept, rec = store.compressed_copy(l.study_instance_uid, l.sop_instance_uid)
        blob = store.blob_files.read_into(kept, memoryview(bytearray(kept.size_bytes)), "x")
        assert crc32_of(blob) == kept.crc32
        out.append(blob)
    return out
for name, f in [("old", old), ("new", new)] * 3:
    t = time.thread_time(); 
    for _ in range(20): f()
    print(name, round((time.thread_time() - t) / 20 * 1000, 2), "ms per 80")

import pacsnode.node.codec as codec
print("isal", codec._isal_crc32 is not None)
def cc():
    return [store.compressed_copy(l.study_instance_uid, l.sop_instance_uid) for l in locs]
def rec():
    return [store.instance_record(l.study_instance_uid, l.sop_instance_uid) for l in locs]
kept = [k for k, r in cc()]
def rd():
    return [reads._read_file(k, "x") for k in kept]
blobs = rd()
def crc():
    return [crc32_of(b) for b in blobs]
for name, f in [("compressed_copy", cc), ("record", rec), ("read", rd), ("crc", crc)] * 2:
    t = time.thread_time()
    for _ in range(20): f()
    print(name, round((time.thread_time() - t) / 20 * 1000, 2), "ms per 80")
store.close()
import shutil
shutil.rmtree(tmp, ignore_errors=True)
