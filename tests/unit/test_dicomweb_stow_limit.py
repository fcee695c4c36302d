"""STOW-RS and instance_size_bytes_max: a part over the limit is read on to its end without
keeping its bytes, listed as refused (00081198, 0xA700, its UIDs from the file meta group),
and the parts after it are stored; nothing stored and a part over the limit is 413 with the
reason in the body. A real HttpServer on a free loopback port over a real Archive
(RocksStore), driven by httpx.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from pydicom import dcmread

from pacsnode.node import conformance
from pacsnode.node.dicomweb import STOW_HTTP_STATUS, StowOutcome, stow_outcome
from pacsnode.node.dicomweb_media import BodyCutShort, MultipartReader, OversizedPart, Part
from pacsnode.node.http_server import HttpServer
from pacsnode.node.http_views import StoreHeaders
from pacsnode.node.metrics import Metrics
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive
from pacsnode.sim.datagen import ManifestEntry, StudySetSpec, iter_part10

LIMIT_BYTES = 100_000  # The small instances are ~9 KB, the big one ~525 KB.


@pytest.fixture(scope="module")
def small() -> list[tuple[ManifestEntry, bytes]]:
    spec = StudySetSpec(patients=1, series_per_study=1, instances_per_series=3, seed=21, modalities=("CT",))
    return list(iter_part10(spec))


@pytest.fixture(scope="module")
def big() -> tuple[ManifestEntry, bytes]:
    spec = StudySetSpec(patients=1, series_per_study=1, instances_per_series=1, seed=22, rows=512, cols=512,
                        modalities=("CT",))
    return next(iter_part10(spec))


class _Served:
    def __init__(self, server: HttpServer, store: RocksStore) -> None:
        self.store = store
        self.url = f"http://127.0.0.1:{server.port}/dicom-web"

    def found(self) -> set[str]:
        reply = httpx.get(self.url + "/instances")
        assert reply.status_code in (200, 204)
        return {row["00080018"]["Value"][0] for row in reply.json()} if reply.content else set()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_Served]:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    server = HttpServer(host="127.0.0.1", port=0, archive=Archive(store), metrics=Metrics(lambda: {}),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=LIMIT_BYTES, qido_result_max=100,
                        local_headers=StoreHeaders(store))
    server.start()
    try:
        yield _Served(server, store)
    finally:
        server.stop()
        store.close()


def _stow_body(parts: list[bytes], boundary: str = "XyZ") -> tuple[bytes, dict[str, str]]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def _in_chunks(body: bytes, size: int) -> Iterator[bytes]:
    for index in range(0, len(body), size):
        yield body[index:index + size]


def _patient_values(data: bytes) -> list[str]:
    """The patient's name and ID as they are written in the file (what no log line may hold)."""
    dataset = dcmread(io.BytesIO(data), stop_before_pixels=True)
    return [str(value) for value in (dataset.PatientName, dataset.PatientID) if str(value)]


