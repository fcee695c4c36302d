"""Synthetic DICOM studies for tests, benchmarks and the chaos harness.

Everything is deterministic from one seed: the same `StudySetSpec` gives byte-identical
Part-10 files. UIDs are "2.25.<128-bit integer>" drawn from the seeded `random.Random`
(never `pydicom.uid.generate_uid(entropy_srcs=...)`, which joins its inputs without a
separator and so can give equal UIDs for different inputs).

Library use:

    spec = StudySetSpec(patients=10, studies_per_patient=2, seed=7)
    manifest = write_study_set(spec, out_dir)        # files on disk + manifest rows
    for entry, part10 in iter_part10(spec): ...       # Part-10 bytes in memory, no files
    for entry, dataset in iter_instances(spec): ...   # the same, parsed by pydicom
    big = write_large_instance(out_dir, size_bytes=45_000_000, seed=1)

The files are encoded by a small Little Endian writer here (about 5x faster than building
pydicom Datasets); tests/unit/test_datagen.py checks that it gives the same bytes as
pydicom's dcmwrite for the same elements.

Command line:

    python -m pacsnode.sim.datagen --out DIR --patients P --studies-per-patient S \
        --series-per-study E --instances-per-series I --rows R --cols C --seed N

Pixel data is cheap noise from the RNG (no numpy): by default 12 stored bits in 16
allocated, so it compresses about as badly as real CT noise does (roughly 0.8 with zstd).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import random
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "CR_IMAGE_STORAGE",
    "US_IMAGE_STORAGE",
    "MF_GRAYSCALE_WORD_SC_STORAGE",
    "SOP_CLASS_BY_MODALITY",
    "ManifestEntry",
    "PixelFill",
    "StudySetSpec",
    "elements_to_dataset",
    "encode_part10",
    "iter_instances",
    "iter_part10",
    "make_large_instance",
    "main",
    "pixel_bytes",
    "random_uid",
    "read_manifest",
    "write_large_instance",
    "write_ramp_multiframe",
    "write_manifest",
    "write_study_set",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
MF_GRAYSCALE_WORD_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7.3"

SOP_CLASS_BY_MODALITY: dict[str, str] = {
    "CT": CT_IMAGE_STORAGE,
    "MR": MR_IMAGE_STORAGE,
    "CR": CR_IMAGE_STORAGE,
    "US": US_IMAGE_STORAGE,
}

IMPLEMENTATION_CLASS_UID = "2.25.98213598720348156107283934702917411203"
IMPLEMENTATION_VERSION_NAME = "PACSNODE_GEN_1"
MANUFACTURER = "pacsnode datagen"

PixelFill = Literal["noise12", "random", "zeros", "phantom"]

# Relative frequency of modalities in a study set (roughly a general hospital's mix).
DEFAULT_MODALITY_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("CT", 0.4),
    ("MR", 0.3),
    ("CR", 0.2),
    ("US", 0.1),
)

_BODY_PARTS: dict[str, tuple[str, ...]] = {
    "CT": ("HEAD", "CHEST", "ABDOMEN", "PELVIS", "NECK"),
    "MR": ("BRAIN", "KNEE", "LSPINE", "CSPINE", "SHOULDER"),
    "CR": ("CHEST", "HAND", "KNEE", "FOOT", "PELVIS"),
    "US": ("ABDOMEN", "NECK", "BREAST", "KIDNEY", "HEART"),
}
_STUDY_QUALIFIERS: tuple[str, ...] = ("", " W CONTRAST", " WO CONTRAST", " ROUTINE", " FOLLOW-UP")
_SERIES_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "CT": ("AXIAL 5MM", "AXIAL 1MM", "CORONAL MPR", "SAGITTAL MPR", "SCOUT"),
    "MR": ("T1 SAG", "T2 AX", "FLAIR AX", "DWI", "T1 POST GAD"),
    "CR": ("PA", "LATERAL", "AP", "OBLIQUE"),
    "US": ("B-MODE", "DOPPLER", "CINE"),
}

_FAMILY_NAMES_ASCII: tuple[str, ...] = (
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS",
    "MARTIN", "THOMPSON", "WHITE", "HARRIS", "CLARK", "LEWIS", "ROBINSON", "WALKER",
    "YOUNG", "ALLEN", "KING", "WRIGHT", "SCOTT", "HILL", "GREEN", "ADAMS", "BAKER",
    "NELSON", "CARTER", "MITCHELL", "PEREZ", "ROBERTS", "TURNER", "PHILLIPS", "CAMPBELL",
    "PARKER", "EVANS", "EDWARDS", "COLLINS", "STEWART", "MORRIS", "ROGERS", "REED",
    "COOK", "MORGAN", "BELL", "MURPHY", "BAILEY", "RIVERA", "COOPER", "RICHARDSON", "COX",
)
_GIVEN_NAMES_ASCII: tuple[str, ...] = (
    "JAMES", "MARY", "JOHN", "PATRICIA", "ROBERT", "JENNIFER", "MICHAEL", "LINDA",
    "WILLIAM", "ELIZABETH", "DAVID", "BARBARA", "RICHARD", "SUSAN", "JOSEPH", "JESSICA",
    "THOMAS", "SARAH", "CHARLES", "KAREN", "DANIEL", "NANCY", "MATTHEW", "LISA", "ANNA",
)
# Every character is in ISO 8859-1 (ISO_IR 100).
_FAMILY_NAMES_LATIN1: tuple[str, ...] = (
    "Müller", "Größer", "Söderström", "Núñez", "Çelik", "Ångström", "Bjørnstad",
    "Lefèvre", "Þórsson", "Lindström", "Gómez", "Schäfer", "Jäger", "Peña",
)
_GIVEN_NAMES_LATIN1: tuple[str, ...] = (
    "Jürgen", "Françoise", "Zoë", "José", "Øyvind", "Günther", "Hélène", "Begoña",
    "Åsa", "René", "Maël", "Inês", "Sigríður", "Dörte",
)
_PHYSICIANS: tuple[str, ...] = (
    "HOUSE^GREGORY^^DR", "GREY^MEREDITH^^DR", "WHO^JOHN^^DR", "QUINN^MICHAELA^^DR",
    "ROSS^DOUGLAS^^DR", "KILDARE^JAMES^^DR", "",
)
_INSTITUTIONS: tuple[str, ...] = ("GENERAL HOSPITAL", "CITY CLINIC", "ST. MARY IMAGING")

# 0..255 -> 0..15: the high byte of a 12-bit sample.
_NIBBLE_TABLE = bytes(i & 0x0F for i in range(256))


class ManifestEntry(TypedDict):
    """One generated instance. `path` is empty for instances that were not written."""

    path: str
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    study_date: str
    accession_number: str
    transfer_syntax_uid: str
    size: int


@dataclass(frozen=True, kw_only=True)
class StudySetSpec:
    """What to generate. Same spec -> byte-identical output."""

    patients: int = 10
    studies_per_patient: int = 1
    series_per_study: int = 1
    instances_per_series: int = 1
    rows: int = 64                      # Image size; 512 x 512 x 16-bit = 512 KiB of pixel data.
    cols: int = 64
    seed: int = 0
    latin1_fraction: float = 0.0        # Share of patients with a Latin-1 name (ISO_IR 100).
    implicit_vr: bool = False           # Implicit VR Little Endian instead of Explicit VR LE.
    pixel_fill: PixelFill = "noise12"   # noise12: 12 stored bits of noise; random: 16; zeros; phantom
                                        # (a CT-like disc: tissue with structure and noise in air).
    modalities: tuple[str, ...] = ()    # Empty: the DEFAULT_MODALITY_WEIGHTS mix.
    first_study_date: datetime.date = datetime.date(2005, 1, 1)
    last_study_date: datetime.date = datetime.date(2024, 12, 31)

    def __post_init__(self) -> None:
        for name in ("patients", "studies_per_patient", "series_per_study", "instances_per_series"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"rows and cols must be >= 1, got {self.rows}x{self.cols}")
        if not 0.0 <= self.latin1_fraction <= 1.0:
            raise ValueError(f"latin1_fraction must be in [0, 1], got {self.latin1_fraction}")
        if self.pixel_fill not in ("noise12", "random", "zeros", "phantom"):
            raise ValueError(f"unknown pixel_fill {self.pixel_fill!r}")
        unknown = [m for m in self.modalities if m not in SOP_CLASS_BY_MODALITY]
        if unknown:
            raise ValueError(f"unsupported modalities {unknown}; known: {sorted(SOP_CLASS_BY_MODALITY)}")
        if self.last_study_date < self.first_study_date:
            raise ValueError("last_study_date is before first_study_date")

    @property
    def instance_count(self) -> int:
        return (
            self.patients
            * self.studies_per_patient
            * self.series_per_study
            * self.instances_per_series
        )

    @property
    def transfer_syntax_uid(self) -> str:
        return str(ImplicitVRLittleEndian if self.implicit_vr else ExplicitVRLittleEndian)


# ---------------------------------------------------------------------------------------
# Building blocks


def random_uid(rng: random.Random) -> str:
    """A UID under the 2.25 root (ITU-T X.667): "2.25." + a 128-bit integer from `rng`."""
    return f"2.25.{rng.getrandbits(128)}"


class _UidSource:
    """Draws UIDs from the RNG and guarantees they are unique within one generator run."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._seen: set[str] = set()

    def next(self) -> str:
        while True:
            uid = random_uid(self._rng)
            if uid not in self._seen:
                self._seen.add(uid)
                return uid


