"""WADO-RS /frames, Pixel Data /bulk and /rendered of a big instance of a corrected study,
kept here as a blob file: read from the file as received, only as far as the frames asked,
and byte-equal to what the whole read of the corrected instance (node/correct.py, as
ClusterArchive.read applies it) gives; the archive's whole read is not asked. The whole
instance (WADO-RS retrieve) still goes out corrected.

A real HttpServer and StoreReads over a real RocksStore; the Archive is the single-node one
with a study's correction put on its locations and applied on its reads as a cluster's
ClusterArchive does (node/runtime.py), counting its whole reads.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from pacsnode.node import frame_stream
from pacsnode.node.correct import corrected
from pacsnode.node.dicomweb_render import frames as whole_read_frames
from pacsnode.node.dicomweb_render import render
from pacsnode.node.http_server import HttpServer
from pacsnode.node.http_views import StoreHeaders, StoreReads
from pacsnode.node.metrics import Metrics
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive, InstanceLocation, RetrievePlan
from pacsnode.replication.correction import Correction
from pacsnode.replication.hlc import Version
from pacsnode.replication.matching import Query

from .test_dicomweb_frames_stream import _part10, _parts

EXPLICIT = "1.2.840.10008.1.2.1"
JPEG_2000 = "1.2.840.10008.1.2.4.90"


class _CorrectedArchive(Archive):
    """The single-node Archive with one study's correction, as a cluster's reads carry it."""

    def __init__(self, store: RocksStore, correction: Correction) -> None:
        super().__init__(store)
        self.correction = correction
        self.reads: list[str] = []

    def locate(self, query: Query) -> RetrievePlan:
        """As the coordinator's locations (replication/coordinator.py `_location`): a
        corrected study's carry its correction and no length (the header is rewritten)."""
        plan = super().locate(query)
        return RetrievePlan([dataclasses.replace(location, correction=self.correction.dumps(), part10_bytes=0)
                             if location.study_instance_uid == self.correction.study_instance_uid else location
                             for location in plan.locations], plan.shortfall)

    def read(self, location: InstanceLocation) -> tuple[bytes, int]:
        self.reads.append(location.sop_instance_uid)
        part10, offset = super().read(location)
        if not location.correction:
            return part10, offset
        return corrected(part10, offset, location.transfer_syntax_uid, Correction.loads(location.correction))


def _dataset(frames: int, study: str, series: str, *, bits: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 6"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName = "BEFORE^NAME"
    ds.PatientID = "FC1"
    ds.StudyID = "1"
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 256, 256, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    return ds


def test_frames_of_a_corrected_study_are_read_from_the_file_and_equal_the_corrected_whole_read(
        tmp_path: Path, make_instance: Callable[[bytes], Any]) -> None:
    rng = np.random.default_rng(5)
    study, series = generate_uid(), generate_uid()
    native = _dataset(40, study, series, bits=16)
    native.PixelData = rng.integers(0, 4096, 40 * 256 * 256, dtype=np.uint16).tobytes()
    native_data = _part10(native, EXPLICIT)
    coded = _dataset(30, study, series, bits=8)
    coded.PixelData = encapsulate([b"\xff\x4f" + rng.integers(0, 255, 100_000, dtype=np.uint8).tobytes()
                                   + b"\xff\xd9" for _ in range(30)], has_bot=True)
    coded["PixelData"].VR = "OB"
    coded_data = _part10(coded, JPEG_2000)
    assert min(len(native_data), len(coded_data)) > frame_stream.STREAM_PART10_BYTES_MIN
    # A non-ASCII name (the character set switches to UTF-8), and the last correctable tag.
    correction = Correction.of(study, {"PatientName": "Müller^Zoë", "StudyID": "CORR-7",
                                       "AccessionNumber": "A123"}, Version(1, 0, "n1"))
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0, blob_file_bytes_min=1024)
    archive = _CorrectedArchive(store, correction)
    for data in (native_data, coded_data):
        archive.store(make_instance(data))
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=100_000_000, qido_result_max=4,
                        owns=lambda study_uid: True, local_reads=StoreReads(store, 1024),
                        local_headers=StoreHeaders(store))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}/dicom-web/studies/{study}/series/{series}/instances/"
        expected: dict[str, bytes] = {}
        for dataset, data in ((native, native_data), (coded, coded_data)):
            uid = str(dataset.SOPInstanceUID)
            whole, _ = archive.read(InstanceLocation(study, series, uid, str(dataset.SOPClassUID),
                                                     str(dataset.file_meta.TransferSyntaxUID),
                                                     correction=correction.dumps()))
            assert dcmread(io.BytesIO(whole)).StudyID == "CORR-7" and whole != data  # The corrected instance.
            expected[uid] = whole
        archive.reads.clear()
        for dataset, numbers in ((native, [40, 1, 7]), (coded, [3, 2])):
            uid = str(dataset.SOPInstanceUID)
            accept = {"Accept": f'multipart/related; type="image/jp2"; transfer-syntax={JPEG_2000}'} \
                if dataset is coded else {}
            got = _parts(httpx.get(base + f"{uid}/frames/{','.join(map(str, numbers))}", headers=accept))
            assert got == whole_read_frames(expected[uid], numbers)
        got = _parts(httpx.get(base + f"{native.SOPInstanceUID}/bulk/7FE00010"))
        assert got == [bytes(native.PixelData)]
        png = httpx.get(base + f"{native.SOPInstanceUID}/frames/7/rendered", headers={"Accept": "image/png"})
        assert png.status_code == 200
        assert png.content == render(expected[str(native.SOPInstanceUID)], frame=7, media_type="image/png")
        assert archive.reads == []  # No whole read of a big instance, corrected or not.
        # The instance itself still goes out corrected (a whole read).
        client = DICOMwebClient(f"http://127.0.0.1:{server.port}/dicom-web")
        instance = client.retrieve_instance(study, series, str(native.SOPInstanceUID))
        assert instance.StudyID == "CORR-7" and str(instance.PatientName) == "Müller^Zoë"
        assert archive.reads == [str(native.SOPInstanceUID)]
    finally:
        server.stop()
        store.close()
