"""instance_from_part10: header-only reading, UID validation (0xA900), unreadable bytes (0xC000)."""

from __future__ import annotations

import io
import random
import struct
import warnings
from collections.abc import Callable, Iterator

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from pacsnode.node.ingest import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    InvalidInstance,
    header_attributes,
    instance_from_part10,
)
from pacsnode.replication.model import content_hash
from pacsnode.sim.datagen import CT_IMAGE_STORAGE, StudySetSpec, encode_part10, iter_part10

PLAIN = StudySetSpec(patients=1, rows=8, cols=8, seed=31, modalities=("CT",))
IMPLICIT = StudySetSpec(patients=1, rows=8, cols=8, seed=32, modalities=("CT",), implicit_vr=True)


def _one(spec: StudySetSpec) -> bytes:
    return next(iter_part10(spec))[1]


def _offset(part10: bytes) -> tuple[int, str]:
    stream = io.BytesIO(part10)
    read_preamble(stream, False)
    meta = _read_file_meta_info(stream)
    return stream.tell(), str(meta.TransferSyntaxUID)


def _ingest(part10: bytes, **kwargs: str) -> object:
    offset, transfer_syntax_uid = _offset(part10)
    return instance_from_part10(part10, offset, transfer_syntax_uid, **kwargs)