def pixel_bytes(rng: random.Random, size_bytes: int, fill: PixelFill, rows: int = 0, cols: int = 0) -> bytes:
    """`size_bytes` (even) of little-endian 16-bit samples; the frame's `rows` and `cols`
    are needed by "phantom" only."""
    if size_bytes % 2:
        raise ValueError(f"16-bit pixel data needs an even length, got {size_bytes}")
    if fill == "zeros":
        return bytes(size_bytes)
    if fill == "phantom":
        return _phantom_bytes(rng, size_bytes // 2, rows, cols)
    if fill == "random":
        return rng.randbytes(size_bytes)
    half = size_bytes // 2
    buffer = bytearray(size_bytes)
    buffer[0::2] = rng.randbytes(half)
    buffer[1::2] = rng.randbytes(half).translate(_NIBBLE_TABLE)
    return bytes(buffer)


def _phantom_bytes(rng: random.Random, samples: int, rows: int, cols: int) -> bytes:
    """CT-like frames: a centred disc of "tissue" (1000 + a smooth pattern of +-150 +
    Gaussian noise of sd 10, 12 bits) in zeros ("air", as stored values before a -1024
    rescale). Unlike noise it compresses as real CT does (~2x at zstd level -1, where
    noise12 stays ~1x), so that disk and retrieval figures are neither flattered nor
    penalised by incompressible pixels (bench/README.md)."""
    import numpy

    if rows < 1 or cols < 1 or samples % (rows * cols):
        raise ValueError(f"a phantom needs whole {rows}x{cols} frames: {samples} samples")
    frames = samples // (rows * cols)
    y, x = numpy.mgrid[:rows, :cols]
    radius = 0.4 * min(rows, cols)
    inside = (x - cols / 2) ** 2 + (y - rows / 2) ** 2 < radius ** 2
    pattern = 1000 + 150 * numpy.sin(x / 23) * numpy.cos(y / 31)
    generator = numpy.random.default_rng(rng.getrandbits(64))
    tissue = pattern + generator.normal(0, 10, (frames, rows, cols))
    return numpy.where(inside, tissue, 0).clip(0, 4095).astype("<u2").tobytes()


def _da(day: datetime.date) -> str:
    return day.strftime("%Y%m%d")


def _tm(seconds_of_day: int) -> str:
    seconds_of_day %= 86_400
    return f"{seconds_of_day // 3600:02d}{seconds_of_day // 60 % 60:02d}{seconds_of_day % 60:02d}"


def _age(birth: datetime.date, on: datetime.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{max(years, 0):03d}Y"


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    patient_name: str
    birth_date: datetime.date
    sex: str
    latin1: bool


@dataclass(frozen=True)
class _Study:
    study_uid: str
    study_date: datetime.date
    study_time_s: int
    accession_number: str
    study_id: str
    description: str
    referring_physician: str
    institution: str
    modality: str
    body_part: str


@dataclass(frozen=True)
class _Series:
    series_uid: str
    series_number: int
    description: str
    series_time_s: int
    frame_of_reference_uid: str


def _pick_modality(rng: random.Random, spec: StudySetSpec) -> str:
    if spec.modalities:
        return spec.modalities[rng.randrange(len(spec.modalities))]
    names = [name for name, _ in DEFAULT_MODALITY_WEIGHTS]
    weights = [weight for _, weight in DEFAULT_MODALITY_WEIGHTS]
    return rng.choices(names, weights)[0]


def _make_patient(rng: random.Random, spec: StudySetSpec, used_ids: set[str]) -> _Patient:
    while True:
        patient_id = f"{rng.randrange(10**9, 10**10)}"  # A 10-digit MRN.
        if patient_id not in used_ids:
            used_ids.add(patient_id)
            break
    latin1 = spec.latin1_fraction > 0 and rng.random() < spec.latin1_fraction
    if latin1:
        family = rng.choice(_FAMILY_NAMES_LATIN1)
        given = rng.choice(_GIVEN_NAMES_LATIN1)
    else:
        family = rng.choice(_FAMILY_NAMES_ASCII)
        given = rng.choice(_GIVEN_NAMES_ASCII)
    birth = datetime.date(1930, 1, 1) + datetime.timedelta(days=rng.randrange(90 * 365))
    sex = rng.choices(("M", "F", "O"), (0.49, 0.49, 0.02))[0]
    return _Patient(patient_id, f"{family}^{given}", birth, sex, latin1)


def _make_study(
    rng: random.Random, spec: StudySetSpec, patient: _Patient, uids: _UidSource, used_accessions: set[str]
) -> _Study:
    first = max(spec.first_study_date, patient.birth_date)
    last = max(spec.last_study_date, first)
    study_date = first + datetime.timedelta(days=rng.randrange((last - first).days + 1))
    study_time_s = rng.randrange(7 * 3600, 20 * 3600)
    while True:
        accession = f"A{rng.randrange(10**11, 10**12)}"
        if accession not in used_accessions:
            used_accessions.add(accession)
            break
    modality = _pick_modality(rng, spec)
    body_part = rng.choice(_BODY_PARTS[modality])
    description = f"{modality} {body_part}{rng.choice(_STUDY_QUALIFIERS)}"
    return _Study(
        study_uid=uids.next(),
        study_date=study_date,
        study_time_s=study_time_s,
        accession_number=accession,
        study_id=str(rng.randrange(1, 100_000)),
        description=description,
        referring_physician=rng.choice(_PHYSICIANS),
        institution=rng.choice(_INSTITUTIONS),
        modality=modality,
        body_part=body_part,
    )


def _make_series(rng: random.Random, study: _Study, series_number: int, uids: _UidSource) -> _Series:
    return _Series(
        series_uid=uids.next(),
        series_number=series_number,
        description=rng.choice(_SERIES_DESCRIPTIONS[study.modality]),
        series_time_s=study.study_time_s + 60 * (series_number - 1) + rng.randrange(60),
        frame_of_reference_uid=uids.next(),
    )


# An element as the generator knows it: (tag, VR, value). Text values are already in their
# DICOM string form (DS/IS/DA/TM as strings, multi-values joined with "\\").
Element = tuple[int, str, "str | bytes | int"]

# VRs with a 2-byte reserved field and a 4-byte length in Explicit VR.
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_PREAMBLE = bytes(128) + b"DICM"
_TAG_PIXEL_DATA = 0x7FE00010


def _value_bytes(vr: str, value: "str | bytes | int", codec: str) -> bytes:
    if isinstance(value, int):
        if vr == "US":
            return struct.pack("<H", value)
        if vr == "UL":
            return struct.pack("<I", value)
        if vr == "AT":
            return struct.pack("<HH", value >> 16, value & 0xFFFF)
        raise TypeError(f"integer value for VR {vr}")
    if isinstance(value, bytes):
        return value if len(value) % 2 == 0 else value + b"\0"
    data = value.encode("ascii" if vr in ("UI", "CS", "DA", "TM", "DS", "IS", "AS") else codec)
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def _encode_elements(elements: Sequence[Element], *, implicit_vr: bool, codec: str) -> bytes:
    """Little Endian encoding of `elements` (sorted by tag here), as pydicom writes them."""
    parts: list[bytes] = []
    for tag, vr, value in sorted(elements, key=lambda element: element[0]):
        data = _value_bytes(vr, value, codec)
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if implicit_vr:
            parts.append(head + struct.pack("<I", len(data)))
        elif vr in _LONG_VRS:
            parts.append(head + vr.encode("ascii") + b"\0\0" + struct.pack("<I", len(data)))
        else:
            parts.append(head + vr.encode("ascii") + struct.pack("<H", len(data)))
        parts.append(data)
    return b"".join(parts)


def _file_meta_elements(sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str) -> list[Element]:
    return [
        (0x00020001, "OB", b"\x00\x01"),
        (0x00020002, "UI", sop_class_uid),
        (0x00020003, "UI", sop_uid),
        (0x00020010, "UI", transfer_syntax_uid),
        (0x00020012, "UI", IMPLEMENTATION_CLASS_UID),
        (0x00020013, "SH", IMPLEMENTATION_VERSION_NAME),
    ]


def _part10_bytes(meta: Sequence[Element], dataset: Sequence[Element], *, implicit_vr: bool, codec: str) -> bytes:
    meta_body = _encode_elements(meta, implicit_vr=False, codec="ascii")
    group_length = _encode_elements([(0x00020000, "UL", len(meta_body))], implicit_vr=False, codec="ascii")
    body = _encode_elements(dataset, implicit_vr=implicit_vr, codec=codec)
    return b"".join((_PREAMBLE, group_length, meta_body, body))


def _join(*values: str) -> str:
    return "\\".join(values)


def _instance_elements(
    *,
    patient: _Patient,
    study: _Study,
    series: _Series,
    sop_class_uid: str,
    sop_uid: str,
    instance_number: int,
    rows: int,
    cols: int,
    frames: int,
    pixel_data: bytes,
) -> list[Element]:
    """The data set of one instance, header attributes plus pixel data (unsorted)."""
    modality = study.modality
    multiframe_sc = sop_class_uid == MF_GRAYSCALE_WORD_SC_STORAGE
    study_date = _da(study.study_date)
    elements: list[Element] = [
        (0x00080008, "CS", _join("ORIGINAL", "PRIMARY", "AXIAL") if modality == "CT" else _join("ORIGINAL", "PRIMARY")),
        (0x00080012, "DA", study_date),                      # InstanceCreationDate
        (0x00080013, "TM", _tm(series.series_time_s)),       # InstanceCreationTime
        (0x00080016, "UI", sop_class_uid),
        (0x00080018, "UI", sop_uid),
        (0x00080020, "DA", study_date),                      # StudyDate
        (0x00080021, "DA", study_date),                      # SeriesDate
        (0x00080023, "DA", study_date),                      # ContentDate
        (0x00080030, "TM", _tm(study.study_time_s)),         # StudyTime
        (0x00080031, "TM", _tm(series.series_time_s)),       # SeriesTime
        (0x00080033, "TM", _tm(series.series_time_s + instance_number)),  # ContentTime
        (0x00080050, "SH", study.accession_number),
        (0x00080060, "CS", "OT" if multiframe_sc else modality),
        (0x00080070, "LO", MANUFACTURER),
        (0x00080080, "LO", study.institution),
        (0x00080090, "PN", study.referring_physician),
        (0x00081010, "SH", f"{modality}01"),                 # StationName
        (0x00081030, "LO", study.description),
        (0x0008103E, "LO", series.description),
        (0x00100010, "PN", patient.patient_name),
        (0x00100020, "LO", patient.patient_id),
        (0x00100030, "DA", _da(patient.birth_date)),
        (0x00100040, "CS", patient.sex),
        (0x00101010, "AS", _age(patient.birth_date, study.study_date)),
        (0x00180015, "CS", study.body_part),                 # BodyPartExamined
        (0x0020000D, "UI", study.study_uid),
        (0x0020000E, "UI", series.series_uid),
        (0x00200010, "SH", study.study_id),
        (0x00200011, "IS", str(series.series_number)),
        (0x00200013, "IS", str(instance_number)),
        (0x00280002, "US", 1),                               # SamplesPerPixel
        (0x00280004, "CS", "MONOCHROME2"),
        (0x00280010, "US", rows),
        (0x00280011, "US", cols),
        (0x00280100, "US", 16),                              # BitsAllocated
        (0x00280101, "US", 12),                              # BitsStored
        (0x00280102, "US", 11),                              # HighBit
        (0x00280103, "US", 0),                               # PixelRepresentation: unsigned
        (_TAG_PIXEL_DATA, "OW", pixel_data),
    ]
    if patient.latin1:
        elements.append((0x00080005, "CS", "ISO_IR 100"))  # SpecificCharacterSet
    if multiframe_sc:
        elements.append((0x00080064, "CS", "WSD"))          # ConversionType
    if frames > 1:
        elements += [
            (0x00280008, "IS", str(frames)),                # NumberOfFrames
            (0x00280009, "AT", 0x00181063),                 # FrameIncrementPointer -> FrameTime
            (0x00181063, "DS", "33.3"),                     # FrameTime
        ]
    if modality == "CT":
        elements += [
            (0x00180050, "DS", "5.0"),                      # SliceThickness
            (0x00180060, "DS", "120"),                      # KVP
            (0x00281050, "DS", "40"),                       # WindowCenter
            (0x00281051, "DS", "400"),                      # WindowWidth
            (0x00281052, "DS", "-1024"),                    # RescaleIntercept
            (0x00281053, "DS", "1"),                        # RescaleSlope
            (0x00281054, "LO", "HU"),                       # RescaleType
        ]
    elif modality == "MR":
        elements += [
            (0x00180050, "DS", "4.0"),                      # SliceThickness
            (0x00180080, "DS", "500"),                      # RepetitionTime
            (0x00180081, "DS", "15"),                       # EchoTime
            (0x00180087, "DS", "1.5"),                      # MagneticFieldStrength
        ]
    if modality in ("CT", "MR"):
        elements += [
            (0x00200032, "DS", _join("-250.0", "-250.0", f"{-5.0 * instance_number:.1f}")),
            (0x00200037, "DS", _join("1.0", "0.0", "0.0", "0.0", "1.0", "0.0")),
            (0x00200052, "UI", series.frame_of_reference_uid),
        ]
    if modality in ("CT", "MR", "CR"):
        elements.append((0x00280030, "DS", _join("0.5", "0.5")))  # PixelSpacing
    return elements


def _instance_part10(elements: Sequence[Element], *, sop_class_uid: str, sop_uid: str,
                     transfer_syntax_uid: str, latin1: bool) -> bytes:
    return _part10_bytes(
        _file_meta_elements(sop_class_uid, sop_uid, transfer_syntax_uid),
        elements,
        implicit_vr=transfer_syntax_uid == ImplicitVRLittleEndian,
        codec="latin-1" if latin1 else "ascii",
    )


def elements_to_dataset(meta: Sequence[Element], elements: Sequence[Element]) -> Dataset:
    """The same content as a pydicom Dataset built with pydicom's own element classes
    (used by the tests to check the hand encoder against pydicom's writer)."""
    dataset = Dataset()
    for tag, vr, value in elements:
        dataset.add_new(tag, vr, _pydicom_value(vr, value))
    dataset.file_meta = FileMetaDataset()
    for tag, vr, value in meta:
        dataset.file_meta.add_new(tag, vr, _pydicom_value(vr, value))
    return dataset


def _pydicom_value(vr: str, value: "str | bytes | int") -> "str | bytes | int | list[str]":
    if isinstance(value, str) and "\\" in value:
        return value.split("\\")
    return value


def encode_part10(dataset: Dataset) -> bytes:
    """Any pydicom Dataset with file_meta as a Part-10 file (preamble, 'DICM', meta, data set)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# Study sets


def iter_part10(spec: StudySetSpec) -> Iterator[tuple[ManifestEntry, bytes]]:
    """Yield (manifest entry with path "" and size set, Part-10 bytes) for every instance.

    Order: patients, then their studies, series and instances. UIDs and header values come
    from `random.Random(spec.seed)`; pixel data from a per-instance RNG seeded from it, so
    the image size changes no UID.
    """
    rng = random.Random(spec.seed)
    uids = _UidSource(rng)
    used_patient_ids: set[str] = set()
    used_accessions: set[str] = set()
    pixel_size_bytes = spec.rows * spec.cols * 2
    transfer_syntax_uid = spec.transfer_syntax_uid
    for _ in range(spec.patients):
        patient = _make_patient(rng, spec, used_patient_ids)
        for _ in range(spec.studies_per_patient):
            study = _make_study(rng, spec, patient, uids, used_accessions)
            sop_class_uid = SOP_CLASS_BY_MODALITY[study.modality]
            for series_number in range(1, spec.series_per_study + 1):
                series = _make_series(rng, study, series_number, uids)
                for instance_number in range(1, spec.instances_per_series + 1):
                    sop_uid = uids.next()
                    pixel_rng = random.Random(rng.getrandbits(64))
                    elements = _instance_elements(
                        patient=patient,
                        study=study,
                        series=series,
                        sop_class_uid=sop_class_uid,
                        sop_uid=sop_uid,
                        instance_number=instance_number,
                        rows=spec.rows,
                        cols=spec.cols,
                        frames=1,
                        pixel_data=pixel_bytes(pixel_rng, pixel_size_bytes, spec.pixel_fill, spec.rows, spec.cols),
                    )
                    data = _instance_part10(elements, sop_class_uid=sop_class_uid, sop_uid=sop_uid,
                                            transfer_syntax_uid=transfer_syntax_uid, latin1=patient.latin1)
                    yield _entry(patient, study, series, sop_uid, sop_class_uid, transfer_syntax_uid, len(data)), data


def _entry(patient: _Patient, study: _Study, series: _Series, sop_uid: str, sop_class_uid: str,
           transfer_syntax_uid: str, size: int) -> ManifestEntry:
    return ManifestEntry(
        path="",
        patient_id=patient.patient_id,
        patient_name=patient.patient_name,
        study_uid=study.study_uid,
        series_uid=series.series_uid,
        sop_uid=sop_uid,
        sop_class_uid=sop_class_uid,
        modality="OT" if sop_class_uid == MF_GRAYSCALE_WORD_SC_STORAGE else study.modality,
        study_date=_da(study.study_date),
        accession_number=study.accession_number,
        transfer_syntax_uid=transfer_syntax_uid,
        size=size,
    )


def iter_instances(spec: StudySetSpec) -> Iterator[tuple[ManifestEntry, Dataset]]:
    """As iter_part10, with each file parsed by pydicom (file_meta included)."""
    for entry, data in iter_part10(spec):
        yield entry, dcmread(io.BytesIO(data))


def _instance_path(out_dir: Path, entry: ManifestEntry) -> Path:
    return out_dir / entry["patient_id"] / entry["study_uid"] / entry["series_uid"] / f"{entry['sop_uid']}.dcm"


def write_study_set(spec: StudySetSpec, out_dir: str | os.PathLike[str]) -> list[ManifestEntry]:
    """Write every instance of `spec` as out_dir/<PatientID>/<Study>/<Series>/<SOP>.dcm.

    Returns the manifest (one entry per file; `path` is out_dir joined with that relative
    path, `size` the file size in bytes). Does not write a manifest file.
    """
    root = Path(out_dir)
    manifest: list[ManifestEntry] = []
    made_dirs: set[Path] = set()
    for entry, data in iter_part10(spec):
        path = _instance_path(root, entry)
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        path.write_bytes(data)
        entry["path"] = str(path)
        manifest.append(entry)
    return manifest


def make_large_instance(
    *,
    size_bytes: int = 45_000_000,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    pixel_fill: PixelFill = "noise12",
    implicit_vr: bool = False,
) -> tuple[ManifestEntry, bytes]:
    """One multi-frame instance (Multi-frame Grayscale Word SC Image Storage) with at least
    `size_bytes` of pixel data: NumberOfFrames = ceil(size_bytes / (rows * cols * 2))."""
    if size_bytes < 1:
        raise ValueError(f"size_bytes must be >= 1, got {size_bytes}")
    frame_bytes = rows * cols * 2
    frames = max(1, -(-size_bytes // frame_bytes))
    rng = random.Random(seed)
    uids = _UidSource(rng)
    spec = StudySetSpec(patients=1, rows=rows, cols=cols, seed=seed, modalities=("CT",))
    patient = _make_patient(rng, spec, set())
    study = dataclasses.replace(_make_study(rng, spec, patient, uids, set()), description="MULTIFRAME TEST")
    series = _make_series(rng, study, 1, uids)
    sop_uid = uids.next()
    pixel_rng = random.Random(rng.getrandbits(64))
    transfer_syntax_uid = str(ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian)
    elements = _instance_elements(
        patient=patient,
        study=study,
        series=series,
        sop_class_uid=MF_GRAYSCALE_WORD_SC_STORAGE,
        sop_uid=sop_uid,
        instance_number=1,
        rows=rows,
        cols=cols,
        frames=frames,
        pixel_data=pixel_bytes(pixel_rng, frame_bytes * frames, pixel_fill, rows, cols),
    )
    data = _instance_part10(elements, sop_class_uid=MF_GRAYSCALE_WORD_SC_STORAGE, sop_uid=sop_uid,
                            transfer_syntax_uid=transfer_syntax_uid, latin1=patient.latin1)
    return _entry(patient, study, series, sop_uid, MF_GRAYSCALE_WORD_SC_STORAGE, transfer_syntax_uid, len(data)), data


def write_large_instance(
    out_dir: str | os.PathLike[str],
    *,
    size_bytes: int = 45_000_000,
    rows: int = 512,
    cols: int = 512,
    seed: int = 0,
    pixel_fill: PixelFill = "noise12",
    implicit_vr: bool = False,
) -> ManifestEntry:
    """Write make_large_instance(...) under out_dir (same layout as write_study_set)."""
    entry, data = make_large_instance(
        size_bytes=size_bytes, rows=rows, cols=cols, seed=seed, pixel_fill=pixel_fill, implicit_vr=implicit_vr
    )
    path = _instance_path(Path(out_dir), entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    entry["path"] = str(path)
    return entry


def write_ramp_multiframe(path: str | os.PathLike[str], *, study_uid: str, frames: int, rows: int, cols: int,
                          seed: int, patient_id: str) -> Dataset:
    """A `frames`-frame 16-bit Multi-frame Grayscale Word Secondary Capture instance of study
    `study_uid` in Explicit VR Little Endian, written to `path` as a Part-10 file and returned
    (with its Pixel Data): every frame a ramp plus numpy noise from `seed` plus its index, so
    each frame differs and compresses little (WADO-RS /frames tests and bench/frames_peer.py)."""
    import numpy as np

    ds = Dataset()
    ds.SOPClassUID = MF_GRAYSCALE_WORD_SC_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(seed)
    ramp = (np.arange(rows * cols, dtype=np.uint32) % 4096).astype(np.uint16)
    ds.PixelData = b"".join(((ramp + rng.integers(0, 64, rows * cols, dtype=np.uint16) + index) % 4096)
                            .astype(np.uint16).tobytes() for index in range(frames))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_manifest(manifest: Sequence[ManifestEntry], path: str | os.PathLike[str]) -> None:
    """JSON list of the entries, one per line inside the list (diff-friendly)."""
    lines = ",\n".join(json.dumps(entry, ensure_ascii=False, sort_keys=True) for entry in manifest)
    Path(path).write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestEntry]:
    entries: list[ManifestEntry] = json.loads(Path(path).read_text(encoding="utf-8"))
    return entries


# ---------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pacsnode.sim.datagen",
        description="Write a deterministic synthetic DICOM study set (Part-10 files) and manifest.json.",
    )
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--studies-per-patient", type=int, default=1)
    parser.add_argument("--series-per-study", type=int, default=1)
    parser.add_argument("--instances-per-series", type=int, default=1)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latin1-fraction", type=float, default=0.0,
                        help="share of patients with Latin-1 names (ISO_IR 100), 0..1")
    parser.add_argument("--implicit-vr", action="store_true", help="Implicit VR Little Endian files")
    parser.add_argument("--pixel-fill", choices=("noise12", "random", "zeros", "phantom"), default="noise12")
    parser.add_argument("--modalities", default="",
                        help="comma-separated subset of CT,MR,CR,US (default: weighted mix)")
    parser.add_argument("--large-instance-bytes", type=int, default=0,
                        help="also write one multi-frame instance of about this many bytes")
    parser.add_argument("--manifest", default="manifest.json",
                        help="manifest file name inside --out ('' to skip)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    modalities = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
    spec = StudySetSpec(
        patients=args.patients,
        studies_per_patient=args.studies_per_patient,
        series_per_study=args.series_per_study,
        instances_per_series=args.instances_per_series,
        rows=args.rows,
        cols=args.cols,
        seed=args.seed,
        latin1_fraction=args.latin1_fraction,
        implicit_vr=args.implicit_vr,
        pixel_fill=args.pixel_fill,
        modalities=modalities,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest = write_study_set(spec, out_dir)
    if args.large_instance_bytes > 0:
        manifest.append(
            write_large_instance(out_dir, size_bytes=args.large_instance_bytes, rows=args.rows,
                                 cols=args.cols, seed=args.seed + 1, pixel_fill=args.pixel_fill,
                                 implicit_vr=args.implicit_vr)
        )
    elapsed_s = time.perf_counter() - started
    if args.manifest:
        write_manifest(manifest, out_dir / args.manifest)
    if not args.quiet:
        total_bytes = sum(entry["size"] for entry in manifest)
        rate = len(manifest) / elapsed_s if elapsed_s > 0 else float("inf")
        print(
            f"datagen.done files={len(manifest)} bytes={total_bytes} elapsed_s={elapsed_s:.2f} "
            f"files_per_s={rate:.0f} out={out_dir}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
