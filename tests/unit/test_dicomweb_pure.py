"""The pure parts of DICOMweb: PS3.18 F JSON, QIDO parameters to Query, Accept headers,
multipart bodies read in arbitrary chunks, and the Part-10 file meta of a STOW part."""

from __future__ import annotations

import io
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsnode.node.dicomweb_json import attribute, dataset_to_json, number, person_name, row_to_json
from pacsnode.node.dicomweb_media import (
    MediaError,
    MultipartReader,
    OversizedPart,
    choose_syntax,
    closing_delimiter,
    dicom_syntaxes,
    multipart_boundary,
    parse_accept,
    part_header,
    read_file_meta,
)
from pacsnode.node.dicomweb_query import QidoError, default_keywords, parse_qido, sort_key
from pacsnode.replication.matching import match_all

# ------------------------------------------------------------------ JSON (PS3.18 F)


@pytest.mark.parametrize(("vr", "value", "expected"), [
    ("PN", "DOE^JOHN", {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}),
    ("PN", "Yamada^Tarou=山田^太郎=やまだ^たろう",
     {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]}),
    ("PN", "=山田^太郎", {"vr": "PN", "Value": [{"Ideographic": "山田^太郎"}]}),
    ("IS", "12", {"vr": "IS", "Value": [12]}),
    ("IS", " 7 ", {"vr": "IS", "Value": [7]}),
    ("DS", "0.5", {"vr": "DS", "Value": [0.5]}),
    ("DS", "2", {"vr": "DS", "Value": [2]}),
    ("DS", ["1.5", "-2.25"], {"vr": "DS", "Value": [1.5, -2.25]}),
    ("DS", "1.5\\2.5", {"vr": "DS", "Value": [1.5, 2.5]}),
    ("US", "512", {"vr": "US", "Value": [512]}),
    ("IS", "twelve", {"vr": "IS"}),  # Never a string posing as a number.
    ("CS", ["CT", "MR"], {"vr": "CS", "Value": ["CT", "MR"]}),
    ("CS", ["ORIGINAL", "", "AXIAL"], {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]}),
    ("LO", "", {"vr": "LO"}),
    ("LO", None, {"vr": "LO"}),
    ("SQ", "x", {"vr": "SQ"}),
    ("DA", "20240102", {"vr": "DA", "Value": ["20240102"]}),
    ("LT", "a\\b", {"vr": "LT", "Value": ["a\\b"]}),  # Text VRs keep their backslash.
])
def test_attribute_values(vr: str, value: Any, expected: dict[str, Any]) -> None:
    assert attribute(vr, value) == expected


def test_numbers_and_names() -> None:
    assert number("DS", "1e3") == 1000.0 and number("DS", "nan") is None and number("IS", "12.0") == 12
    assert person_name("") is None


