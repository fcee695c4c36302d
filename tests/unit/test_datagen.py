"""pacsnode.sim.datagen: deterministic, unique, valid Part-10 output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsnode.sim import datagen

SMALL = datagen.StudySetSpec(
    patients=4, studies_per_patient=2, series_per_study=2, instances_per_series=3, rows=16, cols=8, seed=11
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.dcm"))}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = datagen.write_study_set(SMALL, tmp_path / "a")
    second = datagen.write_study_set(SMALL, tmp_path / "b")
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == SMALL.instance_count == 48
    assert files_a == files_b
    strip = [{**entry, "path": ""} for entry in first]
    assert strip == [{**entry, "path": ""} for entry in second]


def test_other_seed_gives_other_uids() -> None:
    uids_a = {entry["sop_uid"] for entry, _ in datagen.iter_part10(SMALL)}
    other = datagen.StudySetSpec(**{**SMALL.__dict__, "seed": 12})
    uids_b = {entry["sop_uid"] for entry, _ in datagen.iter_part10(other)}
    assert not uids_a & uids_b


def test_image_size_changes_no_uid() -> None:
    bigger = datagen.StudySetSpec(**{**SMALL.__dict__, "rows": 32, "cols": 32})
    uids = [(e["study_uid"], e["sop_uid"]) for e, _ in datagen.iter_part10(SMALL)]
    assert uids == [(e["study_uid"], e["sop_uid"]) for e, _ in datagen.iter_part10(bigger)]


def test_uids_are_unique_and_valid() -> None:
    spec = datagen.StudySetSpec(patients=50, studies_per_patient=3, series_per_study=2, instances_per_series=2)
    entries = [entry for entry, _ in datagen.iter_part10(spec)]
    studies = {entry["study_uid"] for entry in entries}
    series = {entry["series_uid"] for entry in entries}
    sops = [entry["sop_uid"] for entry in entries]
    assert len(studies) == 150
    assert len(series) == 300
    assert len(set(sops)) == len(sops) == 600
    assert not (studies & series) and not (studies & set(sops)) and not (series & set(sops))
    assert len({entry["patient_id"] for entry in entries}) == 50
    assert len({entry["accession_number"] for entry in entries}) == 150
    for uid in studies | series | set(sops):
        assert uid.startswith("2.25.") and UID(uid).is_valid and len(uid) <= 64


def test_files_read_back_with_the_right_attributes(tmp_path: Path) -> None:
    manifest = datagen.write_study_set(SMALL, tmp_path)
    for entry in manifest:
        assert Path(entry["path"]).stat().st_size == entry["size"]
        ds = pydicom.dcmread(entry["path"])
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == entry["sop_uid"]
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == entry["sop_class_uid"]
        assert ds.SOPClassUID == datagen.SOP_CLASS_BY_MODALITY[ds.Modality]
        assert ds.Modality == entry["modality"]
        assert ds.PatientID == entry["patient_id"]
        assert str(ds.PatientName) == entry["patient_name"]
        assert ds.StudyInstanceUID == entry["study_uid"]
        assert ds.SeriesInstanceUID == entry["series_uid"]
        assert ds.StudyDate == entry["study_date"] and len(ds.StudyDate) == 8
        assert ds.AccessionNumber == entry["accession_number"]
        for keyword in ("PatientBirthDate", "PatientSex", "StudyTime", "StudyID", "StudyDescription",
                        "ReferringPhysicianName", "SeriesDescription", "BodyPartExamined"):
            assert keyword in ds, keyword
        assert 1 <= ds.SeriesNumber <= 2 and 1 <= ds.InstanceNumber <= 3
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel) == (16, 8, 16, 1)
        assert len(ds.PixelData) == 16 * 8 * 2
        assert max(ds.PixelData[1::2]) <= 0x0F  # 12 stored bits.
    # The same UID is shared by the instances of a series and the series of a study.
    assert len({entry["study_uid"] for entry in manifest}) == 8
    assert len({entry["series_uid"] for entry in manifest}) == 16


def test_hand_encoder_matches_pydicom_writer() -> None:
    spec = datagen.StudySetSpec(patients=12, studies_per_patient=2, latin1_fraction=0.5, seed=5)
    for implicit in (False, True):
        spec = datagen.StudySetSpec(**{**spec.__dict__, "implicit_vr": implicit})
        for _, data in datagen.iter_part10(spec):
            assert datagen.encode_part10(pydicom.dcmread(io.BytesIO(data))) == data


def test_implicit_vr_option() -> None:
    spec = datagen.StudySetSpec(**{**SMALL.__dict__, "implicit_vr": True})
    entry, ds = next(datagen.iter_instances(spec))
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian == entry["transfer_syntax_uid"]
    assert ds.original_encoding == (True, True)  # (implicit VR, little endian)
    assert ds.PatientID == entry["patient_id"]


def test_latin1_name_round_trip(tmp_path: Path) -> None:
    spec = datagen.StudySetSpec(patients=20, latin1_fraction=1.0, seed=3)
    manifest = datagen.write_study_set(spec, tmp_path)
    names = [entry["patient_name"] for entry in manifest]
    assert all(any(ord(char) > 127 for char in name) for name in names)
    for entry in manifest:
        raw = Path(entry["path"]).read_bytes()
        assert entry["patient_name"].encode("latin-1") in raw  # Stored as ISO 8859-1 bytes.
        ds = pydicom.dcmread(entry["path"])
        assert ds.SpecificCharacterSet == "ISO_IR 100"
        assert str(ds.PatientName) == entry["patient_name"]


def test_ascii_only_by_default() -> None:
    for entry, ds in datagen.iter_instances(SMALL):
        assert "SpecificCharacterSet" not in ds
        assert entry["patient_name"].isascii()


def test_modality_mix_and_date_spread() -> None:
    spec = datagen.StudySetSpec(patients=200, seed=1)
    entries = [entry for entry, _ in datagen.iter_part10(spec)]
    assert {entry["modality"] for entry in entries} == {"CT", "MR", "CR", "US"}
    years = {entry["study_date"][:4] for entry in entries}
    assert len(years) >= 15
    only_mr = datagen.StudySetSpec(patients=5, modalities=("MR",))
    assert {entry["sop_class_uid"] for entry, _ in datagen.iter_part10(only_mr)} == {datagen.MR_IMAGE_STORAGE}


def test_large_multiframe_instance(tmp_path: Path) -> None:
    entry = datagen.write_large_instance(tmp_path, size_bytes=1_000_000, rows=128, cols=128, seed=2)
    ds = pydicom.dcmread(entry["path"])
    assert ds.NumberOfFrames == 31  # ceil(1_000_000 / (128 * 128 * 2))
    assert len(ds.PixelData) == 31 * 128 * 128 * 2
    assert ds.SOPClassUID == datagen.MF_GRAYSCALE_WORD_SC_STORAGE == entry["sop_class_uid"]
    assert entry["size"] == Path(entry["path"]).stat().st_size > 1_000_000
    again, data = datagen.make_large_instance(size_bytes=1_000_000, rows=128, cols=128, seed=2)
    assert data == Path(entry["path"]).read_bytes()


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = datagen.write_study_set(SMALL, tmp_path / "data")
    datagen.write_manifest(manifest, tmp_path / "manifest.json")
    assert datagen.read_manifest(tmp_path / "manifest.json") == manifest
    keys = {"path", "patient_id", "study_uid", "series_uid", "sop_uid", "sop_class_uid", "size"}
    assert keys <= set(manifest[0])


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    code = datagen.main([
        "--out", str(out), "--patients", "2", "--studies-per-patient", "2", "--series-per-study", "1",
        "--instances-per-series", "2", "--rows", "8", "--cols", "8", "--seed", "4", "--quiet",
    ])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert len(manifest) == 8 == len(list(out.rglob("*.dcm")))


@pytest.mark.parametrize(
    "kwargs",
    [{"patients": -1}, {"rows": 0}, {"latin1_fraction": 1.5}, {"modalities": ("XA",)}, {"pixel_fill": "ones"}],
)
def test_bad_spec_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        datagen.StudySetSpec(**kwargs)  # type: ignore[arg-type]


def test_phantom_pixels_compress_as_ct_does_and_noise_does_not(tmp_path: Path) -> None:
    import pydicom
    import zstandard

    ratios = {}
    for fill in ("phantom", "noise12"):
        spec = datagen.StudySetSpec(patients=1, instances_per_series=1, rows=128, cols=96, modalities=("CT",),
                                    pixel_fill=fill, seed=5)
        entry = datagen.write_study_set(spec, tmp_path / fill)[0]
        raw = Path(entry["path"]).read_bytes()
        ratios[fill] = len(raw) / len(zstandard.ZstdCompressor(level=-1).compress(raw))
        if fill == "phantom":
            pixels = pydicom.dcmread(entry["path"]).pixel_array
            assert pixels.shape == (128, 96)
            assert pixels[0, 0] == 0 and pixels[-1, -1] == 0  # Air outside the disc.
            assert 800 < pixels[64, 48] < 1200 and pixels.max() < 4096  # Tissue, 12 bits.
    assert ratios["phantom"] > 1.5 > 1.1 > ratios["noise12"], ratios
