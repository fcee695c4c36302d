"""LocalQuery and Archive over a real RocksStore filled with synthetic studies.

Counts and computed keys are checked against the datagen manifest; index-assisted
candidate selection must give exactly what a full scan gives.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread

from pacsnode.node.ingest import header_attributes
from pacsnode.node.store import PREFIX_BLOB, SEP, RocksStore, study_prefix
from pacsnode.replication.archive import Archive, InstanceLocation, ReadError, WriteStatus
from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import Attributes, Instance, StoreOutcome, StudyRecord
from pacsnode.replication.query import LocalQuery, aggregate_patients, unique_key
from pacsnode.sim.datagen import MR_IMAGE_STORAGE, ManifestEntry, StudySetSpec, encode_part10, iter_part10

MakeInstance = Callable[[bytes], Instance]

SPEC = StudySetSpec(
    patients=6,
    studies_per_patient=2,
    series_per_study=2,
    instances_per_series=3,
    rows=8,
    cols=8,
    seed=21,
    latin1_fraction=0.5,
)


def _rewrite(part10: bytes, **changes: str) -> bytes:
    """The same instance with some attributes changed (re-encoded by pydicom)."""
    dataset = dcmread(io.BytesIO(part10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Invalid value for VR DA" for the old-style dates.
        for keyword, value in changes.items():
            setattr(dataset, keyword, value)
        if "SOPClassUID" in changes:
            dataset.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
        return encode_part10(dataset)


def _extra_instances() -> Iterator[tuple[ManifestEntry, bytes]]:
    """A study with a CT and an MR series, and a study with old ACR-NEMA style dates."""
    mixed = StudySetSpec(patients=1, series_per_study=2, instances_per_series=2, rows=4, cols=4, seed=901,
                         modalities=("CT",))
    first_series = ""
    for entry, part10 in iter_part10(mixed):
        first_series = first_series or entry["series_uid"]
        if entry["series_uid"] != first_series:
            part10 = _rewrite(part10, Modality="MR", SOPClassUID=MR_IMAGE_STORAGE)
            entry = {**entry, "modality": "MR", "sop_class_uid": MR_IMAGE_STORAGE}  # type: ignore[assignment]
        yield entry, part10
    old = StudySetSpec(patients=1, rows=4, cols=4, seed=902, modalities=("CR",))
    for entry, part10 in iter_part10(old):
        part10 = _rewrite(part10, StudyDate="2005.03.04", PatientBirthDate="1950.06.07")
        yield {**entry, "study_date": "2005.03.04"}, part10  # type: ignore[misc]


@dataclasses.dataclass
class Corpus:
    store: RocksStore
    entries: list[ManifestEntry]
    instances: dict[str, Instance]  # By SOP Instance UID.

    def studies(self) -> list[StudyRecord]:
        return list(self.store.studies())

    def header_reader(self, study_uid: str, sop_uid: str, keywords: tuple[str, ...]) -> Attributes:
        return header_attributes(self.store.read_part10(study_uid, sop_uid), keywords)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, make_instance: MakeInstance) -> Iterator[Corpus]:
    store = RocksStore(tmp_path_factory.mktemp("query") / "store", disk_free_bytes_min=0)
    entries: list[ManifestEntry] = []
    instances: dict[str, Instance] = {}
    for entry, part10 in itertools.chain(iter_part10(SPEC), _extra_instances()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom: "Invalid value for VR DA" (the old-style dates).
            instance = make_instance(part10)
        assert store.put_instance(instance, now_ms=1) == StoreOutcome.STORED
        entries.append(entry)
        instances[instance.sop_instance_uid] = instance
    yield Corpus(store, entries, instances)
    store.close()


class CountingReader:
    """Delegates to a store and counts the calls LocalQuery/Archive make."""

    def __init__(self, inner: RocksStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


class ScanQuery(LocalQuery):
    """The same query, never using the secondary index (the reference for index lookups)."""

    def _indexed_candidates(self) -> list[str] | None:
        return None


def _run(store: Any, query: Query, *, scan: bool = False, header_reader: Any = None) -> list[Attributes]:
    rows: Iterable[Attributes] = (ScanQuery if scan else LocalQuery)(store, query, header_reader).rows()
    if query.level == "PATIENT":
        rows = aggregate_patients(rows)
    return list(rows)


def _canonical(rows: Iterable[Attributes]) -> list[str]:
    return sorted(json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rows)


def _by(entries: Iterable[ManifestEntry], field: str) -> dict[str, list[ManifestEntry]]:
    groups: dict[str, list[ManifestEntry]] = defaultdict(list)
    for entry in entries:
        groups[entry[field]].append(entry)  # type: ignore[literal-required]
    return groups


def _model(level: str) -> str:
    return "PATIENT" if level == "PATIENT" else "STUDY"


# -- the fixture itself ---------------------------------------------------------------


def test_corpus_has_latin1_names_and_a_mixed_modality_study(corpus: Corpus) -> None:
    names = {entry["patient_name"] for entry in corpus.entries}
    assert any(not name.isascii() for name in names)
    assert any(name.isascii() for name in names)
    modalities_per_study = {uid: {e["modality"] for e in group} for uid, group in _by(corpus.entries, "study_uid").items()}
    assert {"CT", "MR"} in modalities_per_study.values()
    stats = corpus.store.statistics()
    assert stats.instances == len(corpus.entries) == SPEC.instance_count + 5
    assert stats.studies == len(modalities_per_study)


# -- counts and computed keys per level -------------------------------------------------


@pytest.mark.parametrize(
    ("level", "field"),
    [("PATIENT", "patient_id"), ("STUDY", "study_uid"), ("SERIES", "series_uid"), ("IMAGE", "sop_uid")],
)
def test_one_row_per_entity_at_each_level(corpus: Corpus, level: str, field: str) -> None:
    rows = list(Archive(corpus.store).find(Query(level=level, model=_model(level))))
    expected = {entry[field] for entry in corpus.entries}  # type: ignore[literal-required]
    key = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
    assert sorted(str(row[key[level]]) for row in rows) == sorted(expected)


def test_patient_rows_count_related_studies_series_instances(corpus: Corpus) -> None:
    rows = {row["PatientID"]: row for row in Archive(corpus.store).find(Query(level="PATIENT", model="PATIENT"))}
    for patient_id, entries in _by(corpus.entries, "patient_id").items():
        row = rows[patient_id]
        assert row["PatientName"] == entries[0]["patient_name"]
        assert row["NumberOfPatientRelatedStudies"] == str(len({e["study_uid"] for e in entries}))
        assert row["NumberOfPatientRelatedSeries"] == str(len({e["series_uid"] for e in entries}))
        assert row["NumberOfPatientRelatedInstances"] == str(len(entries))
        assert "StudyInstanceUID" not in row and "NumberOfStudyRelatedSeries" not in row


def test_study_rows_have_computed_keys(corpus: Corpus) -> None:
    rows = {row["StudyInstanceUID"]: row for row in Archive(corpus.store).find(Query(level="STUDY"))}
    for study_uid, entries in _by(corpus.entries, "study_uid").items():
        row = rows[study_uid]
        assert row["NumberOfStudyRelatedSeries"] == str(len({e["series_uid"] for e in entries}))
        assert row["NumberOfStudyRelatedInstances"] == str(len(entries))
        assert sorted(row["ModalitiesInStudy"]) == sorted({e["modality"] for e in entries})
        assert sorted(row["SOPClassesInStudy"]) == sorted({e["sop_class_uid"] for e in entries})
        assert row["PatientID"] == entries[0]["patient_id"]
        assert row["PatientName"] == entries[0]["patient_name"]
        assert row["AccessionNumber"] == entries[0]["accession_number"]
        assert row["StudyDate"] == entries[0]["study_date"]


def test_patient_counts_at_study_level_cover_the_patients_studies(corpus: Corpus) -> None:
    """Asked at STUDY level (Study Root), NumberOfPatientRelated* count all of the
    patient's studies, also when the query names one of them."""
    computed = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")
    for patient_id, entries in _by(corpus.entries, "patient_id").items():
        for study_uid in sorted({e["study_uid"] for e in entries}):
            query = Query(level="STUDY", conditions=(Condition("StudyInstanceUID", "UI", study_uid),),
                          return_keys=computed)
            rows = list(Archive(corpus.store).find(query))
            assert [row["StudyInstanceUID"] for row in rows] == [study_uid]
            assert rows[0]["NumberOfPatientRelatedStudies"] == str(len({e["study_uid"] for e in entries}))
            assert rows[0]["NumberOfPatientRelatedSeries"] == str(len({e["series_uid"] for e in entries}))
            assert rows[0]["NumberOfPatientRelatedInstances"] == str(len(entries))
    # Every study asked for: one row each (no count-only row standing in for a match).
    rows = list(Archive(corpus.store).find(Query(level="STUDY", return_keys=computed)))
    assert sorted(row["StudyInstanceUID"] for row in rows) == sorted({e["study_uid"] for e in corpus.entries})
    assert all("_count_only" not in row for row in rows)
    # Not asked for: not computed.
    assert "NumberOfPatientRelatedStudies" not in next(iter(Archive(corpus.store).find(Query(level="STUDY"))))


