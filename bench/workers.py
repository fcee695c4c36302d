"""storescu x4 into one node with --dicom-workers K, node CPU per instance summed over the
node and its worker processes (from /proc). A first, small measurement: not yet the rows
the task asks for (pynetdicom x1/x4, storescu x1, Orthanc in the same run); see docs/workers.md.

    .venv/bin/python bench/workers.py 0 2 0 2     # workers=0, 2, 0, 2 in turn
"""
import tempfile
import sys, time, subprocess, shutil, resource
from pathlib import Path
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pacsnode.sim.process import NodeProcess, wait_until
import os, re
def kids(pid):
    out=[]
    for p in os.listdir('/proc'):
        if p.isdigit():
            try: st=open(f'/proc/{p}/stat').read().rsplit(') ',1)[1].split()
            except OSError: continue
            if int(st[1])==pid: out.append(int(p))
    return out
def cpu(pids):
    t=0
    for p in pids:
        try: st=open(f'/proc/{p}/stat').read().rsplit(') ',1)[1].split(); t+=int(st[11])+int(st[12])
        except OSError: pass
    return t/os.sysconf('SC_CLK_TCK')
root = Path(tempfile.gettempdir()) / "pacsnode-bench-workers"; data = root/"data"
if not data.exists():
    data.mkdir(parents=True)
    src = dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(400):
        src.SOPInstanceUID = generate_uid(); src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.StudyInstanceUID = generate_uid() if i % 20 == 0 else src.StudyInstanceUID
        src.save_as(data/f"{i:04d}.dcm", enforce_file_format=True)
files = sorted(data.glob("*.dcm"))
for workers in map(int, sys.argv[1:]):
    d = root/f"node-w{workers}"; shutil.rmtree(d, ignore_errors=True)
    node = NodeProcess(d, node_id="b1", extra_args=["--dicom-workers", str(workers)]).start()
    time.sleep(3)
    pids=[node.process.pid]+kids(node.process.pid)
    cpu0=cpu(pids)
    t0 = time.monotonic()
    chunks = [files[i::4] for i in range(4)]
    ps = [subprocess.Popen(["storescu", "127.0.0.1", str(node.dicom_port), "-aec", "PACSNODE", *map(str, c)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in chunks]
    rcs = [p.wait() for p in ps]
    dt = time.monotonic() - t0
    cpu1=cpu(pids)
    print(f"workers={workers} storescu x4 {len(files)} inst: {len(files)/dt:.0f} inst/s, node CPU {1000*(cpu1-cpu0)/len(files):.1f} ms/inst (summed over node+workers) rcs={rcs}", flush=True)
    node.stop()
    shutil.rmtree(d, ignore_errors=True)