def test_row_to_json_has_every_asked_attribute_sorted_by_tag() -> None:
    row = {"PatientName": "DOE^JANE", "StudyInstanceUID": "1.2.3", "NumberOfStudyRelatedInstances": "4",
           "_transfer_syntax_uid": "1.2.840.10008.1.2.1"}
    result = row_to_json(row, ["StudyInstanceUID", "PatientName", "StudyDate", "NumberOfStudyRelatedInstances"],
                         {"RetrieveURL": {"vr": "UR", "Value": ["http://x/studies/1.2.3"]}})
    assert list(result) == ["00080020", "00081190", "00100010", "0020000D", "00201208"]
    assert result["00080020"] == {"vr": "DA"}
    assert result["00201208"] == {"vr": "IS", "Value": [4]}
    assert result["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}


def test_dataset_to_json_follows_annex_f() -> None:
    dataset = Dataset()
    dataset.PatientName = "DOE^JOHN"
    dataset.InstanceNumber = "3"
    dataset.SliceThickness = "1.25"
    dataset.StudyDescription = ""
    dataset.add_new(0x00091010, "OB", b"\x00" * 4096)  # Bulk data: left out without a URI handler.
    result = dataset_to_json(dataset)
    assert result["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}
    assert result["00200013"] == {"vr": "IS", "Value": [3]}
    assert result["00180050"] == {"vr": "DS", "Value": [1.25]}
    assert result["00081030"] == {"vr": "LO"}
    assert result["00091010"] == {"vr": "OB"}
    assert list(result) == sorted(result)


# ------------------------------------------------------------------ QIDO parameters


def test_study_search_with_every_matching_kind() -> None:
    request = parse_qido("studies", [
        ("PatientName", "DOE*"), ("00100020", "ID?"), ("StudyDate", "20200101-20201231"),
        ("StudyInstanceUID", "1.2.3,1.2.4"), ("ModalitiesInStudy", "CT"), ("AccessionNumber", "A1"),
        ("includefield", "StudyDescription,00081032"), ("includefield", "PatientAge"),
        ("limit", "10"), ("offset", "20"), ("fuzzymatching", "true"),
    ])
    query = request.query
    assert query.level == "STUDY"
    kinds = {c.keyword: c.kind for c in query.conditions}
    assert kinds == {"PatientName": "wildcard", "PatientID": "wildcard", "StudyDate": "range",
                     "StudyInstanceUID": "uid-list", "ModalitiesInStudy": "single", "AccessionNumber": "single"}
    assert query.condition("StudyInstanceUID").value == "1.2.3\\1.2.4"  # type: ignore[union-attr]
    assert {"StudyDescription", "ProcedureCodeSequence", "PatientAge", "PatientName"} <= set(request.keywords)
    assert (request.limit, request.offset, request.fuzzy_requested) == (10, 20, True)
    row = {"PatientName": "doe^john", "PatientID": "ID7", "StudyDate": "20200615", "StudyInstanceUID": "1.2.4",
           "ModalitiesInStudy": ["MR", "CT"], "AccessionNumber": "A1"}
    assert match_all(query.conditions, row)
    assert not match_all(query.conditions, {**row, "StudyDate": "20210101"})


def test_nested_paths_become_study_and_series_conditions() -> None:
    request = parse_qido("instances", [("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")], study_instance_uid="1.2.3",
                         series_instance_uid="1.2.3.4")
    assert request.query.level == "IMAGE"
    assert {c.keyword: c.value for c in request.query.conditions} == {
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}
    assert "PatientName" not in request.keywords  # Nested: the parents' UIDs only.
    assert "PatientName" in parse_qido("instances", []).keywords  # Un-nested: the study's attributes too.
    assert "Modality" in parse_qido("instances", []).keywords


def test_includefield_all_and_universal_keys() -> None:
    request = parse_qido("series", [("includefield", "all"), ("BodyPartExamined", "")])
    assert {"Manufacturer", "PatientBirthDate", "NumberOfSeriesRelatedInstances"} <= set(request.keywords)
    assert request.query.conditions == ()
    assert set(default_keywords("STUDY", False)) <= set(request.keywords)


@pytest.mark.parametrize("params", [
    [("limit", "-1")], [("offset", "x")], [("NoSuchKeyword", "1")], [("00991234", "1")],
    [("includefield", "Nonsense")], [("00400275.00321060", "X")], [("PatientID", "1"), ("PatientID", "2")],
])
def test_bad_parameters_are_refused(params: list[tuple[str, str]]) -> None:
    with pytest.raises(QidoError):
        parse_qido("studies", params)


def test_path_and_query_study_must_agree() -> None:
    with pytest.raises(QidoError):
        parse_qido("series", [("StudyInstanceUID", "9.9")], study_instance_uid="1.2.3")


def test_pages_are_ordered_newest_first_then_by_uid() -> None:
    rows = [{"StudyDate": "20200101", "StudyInstanceUID": "1.2"}, {"StudyDate": "", "StudyInstanceUID": "1.0"},
            {"StudyDate": "20240101", "StudyInstanceUID": "1.9"}, {"StudyDate": "20240101", "StudyInstanceUID": "1.3"}]
    ordered = sorted(rows, key=sort_key("STUDY"))
    assert [r["StudyInstanceUID"] for r in ordered] == ["1.3", "1.9", "1.2", "1.0"]


# ------------------------------------------------------------------ media types


def test_accept_headers() -> None:
    ranges = parse_accept('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50, '
                          'multipart/related; type="application/dicom"; transfer-syntax=*;q=0.5')
    assert dicom_syntaxes(ranges) == ["1.2.840.10008.1.2.4.50", "*"]
    assert dicom_syntaxes(parse_accept(None)) == ["*"]
    assert dicom_syntaxes(parse_accept("application/dicom+json")) is None
    assert dicom_syntaxes(parse_accept('multipart/related; type="image/jpeg"')) is None
    assert dicom_syntaxes(parse_accept('multipart/related; type="application/dicom"')) == ["*"]


def test_choose_syntax_keeps_stored_bytes_when_it_can() -> None:
    assert choose_syntax("1.2.840.10008.1.2.4.50", ["*"]) == "1.2.840.10008.1.2.4.50"
    assert choose_syntax("1.2.840.10008.1.2.4.50", ["1.2.840.10008.1.2.1"]) is None  # No decoder: never.
    jpeg_decoder = lambda syntax: syntax == "1.2.840.10008.1.2.4.50"  # noqa: E731
    assert choose_syntax("1.2.840.10008.1.2.4.50", ["1.2.840.10008.1.2.1"], jpeg_decoder) == "1.2.840.10008.1.2.1"
    assert choose_syntax("1.2.840.10008.1.2.4.50", ["*"], jpeg_decoder) == "1.2.840.10008.1.2.4.50"  # Default: as stored.
    assert choose_syntax("1.2.840.10008.1.2.4.50", ["1.2.840.10008.1.2.2"], jpeg_decoder) is None
    assert choose_syntax("1.2.840.10008.1.2.4.80", ["1.2.840.10008.1.2.1"], jpeg_decoder) is None
    assert choose_syntax("1.2.840.10008.1.2.1.99", ["1.2.840.10008.1.2"]) == "1.2.840.10008.1.2"  # Deflated.
    assert choose_syntax("1.2.840.10008.1.2", ["1.2.840.10008.1.2.1"]) == "1.2.840.10008.1.2.1"
    assert choose_syntax("1.2.840.10008.1.2.1", ["1.2.840.10008.1.2.1"]) == "1.2.840.10008.1.2.1"


def _multipart(parts: list[bytes], boundary: str) -> bytes:
    body = b"".join(part_header(boundary, "application/dicom", first=i == 0) + part for i, part in enumerate(parts))
    return body + closing_delimiter(boundary, empty=not parts)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 100_000])
