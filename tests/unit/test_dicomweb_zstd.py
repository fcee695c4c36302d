"""WADO-RS retrieve with Content-Encoding: zstd (node/dicomweb_zstd.py, DicomWeb._zstd_parts):
a real HttpServer over a real RocksStore and the node's StoreReads, read back by clients no
one here wrote: curl --compressed, httpx, and dicomweb-client over a requests session
(urllib3 2.x decodes zstd with backports.zstd). Every stored frame must be on the wire as
stored, every frame a decoder bounded to RFC 9659's 8 MB window reads, and the decoded body
the parts the unencoded answer carries."""

from __future__ import annotations

import dataclasses
import io
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import requests
import zstandard
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from pacsnode.node.blob_files import BlobPointer
from pacsnode.node.correct import corrected
from pacsnode.node.dicomweb_media import MultipartReader, multipart_boundary
from pacsnode.node.dicomweb_zstd import (ZSTD_WINDOW_BYTES_MAX, WindowTooLarge, accepts_zstd, check_frame_header,
                                         encode)
from pacsnode.node.http_server import HttpServer
from pacsnode.node.http_views import StoreReads
from pacsnode.node.metrics import Metrics
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive, InstanceLocation, RetrievePlan
from pacsnode.replication.correction import Correction
from pacsnode.replication.hlc import Version
from pacsnode.replication.matching import Query
from pacsnode.sim.datagen import StudySetSpec, iter_part10

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
BLOB_FILE_BYTES_MIN = 32 * 1024  # 256 x 256 phantom CT: blob files; 64 x 64: RocksDB values.


@pytest.mark.parametrize(("header", "accepted"), [
    (None, False), ("", False), ("zstd", True), ("gzip, deflate, zstd", True), ("ZSTD;q=0.5", True),
    ("zstd;q=0", False), ("zstd;q=0.000", False), ("*", True), ("*;q=0", False), ("gzip, *;q=0.1", True),
    ("*, zstd;q=0", False), ("zstd;q=0, *", False), ("gzip, br", False), ("identity", False),
    ("zstd;q=2", False), ("zstd;q=abc", False), ("zstd ; q=1.0", True), ("gzip;q=1, zstd;q=0.001", True),
])
def test_accept_encoding_is_read_with_its_qvalues(header: str | None, accepted: bool) -> None:
    assert accepts_zstd(header) is accepted