def test_series_rows_count_instances_and_carry_upper_levels(corpus: Corpus) -> None:
    rows = {row["SeriesInstanceUID"]: row for row in Archive(corpus.store).find(Query(level="SERIES"))}
    for series_uid, entries in _by(corpus.entries, "series_uid").items():
        row = rows[series_uid]
        assert row["NumberOfSeriesRelatedInstances"] == str(len(entries))
        assert row["Modality"] == entries[0]["modality"]
        assert row["StudyInstanceUID"] == entries[0]["study_uid"]
        assert row["PatientID"] == entries[0]["patient_id"]


def test_image_rows_carry_instance_series_study_and_patient_keys(corpus: Corpus) -> None:
    rows = {row["SOPInstanceUID"]: row for row in Archive(corpus.store).find(Query(level="IMAGE"))}
    for entry in corpus.entries:
        row = rows[entry["sop_uid"]]
        assert row["SOPClassUID"] == entry["sop_class_uid"]
        assert row["SeriesInstanceUID"] == entry["series_uid"]
        assert row["StudyInstanceUID"] == entry["study_uid"]
        assert row["Modality"] == entry["modality"]
        assert row["PatientName"] == entry["patient_name"]


# -- matching through the index ---------------------------------------------------------


def test_latin1_names_match_case_insensitively(corpus: Corpus) -> None:
    latin1 = {e["patient_name"]: e["patient_id"] for e in corpus.entries if not e["patient_name"].isascii()}
    assert latin1
    for name, patient_id in latin1.items():
        for value in (name.lower(), name.upper(), name[:3].lower() + "*", "*" + name[-3:].upper()):
            rows = list(Archive(corpus.store).find(Query(level="STUDY", conditions=(Condition("PatientName", "PN", value),))))
            assert rows, value
            assert patient_id in {row["PatientID"] for row in rows}
            if "*" not in value:
                assert {row["PatientID"] for row in rows} == {patient_id}


