"""DICOMweb over HTTP: a real HttpServer on a free loopback port over a real Archive
(RocksStore), driven by dicomweb-client (search, retrieve, store) and httpx (status
codes, headers, raw bodies). A subclass of the Archive injects the answers a cluster
gives when it could not ask every owner.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from pacsnode.node.blob_files import CHUNK_BYTES, Part10Stream
from pacsnode.node.dicomweb import OWN_READ_GROUPS_AHEAD, READ_GROUP_INSTANCES
from pacsnode.node.dicomweb_media import MultipartReader, multipart_boundary
from pacsnode.node.http_server import HttpServer
from pacsnode.node.http_views import StoreHeaders, StoreReads
from pacsnode.node.metrics import Metrics
from pacsnode.node.runtime import own_stream_reader
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive, IncompleteAnswer, InstanceLocation, ReadError, RetrievePlan, Shortfall
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import Attributes, CorruptBlob
from pacsnode.sim.datagen import ManifestEntry, StudySetSpec, iter_part10


class _ClusterLikeArchive(Archive):
    """The real single-node Archive; `shortfall` makes finds and locates end as a cluster's
    do when every owner of some studies is down."""

    shortfall = Shortfall()

    def find(self, query: Query, is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[Attributes]:
        yield from super().find(query, is_cancelled)
        if self.shortfall:
            raise IncompleteAnswer(self.shortfall)

    def locate(self, query: Query) -> RetrievePlan:
        plan = super().locate(query)
        return RetrievePlan(plan.locations, self.shortfall)

    unreadable: frozenset[str] = frozenset()  # SOP Instance UIDs whose reads fail (every copy corrupt).

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        if location.sop_instance_uid in self.unreadable:
            raise ReadError(f"instance {location.sop_instance_uid} failed its checksum")
        return super().read(location)


@pytest.fixture(scope="module")
def study_set() -> list[tuple[ManifestEntry, bytes]]:
    spec = StudySetSpec(patients=3, studies_per_patient=1, series_per_study=2, instances_per_series=2, seed=13,
                        modalities=("CT", "MR"))
    return list(iter_part10(spec))


class _Served:
    def __init__(self, server: HttpServer, archive: _ClusterLikeArchive, store: RocksStore) -> None:
        self.server = server
        self.archive = archive
        self.store = store
        self.url = f"http://127.0.0.1:{server.port}"
        self.client = DICOMwebClient(url=self.url + "/dicom-web")


@pytest.fixture
def served(tmp_path: Path, study_set: list[tuple[ManifestEntry, bytes]]) -> Iterator[_Served]:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    archive = _ClusterLikeArchive(store)
    server = HttpServer(host="127.0.0.1", port=0, archive=archive,
                        metrics=Metrics(lambda: {"pacsnode.store.instances_count": 6.0,
                                                 "pacsnode.ring.members_alive_count": 1.0}),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=10_000_000, qido_result_max=4,
                        local_headers=StoreHeaders(store))
    server.start()
    try:
        served = _Served(server, archive, store)
        stored = served.client.store_instances([dcmread(io.BytesIO(data)) for _entry, data in study_set])
        assert len(stored.ReferencedSOPSequence) == len(study_set)
        yield served
    finally:
        server.stop()
        store.close()


def _value(result: dict[str, Any], tag: str) -> Any:
    return result[tag]["Value"][0]


# ------------------------------------------------------------------ QIDO-RS


def test_search_studies_json_and_matching(served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    studies = served.client.search_for_studies()
    assert len(studies) == 3
    first = studies[0]
    assert set(first["00100010"]["Value"][0]) == {"Alphabetic"}  # PN as an object.
    assert isinstance(_value(first, "00201208"), int) and _value(first, "00201208") == 4  # IS as a number.
    assert first["00080090"] == {"vr": "PN"} or "Value" in first["00080090"]  # Empty: no Value key.
    assert _value(first, "00080056") == "ONLINE"
    assert _value(first, "00081190").startswith(served.url + "/dicom-web/studies/")
    entry = study_set[0][0]
    by_id = served.client.search_for_studies(search_filters={"PatientID": entry["patient_id"]})
    assert [_value(s, "0020000D") for s in by_id] == [entry["study_uid"]]
    wildcard = served.client.search_for_studies(search_filters={"PatientName": entry["patient_name"][:3].lower() + "*"})
    assert entry["study_uid"] in [_value(s, "0020000D") for s in wildcard]
    dated = served.client.search_for_studies(search_filters={"StudyDate": f"{entry['study_date']}-"})
    assert all(_value(s, "00080020") >= entry["study_date"] for s in dated) and dated
    uids = f"{study_set[0][0]['study_uid']},{study_set[-1][0]['study_uid']}"
    assert len(served.client.search_for_studies(search_filters={"StudyInstanceUID": uids})) == 2
    with_fields = served.client.search_for_studies(fields=["PatientAge", "00081030"], limit=1)
    assert "00101010" in with_fields[0] and "00081030" in with_fields[0]


def test_pages_and_the_server_limit(served: _Served) -> None:
    every = [_value(s, "0020000D") for s in served.client.search_for_studies()]
    pages = [_value(s, "0020000D") for offset in range(3)
             for s in served.client.search_for_studies(limit=1, offset=offset)]
    assert pages == every  # Stable order across pages.
    reply = httpx.get(served.url + "/dicom-web/instances")
    assert reply.status_code == 200 and len(reply.json()) == 4  # qido_result_max=4 of 12.
    assert 'There are 8 additional results' in reply.headers["warning"]
    # fuzzymatching=true: a name key matches anywhere in the name, in any case; not without it.
    name = _value(served.client.search_for_studies()[0], "00100010")["Alphabetic"]
    middle = name.split("^")[-1][1:4].lower()
    fuzzy = httpx.get(served.url + f"/dicom-web/studies?PatientName={middle}&fuzzymatching=true")
    assert fuzzy.status_code == 200 and "warning" not in fuzzy.headers
    assert name in {_value(s, "00100010")["Alphabetic"] for s in fuzzy.json()}
    assert httpx.get(served.url + f"/dicom-web/studies?PatientName={middle}").json() == []


def test_series_and_instances_nested_and_not(served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    entry = study_set[0][0]
    series = served.client.search_for_series(entry["study_uid"])
    assert len(series) == 2 and {_value(s, "0020000D") for s in series} == {entry["study_uid"]}
    assert "00100010" not in series[0]  # Nested: no study attributes beyond the UID.
    all_series = served.client.search_for_series()
    assert len(all_series) == 4 and "00100010" in all_series[0]  # 6, capped at qido_result_max=4.
    instances = served.client.search_for_instances(entry["study_uid"], entry["series_uid"])
    assert sorted(_value(i, "00080018") for i in instances) == sorted(
        e["sop_uid"] for e, _ in study_set if e["series_uid"] == entry["series_uid"])
    assert isinstance(_value(instances[0], "00280010"), int)  # Rows (US) as a number.
    by_modality = served.client.search_for_series(search_filters={"Modality": "MR"})
    assert by_modality and all(_value(s, "00080060") == "MR" for s in by_modality)
    assert httpx.get(served.url + "/dicom-web/studies?NoSuchKey=1").status_code == 400
    assert httpx.get(served.url + "/dicom-web/studies", headers={"Accept": "application/xml"}).status_code == 406


# ------------------------------------------------------------------ WADO-RS


def _parts(reply: httpx.Response) -> list[bytes]:
    _type, boundary = multipart_boundary(reply.headers["content-type"])
    reader = MultipartReader(boundary, part_bytes_max=10_000_000)
    parts = reader.feed(reply.content)
    reader.close()
    return [part.body for part in parts]


def test_an_unreadable_instance_breaks_the_body_off_after_the_ones_before_it(
        served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    """Reads go in groups (node/dicomweb.py READ_GROUP_INSTANCES), small instances out in
    joined writes (SMALL_PART_BYTES): an instance that cannot
    be read ends the body right there, after the instances before it in its group, and
    without the closing delimiter, so the client sees a failed transfer."""
    study = study_set[0][0]["study_uid"]
    plan = served.archive.locate(Query(level="STUDY", conditions=(Condition("StudyInstanceUID", "UI", study),)))
    order = [location.sop_instance_uid for location in plan.locations]
    assert len(order) == 4
    served.archive.unreadable = frozenset({order[2]})
    try:
        received = bytearray()
        with pytest.raises(httpx.HTTPError):  # Content-Length stated, body cut short.
            with httpx.stream("GET", f"{served.url}/dicom-web/studies/{study}",
                              headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as reply:
                assert reply.status_code == 200
                for chunk in reply.iter_raw():
                    received += chunk
    finally:
        served.archive.unreadable = frozenset()
    by_uid = {entry["sop_uid"]: data for entry, data in study_set}
    assert by_uid[order[0]] in received and by_uid[order[1]] in received
    assert by_uid[order[3]] not in received


def test_retrieve_returns_the_stored_bytes(served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    entry, data = study_set[0]
    url = f"{served.url}/dicom-web/studies/{entry['study_uid']}/series/{entry['series_uid']}/instances/{entry['sop_uid']}"
    reply = httpx.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert reply.status_code == 200 and _parts(reply) == [data]
    study = httpx.get(f"{served.url}/dicom-web/studies/{entry['study_uid']}")
    assert sorted(_parts(study)) == sorted(d for e, d in study_set if e["study_uid"] == entry["study_uid"])
    # Stored bytes as stored: the length comes from the index, stated before the body.
    assert study.headers["content-length"] == str(len(study.content))
    datasets = served.client.retrieve_series(entry["study_uid"], entry["series_uid"],
                                             media_types=(("application/dicom", "*"),))
    assert sorted(d.SOPInstanceUID for d in datasets) == sorted(
        e["sop_uid"] for e, _ in study_set if e["series_uid"] == entry["series_uid"])
    one = served.client.retrieve_instance(entry["study_uid"], entry["series_uid"], entry["sop_uid"])
    assert one.PixelData == dcmread(io.BytesIO(data)).PixelData


def test_retrieve_in_another_syntax_or_406(served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    entry, data = study_set[0]
    url = f"{served.url}/dicom-web/studies/{entry['study_uid']}/series/{entry['series_uid']}/instances/{entry['sop_uid']}"
    implicit = httpx.get(url, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'})
    assert implicit.status_code == 200
    assert implicit.headers.get("transfer-encoding") == "chunked"  # Re-encoded: its length is not known first.
    dataset = dcmread(io.BytesIO(_parts(implicit)[0]))
    assert dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert dataset.PixelData == dcmread(io.BytesIO(data)).PixelData  # Lossless re-encoding.
    jpeg = httpx.get(url, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert jpeg.status_code == 406
    assert httpx.get(url, headers={"Accept": "image/png"}).status_code == 406
    assert httpx.get(f"{served.url}/dicom-web/studies/1.2.3.999").status_code == 404


def test_metadata(served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    entry, data = study_set[0]
    metadata = served.client.retrieve_series_metadata(entry["study_uid"], entry["series_uid"])
    assert len(metadata) == 2
    mine = next(m for m in metadata if _value(m, "00080018") == entry["sop_uid"])
    original = dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert _value(mine, "00280010") == original.Rows
    assert _value(mine, "00083002") == entry["transfer_syntax_uid"]
    # Pixel data (never read into the JSON) is a BulkDataURI under this server's root,
    # and dicomweb-client fetches the stored value there.
    pixel_uri = mine["7FE00010"]["BulkDataURI"]
    assert pixel_uri == (f"{served.url}/dicom-web/studies/{entry['study_uid']}/series/{entry['series_uid']}"
                         f"/instances/{entry['sop_uid']}/bulk/7FE00010")
    assert "Value" not in mine["7FE00010"] and "InlineBinary" not in mine["7FE00010"]
    assert served.client.retrieve_bulkdata(pixel_uri) == [original_pixels(data)]
    missing = httpx.get(pixel_uri.replace("7FE00010", "00100010"))
    assert missing.status_code == 404
    # Built once from the header, then kept beside the index for this content.
    record = served.store.instance_record(entry["study_uid"], entry["sop_uid"])
    assert record is not None
    kept = served.store.instance_header(entry["study_uid"], entry["sop_uid"], record.content_hash)
    assert kept is not None and json.loads(kept)["00080018"]["Value"] == [entry["sop_uid"]]
    assert served.store.instance_header(entry["study_uid"], entry["sop_uid"], "other-content") is None
    study_metadata = served.client.retrieve_study_metadata(entry["study_uid"])
    assert len(study_metadata) == 4
    again = served.client.retrieve_series_metadata(entry["study_uid"], entry["series_uid"])
    assert sorted(json.dumps(m, sort_keys=True) for m in again) == sorted(json.dumps(m, sort_keys=True)
                                                                          for m in metadata)
    # An instance over StoreHeaders' first read (64 KB): built from its first bytes alone,
    # the same JSON as from the whole instance.
    from pacsnode.node.dicomweb_metadata import header_json, with_root
    from pacsnode.node.http_views import HEADER_READ_BYTES

    large = dcmread(io.BytesIO(_relabelled(data, EVRLE)))
    large.Rows, large.Columns, large.BitsAllocated, large.BitsStored, large.HighBit = 256, 256, 16, 12, 11
    large.PixelData = bytes(range(256)) * 512
    served.client.store_instances([large])
    large_bytes = httpx.get(f"{served.url}/dicom-web/studies/{large.StudyInstanceUID}/series/"
                            f"{large.SeriesInstanceUID}/instances/{large.SOPInstanceUID}",
                            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    stored = _parts(large_bytes)[0]
    assert len(stored) > HEADER_READ_BYTES
    built = served.client.retrieve_instance_metadata(large.StudyInstanceUID, large.SeriesInstanceUID,
                                                     large.SOPInstanceUID)
    expected = with_root(header_json(stored, EVRLE, large.StudyInstanceUID, large.SeriesInstanceUID,
                                     large.SOPInstanceUID), served.url + "/dicom-web")
    assert built == json.loads(expected) and built["00280010"]["Value"] == [256]


def original_pixels(data: bytes) -> bytes:
    return bytes(dcmread(io.BytesIO(data)).PixelData)


# ------------------------------------------------------------------ STOW-RS


def _stow_body(parts: list[bytes], boundary: str = "XyZ") -> tuple[bytes, dict[str, str]]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def test_store_duplicates_failures_and_reasons(served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    entry, data = study_set[0]
    body, headers = _stow_body([data])
    duplicate = httpx.post(served.url + "/dicom-web/studies", content=body, headers=headers)
    assert duplicate.status_code == 200  # A duplicate is a success.
    assert duplicate.json()["00081199"]["Value"][0]["00081155"]["Value"] == [entry["sop_uid"]]
    other_study = study_set[-1][1]
    body, headers = _stow_body([data, other_study, b"not dicom at all" * 20])
    mixed = httpx.post(f"{served.url}/dicom-web/studies/{entry['study_uid']}", content=body, headers=headers)
    assert mixed.status_code == 202
    result = mixed.json()
    assert [item["00081155"]["Value"][0] for item in result["00081199"]["Value"]] == [entry["sop_uid"]]
    reasons = [item["00081197"]["Value"][0] for item in result["00081198"]["Value"]]
    assert reasons == [0xA900, 0xC000]
    assert result["00081198"]["Value"][0]["00081155"]["Value"] == [study_set[-1][0]["sop_uid"]]
    assert "Warning" in mixed.headers
    body, headers = _stow_body([b"garbage"])
    assert httpx.post(served.url + "/dicom-web/studies", content=body, headers=headers).status_code == 409
    assert httpx.post(served.url + "/dicom-web/studies", content=b"x",
                      headers={"Content-Type": "application/dicom"}).status_code == 415


def test_store_streams_in_small_chunks(served: _Served) -> None:
    spec = StudySetSpec(patients=1, series_per_study=1, instances_per_series=3, seed=99, rows=128, cols=128)
    new = [data for _entry, data in iter_part10(spec)]
    body, headers = _stow_body(new)

    def chunks() -> Iterator[bytes]:
        for index in range(0, len(body), 1000):
            yield body[index:index + 1000]

    reply = httpx.post(served.url + "/dicom-web/studies", content=chunks(), headers=headers)
    assert reply.status_code == 200 and len(reply.json()["00081199"]["Value"]) == 3
    truncated, headers = _stow_body(new)
    broken = httpx.post(served.url + "/dicom-web/studies", content=truncated[:-100], headers=headers)
    assert broken.status_code == 202 and "malformed body" in broken.headers["warning"]


# ------------------------------------------------------------------ partial answers, CORS, metrics


def test_partial_answers_are_flagged(served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    served.archive.shortfall = Shortfall(studies=1)
    search = httpx.get(served.url + "/dicom-web/studies")
    assert search.status_code == 206
    assert '299 pacsnode "incomplete: 1 study unreachable"' in search.headers["warning"]
    assert len(search.json()) == 3
    nothing = httpx.get(served.url + "/dicom-web/studies?PatientID=nobody")
    assert nothing.status_code == 503 and "incomplete" in nothing.headers["warning"]
    entry = study_set[0][0]
    retrieve = httpx.get(f"{served.url}/dicom-web/studies/{entry['study_uid']}")
    assert retrieve.status_code == 206 and len(_parts(retrieve)) == 4
    missing = httpx.get(f"{served.url}/dicom-web/studies/1.2.3.999")
    assert missing.status_code == 503 and "incomplete" in missing.headers["warning"]
    metadata = httpx.get(f"{served.url}/dicom-web/studies/{entry['study_uid']}/metadata")
    assert metadata.status_code == 206


def test_cors_health_and_metrics(served: _Served) -> None:
    preflight = httpx.options(served.url + "/dicom-web/studies", headers={
        "Origin": "http://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "accept"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    search = httpx.get(served.url + "/dicom-web/studies", headers={"Origin": "http://viewer.example"})
    assert search.headers["access-control-allow-origin"] == "*"
    assert "warning" in search.headers["access-control-expose-headers"].lower()
    assert httpx.get(served.url + "/healthz").text == "ok\n"
    assert httpx.get(served.url + "/readyz").json() == {"ready": True}
    metrics = httpx.get(served.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'pacsnode_http_requests_total{method="GET",route="/dicom-web/studies",status="200"}' in text
    assert 'pacsnode_http_requests_total{method="POST",route="/dicom-web/studies",status="200"} 1.0' in text
    assert "pacsnode_http_request_duration_seconds_bucket" in text
    assert "pacsnode_store_instances 6.0" in text
    assert 'pacsnode_ring_members{state="alive"} 1.0' in text


# ------------------------------------------------------------------ frames, rendered, thumbnail


def _jpeg_instance() -> bytes:
    """A grayscale JPEG baseline instance (Pillow encodes the frame), as Part-10 bytes."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    gradient = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    encoded = io.BytesIO()
    Image.fromarray(gradient, mode="L").save(encoded, format="JPEG", quality=95)
    dataset = Dataset()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.PatientID = "JPEG1"
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = 48, 64
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = encapsulate([encoded.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()


def test_frames_rendered_and_thumbnails(served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    from PIL import Image

    entry, data = study_set[0]
    original = dcmread(io.BytesIO(data))
    frames = served.client.retrieve_instance_frames(entry["study_uid"], entry["series_uid"], entry["sop_uid"], [1])
    assert frames == [original.PixelData]  # Native frames as stored.
    rendered = served.client.retrieve_instance_rendered(entry["study_uid"], entry["series_uid"], entry["sop_uid"],
                                                        media_types=("image/png",))
    image = Image.open(io.BytesIO(rendered))
    assert image.format == "PNG" and image.size == (original.Columns, original.Rows)
    assert image.getextrema()[1] > image.getextrema()[0]  # Not blank.
    base = f"{served.url}/dicom-web/studies/{entry['study_uid']}"
    thumbnail = httpx.get(f"{base}/series/{entry['series_uid']}/thumbnail?viewport=32,32")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 32
    assert httpx.get(f"{base}/thumbnail").status_code == 200
    # Study and series /rendered: a representative frame, at full size unless a viewport is asked.
    series_image = httpx.get(f"{base}/series/{entry['series_uid']}/rendered", headers={"Accept": "image/png"})
    assert series_image.status_code == 200 and series_image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(series_image.content)).size == (original.Columns, original.Rows)
    study_image = httpx.get(f"{base}/rendered?viewport=16,16", headers={"Accept": "image/jpeg"})
    assert study_image.status_code == 200 and max(Image.open(io.BytesIO(study_image.content)).size) <= 16
    assert httpx.get(f"{served.url}/dicom-web/studies/1.2.3.999/rendered").status_code == 404
    assert httpx.get(f"{base}/series/{entry['series_uid']}/instances/{entry['sop_uid']}/frames/2").status_code == 404
    assert httpx.get(f"{base}/series/{entry['series_uid']}/instances/{entry['sop_uid']}/frames/2/rendered"
                     ).status_code == 404  # No such frame (NoSuchFrame), where an undecodable one is 406.
    assert httpx.get(f"{base}/series/{entry['series_uid']}/instances/{entry['sop_uid']}/rendered",
                     headers={"Accept": "image/gif"}).status_code == 406

    jpeg = _jpeg_instance()
    stored = dcmread(io.BytesIO(jpeg))
    served.client.store_instances([stored])
    path = (f"{served.url}/dicom-web/studies/{stored.StudyInstanceUID}/series/{stored.SeriesInstanceUID}"
            f"/instances/{stored.SOPInstanceUID}")
    reply = httpx.get(path + "/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    from pydicom.encaps import generate_frames
    assert _parts(reply) == list(generate_frames(stored.PixelData, number_of_frames=1))  # Encoded bytes as stored.
    decoded = httpx.get(path + "/frames/1", headers={
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'})
    assert decoded.status_code == 200  # Decoded when only uncompressed frames are accepted.
    assert _parts(decoded) == [stored.pixel_array.tobytes()]
    picture = httpx.get(path + "/rendered", headers={"Accept": "image/jpeg"})
    assert picture.status_code == 200
    assert Image.open(io.BytesIO(picture.content)).size == (64, 48)


EVRLE = "1.2.840.10008.1.2.1"


def _relabelled(part10: bytes, syntax: str) -> bytes:
    """The instance under a new SOPInstanceUID, written in `syntax` (pixel data as it is)."""
    from pydicom.uid import generate_uid

    dataset = dcmread(io.BytesIO(part10))
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.file_meta.TransferSyntaxUID = syntax
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()


def test_retrieve_converts_native_and_decodes_compressed_only_when_asked(
        served: _Served, study_set: list[tuple[ManifestEntry, bytes]]) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

    jpeg = dcmread(io.BytesIO(_jpeg_instance()))
    deflated = dcmread(io.BytesIO(_relabelled(study_set[0][1], DeflatedExplicitVRLittleEndian)))
    # No installed handler decodes video: labelled H.264, the JPEG frame is never decoded.
    video = dcmread(io.BytesIO(_relabelled(_jpeg_instance(), "1.2.840.10008.1.2.4.102")))
    served.client.store_instances([jpeg, deflated, video])

    def url(dataset: Dataset) -> str:
        return (f"{served.url}/dicom-web/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
                f"/instances/{dataset.SOPInstanceUID}")

    def get(dataset: Dataset, syntax: str | None) -> Dataset:
        if syntax == ImplicitVRLittleEndian:  # dicomweb-client does not ask for Implicit VR.
            reply = httpx.get(url(dataset), headers={
                "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'})
            assert reply.status_code == 200
            return dcmread(io.BytesIO(_parts(reply)[0]))
        return served.client.retrieve_instance(dataset.StudyInstanceUID, dataset.SeriesInstanceUID,
                                               dataset.SOPInstanceUID, media_types=(("application/dicom", syntax),)
                                               if syntax else None)

    # The default path sends the stored bytes: nothing decoded.
    assert get(jpeg, None).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    # Asked by name: the JPEG frame decoded by pydicom's handler, the instance's UIDs kept.
    decoded = get(jpeg, EVRLE)
    assert decoded.file_meta.TransferSyntaxUID == EVRLE and decoded.SOPInstanceUID == jpeg.SOPInstanceUID
    assert (decoded.pixel_array == jpeg.pixel_array).all() and decoded.pixel_array.std() > 0
    assert get(jpeg, ImplicitVRLittleEndian).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    # Deflated: inflated and re-encoded, the pixel values as they were.
    inflated = get(deflated, ImplicitVRLittleEndian)
    assert inflated.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert inflated.PixelData == dcmread(io.BytesIO(study_set[0][1])).PixelData
    assert get(deflated, EVRLE).PatientID == deflated.PatientID
    # 406 for what cannot be produced: a syntax with no decoder here, or an encoding.
    def status(dataset: Dataset, syntax: str) -> int:
        return httpx.get(url(dataset), headers={"Accept": f'multipart/related; type="application/dicom"; '
                                                          f"transfer-syntax={syntax}"}).status_code

    assert status(video, EVRLE) == 406
    assert status(jpeg, "1.2.840.10008.1.2.4.90") == 406
    assert status(video, "1.2.840.10008.1.2.4.102") == 200


@pytest.mark.parametrize("tool, syntax", [(["dcmcjpeg", "--encode-lossless-sv1"], "1.2.840.10008.1.2.4.70"),
                                          (["dcmcjpls", "--encode-lossless"], "1.2.840.10008.1.2.4.80")])
def test_jpeg_lossless_and_jpeg_ls_are_rendered_and_decoded_when_asked(
        served: _Served, study_set: list[tuple[ManifestEntry, bytes]], tmp_path: Path, tool: list[str],
        syntax: str) -> None:
    """The lossless syntaxes modalities send most (JPEG lossless SV1, JPEG-LS), as dcmtk
    encodes them: /rendered and /thumbnail decode them (GDCM through pydicom), and a WADO-RS
    client that names Explicit VR Little Endian gets the original pixel values. The default
    retrieve still sends the stored bytes, undecoded."""
    import subprocess

    from PIL import Image

    _entry, data = study_set[0]
    (tmp_path / "native.dcm").write_bytes(data)
    subprocess.run([*tool, str(tmp_path / "native.dcm"), str(tmp_path / "coded.dcm")], check=True, timeout=60)
    coded = dcmread(tmp_path / "coded.dcm")
    assert coded.file_meta.TransferSyntaxUID == syntax
    from pydicom.uid import generate_uid
    coded.SOPInstanceUID = coded.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # Not the stored native one.
    original = dcmread(io.BytesIO(data))
    served.client.store_instances([coded])
    path = (f"{served.url}/dicom-web/studies/{coded.StudyInstanceUID}/series/{coded.SeriesInstanceUID}"
            f"/instances/{coded.SOPInstanceUID}")
    picture = httpx.get(path + "/rendered", headers={"Accept": "image/png"})
    assert picture.status_code == 200
    image = Image.open(io.BytesIO(picture.content))
    assert image.size == (original.Columns, original.Rows) and image.getextrema()[1] > image.getextrema()[0]
    assert httpx.get(path + "/thumbnail?viewport=32,32").status_code == 200
    decoded = served.client.retrieve_instance(coded.StudyInstanceUID, coded.SeriesInstanceUID, coded.SOPInstanceUID,
                                              media_types=(("application/dicom", EVRLE),))
    assert decoded.file_meta.TransferSyntaxUID == EVRLE
    assert (decoded.pixel_array == original.pixel_array).all()  # Lossless, both ways.
    assert served.client.retrieve_instance(coded.StudyInstanceUID, coded.SeriesInstanceUID,
                                           coded.SOPInstanceUID).file_meta.TransferSyntaxUID == syntax


def _multiframe(tool: list[str], tmp_path: Path) -> tuple[Dataset, Dataset]:
    """A 3-frame 64 x 64 instance (12 bits of noise in 16: different frames), native and
    encoded by `tool`: dcmtk's dcmcjpeg/dcmcjpls, or "gdcm" (python-gdcm, JPEG 2000 lossless)."""
    import subprocess

    from pacsnode.sim.datagen import make_large_instance

    _entry, data = make_large_instance(size_bytes=3 * 64 * 64 * 2, rows=64, cols=64, seed=41)
    native, coded = tmp_path / "native.dcm", tmp_path / "coded.dcm"
    native.write_bytes(data)
    if tool == ["gdcm"]:
        import gdcm

        reader = gdcm.ImageReader()
        reader.SetFileName(str(native))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEG2000Lossless))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(coded))
        assert writer.Write()
    else:
        subprocess.run([*tool, str(native), str(coded)], check=True, timeout=60)
    return dcmread(native), dcmread(coded)


@pytest.mark.parametrize("tool, syntax", [(["dcmcjpeg", "--encode-lossless-sv1"], "1.2.840.10008.1.2.4.70"),
                                          (["dcmcjpls", "--encode-lossless"], "1.2.840.10008.1.2.4.80"),
                                          (["gdcm"], "1.2.840.10008.1.2.4.90")])
def test_frames_of_a_compressed_instance_are_decoded_when_only_uncompressed_ones_are_accepted(
        served: _Served, tmp_path: Path, tool: list[str], syntax: str) -> None:
    """dicomweb-client asking frames as application/octet-stream (with Explicit VR Little
    Endian named, or no syntax: PS3.18's default for octet-stream) of a JPEG lossless, a
    JPEG-LS and a JPEG 2000 multi-frame instance gets each asked frame decoded, in the
    asked order, equal to the original pixel values and to the frame of the instance
    converted to Explicit VR Little Endian (the same decode). A client that accepts the
    stored form still gets the encoded frames byte for byte."""
    from pydicom.encaps import generate_frames

    native, coded = _multiframe(tool, tmp_path)
    assert coded.file_meta.TransferSyntaxUID == syntax and int(coded.NumberOfFrames) == 3
    served.client.store_instances([coded])
    uids = (coded.StudyInstanceUID, coded.SeriesInstanceUID, coded.SOPInstanceUID)
    size = 64 * 64 * 2
    original = [native.PixelData[index * size:(index + 1) * size] for index in range(3)]
    assert len(set(original)) == 3
    for media_types in ((("application/octet-stream", EVRLE),), ("application/octet-stream",)):
        assert served.client.retrieve_instance_frames(*uids, [2, 1], media_types=media_types) == \
            [original[1], original[0]]
    assert served.client.retrieve_instance_frames(*uids, [3, 3], media_types=("application/octet-stream",)) == \
        [original[2], original[2]]
    converted = served.client.retrieve_instance(*uids, media_types=(("application/dicom", EVRLE),))
    assert converted.PixelData == b"".join(original)
    path = f"{served.url}/dicom-web/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/frames/2,1"
    reply = httpx.get(path, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    assert b"Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1\r\n" in reply.content
    # The stored form accepted: the encoded frames as stored, undecoded, as before.
    encoded = list(generate_frames(coded.PixelData, number_of_frames=3))
    codec = {"1.2.840.10008.1.2.4.70": "image/jpeg", "1.2.840.10008.1.2.4.80": "image/jls"}.get(syntax, "image/jp2")
    for accept in ('multipart/related; type="application/octet-stream"; transfer-syntax=*',
                   f'multipart/related; type="{codec}"', "*/*",
                   f'multipart/related; type="application/octet-stream", multipart/related; type="{codec}"'):
        stored = httpx.get(path, headers={"Accept": accept})
        assert stored.status_code == 200 and _parts(stored) == [encoded[1], encoded[0]], accept
    assert served.client.retrieve_instance_frames(*uids, [1]) == [encoded[0]]  # Its default: type="*/*".
    # Frames beyond NumberOfFrames and bad lists as before.
    assert httpx.get(path.replace("2,1", "4"), headers={
        "Accept": 'multipart/related; type="application/octet-stream"'}).status_code == 404
    assert httpx.get(path.replace("2,1", "x"), headers={
        "Accept": 'multipart/related; type="application/octet-stream"'}).status_code == 400


def _pillow_jpeg(rgb: Any) -> Dataset:
    """An RGB image through Pillow's JPEG encoder (YCbCr 4:2:0 in the code stream),
    labelled YBR_FULL_422 as PS3.3 C.7.6.3.1.2 allows for 4:2:0 too."""
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    encoded = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(encoded, format="JPEG", quality=95)
    dataset = Dataset()
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.PatientID = "JPEGRGB"
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = rgb.shape[0], rgb.shape[1]
    dataset.SamplesPerPixel = 3
    dataset.PhotometricInterpretation = "YBR_FULL_422"
    dataset.PlanarConfiguration = 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = encapsulate([encoded.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    part10 = io.BytesIO()
    dataset.save_as(part10, enforce_file_format=True)
    return dcmread(io.BytesIO(part10.getvalue()))


def _rgb_by_metadata(frame: bytes, metadata: dict[str, Any]) -> Any:
    """A native frame turned into RGB the way a client reads it: by the Photometric
    Interpretation, Rows and Columns of the instance's /metadata (PS3.3 C.7.6.3.1.2: a
    native YBR_FULL_422 frame holds Y1 Y2 Cb Cr for each pair of pixels)."""
    import numpy as np
    from pydicom.pixels import convert_color_space

    photometric = metadata["00280004"]["Value"][0]
    rows, columns = metadata["00280010"]["Value"][0], metadata["00280011"]["Value"][0]
    samples = np.frombuffer(frame, dtype=np.uint8)
    if photometric == "RGB":
        return samples.reshape(rows, columns, 3)
    if photometric == "YBR_FULL":
        return convert_color_space(samples.reshape(rows, columns, 3), "YBR_FULL", "RGB")
    assert photometric == "YBR_FULL_422", photometric
    assert len(frame) == rows * columns * 2, "a native YBR_FULL_422 frame has two samples a pixel"
    pairs = samples.reshape(rows, columns // 2, 4)
    full = np.empty((rows, columns, 3), dtype=np.uint8)
    full[:, 0::2, 0], full[:, 1::2, 0] = pairs[..., 0], pairs[..., 1]
    for pixel in (0, 1):
        full[:, pixel::2, 1], full[:, pixel::2, 2] = pairs[..., 2], pairs[..., 3]
    return convert_color_space(full, "YBR_FULL", "RGB")


@pytest.mark.parametrize("source", ["SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_+eb+cy+s4.dcm", "pillow-4:2:0"])
def test_colour_jpeg_frames_decoded_are_in_the_colour_space_metadata_gives(served: _Served, source: str) -> None:
    """JPEG baseline YCbCr (dcmtk's YBR_FULL_422 and YBR_FULL from pydicom's test files, and
    Pillow's 4:2:0 labelled YBR_FULL_422) asked uncompressed through dicomweb-client: the
    frame, and the Pixel Data bulk data, read by the instance's /metadata as a client reads
    them (its Photometric Interpretation, native layout) give the picture pydicom decodes
    to RGB from the stored instance. /metadata keeps the stored description (YBR_*, and the
    stored syntax as Available Transfer Syntax); the decoded frames keep to it. The
    instance converted whole to Explicit VR Little Endian is RGB and its header says so."""
    import numpy as np
    from pydicom.data import get_testdata_file

    if source.startswith("pillow"):
        rgb = np.zeros((32, 48, 3), dtype=np.uint8)
        rgb[..., 0] = np.arange(48, dtype=np.uint8) * 5
        rgb[..., 1] = (np.arange(32, dtype=np.uint8) * 7)[:, None]
        rgb[8:24, 16:32, 2] = 200
        dataset = _pillow_jpeg(rgb)
    else:
        path = get_testdata_file(source)
        assert path is not None
        dataset = dcmread(path)
        dataset.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{len(source)}.{source.count('s4')}"
    stored_photometric = str(dataset.PhotometricInterpretation)
    reference = dataset.pixel_array  # pydicom's decode of the stored instance, as RGB.
    served.client.store_instances([dataset])
    uids = (str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
    metadata = served.client.retrieve_instance_metadata(*uids)
    assert metadata["00280004"]["Value"] == [stored_photometric]
    assert metadata["00083002"]["Value"] == ["1.2.840.10008.1.2.4.50"]
    [frame] = served.client.retrieve_instance_frames(*uids, [1], media_types=(("application/octet-stream", EVRLE),))
    bulk = served.client.retrieve_bulkdata(metadata["7FE00010"]["BulkDataURI"], media_types=("application/octet-stream",))
    assert bulk == [frame]
    shown = _rgb_by_metadata(frame, metadata)
    difference = np.abs(shown.astype(int) - reference.astype(int))
    # Within a level or two (colour conversions round differently), more only at colour edges,
    # where the native layout's one chroma sample per pair replaces the decoder's interpolation
    # (Pillow's 4:2:0 test pattern: 23 at the 99th percentile). RGB read as YCbCr, or a frame
    # of another length, is far off.
    assert difference.mean() < 2 and np.percentile(difference, 99) <= 32, (difference.mean(), difference.max())
    converted = served.client.retrieve_instance(*uids, media_types=(("application/dicom", EVRLE),))
    assert converted.PhotometricInterpretation == "RGB" and converted.PlanarConfiguration == 0
    assert np.abs(converted.pixel_array.astype(int) - reference.astype(int)).max() == 0


def test_ybr_full_422_with_an_odd_number_of_columns_is_not_decoded() -> None:
    """No native YBR_FULL_422 layout holds an odd number of columns: the first frame fails
    (FrameDecodeError: the route answers 406), rather than frames /metadata misdescribes."""
    import numpy as np
    from pacsnode.node.dicomweb_render import FrameDecodeError, decoded_frames

    dataset = _pillow_jpeg(np.full((16, 33, 3), 90, dtype=np.uint8))
    part10 = io.BytesIO()
    dataset.save_as(part10, enforce_file_format=True)
    with pytest.raises(FrameDecodeError):
        next(decoded_frames(part10.getvalue(), [1]))


def test_frames_no_decoder_reads_are_406_and_never_sent_as_uncompressed(served: _Served) -> None:
    """Video (a JPEG frame labelled H.264: no installed handler decodes it) and HTJ2K: a
    client that accepts only uncompressed frames gets 406, not the encoded bytes labelled
    application/octet-stream; naming the stored syntax still gets them as stored."""
    from requests import HTTPError

    for syntax in ("1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.201"):
        dataset = dcmread(io.BytesIO(_relabelled(_jpeg_instance(), syntax)))
        served.client.store_instances([dataset])
        uids = (dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID)
        for media_types in ((("application/octet-stream", EVRLE),), ("application/octet-stream",)):
            with pytest.raises(HTTPError) as refused:
                served.client.retrieve_instance_frames(*uids, [1], media_types=media_types)
            assert refused.value.response.status_code == 406
            assert "no decoder installed here reads that syntax" in refused.value.response.text
        path = f"{served.url}/dicom-web/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/frames/1"
        stored_type = "application/octet-stream" if syntax.endswith(".102") else "image/jphc"
        named = httpx.get(path, headers={"Accept": f'multipart/related; type="{stored_type}"; transfer-syntax={syntax}'})
        assert named.status_code == 200 and _parts(named) == [_parts_of(dataset)[0]]


def test_only_the_asked_frames_are_decoded_and_a_frame_that_fails_breaks_the_body_off(served: _Served) -> None:
    """A 3-frame JPEG baseline instance whose third frame is not JPEG: frames 2,1 come
    decoded (the third never touched: one frame decoded at a time, not the instance); 3
    alone is a 406 (nothing sent yet); 1,3 sends frame 1, then breaks the body off with no
    closing delimiter, so that the client sees a failed transfer."""
    import numpy as np
    from PIL import Image
    from pydicom.encaps import encapsulate

    jpeg = dcmread(io.BytesIO(_jpeg_instance()))
    pictures = []
    for shift in (0, 64):
        encoded = io.BytesIO()
        Image.fromarray(np.tile((np.arange(64, dtype=np.uint8) * 2 + shift), (48, 1)), mode="L").save(
            encoded, format="JPEG", quality=95)
        pictures.append(encoded.getvalue())
    jpeg.PixelData = encapsulate([*pictures, b"\xff\xd8 not a JPEG stream \xff\xd9"])
    jpeg.NumberOfFrames = 3
    part10 = io.BytesIO()
    jpeg.save_as(part10, enforce_file_format=True)
    stored = dcmread(io.BytesIO(part10.getvalue()))
    served.client.store_instances([stored])
    expected = [np.asarray(Image.open(io.BytesIO(picture))).tobytes() for picture in pictures]
    uids = (stored.StudyInstanceUID, stored.SeriesInstanceUID, stored.SOPInstanceUID)
    accept = {"Accept": 'multipart/related; type="application/octet-stream"'}
    assert served.client.retrieve_instance_frames(*uids, [2, 1], media_types=("application/octet-stream",)) == \
        [expected[1], expected[0]]
    path = f"{served.url}/dicom-web/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/frames/"
    refused = httpx.get(path + "3", headers=accept)
    assert refused.status_code == 406 and "could not be decoded" in refused.text
    received = bytearray()
    with pytest.raises(httpx.HTTPError):  # Chunked body, ended without its last chunk.
        with httpx.stream("GET", path + "1,3", headers=accept) as cut:
            assert cut.status_code == 200
            for chunk in cut.iter_raw():
                received += chunk
    assert expected[0] in received
    _type, boundary = multipart_boundary(cut.headers["content-type"])
    assert f"--{boundary}--".encode() not in received


@pytest.mark.parametrize("tool, syntax", [(["dcmcjpeg", "--encode-lossless-sv1"], "1.2.840.10008.1.2.4.70"),
                                          (["dcmcjpls", "--encode-lossless"], "1.2.840.10008.1.2.4.80")])
def test_bulk_pixel_data_of_a_compressed_instance_is_decoded_when_only_octet_stream_is_accepted(
        served: _Served, tmp_path: Path, tool: list[str], syntax: str) -> None:
    """The BulkDataURI /metadata gives for the Pixel Data of a JPEG lossless and a JPEG-LS
    3-frame instance (dcmtk): a client accepting only application/octet-stream
    (dicomweb-client's octet-stream, Explicit VR Little Endian named or not, a single-part
    octet-stream) gets every frame decoded, in order, in one part, streamed: the original
    native pixel data byte for byte. A client that accepts the stored form gets the
    encoded frames as stored, byte for byte, as before."""
    native, coded = _multiframe(tool, tmp_path)
    assert coded.file_meta.TransferSyntaxUID == syntax and int(coded.NumberOfFrames) == 3
    served.client.store_instances([coded])
    uids = (coded.StudyInstanceUID, coded.SeriesInstanceUID, coded.SOPInstanceUID)
    metadata = served.client.retrieve_instance_metadata(*uids)
    uri = metadata["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{uids[2]}/bulk/7FE00010")
    original = bytes(native.PixelData)
    assert len(original) == 3 * 64 * 64 * 2
    for media_types in (("application/octet-stream",), (("application/octet-stream", EVRLE),)):
        assert served.client.retrieve_bulkdata(uri, media_types=media_types) == [original]
    for accept in ('multipart/related; type="application/octet-stream"', "application/octet-stream",
                   f"application/octet-stream; transfer-syntax={EVRLE}"):
        reply = httpx.get(uri, headers={"Accept": accept})
        assert reply.status_code == 200 and _parts(reply) == [original], accept
        assert reply.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
        assert f"Content-Type: application/octet-stream; transfer-syntax={EVRLE}\r\n".encode() in reply.content
        assert "content-length" not in reply.headers  # Streamed, a frame at a time.
    # The stored form accepted: the encoded frames as stored, each a part, undecoded.
    encoded = _parts_of(coded)
    codec = "image/jpeg" if syntax.endswith(".70") else "image/jls"
    for accept in ("*/*", f'multipart/related; type="{codec}"',
                   'multipart/related; type="application/octet-stream"; transfer-syntax=*',
                   f'multipart/related; type="application/octet-stream", multipart/related; type="{codec}"'):
        stored = httpx.get(uri, headers={"Accept": accept})
        assert stored.status_code == 200 and _parts(stored) == encoded, accept
        assert stored.headers["content-type"].startswith(f'multipart/related; type="{codec}"')
    assert served.client.retrieve_bulkdata(uri) == encoded  # Its default: type="*/*".
    assert httpx.get(uri, headers={"Accept": f"application/octet-stream; transfer-syntax={syntax}"}).status_code == 406


def test_bulk_pixel_data_no_decoder_reads_is_406_and_an_odd_length_value_is_padded(served: _Served) -> None:
    """The Pixel Data of an HTJ2K-labelled instance (no installed handler) asked as
    octet-stream: 406 saying why, never the encoded bytes labelled octet-stream; one whose
    first frame fails to decode: 406 too. An 8-bit 7 x 5 JPEG frame (35 bytes decoded)
    comes padded to 36, as the Pixel Data of the instance converted to Explicit VR Little
    Endian (the same decode)."""
    import numpy as np
    from PIL import Image
    from pydicom.encaps import encapsulate

    octet = {"Accept": 'multipart/related; type="application/octet-stream"'}
    htj2k = dcmread(io.BytesIO(_relabelled(_jpeg_instance(), "1.2.840.10008.1.2.4.201")))
    broken = dcmread(io.BytesIO(_relabelled(_jpeg_instance(), "1.2.840.10008.1.2.4.50")))
    broken.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
    odd = dcmread(io.BytesIO(_relabelled(_jpeg_instance(), "1.2.840.10008.1.2.4.50")))
    picture = io.BytesIO()
    Image.fromarray(np.arange(35, dtype=np.uint8).reshape(5, 7) * 7, mode="L").save(picture, format="JPEG",
                                                                                   quality=95)
    odd.Rows, odd.Columns = 5, 7
    odd.PixelData = encapsulate([picture.getvalue()])
    served.client.store_instances([htj2k, broken, odd])

    def bulk(dataset: Dataset) -> str:
        return (f"{served.url}/dicom-web/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
                f"/instances/{dataset.SOPInstanceUID}/bulk/7FE00010")

    refused = httpx.get(bulk(htj2k), headers=octet)
    assert refused.status_code == 406 and "no decoder installed here reads that syntax" in refused.text
    assert _parts(httpx.get(bulk(htj2k))) == _parts_of(htj2k)  # As stored when that is accepted.
    # Video (no image media type): as stored under */*, labelled with its syntax, never as
    # bare octet-stream (which says uncompressed); 406 to a client that accepts only that.
    video = dcmread(io.BytesIO(_relabelled(_jpeg_instance(), "1.2.840.10008.1.2.4.102")))
    served.client.store_instances([video])
    stored = httpx.get(bulk(video))
    assert stored.status_code == 200 and _parts(stored) == _parts_of(video)
    assert stored.headers["content-type"].endswith("; transfer-syntax=1.2.840.10008.1.2.4.102")
    assert b"Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.102\r\n" in stored.content
    assert httpx.get(bulk(video), headers=octet).status_code == 406
    failed = httpx.get(bulk(broken), headers=octet)
    assert failed.status_code == 406 and "could not be decoded" in failed.text
    converted = served.client.retrieve_instance(odd.StudyInstanceUID, odd.SeriesInstanceUID, odd.SOPInstanceUID,
                                                media_types=(("application/dicom", EVRLE),))
    [value] = _parts(httpx.get(bulk(odd), headers=octet))
    assert len(value) == 36 and value == converted.PixelData and value[-1:] == b"\x00"


def _parts_of(dataset: Dataset) -> list[bytes]:
    from pydicom.encaps import generate_frames

    return list(generate_frames(dataset.PixelData, number_of_frames=int(dataset.get("NumberOfFrames", 1) or 1)))


def _viewer_server(viewer_dir: Path) -> HttpServer:
    """An HTTP front end with no archive behind it, serving the viewer from `viewer_dir`."""
    server = HttpServer(host="127.0.0.1", port=0, archive=None, metrics=Metrics(lambda: {}),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=1_000, qido_result_max=4,
                        viewer_dir=viewer_dir)
    server.start()
    return server


def test_viewer_is_served_under_viewer_with_its_app_config(tmp_path: Path) -> None:
    from pacsnode.node import viewer_install

    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text('<script>window.PUBLIC_URL="/"</script><script src="/app.bundle.1.js"></script>'
                                     '<link href="/assets/x.css"><a href="//cdn.example/y">')
    (dist / "app.bundle.1.js").write_text("console.log(1)")
    (dist / "2.bundle.js").write_text('__webpack_require__.p = "/";')  # OHIF's chunks load from here.
    (dist / "app-config.js").write_text("window.config = {};")
    viewer_install.install(dist, tmp_path / "ohif")
    index = (tmp_path / "ohif" / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in index and 'src="/viewer/app.bundle.1.js"' in index
    assert 'href="/viewer/assets/x.css"' in index and 'href="//cdn.example/y"' in index
    assert "window.location.origin + '/dicom-web'" in (tmp_path / "ohif" / "app-config.js").read_text()
    assert (tmp_path / "ohif" / "2.bundle.js").read_text() == '__webpack_require__.p = "/viewer/";'
    server = _viewer_server(tmp_path / "ohif")
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert httpx.get(url + "/viewer/app.bundle.1.js").text == "console.log(1)"
        route = httpx.get(url + "/viewer/viewer?StudyInstanceUIDs=1.2.3")  # A route of the app: its index.
        assert route.status_code == 200 and 'PUBLIC_URL="/viewer/"' in route.text
        assert httpx.get(url + "/viewer/../../etc/passwd").status_code in (200, 404)  # Never outside the dir...
        assert "root:" not in httpx.get(url + "/viewer/%2e%2e/%2e%2e/etc/passwd").text  # ...however spelled.
    finally:
        server.stop()
    absent = _viewer_server(tmp_path / "absent")
    try:
        assert httpx.get(f"http://127.0.0.1:{absent.port}/viewer/").status_code == 404
    finally:
        absent.stop()


def test_connections_are_served_without_nagle(tmp_path: Path) -> None:
    """The listener says TCP and sets TCP_NODELAY, so accepted connections have it (asyncio
    sets it only when the socket's proto is TCP; Linux copies it from the listener): on a
    kept-alive connection a response's body then does not wait ~40 ms for a delayed ACK."""
    import socket

    server = _viewer_server(tmp_path)
    try:
        listener = server._socket
        assert listener is not None and listener.proto == socket.IPPROTO_TCP
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        with httpx.Client() as client:  # Kept alive: every request after the first on one connection.
            for _ in range(3):
                assert client.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200
    finally:
        server.stop()


_WARM_UP_PROBE = """
import sys, time
from pacsnode.node.http_server import HttpServer
from pacsnode.node.metrics import Metrics
backend = "anyio._backends._asyncio"
before = backend in sys.modules
server = HttpServer(host="127.0.0.1", port=0, archive=None, metrics=Metrics(lambda: {}), ready=lambda: {"ready": True},
                    instance_size_bytes_max=1_000, qido_result_max=4)
server.start()
deadline = time.monotonic() + 10
while backend not in sys.modules and time.monotonic() < deadline:
    time.sleep(0.02)
after = backend in sys.modules
server.stop()
print(before, after)
"""


def test_the_server_pays_its_one_time_costs_before_the_first_request() -> None:
    """Starlette's run_in_threadpool imports anyio's asyncio back end on its first call
    (~30 ms of CPU, most of a fresh node's first series /metadata, measured with py-spy):
    the server does it when it starts, with no request made. In a fresh interpreter, so
    that no other test has imported it already."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", _WARM_UP_PROBE], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["False", "True"]


class _CountingArchive(Archive):
    """Counts the reads running at once; each takes a moment, as a read from a peer would."""

    def __init__(self, store: RocksStore) -> None:
        super().__init__(store)
        self._lock = threading.Lock()
        self._running = 0
        self.most = 0

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        with self._lock:
            self._running += 1
            self.most = max(self.most, self._running)
        try:
            time.sleep(0.01)  # Long beside the loop's work of handing out groups, even at load.
            return super().read(location)
        finally:
            with self._lock:
                self._running -= 1


@pytest.mark.parametrize("owned", [True, False])
def test_reads_of_own_copies_go_fewer_at_once(tmp_path: Path, make_instance: Callable[[bytes], Any],
                                               owned: bool) -> None:
    """A study this node owns is read OWN_READ_GROUPS_AHEAD groups at a time (its reads
    are CPU here); one it does not own READ_GROUPS_AHEAD at a time (waits on peers)."""
    spec = StudySetSpec(patients=1, instances_per_series=READ_GROUP_INSTANCES * 3, rows=8, cols=8, seed=31,
                        modalities=("CT",))
    study_set = list(iter_part10(spec))
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    archive = _CountingArchive(store)
    for _entry, data in study_set:
        archive.store(make_instance(data))
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(),
                       ready=lambda: {"ready": True}, instance_size_bytes_max=10_000_000, qido_result_max=4,
                       owns=lambda study: owned)
    server.start()
    try:
        reply = httpx.get(f"http://127.0.0.1:{server.port}/dicom-web/studies/{study_set[0][0]['study_uid']}",
                          headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                          timeout=60)
    finally:
        server.stop()
        store.close()
    assert reply.status_code == 200
    assert sorted(_parts(reply)) == sorted(data for _entry, data in study_set)
    if owned:
        assert archive.most <= OWN_READ_GROUPS_AHEAD
    else:
        assert archive.most > OWN_READ_GROUPS_AHEAD  # Reads from peers still overlap.


class _StreamingArchive(Archive):
    """The single-node Archive with the node's streamed reads of its own copies (blob files
    as Part10Streams, node/runtime.py's own_stream_reader)."""

    def __init__(self, store: RocksStore) -> None:
        super().__init__(store)
        self._open = own_stream_reader(store)
        self.streamed: list[str] = []  # The SOP Instance UIDs asked of open_streamed.

    def open_streamed(self, location: InstanceLocation) -> tuple[bytes | Part10Stream, int]:
        self.streamed.append(location.sop_instance_uid)
        found = self._open(location)
        return found if found is not None else self.read(location)


@pytest.mark.parametrize("local", [False, True])
def test_retrieve_of_blob_files_sends_their_bytes_and_breaks_off_at_a_corrupt_one(
        tmp_path: Path, make_instance: Callable[[bytes], Any], local: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Instances kept as blob files (one chunk each, and one of several chunks) come back
    byte for byte; a blob file that fails its checksum ends the body before its part.
    With `local_reads` (the node's StoreReads) the archive is asked for none of them but
    the corrupt one, which StoreReads hands back to the archive's read."""
    spec = StudySetSpec(patients=1, instances_per_series=3, rows=64, cols=64, seed=32, modalities=("CT",))
    study_set = list(iter_part10(spec))
    big = StudySetSpec(patients=1, instances_per_series=1, rows=768, cols=768, seed=33, modalities=("CT",))
    entry, data = next(iter_part10(big))
    assert len(data) > CHUNK_BYTES
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1024)
    archive = _StreamingArchive(store)
    for _entry, part10 in study_set:
        archive.store(make_instance(part10))
    archive.store(make_instance(data))
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=10_000_000, qido_result_max=4,
                        owns=lambda study: True, local_reads=StoreReads(store, 1024) if local else None)
    server.start()
    # Not zstd (httpx asks for it when zstandard is installed): the unencoded answer's reads
    # (tests/unit/test_dicomweb_zstd.py has the encoded one's).
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
              "Accept-Encoding": "gzip, deflate"}
    try:
        study = study_set[0][0]["study_uid"]
        reply = httpx.get(f"http://127.0.0.1:{server.port}/dicom-web/studies/{study}", headers=accept)
        assert reply.status_code == 200
        assert sorted(_parts(reply)) == sorted(part10 for _entry, part10 in study_set)
        whole = httpx.get(f"http://127.0.0.1:{server.port}/dicom-web/studies/{entry['study_uid']}", headers=accept)
        assert whole.status_code == 200 and _parts(whole) == [data]
        assert len(archive.streamed) == (0 if local else len(study_set) + 1)
        archive.streamed.clear()
        plan = archive.locate(Query(level="STUDY", conditions=(Condition("StudyInstanceUID", "UI", study),)))
        order = [location.sop_instance_uid for location in plan.locations]
        blobs = sorted(p for p in (tmp_path / "store" / "blobs").rglob("*.zst") if p.stat().st_size)  # Not the pool's.
        assert len(blobs) == len(study_set) + 1
        victim = order[1]
        pointer = store.compressed_copy(study, victim)
        assert pointer is not None and not isinstance(pointer[0], bytes)
        path = store.blob_files.path(pointer[0])
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        received = bytearray()
        with pytest.raises(httpx.HTTPError):  # Content-Length stated, body cut short.
            with httpx.stream("GET", f"http://127.0.0.1:{server.port}/dicom-web/studies/{study}",
                              headers=accept) as cut:
                assert cut.status_code == 200
                for chunk in cut.iter_raw():
                    received += chunk
        by_uid = {e["sop_uid"]: part10 for e, part10 in study_set}
        assert by_uid[order[0]] in received
        assert by_uid[order[1]] not in received and by_uid[order[2]] not in received
        assert archive.streamed == ([victim] if local else order[:2])
        # Logged by the archive's reads only (its streamed read, then its whole read, which
        # stands for the coordinator's here): StoreReads' reads add no line.
        corrupt = [r for r in caplog.records if r.getMessage().startswith("store.blob.corrupt") and victim in r.getMessage()]
        assert [r.name for r in corrupt] == ["pacsnode.node.store", "pacsnode.node.store"]
    finally:
        server.stop()
        store.close()


class _OtherOwners:
    """The coordinator as ClusterArchive sees it for a study this node owns: plans from this
    node's own index (the real single-node Archive over its store), and a read that stands
    for the coordinator's read of the owners after this node's own copy failed its check
    (it is where another owner's intact copy comes from)."""

    def __init__(self, store: RocksStore, intact: dict[str, bytes]) -> None:
        self._archive = Archive(store)
        self.intact = intact
        self.reads: list[str] = []

    def owns(self, study_instance_uid: str) -> bool:
        return True

    async def locate(self, query: Query) -> RetrievePlan:
        return self._archive.locate(query)

    def locate_here(self, query: Query, instances_max: int) -> RetrievePlan | None:
        return None  # Plans come from locate(), on the loop.

    async def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        from tests.unit.conftest import dataset_offset

        self.reads.append(location.sop_instance_uid)
        data = self.intact[location.sop_instance_uid]
        return data, dataset_offset(data)[0]


def test_a_corrupt_own_copy_is_logged_once_before_another_owners_copy_is_sent(
        tmp_path: Path, make_instance: Callable[[bytes], Any], caplog: pytest.LogCaptureFixture) -> None:
    """The node's WADO-RS read chain (StoreReads on the HTTP loop or a reader thread, then
    ClusterArchive.open_streamed: own_stream, the coordinator's read) over a blob file with
    a flipped byte: the retrieve sends the other owner's intact copy, and the corrupt copy
    is logged once (store.blob.corrupt), not by each read of it (it was four times)."""
    from pacsnode.node.runtime import ClusterArchive, LoopThread, own_copy_reader

    [(entry, data)] = list(iter_part10(StudySetSpec(patients=1, instances_per_series=1, rows=128, cols=128, seed=43,
                                                    modalities=("CT",))))
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1024)
    Archive(store).store(make_instance(data))
    found = store.compressed_copy(entry["study_uid"], entry["sop_uid"])
    assert found is not None and not isinstance(found[0], bytes)
    path = store.blob_files.path(found[0])
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    loop = LoopThread(name="test-corrupt-loop", io_thread_prefix="test-corrupt-io-")
    owners = _OtherOwners(store, {entry["sop_uid"]: data})
    archive = ClusterArchive(loop, owners, store_timeout_ms=1_000,  # type: ignore[arg-type]
                             own_copy=own_copy_reader(store), own_stream=own_stream_reader(store))
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=10_000_000, qido_result_max=4,
                        owns=lambda study: True, local_reads=StoreReads(store, 1024))
    server.start()
    try:
        reply = httpx.get(f"http://127.0.0.1:{server.port}/dicom-web/studies/{entry['study_uid']}",
                          headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert reply.status_code == 200 and _parts(reply) == [data]
        assert owners.reads == [entry["sop_uid"]]
        corrupt = [r for r in caplog.records if r.getMessage().startswith("store.blob.corrupt")]
        assert len(corrupt) == 1 and entry["sop_uid"] in corrupt[0].getMessage()
    finally:
        server.stop()
        loop.stop()
        store.close()


@pytest.fixture(scope="module")
def big_and_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes], str]:
    """A store holding one study: three small CT and two of 768 x 768 (1.2 MB, more than
    a loopback socket takes in one send), blob files from 1 KiB as the node keeps them."""
    from tests.unit.conftest import to_instance
    small = list(iter_part10(StudySetSpec(patients=1, instances_per_series=3, rows=64, cols=64, seed=34,
                                          modalities=("CT",))))
    study = small[0][0]["study_uid"]
    big = [data for _entry, data in iter_part10(StudySetSpec(patients=1, instances_per_series=2, rows=768, cols=768,
                                                             seed=35, modalities=("CT",)))]
    retagged = []
    for data in big:  # The big ones into the small ones' study and series.
        dataset = dcmread(io.BytesIO(data))
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, small[0][0]["series_uid"]
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        retagged.append(buffer.getvalue())
    path = tmp_path_factory.mktemp("parsers") / "store"
    store = RocksStore(path, disk_free_bytes_min=0, blob_file_bytes_min=1024)
    archive = Archive(store)
    every = [data for _entry, data in small] + retagged
    for data in every:
        archive.store(to_instance(data))
    store.close()
    return path, every, study


@pytest.mark.parametrize(("parser", "loop"), [("auto", "auto"), ("h11", "asyncio"), ("httptools", "asyncio"),
                                              ("h11", "uvloop")])
def test_each_http_parser_and_loop_sends_the_same_retrieve_bytes(
        big_and_small: tuple[Path, list[bytes], str], parser: str, loop: str) -> None:
    """The node's default (httptools on uvloop) and the others it can be asked for answer a
    WADO-RS study retrieve with the same bytes, twice on one kept-alive connection: every
    stored instance whole, a stated Content-Length that matches the body."""
    path, every, study = big_and_small
    store = RocksStore(path, disk_free_bytes_min=0, blob_file_bytes_min=1024)
    server = HttpServer(host="127.0.0.1", port=0, archive=_StreamingArchive(store), metrics=Metrics(),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=10_000_000, qido_result_max=4,
                        owns=lambda study: True, http_parser=parser, http_loop=loop)
    server.start()
    # Not zstd (httpx asks for it when zstandard is installed): the unencoded answer's reads
    # (tests/unit/test_dicomweb_zstd.py has the encoded one's).
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
              "Accept-Encoding": "gzip, deflate"}
    try:
        with httpx.Client(timeout=60) as client:
            replies = [client.get(f"http://127.0.0.1:{server.port}/dicom-web/studies/{study}", headers=accept)
                       for _ in range(2)]
    finally:
        server.stop()
        store.close()
    for reply in replies:
        assert reply.status_code == 200
        assert int(reply.headers["content-length"]) == len(reply.content)
        assert sorted(_parts(reply)) == sorted(every)


def test_an_unknown_http_parser_or_loop_is_refused() -> None:
    for options in ({"http_parser": "picohttp"}, {"http_loop": "trio"}):
        with pytest.raises(ValueError):
            HttpServer(host="127.0.0.1", port=0, archive=None, metrics=Metrics(lambda: {}),
                       ready=lambda: {"ready": True}, instance_size_bytes_max=1, qido_result_max=1, **options)


def test_store_reads_take_blob_files_and_rocksdb_values(tmp_path: Path,
                                                        make_instance: Callable[[bytes], Any]) -> None:
    """StoreReads gives an instance kept as a blob file or, when it is about as big as
    one, as a RocksDB value (read once: handing it back to the archive would read it
    again); one not held, or clearly too small for a blob file, is None."""
    entry, data = next(iter_part10(StudySetSpec(patients=1, instances_per_series=1, rows=64, cols=64, seed=36,
                                                modalities=("CT",))))
    for blob_file_bytes_min in (1024, 10_000_000):
        store = RocksStore(tmp_path / f"store-{blob_file_bytes_min}", disk_free_bytes_min=0,
                           blob_file_bytes_min=blob_file_bytes_min)
        try:
            archive = Archive(store)
            archive.store(make_instance(data))
            location = archive.locate(Query(level="IMAGE", conditions=(
                Condition("StudyInstanceUID", "UI", entry["study_uid"]),
                Condition("SOPInstanceUID", "UI", entry["sop_uid"])))).locations[0]
            kept = store.compressed_copy(entry["study_uid"], entry["sop_uid"])
            assert kept is not None and isinstance(kept[0], bytes) == (blob_file_bytes_min > len(data))
            reads = StoreReads(store, min(blob_file_bytes_min, len(data)))  # About that size.
            found = reads.part10(location)
            assert found is not None and found[0] == data and 0 < found[1] < len(data)
            missing = dataclasses.replace(location, sop_instance_uid=location.sop_instance_uid + ".9")
            assert reads.part10(missing) is None
            assert StoreReads(store, len(data) + 1025).part10(location) is None  # Left to the archive.
        finally:
            store.close()


@pytest.mark.parametrize("isal", [True, False])
def test_read_cached_checks_every_stored_byte_by_the_pointers_crc32(
        tmp_path: Path, make_instance: Callable[[bytes], Any], monkeypatch: pytest.MonkeyPatch, isal: bool) -> None:
    """The HTTP loop's read of a blob file (StoreReads.read_cached) checks the file against
    the CRC-32 its pointer records, in place of zstd's checksum, which it leaves out of
    the decompression: a flipped bit anywhere, in the content, in the frame header's
    checksum flag or in the checksum bytes themselves (which zstd no longer reads), is a
    CorruptBlob before any byte is handed on (and the reader threads' read, part10, gives
    None: the archive's read then); so is an intact file whose pointer records
    another CRC-32. An intact file comes back whole, twice (its header is changed only in
    the read buffer, never on disk). Without isal (a venv installed before it was a
    dependency) zstd's checksum finds those in the content and the checksum bytes (not a
    cleared checksum flag, after which zstd ignores the checksum: the content is intact)."""
    from pacsnode.node import codec

    if not isal:
        monkeypatch.setattr(codec, "_isal_crc32", None)
    elif codec._isal_crc32 is None:
        pytest.skip("isal is not installed in this venv (pip install -e . installs it)")
    entry, data = next(iter_part10(StudySetSpec(patients=1, instances_per_series=1, rows=128, cols=128, seed=39,
                                                modalities=("CT",))))
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1024)
    try:
        archive = Archive(store)
        archive.store(make_instance(data))
        location = archive.locate(Query(level="IMAGE", conditions=(
            Condition("StudyInstanceUID", "UI", entry["study_uid"]),
            Condition("SOPInstanceUID", "UI", entry["sop_uid"])))).locations[0]
        reads = StoreReads(store, 1024)
        kept = reads.kept(location)
        assert kept is not None
        path = store.blob_files.path(kept.pointer)
        stored = path.read_bytes()
        assert stored[:4] == b"\x28\xb5\x2f\xfd" and stored[4] & 0x04  # One zstd frame, with its checksum.
        assert reads.read_cached(kept) == data and reads.read_cached(kept) == data
        assert path.read_bytes() == stored
        flips = [(len(stored) // 2, 0x10), (len(stored) - 1, 0x01), (len(stored) - 4, 0x80)] + ([(4, 0x04)] if isal else [])
        for position, bit in flips:
            damaged = bytearray(stored)
            damaged[position] ^= bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(CorruptBlob):
                reads.read_cached(kept)
            assert reads.part10(location) is None  # The reader threads' read: left to the archive's.
        path.write_bytes(stored)
        assert reads.read_cached(kept) == data
        found = reads.part10(location)
        assert found is not None and found[0] == data
        if not isal:
            return  # zstd's own check does not read the pointer's CRC-32.
        with pytest.raises(CorruptBlob):
            reads.read_cached(dataclasses.replace(kept, pointer=dataclasses.replace(kept.pointer,
                                                                                 crc32=kept.pointer.crc32 ^ 1)))
    finally:
        store.close()


class _WhereRead(StoreReads):
    """The node's StoreReads, noting the thread of each read and what read_cached gave."""

    def __init__(self, store: RocksStore, blob_file_bytes_min: int) -> None:
        super().__init__(store, blob_file_bytes_min)
        self.cached: list[tuple[str, str, bool]] = []  # (SOP Instance UID, thread, read)
        self.whole: list[tuple[str, str]] = []  # part10's (SOP Instance UID, thread)

    def read_cached(self, kept: Any) -> bytes | None:
        body = super().read_cached(kept)
        self.cached.append((kept.location.sop_instance_uid, threading.current_thread().name, body is not None))
        return body

    def part10(self, location: InstanceLocation) -> tuple[bytes, int] | None:
        self.whole.append((location.sop_instance_uid, threading.current_thread().name))
        return super().part10(location)


def test_own_blob_files_in_the_page_cache_are_read_on_the_http_loop_and_the_rest_on_reader_threads(
        tmp_path: Path, make_instance: Callable[[bytes], Any]) -> None:
    """A study this node owns, CT blob files and small instances kept as RocksDB values
    mixed: the files are read on the HTTP loop (read_cached), the small ones on reader
    threads through the archive; once the files' pages are dropped from the page cache,
    the first file is not read on the loop and it and the rest go to the reader threads.
    Both times every instance comes back byte for byte in the plan's order."""
    small = [data for _entry, data in iter_part10(StudySetSpec(patients=1, instances_per_series=3, rows=64, cols=64,
                                                                seed=37, modalities=("CT",)))]
    first = dcmread(io.BytesIO(small[0]))
    big = []
    for data in (d for _e, d in iter_part10(StudySetSpec(patients=1, instances_per_series=3, rows=512, cols=512,
                                                          seed=38, modalities=("CT",)))):
        dataset = dcmread(io.BytesIO(data))  # Into the small ones' study and series.
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        big.append(buffer.getvalue())
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=64 * 1024)
    archive = _StreamingArchive(store)
    for data in small + big:
        archive.store(make_instance(data))
    reads = _WhereRead(store, 64 * 1024)
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=10_000_000, qido_result_max=4,
                        owns=lambda study: True, local_reads=reads)
    server.start()
    study = str(first.StudyInstanceUID)
    plan = archive.locate(Query(level="STUDY", conditions=(Condition("StudyInstanceUID", "UI", study),)))
    by_uid = {str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID): data for data in small + big}
    in_order = [by_uid[location.sop_instance_uid] for location in plan.locations]
    files = {uid for uid, data in by_uid.items() if data in big}
    # Not zstd (httpx asks for it when zstandard is installed): the unencoded answer's reads
    # (tests/unit/test_dicomweb_zstd.py has the encoded one's).
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
              "Accept-Encoding": "gzip, deflate"}
    try:
        reply = httpx.get(f"http://127.0.0.1:{server.port}/dicom-web/studies/{study}", headers=accept, timeout=60)
        assert reply.status_code == 200 and _parts(reply) == in_order
        assert sorted(uid for uid, _thread, _read in reads.cached) == sorted(files)
        assert {(thread, read) for _uid, thread, read in reads.cached} == {("pacsnode-http", True)}
        assert sorted(archive.streamed) == sorted(set(by_uid) - files)
        assert all(thread.startswith("pacsnode-wado") for _uid, thread in reads.whole)

        blobs = [p for p in (tmp_path / "store" / "blobs").rglob("*.zst") if p.stat().st_size]
        assert len(blobs) == len(big)
        for path in blobs:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        reads.cached.clear()
        reads.whole.clear()
        archive.streamed.clear()
        reply = httpx.get(f"http://127.0.0.1:{server.port}/dicom-web/studies/{study}", headers=accept, timeout=60)
        assert reply.status_code == 200 and _parts(reply) == in_order
        if reads.cached and reads.cached[0][2]:
            pytest.skip("this file system keeps the files' pages (tmpfs?): cannot drop them")
        first_file = next(location.sop_instance_uid for location in plan.locations
                          if location.sop_instance_uid in files)
        assert reads.cached == [(first_file, "pacsnode-http", False)]  # Then the rest on reader threads:
        rest = [location.sop_instance_uid for location in plan.locations]
        rest = rest[rest.index(first_file):]
        assert [uid for uid, _thread in reads.whole] == rest
        assert all(thread.startswith("pacsnode-wado") for _uid, thread in reads.whole)
    finally:
        server.stop()
        store.close()