def test_frames_made_here_and_stored_frames_keep_to_rfc_9659s_window() -> None:
    big = bytes(range(256)) * (40 * 1024 * 1024 // 256)  # 40 MB: more than any window.
    made = zstandard.get_frame_parameters(encode(big))
    assert 0 < made.window_size <= ZSTD_WINDOW_BYTES_MAX
    stored = zstandard.ZstdCompressor(level=-1, write_checksum=True).compress(big)
    check_frame_header(stored, len(big))  # The node's own level: 512 KiB.
    long_window = _long_window(big)
    with pytest.raises(WindowTooLarge):
        check_frame_header(long_window, len(big))
    with pytest.raises(ValueError):
        check_frame_header(zstandard.ZstdCompressor(level=1).compress(big), len(big))  # No checksum.
    with pytest.raises(ValueError):
        check_frame_header(stored, len(big) + 1)


def _long_window(data: bytes) -> bytes:
    """A frame with its checksum whose window is 16 MiB (zstd level 19 would declare 8)."""
    parameters = zstandard.ZstdCompressionParameters.from_level(3, window_log=24, write_checksum=1)
    return zstandard.ZstdCompressor(compression_params=parameters).compress(data)


def _parts(content_type: str, body: bytes) -> list[bytes]:
    _type, boundary = multipart_boundary(content_type)
    reader = MultipartReader(boundary, part_bytes_max=100_000_000)
    parts = reader.feed(body)
    reader.close()
    return [part.body for part in parts]


def _decode_bounded(raw: bytes) -> bytes:
    """The content of a zstd stream of several frames, each read by a decoder that refuses a
    window over RFC 9659's bound."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW_BYTES_MAX)
    with decompressor.stream_reader(io.BytesIO(raw), read_across_frames=True) as reader:
        return reader.read()


class _CorrectingArchive(Archive):
    """The single-node Archive with a study correction as the coordinator hands it over:
    in each location, applied by the read (node/correct.py, as ClusterArchive does)."""

    correction = ""

    def locate(self, query: Query) -> RetrievePlan:
        plan = super().locate(query)
        if not self.correction:
            return plan
        return RetrievePlan([dataclasses.replace(location, correction=self.correction, part10_bytes=0)
                             for location in plan.locations], plan.shortfall)

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        part10, offset = super().read(location)
        if not location.correction:
            return part10, offset
        return corrected(part10, offset, location.transfer_syntax_uid, Correction.loads(location.correction))


@dataclasses.dataclass
class _Node:
    url: str
    store: RocksStore
    archive: _CorrectingArchive
    studies: dict[str, list[bytes]]  # Study UID -> its instances' Part-10 bytes.


@pytest.fixture
def node(tmp_path: Path, make_instance: Callable[[bytes], Any]) -> Iterator[_Node]:
    """A study of CT that compresses (phantom): four 256 x 256 (blob files read whole), two
    64 x 64 (RocksDB values); a study of one 1600 x 1600 (a blob file over 2 MB, sent in
    chunks); a study of one kept with a window over 8 MB."""
    slices = StudySetSpec(patients=1, instances_per_series=4, rows=256, cols=256, seed=71, modalities=("CT",),
                          pixel_fill="phantom")
    small = StudySetSpec(patients=1, instances_per_series=2, rows=64, cols=64, seed=72, modalities=("CT",),
                         pixel_fill="phantom")
    big = StudySetSpec(patients=1, instances_per_series=1, rows=1600, cols=1600, seed=73, modalities=("CT",),
                       pixel_fill="phantom")
    wide = StudySetSpec(patients=1, instances_per_series=1, rows=2200, cols=2200, seed=74, modalities=("CT",),
                        pixel_fill="phantom")
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=BLOB_FILE_BYTES_MIN)
    archive = _CorrectingArchive(store)
    studies: dict[str, list[bytes]] = {}
    first_study = ""
    for spec in (slices, small, big, wide):
        for entry, data in iter_part10(spec):
            instance = make_instance(data)
            if spec is small:  # Into the first study, as another series: kept as RocksDB values.
                data = _restudied(data, first_study)
                instance = make_instance(data)
            if spec is wide:
                instance = dataclasses.replace(instance, blob=_long_window(data))
            archive.store(instance)
            studies.setdefault(instance.study_instance_uid, []).append(data)
            first_study = first_study or instance.study_instance_uid
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(), ready=lambda: {"ready": True},
                        instance_size_bytes_max=100_000_000, qido_result_max=10, owns=lambda study: True,
                        local_reads=StoreReads(store, BLOB_FILE_BYTES_MIN))
    server.start()
    try:
        yield _Node(f"http://127.0.0.1:{server.port}", store, archive, studies)
    finally:
        server.stop()
        store.close()


def _restudied(data: bytes, study: str) -> bytes:
    dataset = dcmread(io.BytesIO(data))
    dataset.StudyInstanceUID = study
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()


def _stored_frame(store: RocksStore, study: str, data: bytes) -> tuple[bytes, bool]:
    """An instance's frame as kept, and whether it is a blob file."""
    sop = dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
    found = store.compressed_copy(study, sop)
    assert found is not None
    kept, _record = found
    if isinstance(kept, BlobPointer):
        return store.blob_files.path(kept).read_bytes(), True
    return kept, False


def _curl(url: str, *options: str) -> tuple[dict[str, str], bytes, int]:
    """curl's answer: headers, body, exit status."""
    done = subprocess.run(["curl", "-sS", "-D", "-", "-H", f"Accept: {ACCEPT}", *options, url],
                          capture_output=True, timeout=60)
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body, done.returncode


def test_curl_httpx_and_dicomweb_client_read_the_stored_frames_sent_as_stored(node: _Node) -> None:
    for study, instances in node.studies.items():
        url = f"{node.url}/dicom-web/studies/{study}"
        plain_headers, plain, status = _curl(url)
        assert status == 0 and "content-encoding" not in plain_headers
        headers, decoded, status = _curl(url, "--compressed")
        assert status == 0, study
        assert headers["content-encoding"] == "zstd" and "accept-encoding" in headers["vary"].lower()
        assert "content-length" not in headers
        assert sorted(_parts(headers["content-type"], decoded)) == sorted(instances)
        assert sorted(_parts(headers["content-type"], decoded)) == sorted(_parts(plain_headers["content-type"], plain))
        raw_headers, raw, status = _curl(url, "-H", "Accept-Encoding: zstd")
        assert status == 0 and raw_headers["content-encoding"] == "zstd"
        assert sorted(_parts(raw_headers["content-type"], _decode_bounded(raw))) == sorted(instances)
        for data in instances:
            frame, _file = _stored_frame(node.store, study, data)
            window = zstandard.get_frame_parameters(frame).window_size
            # As stored, byte for byte, unless its window is over the bound.
            assert (frame in raw) is (window <= ZSTD_WINDOW_BYTES_MAX), study
        reply = httpx.get(url, headers={"Accept": ACCEPT, "Accept-Encoding": "zstd"}, timeout=60)
        assert reply.headers["content-encoding"] == "zstd"
        assert sorted(_parts(reply.headers["content-type"], reply.content)) == sorted(instances)
    # The first study: blob files read whole and RocksDB values, both sent as stored.
    first = next(iter(node.studies))
    kinds = {_stored_frame(node.store, first, data)[1] for data in node.studies[first]}
    assert kinds == {True, False}
    # dicomweb-client through requests: urllib3 asks for zstd (it decodes it with backports.zstd).
    session = requests.Session()
    encodings: list[str] = []
    session.hooks["response"].append(lambda response, *a, **k: encodings.append(
        response.headers.get("content-encoding", "")))
    client = DICOMwebClient(url=node.url + "/dicom-web", session=session)
    datasets = client.retrieve_study(first, media_types=(("application/dicom", "*"),))
    assert encodings == ["zstd"]
    expected = {dcmread(io.BytesIO(data)).SOPInstanceUID: dcmread(io.BytesIO(data)) for data in node.studies[first]}
    assert sorted(d.SOPInstanceUID for d in datasets) == sorted(expected)
    for dataset in datasets:
        assert dataset.PixelData == expected[dataset.SOPInstanceUID].PixelData


def test_without_zstd_accepted_the_answer_is_unchanged(node: _Node) -> None:
    study, instances = next(iter(node.studies.items()))
    url = f"{node.url}/dicom-web/studies/{study}"
    for header in ("gzip, deflate", "gzip, zstd;q=0", "identity"):
        reply = httpx.get(url, headers={"Accept": ACCEPT, "Accept-Encoding": header})
        assert reply.status_code == 200 and "content-encoding" not in reply.headers
        assert reply.headers["content-length"] == str(len(reply.content))  # As before: stated length.
        assert "accept-encoding" in reply.headers["vary"].lower()
        assert sorted(_parts(reply.headers["content-type"], reply.content)) == sorted(instances)


def test_a_corrected_study_is_sent_without_the_encoding(node: _Node) -> None:
    study, instances = next(iter(node.studies.items()))
    node.archive.correction = Correction.of(study, {"PatientName": "Corrected^Name"}, Version(1, 0, "a")).dumps()
    reply = httpx.get(f"{node.url}/dicom-web/studies/{study}", headers={"Accept": ACCEPT, "Accept-Encoding": "zstd"})
    assert reply.status_code == 200 and "content-encoding" not in reply.headers
    parts = _parts(reply.headers["content-type"], reply.content)
    assert len(parts) == len(instances) and not set(parts) & set(instances)
    assert {str(dcmread(io.BytesIO(part)).PatientName) for part in parts} == {"Corrected^Name"}


@pytest.mark.parametrize("which", ["whole", "chunked"])
def test_a_corrupt_blob_file_is_not_sent_and_the_body_is_cut_off(node: _Node, which: str) -> None:
    """A blob file read whole that fails its CRC-32 never goes on the wire; a big one sent
    in chunks loses its last chunk; either way the body ends without its closing frame
    (the archive's read of the corrupt copy fails too: a single node has no other copy)."""
    studies = list(node.studies.items())
    study, instances = studies[0] if which == "whole" else studies[1]
    victim = next(data for data in instances if _stored_frame(node.store, study, data)[1])
    sop = dcmread(io.BytesIO(victim), stop_before_pixels=True).SOPInstanceUID
    found = node.store.compressed_copy(study, sop)
    assert found is not None and isinstance(found[0], BlobPointer)
    path = node.store.blob_files.path(found[0])
    frame = path.read_bytes()
    damaged = bytearray(frame)
    damaged[len(damaged) // 3] ^= 0xFF
    path.write_bytes(bytes(damaged))
    url = f"{node.url}/dicom-web/studies/{study}"
    _headers, _body, status = _curl(url, "--compressed")
    assert status != 0  # curl reports the transfer as failed.
    raw = bytearray()
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("GET", url, headers={"Accept": ACCEPT, "Accept-Encoding": "zstd"}) as reply:
            assert reply.headers["content-encoding"] == "zstd"
            for chunk in reply.iter_raw():
                raw += chunk
    assert bytes(damaged[-1024:]) not in raw  # Its end never went out.
    if which == "whole":
        assert bytes(damaged[:4096]) not in raw  # Nor any of it.
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, headers={"Accept": ACCEPT, "Accept-Encoding": "zstd"})


def test_no_write_but_the_last_ends_where_a_frame_ends() -> None:
    """The writes of an encoded body (DicomWeb._zstd_parts through _Unaligned): their bytes
    are the pieces' in order, and none but the last ends at a piece's end (a frame's end:
    httpx 0.29's decoder fails when a read ends there and more follows)."""
    from pacsnode.node.dicomweb import COALESCE_BYTES, SMALL_PART_BYTES, _Unaligned

    pieces = [b"h" * 40, b"s" * 9_000, b"h" * 60, b"B" * (SMALL_PART_BYTES + 5), memoryview(b"m" * 200_000),
              *(b"x" * 30_000 for _ in range(COALESCE_BYTES // 30_000 + 2)), b"t" * 10]
    writes = _Unaligned()
    out: list[bytes] = []
    for piece in pieces:
        out += [bytes(write) for write in writes.put(piece)]
    out.append(writes.end(b"closing"))
    assert b"".join(out) == b"".join(bytes(piece) for piece in pieces) + b"closing"
    frame_ends = set()
    position = 0
    for piece in pieces:
        position += len(piece)
        frame_ends.add(position)
    position = 0
    for write in out[:-1]:
        position += len(write)
        assert position not in frame_ends
    assert any(len(write) >= COALESCE_BYTES - 1 for write in out)  # Small pieces were joined.


def test_a_study_whose_frames_did_not_compress_goes_out_plain(tmp_path: Path,
                                                              make_instance: Callable[[bytes], Any]) -> None:
    """Noise CT is kept as raw zstd blocks (nothing saved): asked with Accept-Encoding:
    zstd, the study goes out as the plain answer (no Content-Encoding, its length stated),
    the stored frames not sent as stored; the phantom study beside it still goes encoded."""
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=BLOB_FILE_BYTES_MIN)
    archive = Archive(store)
    studies: dict[str, list[bytes]] = {}
    for seed, fill in ((81, "noise12"), (82, "phantom")):
        spec = StudySetSpec(patients=1, instances_per_series=3, rows=256, cols=256, seed=seed, modalities=("CT",),
                            pixel_fill=fill)
        for _entry, data in iter_part10(spec):
            instance = make_instance(data)
            archive.store(instance)
            studies.setdefault(fill, []).append(data)
    noise_study = dcmread(io.BytesIO(studies["noise12"][0]), stop_before_pixels=True).StudyInstanceUID
    phantom_study = dcmread(io.BytesIO(studies["phantom"][0]), stop_before_pixels=True).StudyInstanceUID
    frame, is_file = _stored_frame(store, noise_study, studies["noise12"][0])
    assert is_file and len(frame) > 0.99 * len(studies["noise12"][0])  # Raw blocks.
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(), ready=lambda: {"ready": True},
                        instance_size_bytes_max=100_000_000, qido_result_max=10, owns=lambda study: True,
                        local_reads=StoreReads(store, BLOB_FILE_BYTES_MIN))
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/dicom-web/studies/"
        reply = httpx.get(url + noise_study, headers={"Accept": ACCEPT, "Accept-Encoding": "zstd"})
        assert reply.status_code == 200 and "content-encoding" not in reply.headers
        assert reply.headers["content-length"] == str(len(reply.content))
        assert "accept-encoding" in reply.headers["vary"].lower()
        assert sorted(_parts(reply.headers["content-type"], reply.content)) == sorted(studies["noise12"])
        reply = httpx.get(url + phantom_study, headers={"Accept": ACCEPT, "Accept-Encoding": "zstd"})
        assert reply.headers["content-encoding"] == "zstd"
        assert sorted(_parts(reply.headers["content-type"], reply.content)) == sorted(studies["phantom"])
    finally:
        server.stop()
        store.close()