def _edit(part10: bytes, edit: Callable[[Dataset], None]) -> bytes:
    dataset = dcmread(io.BytesIO(part10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs we write on purpose.
        edit(dataset)
        return encode_part10(dataset)


def _status(call: Callable[[], object]) -> int:
    with pytest.raises(InvalidInstance) as caught:
        call()
    return caught.value.status


# -- a good instance -------------------------------------------------------------------


@pytest.mark.parametrize("spec", [PLAIN, IMPLICIT], ids=["explicit-vr", "implicit-vr"])
def test_instance_describes_the_bytes_as_received(spec: StudySetSpec) -> None:
    entry, part10 = next(iter_part10(spec))
    offset, transfer_syntax_uid = _offset(part10)
    instance = instance_from_part10(part10, offset, transfer_syntax_uid)
    assert instance.part10 is part10
    assert (instance.study_instance_uid, instance.series_instance_uid, instance.sop_instance_uid) == (
        entry["study_uid"],
        entry["series_uid"],
        entry["sop_uid"],
    )
    assert instance.sop_class_uid == entry["sop_class_uid"]
    assert instance.transfer_syntax_uid == spec.transfer_syntax_uid
    assert instance.dataset_offset == offset
    assert instance.dataset_bytes == part10[offset:]
    assert instance.size_bytes == len(part10) - offset
    assert instance.content_hash == content_hash(spec.transfer_syntax_uid, part10[offset:])
    attributes = instance.attributes
    assert attributes["PatientID"] == entry["patient_id"]
    assert attributes["AccessionNumber"] == entry["accession_number"]
    assert attributes["StudyDate"] == entry["study_date"]
    assert attributes["Rows"] == "8"  # US values as strings.
    assert isinstance(attributes["ImageType"], list)  # Multi-valued CS as a list.
    assert "PixelData" not in attributes and "WindowCenter" not in attributes  # Only indexed tags.


def test_content_hash_depends_on_the_transfer_syntax() -> None:
    part10 = _one(PLAIN)
    offset, _ = _offset(part10)
    explicit = instance_from_part10(part10, offset, "1.2.840.10008.1.2.1")
    other = instance_from_part10(part10, offset, "1.2.840.10008.1.2.4.50")
    assert explicit.content_hash != other.content_hash


def test_specific_character_set_iso_ir_100_is_decoded() -> None:
    """Latin-1 text in indexed and unindexed attributes comes out as the right characters."""
    dataset = Dataset()
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.SOPClassUID = CT_IMAGE_STORAGE
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.9.1.1"
    dataset.StudyInstanceUID = "1.2.826.0.1.3680043.9.1.2"
    dataset.SeriesInstanceUID = "1.2.826.0.1.3680043.9.1.3"
    dataset.PatientName = "Müller^Jürgen"
    dataset.ReferringPhysicianName = "Lefèvre^Hélène"
    dataset.StudyDescription = "Thorax Größe"
    dataset.InstitutionalDepartmentName = "Chirurgie Süd"  # Not indexed: read on demand.
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    part10 = encode_part10(dataset)
    assert "Müller".encode("latin-1") in part10 and "Müller".encode("utf-8") not in part10

    instance = _ingest(part10)
    attributes = instance.attributes  # type: ignore[attr-defined]
    assert attributes["PatientName"] == "Müller^Jürgen"
    assert attributes["ReferringPhysicianName"] == "Lefèvre^Hélène"
    assert attributes["StudyDescription"] == "Thorax Größe"
    assert attributes["SpecificCharacterSet"] == "ISO_IR 100"
    assert header_attributes(part10, ("InstitutionalDepartmentName",)) == {"InstitutionalDepartmentName": "Chirurgie Süd"}


def test_generated_latin1_names_round_trip() -> None:
    spec = StudySetSpec(patients=4, rows=4, cols=4, seed=33, latin1_fraction=1.0)
    for entry, part10 in iter_part10(spec):
        attributes = _ingest(part10).attributes  # type: ignore[attr-defined]
        assert attributes["PatientName"] == entry["patient_name"]
        assert not entry["patient_name"].isascii()


def test_header_attributes_returns_only_what_was_asked() -> None:
    part10 = _one(PLAIN)
    found = header_attributes(part10, ("PhotometricInterpretation", "SliceThickness", "PatientComments"))
    assert found == {"PhotometricInterpretation": "MONOCHROME2", "SliceThickness": "5.0"}
    assert header_attributes(b"garbage", ("PatientName",)) == {}


# -- datasets that do not match their SOP class: 0xA900 -------------------------------------


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
def test_missing_uid_is_a_dataset_mismatch(keyword: str) -> None:
    part10 = _edit(_one(PLAIN), lambda dataset: delattr(dataset, keyword))
    with pytest.raises(InvalidInstance) as caught:
        _ingest(part10)
    assert caught.value.status == STATUS_DATASET_MISMATCH == 0xA900
    assert caught.value.reason == f"missing {keyword}"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize(
    "value",
    ["1.2.abc", "1..2", ".1.2", "1.2.", "1.2.3 4", "1." + "2" * 63, "not-a-uid"],
)
def test_invalid_uid_is_a_dataset_mismatch(keyword: str, value: str) -> None:
    part10 = _edit(_one(PLAIN), lambda dataset: setattr(dataset, keyword, value))
    with pytest.raises(InvalidInstance) as caught:
        _ingest(part10)
    assert caught.value.status == STATUS_DATASET_MISMATCH
    assert caught.value.reason == f"invalid {keyword}"


def test_empty_uid_is_missing() -> None:
    part10 = _edit(_one(PLAIN), lambda dataset: setattr(dataset, "StudyInstanceUID", ""))
    with pytest.raises(InvalidInstance, match="missing StudyInstanceUID") as caught:
        _ingest(part10)
    assert caught.value.status == STATUS_DATASET_MISMATCH


def test_sop_class_falls_back_to_the_request() -> None:
    part10 = _edit(_one(PLAIN), lambda dataset: delattr(dataset, "SOPClassUID"))
    instance = _ingest(part10, affected_sop_class_uid=CT_IMAGE_STORAGE)
    assert instance.sop_class_uid == CT_IMAGE_STORAGE  # type: ignore[attr-defined]


def test_request_uids_must_agree_with_the_dataset() -> None:
    part10 = _one(PLAIN)
    instance = _ingest(part10)
    sop_uid, sop_class = instance.sop_instance_uid, instance.sop_class_uid  # type: ignore[attr-defined]
    assert _ingest(part10, affected_sop_instance_uid=sop_uid, affected_sop_class_uid=sop_class)
    assert _status(lambda: _ingest(part10, affected_sop_instance_uid="1.2.3")) == STATUS_DATASET_MISMATCH
    assert _status(lambda: _ingest(part10, affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.4")) == STATUS_DATASET_MISMATCH


# -- bytes that cannot be understood: 0xC000 --------------------------------------------------


def _garbage() -> Iterator[object]:
    rng = random.Random(5)
    part10 = _one(PLAIN)
    offset, _ = _offset(part10)
    yield pytest.param(b"", 0, id="empty")
    yield pytest.param(b"hello", 0, id="text")
    yield pytest.param(rng.randbytes(4096), 132, id="random")
    yield pytest.param(bytes(128) + b"DICM" + rng.randbytes(500), 132, id="preamble-then-random")
    yield pytest.param(part10[:offset] + rng.randbytes(2000), offset, id="valid-meta-random-dataset")
    yield pytest.param(part10, len(part10) + 10, id="offset-past-the-end")


@pytest.mark.parametrize(("part10", "offset"), list(_garbage()))
def test_garbage_cannot_be_understood(part10: bytes, offset: int) -> None:
    with pytest.raises(InvalidInstance) as caught:
        instance_from_part10(part10, offset, "1.2.840.10008.1.2.1")
    assert caught.value.status == STATUS_CANNOT_UNDERSTAND == 0xC000


def _cuts(spec: StudySetSpec) -> list[object]:
    part10 = _one(spec)
    offset, _ = _offset(part10)
    return [
        pytest.param(spec, cut, id=f"{'implicit' if spec.implicit_vr else 'explicit'}-{name}")
        for name, cut in [
            ("in-preamble", 100),
            ("in-file-meta", offset - 20),
            ("in-first-element", offset + 10),
            ("in-header", offset + 300),
            # (A cut exactly between two elements leaves a whole, shorter dataset: not detectable.)
            ("in-pixel-data-header", len(part10) - 8 * 8 * 2 - 6),
            ("in-pixel-data", len(part10) - 10),
            ("last-byte", len(part10) - 1),
        ]
    ]


@pytest.mark.parametrize(("spec", "cut"), _cuts(PLAIN) + _cuts(IMPLICIT))
def test_truncated_bytes_cannot_be_understood(spec: StudySetSpec, cut: int) -> None:
    part10 = _one(spec)
    offset, transfer_syntax_uid = _offset(part10)
    with pytest.raises(InvalidInstance) as caught:
        instance_from_part10(part10[:cut], offset, transfer_syntax_uid)
    assert caught.value.status == STATUS_CANNOT_UNDERSTAND


def test_trailing_bytes_after_the_dataset_cannot_be_understood() -> None:
    part10 = _one(PLAIN)
    assert _status(lambda: _ingest(part10 + b"\x01\x02\x03")) == STATUS_CANNOT_UNDERSTAND


# -- valid structures the completeness check must accept ----------------------------------------


def _with_undefined_length_sequence(dataset: Dataset) -> None:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    inner = Dataset()
    inner.CodeValue = "T-D4000"
    item.ConceptNameCodeSequence = Sequence([inner])
    item.ConceptNameCodeSequence.is_undefined_length = True  # type: ignore[attr-defined]
    inner.is_undefined_length_sequence_item = True
    item.is_undefined_length_sequence_item = True
    dataset.ReferencedStudySequence = Sequence([item, Dataset()])
    dataset["ReferencedStudySequence"].is_undefined_length = True


def _encapsulated(dataset: Dataset) -> None:
    dataset.PixelData = encapsulate([b"\x01\x02" * 10, b"\x03\x04" * 7])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG Baseline: encapsulated.


def _transfer_syntax(uid: str) -> Callable[[Dataset], None]:
    def edit(dataset: Dataset) -> None:
        dataset.file_meta.TransferSyntaxUID = uid

    return edit


@pytest.mark.parametrize(
    ("source", "edit"),
    [
        pytest.param(PLAIN, _with_undefined_length_sequence, id="explicit-undefined-length-sequences"),
        pytest.param(IMPLICIT, _with_undefined_length_sequence, id="implicit-undefined-length-sequences"),
        pytest.param(PLAIN, _encapsulated, id="encapsulated-pixel-data"),
        pytest.param(PLAIN, _transfer_syntax("1.2.840.10008.1.2.2"), id="explicit-big-endian"),
        pytest.param(PLAIN, _transfer_syntax("1.2.840.10008.1.2.1.99"), id="deflated"),
    ],
)
def test_valid_structures_are_accepted(source: StudySetSpec, edit: Callable[[Dataset], None]) -> None:
    part10 = _edit(_one(source), edit)
    instance = _ingest(part10)
    assert instance.sop_instance_uid == next(iter_part10(source))[0]["sop_uid"]  # type: ignore[attr-defined]


def test_a_truncated_encapsulated_pixel_data_cannot_be_understood() -> None:
    part10 = _edit(_one(PLAIN), _encapsulated)
    assert _status(lambda: _ingest(part10[:-8])) == STATUS_CANNOT_UNDERSTAND  # Sequence delimiter cut off.
    assert _status(lambda: _ingest(part10[:-20])) == STATUS_CANNOT_UNDERSTAND  # Inside a fragment.


def test_private_un_sequence_of_undefined_length_is_accepted() -> None:
    """UN with undefined length holds Implicit VR items (PS3.5 6.2.2), even in an Explicit VR dataset."""
    part10 = _one(PLAIN)
    at = part10.index(b"\x10\x00\x10\x00PN")  # Insert before PatientName (0010,0010).
    item_content = struct.pack("<HHL", 0x0008, 0x0100, 4) + b"ABCD"  # Implicit VR: CodeValue.
    private = (
        struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 4) + b"ACME"
        + struct.pack("<HH", 0x0009, 0x1001) + b"UN\x00\x00" + struct.pack("<L", 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item_content + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )  # fmt: skip
    with_private = part10[:at] + private + part10[at:]
    instance = _ingest(with_private)
    assert instance.attributes["PatientName"]  # type: ignore[attr-defined]
    assert _status(lambda: _ingest(with_private[: at + len(private) - 8] + part10[at:])) == STATUS_CANNOT_UNDERSTAND


# -- one walk: the structure check goes on from where the header read stopped -----------------


def _full_check_then_read(part10: bytes, offset: int, transfer_syntax_uid: str) -> object:
    """What instance_from_part10 did before the two walks were one: check_complete over the
    whole dataset first, then the header read."""
    from pacsnode.node import ingest

    ingest.check_complete(part10, offset, transfer_syntax_uid)
    try:
        attributes = ingest.header_reader.index_attributes(part10, offset, transfer_syntax_uid, ingest._INDEX_TAG_SET)
    except (ingest.header_reader.Unsupported, ingest.header_reader.Truncated):
        _dataset, attributes = ingest.read_attributes(part10)
    return ingest._instance(part10, offset, transfer_syntax_uid, attributes, None, b"", None, None)


def _outcome(call: Callable[[], object]) -> object:
    try:
        instance = call()
    except InvalidInstance as error:
        return error.status
    return (instance.sop_instance_uid, sorted(instance.attributes.items()))  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec", [PLAIN, IMPLICIT], ids=["explicit", "implicit"])
def test_one_walk_answers_as_the_full_check_for_every_cut_and_corruption(spec: StudySetSpec) -> None:
    """Cut at every byte and with random bytes overwritten, in the header the reader walks
    and after it: the same outcome (the instance, or the same status) as the full check
    followed by the header read."""
    part10 = _edit(_one(spec), _with_undefined_length_sequence)
    offset, transfer_syntax_uid = _offset(part10)
    variants = [part10[:cut] for cut in range(offset, len(part10))]
    rng = random.Random(7)
    for _ in range(400):
        corrupt = bytearray(part10)
        for _flip in range(rng.randint(1, 3)):
            corrupt[rng.randrange(offset, len(part10))] = rng.randrange(256)
        variants.append(bytes(corrupt))
    rejected = 0
    for variant in variants:
        expected = _outcome(lambda: _full_check_then_read(variant, offset, transfer_syntax_uid))
        assert _outcome(lambda: instance_from_part10(variant, offset, transfer_syntax_uid)) == expected
        rejected += expected == STATUS_CANNOT_UNDERSTAND
    assert rejected > len(part10) - offset - 10  # Nearly every cut is refused, so both walks were tried.
