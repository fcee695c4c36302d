"""A real browser (headless Debian `chromium`) retrieves a study with `fetch`: it asks for zstd
itself (Accept-Encoding: gzip, deflate, br, zstd), the node answers with its stored frames as
stored (Content-Encoding: zstd, several frames one after another), and the browser's decoded
body holds every instance byte for byte. The page hands the body back base64 in its DOM
(`--dump-dom`); chromium's net log says which encoding crossed the wire."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from pacsnode.node.dicomweb_media import MultipartReader
from pacsnode.node.http_server import HttpServer
from pacsnode.node.http_views import StoreReads
from pacsnode.node.metrics import Metrics
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive
from pacsnode.sim.datagen import StudySetSpec, iter_part10
from tests.unit.conftest import to_instance

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium (Debian package) is not installed")

PAGE = """<html><body>waiting<script>
fetch('%s', {headers: {Accept: 'multipart/related; type="application/dicom"; transfer-syntax=*'}})
  .then(reply => reply.arrayBuffer())
  .then(buffer => {
    const bytes = new Uint8Array(buffer);
    let text = '';
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    document.body.textContent = 'BODY ' + btoa(text) + ' END';
  })
  .catch(error => { document.body.textContent = 'ERROR ' + error; });
</script></body></html>"""


def test_chromium_decodes_the_stored_frames_sent_as_stored(tmp_path: Path) -> None:
    studies = list(iter_part10(StudySetSpec(patients=1, instances_per_series=4, rows=256, cols=256, seed=81,
                                            modalities=("CT",), pixel_fill="phantom")))
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=32 * 1024)
    archive = Archive(store)
    for _entry, data in studies:
        archive.store(to_instance(data))
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(), ready=lambda: {"ready": True},
                        instance_size_bytes_max=100_000_000, qido_result_max=10, owns=lambda study: True,
                        local_reads=StoreReads(store, 32 * 1024))
    server.start()
    try:
        page = tmp_path / "page.html"
        page.write_text(PAGE % f"http://127.0.0.1:{server.port}/dicom-web/studies/{studies[0][0]['study_uid']}")
        net_log = tmp_path / "net.json"
        assert CHROMIUM is not None
        done = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                               f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={net_log}",
                               "--net-log-capture-mode=IncludeSensitive", "--virtual-time-budget=20000",
                               "--dump-dom", page.as_uri()], capture_output=True, timeout=180)
        found = re.search(rb"BODY (\S+) END", done.stdout)
        assert found is not None, done.stdout[-500:]
        body = base64.b64decode(found.group(1))
        log = net_log.read_text(errors="replace")
        assert re.search(r"accept-encoding: [^\"]*zstd", log, re.I)
        assert re.search(r"content-encoding: zstd", log, re.I)
    finally:
        server.stop()
        store.close()
    boundary = body.split(b"\r\n", 1)[0][2:].decode("ascii")
    reader = MultipartReader(boundary, part_bytes_max=10_000_000)
    parts = [part.body for part in reader.feed(body)]
    reader.close()
    assert sorted(parts) == sorted(data for _entry, data in studies)
    assert {dcmread(io.BytesIO(part)).Modality for part in parts} == {"CT"}