@pytest.mark.parametrize(
    ("value", "has_mixed"),
    [("MR\\US", True), ("CT", True), ("US", False), ("XA\\NM", False)],
)
def test_modalities_in_study_value_list(corpus: Corpus, value: str, has_mixed: bool) -> None:
    wanted = set(value.split("\\"))
    expected = {uid for uid, es in _by(corpus.entries, "study_uid").items() if {e["modality"] for e in es} & wanted}
    query = Query(level="STUDY", conditions=(Condition("ModalitiesInStudy", "CS", value),))
    found = {row["StudyInstanceUID"] for row in Archive(corpus.store).find(query)}
    assert found == expected
    mixed = next(uid for uid, es in _by(corpus.entries, "study_uid").items() if len({e["modality"] for e in es}) == 2)
    assert (mixed in found) is has_mixed


def test_computed_count_as_a_condition(corpus: Corpus) -> None:
    counts = Counter(e["study_uid"] for e in corpus.entries)
    for value in ("6", "06", "4", "1"):
        query = Query(level="STUDY", conditions=(Condition("NumberOfStudyRelatedInstances", "IS", value),))
        found = {row["StudyInstanceUID"] for row in Archive(corpus.store).find(query)}
        assert found == {uid for uid, n in counts.items() if n == int(value)}