@pytest.mark.parametrize("chunk_bytes", [0, 1000, 65_536])
def test_a_part_over_the_limit_is_listed_and_the_parts_after_it_are_stored(
        served: _Served, small: list[tuple[ManifestEntry, bytes]], big: tuple[ManifestEntry, bytes],
        chunk_bytes: int) -> None:
    assert len(big[1]) > LIMIT_BYTES > max(len(data) for _entry, data in small)
    body, headers = _stow_body([small[0][1], big[1], small[1][1]])
    content = body if not chunk_bytes else _in_chunks(body, chunk_bytes)
    reply = httpx.post(served.url + "/studies", content=content, headers=headers)
    assert reply.status_code == 202
    result = reply.json()
    assert [item["00081155"]["Value"][0] for item in result["00081199"]["Value"]] == \
        [small[0][0]["sop_uid"], small[1][0]["sop_uid"]]
    [failed] = result["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]
    assert failed["00081155"]["Value"] == [big[0]["sop_uid"]]
    assert "over the size limit" in reply.headers["warning"]
    assert served.found() == {small[0][0]["sop_uid"], small[1][0]["sop_uid"]}


def test_nothing_stored_and_a_part_over_the_limit_is_413_with_the_reason(
        served: _Served, small: list[tuple[ManifestEntry, bytes]], big: tuple[ManifestEntry, bytes],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    body, headers = _stow_body([big[1]])
    reply = httpx.post(served.url + "/studies", content=_in_chunks(body, 8192), headers=headers)
    assert reply.status_code == 413
    assert reply.headers["content-type"].startswith("text/plain")
    assert f"over the size limit of {LIMIT_BYTES} bytes" in reply.text and "nothing was stored" in reply.text
    assert f"the largest {len(big[1])} bytes" in reply.text
    assert served.found() == set()
    lines = [record.getMessage() for record in caplog.records if record.name == "pacsnode.node.dicomweb"]
    assert any(line.startswith("dicomweb.store.too_large ") and f"size_bytes={len(big[1])}" in line
               and f"sop_instance_uid={big[0]['sop_uid']}" in line for line in lines)
    for value in _patient_values(big[1]):
        assert not any(value in line for line in caplog.text.splitlines())
    # A part over the limit and one refused for another reason, nothing stored: still 413.
    body, headers = _stow_body([b"not dicom at all" * 20, big[1]])
    mixed = httpx.post(served.url + "/studies", content=body, headers=headers)
    assert mixed.status_code == 413 and "1 part(s) refused for other reasons" in mixed.text
    # The size limit stays a per-part limit: a body over it made of small parts is stored.
    many = [data for _entry, data in small] * 12
    body, headers = _stow_body(many)
    assert len(body) > LIMIT_BYTES
    assert httpx.post(served.url + "/studies", content=body, headers=headers).status_code == 200


def test_a_body_cut_inside_a_part_over_the_limit(
        served: _Served, small: list[tuple[ManifestEntry, bytes]], big: tuple[ManifestEntry, bytes]) -> None:
    body, headers = _stow_body([big[1]])
    alone = httpx.post(served.url + "/studies", content=body[:LIMIT_BYTES * 2], headers=headers)
    assert alone.status_code == 413 and "ended before its closing delimiter" in alone.text
    body, headers = _stow_body([small[2][1], big[1]])
    after = httpx.post(served.url + "/studies", content=body[:len(small[2][1]) + LIMIT_BYTES * 2],
                       headers=headers)
    assert after.status_code == 202 and "malformed body" in after.headers["warning"]
    result = after.json()
    assert result["00081199"]["Value"][0]["00081155"]["Value"] == [small[2][0]["sop_uid"]]
    assert result["00081198"]["Value"][0]["00081155"]["Value"] == [big[0]["sop_uid"]]
    assert result["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 100, 4096, 10**9])
def test_the_reader_drops_an_oversized_part_in_bounded_memory(chunk_bytes: int) -> None:
    limit = 500
    head = b"DICM-like start " * 10
    bodies = [b"a" * 100, head + b"b" * 5000 + b"\r\n--XyZnot a delimiter" + b"c" * 3000, b"d" * limit,
              b"e" * (limit + 1), b""]
    body, _headers = _stow_body(bodies)
    reader = MultipartReader("XyZ", part_bytes_max=limit)
    parts: list[Part | OversizedPart] = []
    held = 0
    for chunk in _in_chunks(body, chunk_bytes):
        parts += reader.feed(chunk)
        held = max(held, len(reader._buffer))  # noqa: SLF001 (the bound is the point of the test)
    reader.close()
    assert [type(part) for part in parts] == [Part, OversizedPart, Part, OversizedPart, Part]
    assert [part.body for part in parts if isinstance(part, Part)] == [bodies[0], bodies[2], bodies[4]]
    oversized = [part for part in parts if isinstance(part, OversizedPart)]
    assert [part.size_bytes for part in oversized] == [len(bodies[1]), len(bodies[3])]
    assert oversized[0].head.startswith(head) and all(p.headers["content-type"] == "application/dicom"
                                                      for p in oversized)
    assert held <= limit + len(b"\r\n--XyZ") + min(chunk_bytes, len(body)) + 64


def test_the_reader_reports_the_oversized_part_a_body_was_cut_in() -> None:
    body, _headers = _stow_body([b"x" * 2000])
    reader = MultipartReader("XyZ", part_bytes_max=100)
    assert reader.feed(body[:1500]) == []
    with pytest.raises(BodyCutShort) as cut:
        reader.close()
    assert cut.value.oversized is not None and cut.value.oversized.size_bytes > 1400


@pytest.mark.parametrize("counts, outcome", [
    ((3, 0, 0, False), StowOutcome.STORED),
    ((2, 1, 1, False), StowOutcome.SOME_STORED),
    ((2, 0, 0, True), StowOutcome.SOME_STORED),
    ((0, 2, 0, False), StowOutcome.NONE_STORED),
    ((0, 1, 1, False), StowOutcome.TOO_LARGE),
    ((0, 3, 1, True), StowOutcome.TOO_LARGE),
    ((0, 0, 0, True), StowOutcome.MALFORMED),
    ((0, 1, 0, True), StowOutcome.MALFORMED),
    ((0, 0, 0, False), StowOutcome.EMPTY),
])
def test_stow_outcomes(counts: tuple[int, int, int, bool], outcome: StowOutcome) -> None:
    stored, failed, oversized, malformed = counts
    assert stow_outcome(stored=stored, failed=failed, oversized=oversized, malformed=malformed) == outcome


def test_the_conformance_statement_lists_every_stow_outcome_and_its_status() -> None:
    text = conformance.DOCUMENT.read_text()
    section = text[text.index("### 9.4 STOW-RS"):text.index("### 9.5")]
    documented = {(match.group(1), int(match.group(2)))
                  for match in re.finditer(r"^\| (.+?) \| \*\*(\d{3})\*\* \|", section, re.MULTILINE)}
    assert documented == {(outcome.value, status) for outcome, status in STOW_HTTP_STATUS.items()}
