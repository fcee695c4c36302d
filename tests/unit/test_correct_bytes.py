"""node/correct.py: a study's correction applied to the header of the bytes retrieval sends."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsnode.node.correct import corrected
from pacsnode.replication.correction import Correction
from pacsnode.replication.hlc import Version


def _part10(syntax: str, *, charset: str | None = None) -> tuple[bytes, int]:
    dataset = Dataset()
    if charset:
        dataset.SpecificCharacterSet = charset
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.SOPInstanceUID = "1.2.3.4.5.6"
    dataset.StudyDate = "20240102"
    dataset.AccessionNumber = "ACC1"
    item = Dataset()
    item.CodeValue = "X1"
    dataset.ProcedureCodeSequence = Sequence([item])
    dataset.PatientName = "Old^Name"
    dataset.PatientBirthDate = "19700101"
    dataset.StudyInstanceUID = "1.2.3"
    dataset.SeriesInstanceUID = "1.2.3.1"
    dataset.Rows, dataset.Columns, dataset.BitsAllocated = 4, 4, 8
    dataset.PixelData = bytes(range(16))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    dataset.file_meta = meta
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian,
                    little_endian=True)
    data = buffer.getvalue()
    return data, 144 + struct.unpack_from("<L", data, 140)[0]


def _correction(**values: str) -> Correction:
    return Correction.of("1.2.3", values, Version(1, 0, "n"))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_rewritten_rest_byte_for_byte(syntax: str) -> None:
    part10, offset = _part10(syntax)
    new, new_offset = corrected(part10, offset, syntax, _correction(PatientName="New^Name", PatientID="P2",
                                                                       StudyID="7"))
    assert new_offset == offset and new[:offset] == part10[:offset]
    read = dcmread(BytesIO(new))
    assert str(read.PatientName) == "New^Name" and read.PatientID == "P2" and read.StudyID == "7"
    original = dcmread(BytesIO(part10))
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyDate", "SOPInstanceUID", "SeriesInstanceUID"):
        assert read.get(keyword) == original.get(keyword)
    assert read.ProcedureCodeSequence[0].CodeValue == "X1"
    assert read.PixelData == original.PixelData
    # Everything after StudyID (0020,0010) is the stored bytes as they were.
    tail = part10[part10.index(b"\x28\x00\x10\x00"):]  # (0028,0010) Rows onwards, pixel data included.
    assert new.endswith(tail)


def test_no_correction_is_the_same_object() -> None:
    part10, offset = _part10(ExplicitVRLittleEndian)
    assert corrected(part10, offset, ExplicitVRLittleEndian, None)[0] is part10


def test_non_ascii_value_switches_default_repertoire_to_utf8() -> None:
    part10, offset = _part10(ExplicitVRLittleEndian)
    new, _ = corrected(part10, offset, ExplicitVRLittleEndian, _correction(PatientName="Müller^Jörg"))
    read = dcmread(BytesIO(new))
    assert read.SpecificCharacterSet == "ISO_IR 192" and str(read.PatientName) == "Müller^Jörg"


def test_latin1_instance_keeps_its_charset() -> None:
    part10, offset = _part10(ExplicitVRLittleEndian, charset="ISO_IR 100")
    new, _ = corrected(part10, offset, ExplicitVRLittleEndian, _correction(PatientName="Müller^Jörg"))
    read = dcmread(BytesIO(new))
    assert read.SpecificCharacterSet == "ISO_IR 100" and str(read.PatientName) == "Müller^Jörg"
    assert "Müller".encode("latin-1") in new


def test_deflated_is_rewritten_whole() -> None:
    part10, offset = _part10(DeflatedExplicitVRLittleEndian)
    new, new_offset = corrected(part10, offset, DeflatedExplicitVRLittleEndian, _correction(PatientID="P9"))
    read = dcmread(BytesIO(new))
    assert read.PatientID == "P9" and read.PixelData == bytes(range(16))
    assert new_offset == 144 + struct.unpack_from("<L", new, 140)[0]


def test_metadata_json_gets_the_overlay() -> None:
    import json

    from pacsnode.node.correct import overlay_json

    part = json.dumps({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Old^Name"}]},
                       "00100020": {"vr": "LO", "Value": ["P1"]}}).encode()
    out = json.loads(overlay_json(part, _correction(PatientName="New^Name", StudyDescription="").dumps()))
    assert out["00100010"]["Value"] == [{"Alphabetic": "New^Name"}]
    assert out["00100020"]["Value"] == ["P1"] and out["00081030"] == {"vr": "LO"}
    assert list(out) == sorted(out)