def test_old_style_dates_are_found_with_and_without_the_index(corpus: Corpus) -> None:
    """A record stored as "2005.03.04" is a date like any other for exact and range queries."""
    old_study = next(e["study_uid"] for e in corpus.entries if e["study_date"] == "2005.03.04")
    for condition in (
        Condition("StudyDate", "DA", "20050304"),
        Condition("StudyDate", "DA", "2005.03.04"),
        Condition("StudyDate", "DA", "20050301-20050331"),
        Condition("StudyDate", "DA", "20050304-"),
        Condition("PatientBirthDate", "DA", "19500607"),
        Condition("PatientBirthDate", "DA", "-19500607"),
    ):
        query = Query(level="STUDY", conditions=(condition,))
        indexed, scanned = _run(corpus.store, query), _run(corpus.store, query, scan=True)
        assert old_study in {row["StudyInstanceUID"] for row in scanned}, condition
        assert _canonical(indexed) == _canonical(scanned), condition


def _condition_for(study: StudyRecord, kind: str, data: st.DataObject) -> Condition:
    attributes = study.attributes
    if kind == "uid-list":
        others = data.draw(st.lists(st.sampled_from(["1.2.3", "2.25.1", study.study_instance_uid]), max_size=2))
        return Condition("StudyInstanceUID", "UI", "\\".join([study.study_instance_uid, *others]))
    keyword, vr = {
        "patient-id": ("PatientID", "LO"),
        "patient-name": ("PatientName", "PN"),
        "accession": ("AccessionNumber", "SH"),
        "study-date": ("StudyDate", "DA"),
        "birth-date": ("PatientBirthDate", "DA"),
    }[kind]
    value = str(attributes[keyword])
    if vr == "PN":
        value = data.draw(st.sampled_from([value, value.lower(), value.upper()]))
    shape = data.draw(st.sampled_from(["exact", "prefix", "missing"] if vr != "DA" else ["exact", "range", "old-style"]))
    if shape == "exact":
        return Condition(keyword, vr, value)
    if shape == "prefix":
        return Condition(keyword, vr, value[: data.draw(st.integers(1, len(value)))] + "*")
    if shape == "missing":
        return Condition(keyword, vr, value + "X")
    digits = value.replace(".", "")
    if shape == "old-style":
        return Condition(keyword, vr, f"{digits[:4]}.{digits[4:6]}.{digits[6:]}")
    low = data.draw(st.sampled_from(["", f"{int(digits[:4]) - 1}0101", digits, f"{digits[:6]}01"]))
    high = data.draw(st.sampled_from(["", digits, f"{digits[:4]}1231", f"{int(digits[:4]) + 2}0101"]))
    return Condition(keyword, vr, f"{low}-{high}" if low or high else f"{digits}-")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_index_lookup_gives_the_same_rows_as_a_full_scan(corpus: Corpus, data: st.DataObject) -> None:
    studies = corpus.studies()
    study = data.draw(st.sampled_from(studies))
    kind = data.draw(st.sampled_from(["patient-id", "patient-name", "accession", "study-date", "birth-date", "uid-list"]))
    conditions = [_condition_for(study, kind, data)]
    if data.draw(st.booleans()):
        conditions.append(Condition("Modality", "CS", data.draw(st.sampled_from(["CT", "MR", "CR", "US"]))))
    level = data.draw(st.sampled_from(["PATIENT", "STUDY", "SERIES", "IMAGE"]))
    query = Query(level=level, model=_model(level), conditions=tuple(conditions))
    reader = CountingReader(corpus.store)
    indexed = _run(reader, query)
    assert _canonical(indexed) == _canonical(_run(corpus.store, query, scan=True))
    if level != "PATIENT" and not conditions[0].value.startswith(("*", "?")):
        assert reader.calls["studies"] == 0, "the indexed condition should select the candidates"


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_exact_patient_id_equals_a_wildcard_that_defeats_the_index(corpus: Corpus, level: str) -> None:
    for patient_id in {e["patient_id"] for e in corpus.entries}:
        exact = Query(level=level, model=_model(level), conditions=(Condition("PatientID", "LO", patient_id),))
        # Every generated PatientID has 10 digits, so "*<id>" selects the same patient, by scan.
        wildcard = dataclasses.replace(exact, conditions=(Condition("PatientID", "LO", "*" + patient_id),))
        indexed_reader, scan_reader = CountingReader(corpus.store), CountingReader(corpus.store)
        indexed, scanned = _run(indexed_reader, exact), _run(scan_reader, wildcard)
        assert indexed and _canonical(indexed) == _canonical(scanned)
        assert indexed_reader.calls["studies"] == 0
        if level != "PATIENT":  # PATIENT level also looks up each matched patient's other studies, to count them.
            assert indexed_reader.calls["studies_by_index"] == 1
            assert scan_reader.calls["studies_by_index"] == 0
        assert scan_reader.calls["studies"] == 1


