"""node/header_reader.py against pydicom, on every test file of pydicom and this project
and on headers built for the edge cases: the lean reader either gives exactly pydicom's
answer (the same /metadata bytes, the same index attributes) or says Unsupported (and the
caller then uses pydicom). It must also take the common files itself, or it is no use."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsnode.node import header_reader
from pacsnode.node.dicomweb_media import MediaError, read_file_meta
from pacsnode.node.dicomweb_metadata import HeaderTruncated, _lean_header_json, header_json, pydicom_header_json
from pacsnode.node.header_reader import Truncated, Unsupported
from pacsnode.node.ingest import _INDEX_TAGS, InvalidInstance, read_attributes
from pacsnode.sim.datagen import StudySetSpec, iter_part10

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"
BASE = f"studies/{STUDY}/series/{SERIES}/instances/{SOP}/bulk/"
EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)


def _save(dataset: Dataset, syntax: str = EXPLICIT) -> bytes:
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.file_meta.MediaStorageSOPInstanceUID = SOP
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Values invalid on purpose.
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _base() -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.SOPInstanceUID = SOP
    dataset.StudyInstanceUID = STUDY
    dataset.SeriesInstanceUID = SERIES
    return dataset


def _edge(name: str, edit: Callable[[Dataset], None], syntax: str = EXPLICIT) -> tuple[str, bytes]:
    dataset = _base()
    edit(dataset)
    return name, _save(dataset, syntax)


def _add(*elements: tuple[int, str, Any]) -> Callable[[Dataset], None]:
    """Elements to add; a bytes value of a text VR goes in as written (pydicom would refuse
    to build some of the values these tests need)."""
    def edit(dataset: Dataset) -> None:
        for tag, vr, value in elements:
            if isinstance(value, bytes) and vr not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
                dataset[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
            else:
                dataset.add_new(tag, vr, value)
    return edit


def _sequences(dataset: Dataset) -> None:
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-1", "SRT", "Chest  "
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.9"
    item.add_new(0x00400260, "SQ", Sequence([inner, Dataset()]))  # Nested, with an empty item.
    item.add_new(0x00091010, "LO", "PRIVATE CREATOR")
    item.add_new(0x00091011, "OB", b"\x01" * 800)  # Bulk data inside a sequence.
    dataset.ReferencedImageSequence = Sequence([item, Dataset()])
    dataset.add_new(0x00081115, "SQ", Sequence([]))  # An empty sequence.
    icon = Dataset()
    icon.Rows = icon.Columns = 2
    icon.add_new(0x7FE00010, "OW", b"\x02\x00" * 4)
    dataset.IconImageSequence = Sequence([icon])


EDGES: list[tuple[str, bytes]] = [
    _edge("sequences", _sequences),
    _edge("sequences-implicit", _sequences, IMPLICIT),
    _edge("pn-three-groups", _add((0x00100010, "PN", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
                                  (0x00080005, "CS", "ISO_IR 192"))),
    _edge("pn-groups-ascii", _add((0x00100010, "PN", "Doe^John=Ideo=Phon"),
                                  (0x00080090, "PN", ["A^B", "C^D=E", "F=="]),
                                  (0x00081060, "PN", "=Only^Ideographic"))),
    _edge("pn-empty-in-list", _add((0x00100010, "PN", ["A^B", ""]))),
    ("pn-only-equals", _edge("", _add((0x00100010, "PN", "ZZ")))[1].replace(b"PN\x02\x00ZZ", b"PN\x02\x00==")),
    _edge("multi-valued", _add((0x00080008, "CS", ["ORIGINAL", "PRIMARY", "", "AXIAL"]),
                               (0x00200037, "DS", ["1", "0.0", "-0", "1e-3", " 2.50 ", "1E+2"]),
                               (0x00200032, "DS", ["-125.5", "+3", ".5"]),
                               (0x00181310, "US", [0, 512, 512, 0]),
                               (0x00280034, "IS", ["1", " 2", "+3 "]),
                               (0x00186011, "SQ", Sequence([])),
                               (0x00189219, "FD", [0.1, -2.5, 1e300]),
                               (0x00189327, "FL", [0.1, 3.0]),
                               (0x00209165, "AT", [0x00100010, 0x7FE00010]),
                               (0x00080061, "CS", "CT\\MR"),
                               (0x00321060, "LO", ["A ", " B", ""]),
                               (0x00081030, "LO", "Trailing  "))),
    _edge("empty-values", _add(*[(tag, vr, value) for tag, vr, value in (
        (0x00080020, "DA", ""), (0x00080030, "TM", ""), (0x00080050, "SH", ""), (0x00080090, "PN", ""),
        (0x00081030, "LO", ""), (0x00100010, "PN", ""), (0x00101010, "AS", ""), (0x00101020, "DS", ""),
        (0x00200011, "IS", ""), (0x00280010, "US", None), (0x00181000, "LO", "   "), (0x00204000, "LT", ""),
        (0x00080054, "AE", ""), (0x00080201, "SH", ""), (0x00091010, "LO", ""), (0x00091011, "OB", b""),
        (0x00091012, "UT", ""), (0x00091013, "UR", ""), (0x00091014, "FD", None), (0x00091015, "AT", None),
        (0x00091016, "UC", ""), (0x00091017, "SS", None), (0x00091018, "DT", ""))])),
    _edge("bulk-threshold", _add((0x00091010, "LO", "ACME"), (0x00091011, "OB", b"\x07" * 768),
                                 (0x00091012, "OB", b"\x07" * 770), (0x00091013, "OW", b"\x01\x02" * 384),
                                 (0x00091014, "OW", b"\x01\x02" * 385), (0x00091015, "OF", b"\x00" * 8),
                                 (0x00091016, "OD", b"\x00" * 2048), (0x00091017, "OL", b"\x00" * 4))),
    _edge("private-tags", _add((0x00290010, "LO", "SIEMENS CSA HEADER"), (0x00291008, "CS", "IMAGE NUM 4"),
                               (0x00291009, "LO", "20100101"), (0x00291010, "OB", b"SV10" * 300),
                               (0x00431001, "SS", -5), (0x00431002, "SL", [-1, 2]), (0x00431003, "UL", 7),
                               (0x00431004, "FD", 2.5), (0x00431005, "UT", "text\\with backslash "))),
    _edge("latin1", _add((0x00080005, "CS", "ISO_IR 100"), (0x00100010, "PN", "Müller^Jürgen"),
                         (0x00081030, "LO", "Étude"), (0x00204000, "LT", "Bemerkung:  ä\\ö  "))),
    _edge("utf8", _add((0x00080005, "CS", "ISO_IR 192"), (0x00100010, "PN", "Ωμέγα^Ελένη"),
                       (0x00081030, "LO", "Исследование"), (0x00321060, "LO", ["δ", "ε"]))),
    _edge("iso2022", _add((0x00080005, "CS", ["", "ISO 2022 IR 87"]), (0x00100010, "PN", "Yamada^Tarou"))),
    _edge("numbers-odd", _add((0x00200013, "IS", b"12.0"), (0x00101020, "DS", b"1e999 "),
                              (0x00101030, "DS", b"nan "), (0x00200011, "IS", b"x "))),
    _edge("is-huge", _add((0x00200013, "IS", b"99999999999999999999"))),
    _edge("is-float", _add((0x00200013, "IS", b"12.0"))),
    _edge("ds-infinite", _add((0x00101020, "DS", b"1e999 "))),
    _edge("ds-empty-in-list", _add((0x00200037, "DS", b"1\\\\0 "))),
    _edge("numbers-ok", _add((0x00200013, "IS", "-7 "), (0x00101020, "DS", "1.75"), (0x00101030, "DS", " 80 "),
                             (0x00200011, "IS", "0"), (0x00280010, "US", 0), (0x00180050, "DS", "0.6250000000"))),
    _edge("strings", _add((0x00080020, "DA", "20240101 "), (0x00080030, "TM", "101010.123\x00"),
                          (0x00080054, "AE", [" AE1 ", "AE2"]), (0x00081190, "UR", "http://x/y  "),
                          (0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.7\x00"), (0x00181030, "LO", "Protocol\x00"),
                          (0x00204000, "LT", " lead and trail  "), (0x00180015, "CS", " CHEST "),
                          (0x0008002A, "DT", "20240101101010"), (0x00101010, "AS", "042Y"))),
]


def _datagen_files() -> Iterator[tuple[str, bytes]]:
    specs = {
        "mix": StudySetSpec(patients=6, series_per_study=2, rows=8, cols=8, seed=41, latin1_fraction=0.5),
        "implicit": StudySetSpec(patients=3, rows=8, cols=8, seed=42, implicit_vr=True, latin1_fraction=0.5),
        "ct": StudySetSpec(patients=1, instances_per_series=2, rows=8, cols=8, seed=43, modalities=("CT",)),
    }
    for name, spec in specs.items():
        for index, (_entry, part10) in enumerate(iter_part10(spec)):
            yield f"datagen-{name}-{index}", part10


def _pydicom_files() -> Iterator[tuple[str, bytes]]:
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.stat().st_size < 8_000_000:
            yield f"pydicom-{path.relative_to(root)}", path.read_bytes()


CORPUS = [*EDGES, *_datagen_files(), *_pydicom_files()]


def _meta(part10: bytes) -> tuple[int, str] | None:
    try:
        meta = read_file_meta(part10)
    except MediaError:
        return None
    return meta.dataset_offset, meta.transfer_syntax_uid


def _reference(call: Callable[[], Any]) -> tuple[bool, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return True, call()
        except HeaderTruncated:
            raise
        except Exception as error:  # pydicom raises many types on odd headers
            return False, type(error).__name__


def _lean(call: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, call()
    except (Unsupported, Truncated) as error:
        return False, type(error).__name__


def test_metadata_json_is_pydicoms_byte_for_byte() -> None:
    taken: list[str] = []
    for name, part10 in CORPUS:
        meta = _meta(part10)
        if meta is None:
            continue
        syntax = meta[1]
        ok, expected = _reference(lambda: pydicom_header_json(part10, syntax, STUDY, SERIES, SOP))
        lean_ok, lean = _lean(lambda: _lean_header_json(part10, syntax, BASE, whole=True))
        if not lean_ok:
            continue
        assert ok, f"{name}: pydicom failed ({expected}) where the lean reader answered"
        assert lean == expected, name
        assert header_json(part10, syntax, STUDY, SERIES, SOP) == expected, name
        taken.append(name)
    must = {name for name, _ in EDGES if name not in ("pn-empty-in-list", "pn-only-equals", "iso2022", "numbers-odd",
                                                      "is-huge", "is-float", "ds-infinite", "ds-empty-in-list",
                                                      "sequences-implicit")}
    must |= {name for name, _ in _datagen_files()}
    assert must <= set(taken), sorted(must - set(taken))
    assert len(taken) >= 60, len(taken)  # Most of pydicom's Explicit/Implicit LE test files too.


def test_unsupported_headers_fall_back_to_pydicom() -> None:
    for name in ("pn-empty-in-list", "pn-only-equals", "iso2022", "numbers-odd", "is-huge", "is-float",
                 "ds-infinite", "ds-empty-in-list"):
        part10 = dict(EDGES)[name]
        with pytest.raises(Unsupported):
            _lean_header_json(part10, EXPLICIT, BASE, whole=True)
        ok, expected = _reference(lambda: pydicom_header_json(part10, EXPLICIT, STUDY, SERIES, SOP))
        got_ok, got = _reference(lambda: header_json(part10, EXPLICIT, STUDY, SERIES, SOP))
        assert (ok, expected) == (got_ok, got), name


def test_metadata_from_the_first_bytes_matches_pydicom() -> None:
    """whole=False: the answer from a head that holds the header, HeaderTruncated otherwise."""
    checked = 0
    for name, part10 in CORPUS:
        meta = _meta(part10)
        if meta is None or meta[1] not in (EXPLICIT, IMPLICIT):
            continue
        pixel = part10.rfind(b"\xe0\x7f\x10\x00")
        cuts = [len(part10) // 2, meta[0] + 10] + ([pixel + 12] if pixel > meta[0] else [])
        for cut in cuts:
            head = part10[:cut]

            def outcome(call: Callable[[], bytes]) -> Any:
                try:
                    return _reference(call)
                except HeaderTruncated:
                    return "truncated"

            lean = outcome(lambda: header_json(head, meta[1], STUDY, SERIES, SOP, whole=False))
            reference = outcome(lambda: pydicom_header_json(head, meta[1], STUDY, SERIES, SOP, whole=False))
            assert lean == reference, (name, cut)
            checked += 1
    assert checked > 100


def test_index_attributes_are_pydicoms() -> None:
    taken: list[str] = []
    for name, part10 in CORPUS:
        meta = _meta(part10)
        if meta is None:
            continue
        offset, syntax = meta
        ok, expected = _reference(lambda: read_attributes(part10)[1])
        lean_ok, lean = _lean(lambda: header_reader.index_attributes(part10, offset, syntax, _INDEX_TAGS))
        if not lean_ok:
            continue
        assert ok, f"{name}: pydicom failed ({expected}) where the lean reader answered"
        assert lean == expected, name
        taken.append(name)
    must = {name for name, _ in _datagen_files()} | {"pn-groups-ascii", "latin1", "utf8", "multi-valued",
                                                     "empty-values", "numbers-ok", "strings", "sequences"}
    assert must <= set(taken), sorted(must - set(taken))
    assert len(taken) >= 60, len(taken)


def test_index_read_at_ingest_uses_the_lean_reader_and_agrees() -> None:
    from pacsnode.node.ingest import instance_from_part10

    for name, part10 in _datagen_files():
        offset, syntax = _meta(part10) or (0, "")
        instance = instance_from_part10(part10, offset, syntax)
        assert instance.attributes == read_attributes(part10)[1], name


def test_unreadable_datasets_still_fail_as_before() -> None:
    """What pydicom refuses is still refused: the lean reader hands anything odd back."""
    from pacsnode.node.ingest import instance_from_part10

    part10 = dict(EDGES)["strings"]
    offset, syntax = _meta(part10) or (0, "")
    with pytest.raises(InvalidInstance):
        instance_from_part10(part10[:offset + 3], offset, syntax)


def test_the_series_memo_changes_no_answer() -> None:
    """Short values' JSON entries are kept between headers (a series repeats most of
    them): every answer with the memo filled by the whole corpus is the answer with it
    emptied before each header, and a series' second header reuses its first's entries."""
    from pacsnode.node import header_reader

    def answers(clear_each: bool) -> list[tuple[bool, Any]]:
        header_reader._json_entries.clear()
        out = []
        for _name, part10 in CORPUS:
            meta = _meta(part10)
            if meta is None:
                continue
            if clear_each:
                header_reader._json_entries.clear()
            out.append(_lean(lambda: _lean_header_json(part10, meta[1], BASE, whole=True)))
        return out

    assert answers(clear_each=False) == answers(clear_each=True)
    header_reader._json_entries.clear()
    first, second = [part10 for _name, part10 in _datagen_files()][:2]  # Same study, same series.
    _lean_header_json(first, EXPLICIT, BASE, whole=True)
    kept = dict(header_reader._json_entries)
    assert len(kept) > 10
    _lean_header_json(second, EXPLICIT, BASE, whole=True)
    assert len(header_reader._json_entries) < 2 * len(kept)  # Most of the second header was found, not added.