def test_multipart_reader_in_any_chunk_size(chunk: int) -> None:
    boundary = "b0und4ry"
    parts = [b"first\r\n--b0und4r", b"", b"\r\n--b0und4ry-not-yet" * 3, bytes(range(256)) * 10]
    body = b"preamble\r\n" + _multipart(parts, boundary) + b"epilogue"
    reader = MultipartReader(boundary, part_bytes_max=10_000)
    got = []
    for index in range(0, len(body), chunk):
        got.extend(reader.feed(body[index:index + chunk]))
    reader.close()
    assert [p.body for p in got] == parts
    assert all(p.content_type == "application/dicom" for p in got)


def test_multipart_reader_refuses_truncated_bodies_and_reads_past_oversized_parts() -> None:
    body = _multipart([b"x" * 100], "b")
    reader = MultipartReader("b", part_bytes_max=1000)
    reader.feed(body[:-10])
    with pytest.raises(MediaError):
        reader.close()
    small = MultipartReader("b", part_bytes_max=10)
    [oversized] = small.feed(body)  # Read on to its end, its bytes not kept (tests/unit/test_dicomweb_stow_limit.py).
    assert isinstance(oversized, OversizedPart) and oversized.size_bytes == 100
    small.close()
    assert multipart_boundary('multipart/related; type="application/dicom"; boundary="a b"') == ("application/dicom",
                                                                                                 "a b")
    with pytest.raises(MediaError):
        multipart_boundary("application/dicom")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_file_meta_of_a_part10_file(syntax: str) -> None:
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.SOPInstanceUID = "1.2.3.4.5"
    dataset.PatientName = "X"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    data = output.getvalue()
    meta = read_file_meta(data)
    assert (meta.transfer_syntax_uid, meta.media_storage_sop_instance_uid) == (syntax, "1.2.3.4.5")
    assert data[meta.dataset_offset:meta.dataset_offset + 2] == b"\x08\x00"  # (0008,0016) starts the dataset.
    with pytest.raises(MediaError):
        read_file_meta(data[128:])


def test_fuzzymatching_matches_a_name_key_anywhere_in_the_name() -> None:
    from pacsnode.node.dicomweb_query import fuzzy_name

    assert fuzzy_name("smi") == "*smi*" and fuzzy_name("DOE*") == "DOE*" and fuzzy_name("ab\\c?d") == "*ab*\\c?d"
    fuzzy = parse_qido("studies", [("PatientName", "smi"), ("fuzzymatching", "true")]).query.conditions
    literal = parse_qido("studies", [("PatientName", "smi")]).query.conditions
    for name in ("SMITH^JOHN", "doe^smirna", "Osmi^A"):
        assert match_all(fuzzy, {"PatientName": name}) and not match_all(literal, {"PatientName": name})
    assert not match_all(fuzzy, {"PatientName": "JONES^S^M^I"})


# ------------------------------------------------------------------ /metadata built from the header


def _part10(syntax: str, *, pixels: bool = True, icon: bool = False, big_private: bool = False) -> bytes:
    from pydicom.sequence import Sequence

    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.SOPInstanceUID = "1.2.3.4"
    dataset.StudyInstanceUID = "1.2.3"
    dataset.SeriesInstanceUID = "1.2.3.9"
    dataset.PatientName = 'Quote"Me^"BulkDataURI":"x'  # Patient text that looks like our key.
    dataset.Rows, dataset.Columns, dataset.BitsAllocated = 4, 4, 16
    if big_private:
        dataset.add_new(0x00091010, "OB", b"\x01" * 2048)
    if icon:
        item = Dataset()
        item.Rows = item.Columns = 2
        item.add_new(0x7FE00010, "OW", b"\x02\x00" * 4)
        dataset.IconImageSequence = Sequence([item])
    if pixels:
        dataset.PixelData = b"\x05\x00" * 16
        dataset["PixelData"].VR = "OW"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), "1.2.840.10008.1.2.2"])