def test_a_key_below_the_query_level_matches_nothing(corpus: Corpus) -> None:
    """PS3.4 hierarchical query: keys below the level are not part of it. They used to be
    ignored (everything came back); now nothing matches, as in Orthanc (issue 11). An empty
    (return) key below the level is harmless."""
    entry = corpus.entries[0]
    for level, condition in (
        ("PATIENT", Condition("AccessionNumber", "SH", entry["accession_number"])),
        ("PATIENT", Condition("StudyDate", "DA", entry["study_date"])),
        ("PATIENT", Condition("StudyInstanceUID", "UI", entry["study_uid"])),
        ("STUDY", Condition("Modality", "CS", entry["modality"])),
        ("SERIES", Condition("SOPInstanceUID", "UI", entry["sop_uid"])),
    ):
        query = Query(level=level, model=_model(level), conditions=(condition,))
        assert _run(corpus.store, query) == [], (level, condition)
    with_return_key = Query(level="STUDY", return_keys=("Modality",))
    assert len(_run(corpus.store, with_return_key)) == len({e["study_uid"] for e in corpus.entries})


def test_patient_counts_cover_every_study_of_the_patient_not_only_the_matching_ones(corpus: Corpus) -> None:
    entry = corpus.entries[0]
    studies = {e["study_uid"] for e in corpus.entries if e["patient_id"] == entry["patient_id"]}
    assert len(studies) > 1
    everyone = {r["PatientID"]: r for r in _run(corpus.store, Query(level="PATIENT", model="PATIENT"))}
    expected = everyone[entry["patient_id"]]
    assert expected["NumberOfPatientRelatedStudies"] == str(len(studies))
    # A condition that only one of the patient's studies meets (its stored PatientName).
    one_study = next(s for s in corpus.store.studies() if s.study_instance_uid == entry["study_uid"])
    name = one_study.attributes["PatientName"]
    query = Query(level="PATIENT", model="PATIENT",
                  conditions=(Condition("PatientID", "LO", entry["patient_id"]), Condition("PatientName", "PN", str(name))))
    rows = _run(corpus.store, query)
    assert len(rows) == 1
    for name in ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"):
        assert rows[0][name] == expected[name]
    assert "_count_only" not in rows[0]


def test_count_only_rows_never_make_a_patient_row_of_their_own() -> None:
    rows = [
        {"PatientID": "A", "StudyInstanceUID": "1", "NumberOfStudyRelatedSeries": "1", "NumberOfStudyRelatedInstances": "2",
         "_count_only": "1", "PatientName": "OTHER"},
        {"PatientID": "A", "StudyInstanceUID": "2", "NumberOfStudyRelatedSeries": "1", "NumberOfStudyRelatedInstances": "3",
         "PatientName": "MATCHED"},
        {"PatientID": "B", "StudyInstanceUID": "3", "NumberOfStudyRelatedSeries": "1", "NumberOfStudyRelatedInstances": "1",
         "_count_only": "1"},
    ]
    patients = list(aggregate_patients(rows))
    assert len(patients) == 1
    assert patients[0]["PatientName"] == "MATCHED"
    assert patients[0]["NumberOfPatientRelatedStudies"] == "2"
    assert patients[0]["NumberOfPatientRelatedInstances"] == "5"


# -- keys the index does not keep (read from the stored header) ------------------------


def test_unindexed_condition_and_return_key_come_from_the_header(corpus: Corpus) -> None:
    query = Query(
        level="IMAGE",
        conditions=(Condition("PhotometricInterpretation", "CS", "MONOCHROME2"), Condition("Modality", "CS", "CT")),
        return_keys=("SOPInstanceUID", "SliceThickness", "PhotometricInterpretation"),
    )
    rows = _run(corpus.store, query, header_reader=corpus.header_reader)
    assert {row["SOPInstanceUID"] for row in rows} == {e["sop_uid"] for e in corpus.entries if e["modality"] == "CT"}
    assert all(row["SliceThickness"] == "5.0" and row["PhotometricInterpretation"] == "MONOCHROME2" for row in rows)
    other = dataclasses.replace(query, conditions=(Condition("PhotometricInterpretation", "CS", "MONOCHROME1"),))
    assert _run(corpus.store, other, header_reader=corpus.header_reader) == []


def test_unindexed_condition_without_a_header_reader_matches_nothing(corpus: Corpus) -> None:
    query = Query(level="STUDY", conditions=(Condition("PhotometricInterpretation", "CS", "MONOCHROME2"),))
    assert _run(corpus.store, query) == []


@pytest.mark.parametrize("with_header_reader", [True, False])
def test_patient_level_with_an_unindexed_condition(corpus: Corpus, with_header_reader: bool) -> None:
    reader = corpus.header_reader if with_header_reader else None
    matching = Query(level="PATIENT", model="PATIENT", conditions=(Condition("PhotometricInterpretation", "CS", "MONO*"),))
    missing = Query(level="PATIENT", model="PATIENT", conditions=(Condition("PhotometricInterpretation", "CS", "RGB"),))
    patients = {e["patient_id"] for e in corpus.entries}
    found = {row["PatientID"] for row in Archive(corpus.store, reader).find(matching)}
    assert found == (patients if with_header_reader else set())
    assert list(Archive(corpus.store, reader).find(missing)) == []


# -- Archive: find cancellation, locate, read, store ------------------------------------


def _cancel_after(checks: int) -> Any:
    calls = itertools.count()
    return lambda: next(calls) >= checks


def test_find_stops_early_when_cancelled(corpus: Corpus) -> None:
    reader = CountingReader(corpus.store)
    rows = list(Archive(reader).find(Query(level="IMAGE"), is_cancelled=_cancel_after(5)))  # type: ignore[arg-type]
    assert len(rows) == 5
    study_count = len({e["study_uid"] for e in corpus.entries})
    assert reader.calls["instances"] < study_count  # Did not walk the whole archive.