def test_header_json_names_pixel_data_without_reading_it(syntax: str) -> None:
    import json

    from pacsnode.node.dicomweb_metadata import header_json, with_root

    stored = header_json(_part10(syntax), syntax, "1.2.3", "1.2.3.9", "1.2.3.4")
    assert b"\x05\x00" not in stored
    served = json.loads(with_root(stored, "http://h:1/dicom-web"))
    assert served["7FE00010"] == {"vr": "OW", "BulkDataURI":
                                  "http://h:1/dicom-web/studies/1.2.3/series/1.2.3.9/instances/1.2.3.4/bulk/7FE00010"}
    assert served["00280010"] == {"vr": "US", "Value": [4]}
    assert served["00083002"] == {"vr": "UI", "Value": [syntax]}
    # The patient's text is left as it was, though it holds the key's own spelling.
    assert served["00100010"]["Value"][0]["Alphabetic"] == 'Quote"Me^"BulkDataURI":"x'


@pytest.mark.parametrize("syntax", [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)])
def test_header_json_from_the_first_bytes_only_when_they_hold_the_header(syntax: str) -> None:
    from pacsnode.node.dicomweb_metadata import HeaderTruncated, header_json

    part10 = _part10(syntax, big_private=True, icon=True)
    whole = header_json(part10, syntax, "1.2.3", "1.2.3.9", "1.2.3.4")
    pixel_at = part10.rindex(b"\xe0\x7f\x10\x00")  # Where the header ends: the pixel data element.
    for cut in (pixel_at + 12, pixel_at + 13, len(part10) - 1):  # The element header (12 bytes) within.
        assert header_json(part10[:cut], syntax, "1.2.3", "1.2.3.9", "1.2.3.4", whole=False) == whole
    for cut in (pixel_at + 7, pixel_at - 1, pixel_at - 2040, 200):  # Inside the header: never a short answer.
        with pytest.raises(HeaderTruncated):
            header_json(part10[:cut], syntax, "1.2.3", "1.2.3.9", "1.2.3.4", whole=False)
    with pytest.raises(HeaderTruncated):  # A deflated dataset is only read whole.
        header_json(part10[:-1], "1.2.840.10008.1.2.1.99", "1.2.3", "1.2.3.9", "1.2.3.4", whole=False)


def test_header_json_large_binary_values_and_sequences_are_bulk_data() -> None:
    import json

    from pydicom import dcmread

    from pacsnode.node.dicomweb_metadata import BulkDataError, bulk_value, header_json, with_root

    data = _part10(str(ExplicitVRLittleEndian), icon=True, big_private=True, pixels=False)
    served = json.loads(with_root(header_json(data, str(ExplicitVRLittleEndian), "1.2.3", "1.2.3.9", "1.2.3.4"),
                                  'http://h:1/"x'))
    base = 'http://h:1/"x/studies/1.2.3/series/1.2.3.9/instances/1.2.3.4/bulk/'
    assert served["00091010"]["BulkDataURI"] == base + "00091010"
    icon = served["00880200"]["Value"][0]
    assert "7FE00010" not in served
    assert icon["7FE00010"].get("InlineBinary") or icon["7FE00010"].get("BulkDataURI")  # 8 bytes: inline.
    dataset = dcmread(io.BytesIO(data))
    assert bytes(bulk_value(dataset, "00091010").value) == b"\x01" * 2048
    assert bytes(bulk_value(dataset, "00880200/0/7FE00010").value) == b"\x02\x00" * 4
    for bad in ("00100010", "7FE00010", "00880200/3/7FE00010", "zz", "00880200/0"):
        with pytest.raises(BulkDataError):
            bulk_value(dataset, bad)


def test_metrics_route_labels_stay_bounded() -> None:
    from pacsnode.node.http_server import route_label

    base = "/dicom-web/studies/{studies}/series/{series}/instances/{instances}"
    assert route_label("/dicom-web/studies/1.2/series/3.4/instances/5.6/bulk/00880200/0/7FE00010") == base + "/bulk/{path}"
    assert route_label("/dicom-web/studies/1.2/series/3.4/instances/5.6/bulk/7FE00010") == base + "/bulk/{path}"
    assert route_label("/dicom-web/studies/1.2/series/3.4/instances/5.6/frames/1,2") == base + "/frames/{frames}"