def test_patient_find_stops_early_when_cancelled(corpus: Corpus) -> None:
    reader = CountingReader(corpus.store)
    rows = list(Archive(reader).find(Query(level="PATIENT", model="PATIENT"), is_cancelled=_cancel_after(2)))  # type: ignore[arg-type]
    assert len(rows) < len({e["patient_id"] for e in corpus.entries})
    full = list(Archive(corpus.store).find(Query(level="PATIENT", model="PATIENT"), is_cancelled=lambda: False))
    assert len(full) == len({e["patient_id"] for e in corpus.entries})


def _locations(corpus: Corpus, entries: Iterable[ManifestEntry]) -> list[InstanceLocation]:
    return sorted(
        (
            InstanceLocation(e["study_uid"], e["series_uid"], e["sop_uid"], e["sop_class_uid"], e["transfer_syntax_uid"])
            for e in entries
        ),
        key=lambda location: location.sop_instance_uid,
    )


def _locate(corpus: Corpus, level: str, *conditions: Condition, model: str = "STUDY") -> list[InstanceLocation]:
    found = Archive(corpus.store).locate(Query(level=level, model=model, conditions=conditions)).locations
    return sorted(found, key=lambda location: location.sop_instance_uid)


def test_locate_study_series_image_and_patient(corpus: Corpus) -> None:
    mixed_uid = next(uid for uid, es in _by(corpus.entries, "study_uid").items() if len({e["modality"] for e in es}) == 2)
    study = _by(corpus.entries, "study_uid")[mixed_uid]
    assert _locate(corpus, "STUDY", Condition("StudyInstanceUID", "UI", mixed_uid)) == _locations(corpus, study)

    mr = [e for e in study if e["modality"] == "MR"]
    located = _locate(
        corpus, "SERIES", Condition("StudyInstanceUID", "UI", mixed_uid), Condition("SeriesInstanceUID", "UI", mr[0]["series_uid"])
    )
    assert located == _locations(corpus, mr)
    assert {location.sop_class_uid for location in located} == {MR_IMAGE_STORAGE}

    some = corpus.entries[3:5]
    sop_list = "\\".join(e["sop_uid"] for e in some)
    assert _locate(corpus, "IMAGE", Condition("SOPInstanceUID", "UI", sop_list)) == _locations(corpus, some)

    patient_id = corpus.entries[0]["patient_id"]
    expected = [e for e in corpus.entries if e["patient_id"] == patient_id]
    assert _locate(corpus, "PATIENT", Condition("PatientID", "LO", patient_id), model="PATIENT") == _locations(corpus, expected)


def test_locate_uses_only_unique_keys(corpus: Corpus) -> None:
    entry = corpus.entries[0]
    expected = [e for e in corpus.entries if e["study_uid"] == entry["study_uid"]]
    not_unique = Condition("Modality", "CS", "XX")  # Not a retrieve key: ignored.
    assert _locate(corpus, "STUDY", Condition("StudyInstanceUID", "UI", entry["study_uid"]), not_unique) == _locations(corpus, expected)
    assert _locate(corpus, "STUDY", Condition("StudyInstanceUID", "UI", "1.2.3.4")) == []


def test_read_returns_the_bytes_as_received(corpus: Corpus) -> None:
    archive = Archive(corpus.store)
    for location in _locate(corpus, "STUDY", Condition("StudyInstanceUID", "UI", corpus.entries[0]["study_uid"])):
        part10, offset = archive.read(location)
        instance = corpus.instances[location.sop_instance_uid]
        assert part10 == instance.part10
        assert offset == instance.dataset_offset
    missing = dataclasses.replace(location, sop_instance_uid="1.2.3.4")
    with pytest.raises(ReadError, match="not stored"):
        archive.read(missing)


def _instances(make_instance: MakeInstance, spec: StudySetSpec) -> list[Instance]:
    return [make_instance(part10) for _entry, part10 in iter_part10(spec)]


def test_read_of_a_corrupt_blob_is_a_read_error(open_store: Any, make_instance: MakeInstance) -> None:
    store: RocksStore = open_store()
    instance = _instances(make_instance, StudySetSpec(patients=1, rows=4, cols=4, seed=3))[0]
    store.put_instance(instance)
    key = PREFIX_BLOB + study_prefix(instance.study_instance_uid) + SEP + instance.sop_instance_uid.encode()
    blob = store._db.get(key)
    store._db.put(key, blob[:-1] + bytes([blob[-1] ^ 0x01]))
    (location,) = Archive(store).locate(Query(level="IMAGE", conditions=(Condition("SOPInstanceUID", "UI", instance.sop_instance_uid),))).locations
    with pytest.raises(ReadError, match="checksum"):
        Archive(store).read(location)


def test_store_outcomes_map_to_write_results(open_store: Any, make_instance: MakeInstance) -> None:
    first, second = _instances(make_instance, StudySetSpec(patients=1, instances_per_series=2, rows=4, cols=4, seed=4))
    archive = Archive(open_store())
    assert archive.store(first).status == WriteStatus.SUCCESS
    assert archive.store(first).outcome == StoreOutcome.DUPLICATE
    other_bytes = dataclasses.replace(first, part10=first.part10 + b"\x00\x00\x00\x00", content_hash="f" * 32)
    result = archive.store(other_bytes)
    assert (result.status, result.outcome) == (WriteStatus.SUCCESS, StoreOutcome.CONFLICT)
    full = Archive(open_store("full", disk_free_bytes_min=1 << 62))
    result = full.store(second)
    assert result.status == WriteStatus.OUT_OF_RESOURCES and "disk_free_bytes_min" in result.message


# -- aggregate_patients and unique_key on plain rows -------------------------------------


def test_aggregate_patients_counts_each_study_once() -> None:
    def study(patient_id: str, study_uid: str, series: int, instances: int) -> Attributes:
        return {
            "PatientID": patient_id,
            "PatientName": f"NAME^{patient_id}",
            "StudyInstanceUID": study_uid,
            "StudyDate": "20240101",
            "NumberOfStudyRelatedSeries": str(series),
            "NumberOfStudyRelatedInstances": str(instances),
            "ModalitiesInStudy": ["CT"],
        }

    rows = [study("P1", "1.1", 2, 10), study("P2", "2.1", 1, 1), study("P1", "1.2", 3, 7), study("P1", "1.1", 2, 10)]
    patients = {row["PatientID"]: row for row in aggregate_patients(rows)}
    assert patients["P1"] == {
        "PatientID": "P1",
        "PatientName": "NAME^P1",
        "NumberOfPatientRelatedStudies": "2",
        "NumberOfPatientRelatedSeries": "5",
        "NumberOfPatientRelatedInstances": "17",
    }
    assert patients["P2"]["NumberOfPatientRelatedStudies"] == "1"


def test_aggregate_patients_keeps_issuers_apart() -> None:
    rows: list[Attributes] = [
        {"PatientID": "P1", "IssuerOfPatientID": "A", "StudyInstanceUID": "1"},
        {"PatientID": "P1", "IssuerOfPatientID": "B", "StudyInstanceUID": "2"},
    ]
    assert len(list(aggregate_patients(rows))) == 2


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("PATIENT", ("P1", "ISS")),
        ("STUDY", ("1.1",)),
        ("SERIES", ("1.1", "1.1.1")),
        ("IMAGE", ("1.1", "1.1.1.1")),
    ],
)
def test_unique_key(level: str, expected: tuple[str, ...]) -> None:
    row: Attributes = {
        "PatientID": "P1",
        "IssuerOfPatientID": "ISS",
        "StudyInstanceUID": "1.1",
        "SeriesInstanceUID": "1.1.1",
        "SOPInstanceUID": "1.1.1.1",
    }
    assert unique_key(level, row) == expected
