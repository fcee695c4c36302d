"""Run a C-FIND `Query` against one replica's index; build result rows.

Pure logic over an `IndexReader` (the local store implements it). A row is the flat
attribute map of one match at the query's level, including the attributes of every level
above it and the computed keys (PS3.4 C.6.1.1.x / C.6.2.1.x). PATIENT-level queries
return study rows that pass the patient conditions; `aggregate_patients` folds them into
patient rows, which lets the cluster coordinator aggregate across replicas the same way.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol

from pacsnode.replication.matching import LEVELS, Condition, Query, match_all
from pacsnode.replication.model import (
    INSTANCE_KEYWORDS,
    PATIENT_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    Attributes,
    InstanceRecord,
    SeriesRecord,
    StudyRecord,
)

PATIENT_COMPUTED = (
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
)
STUDY_COMPUTED = (
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "ModalitiesInStudy",
    "SOPClassesInStudy",
)
SERIES_COMPUTED = ("NumberOfSeriesRelatedInstances",)

_LEVEL_OF: dict[str, str] = {}
for _keyword in PATIENT_KEYWORDS + PATIENT_COMPUTED:
    _LEVEL_OF[_keyword] = "PATIENT"
for _keyword in STUDY_KEYWORDS + STUDY_COMPUTED:
    _LEVEL_OF[_keyword] = "STUDY"
for _keyword in SERIES_KEYWORDS + SERIES_COMPUTED:
    _LEVEL_OF[_keyword] = "SERIES"
for _keyword in INSTANCE_KEYWORDS:
    _LEVEL_OF[_keyword] = "IMAGE"

# Study-level keys the store indexes, in the order we prefer them to select candidates.
_INDEX_PRIORITY = ("AccessionNumber", "PatientID", "StudyDate", "PatientName", "PatientBirthDate")


def level_of(keyword: str) -> str | None:
    """The query level an attribute belongs to; None for keys the index does not keep."""
    return _LEVEL_OF.get(keyword)


# A callable that reads attributes the index does not keep from a stored instance's
# header: (study uid, sop uid, keywords) -> attributes.
HeaderReader = Callable[[str, str, tuple[str, ...]], Attributes]


class IndexReader(Protocol):
    def study(self, study_instance_uid: str) -> StudyRecord | None: ...
    def studies(self) -> Iterator[StudyRecord]: ...
    def studies_by_index(self, keyword: str, low: str, high: str | None) -> Iterator[str]: ...
    def series(self, study_instance_uid: str) -> Iterator[SeriesRecord]: ...
    def instances(self, study_instance_uid: str) -> Iterator[InstanceRecord]: ...


def study_row(study: StudyRecord) -> Attributes:
    row: Attributes = dict(study.attributes)
    row["StudyInstanceUID"] = study.study_instance_uid
    row["NumberOfStudyRelatedSeries"] = str(study.series_count)
    row["NumberOfStudyRelatedInstances"] = str(study.instance_count)
    row["ModalitiesInStudy"] = list(study.modalities)
    row["SOPClassesInStudy"] = list(study.sop_classes)
    if study.correction:
        # Internal: the study's correction, so a retrieve rewrites the headers it sends and
        # a modify's clock observes its version (never returned to a client).
        row["_correction"] = study.correction
    return row


def series_row(study_attributes: Attributes, series: SeriesRecord) -> Attributes:
    row: Attributes = dict(study_attributes)
    row.update(series.attributes)
    row["SeriesInstanceUID"] = series.series_instance_uid
    row["NumberOfSeriesRelatedInstances"] = str(series.instance_count)
    return row


def instance_row(series_attributes: Attributes, instance: InstanceRecord) -> Attributes:
    row: Attributes = dict(series_attributes)
    row.update(instance.attributes)
    row["SOPInstanceUID"] = instance.sop_instance_uid
    row["SOPClassUID"] = instance.sop_class_uid
    # Internal (not a DICOM keyword, never returned to a client): lets a retrieve open
    # the right presentation context without reading the instance.
    row["_transfer_syntax_uid"] = instance.transfer_syntax_uid
    # Internal too: the Part-10 length, so that a WADO-RS answer can state its length first.
    row["_part10_bytes"] = str(instance.size_bytes + instance.dataset_offset)
    # Internal too: the version mark, which a delete's clock observes before it stamps.
    row["_version"] = instance.version.mark()
    return row


class LocalQuery:
    """Executes one query against one index; iterate `rows()`."""

    def __init__(
        self,
        reader: IndexReader,
        query: Query,
        header_reader: HeaderReader | None = None,
        *,
        study_filter: Callable[[str], bool] | None = None,
    ) -> None:
        self._reader = reader
        self._query = query
        self._header_reader = header_reader
        self._study_filter = study_filter  # E.g. "its token is in these ranges" (cluster reads).
        self._by_level: dict[str, list[Condition]] = {"PATIENT": [], "STUDY": [], "SERIES": [], "IMAGE": []}
        self._unindexed: list[Condition] = []
        for condition in query.conditions:
            level = level_of(condition.keyword)
            if level is None:
                self._unindexed.append(condition)
            else:
                self._by_level[level].append(condition)
        # A matching key below the query level (Modality at STUDY level, StudyDate at
        # PATIENT level) is not part of the hierarchical model: nothing matches, as in
        # Orthanc (it used to be ignored, so such a query returned everything).
        depth = LEVELS.index(query.level)
        self._below_level = [
            c for c in query.conditions if LEVELS.index(level_of(c.keyword) or query.level) > depth
        ]
        # Keys the index does not keep, to read from the instance header for the rows.
        self._extra_keys = tuple(
            k for k in query.return_keys if level_of(k) is None and k not in _NOT_FROM_HEADER
        )

    def rows(self) -> Iterator[Attributes]:
        level = self._query.level
        if self._below_level:
            return
        counted: set[str] = set()
        for study in self._candidate_studies():
            study_attributes = study_row(study)
            if not match_all(self._by_level["PATIENT"], study_attributes):
                continue
            if level == "PATIENT":
                row = self._with_header(study_attributes, study.study_instance_uid, study.first_sop_instance_uid)
                if row is not None:
                    yield row
                    yield from self._other_studies_of(study_attributes, counted)
                continue
            if not match_all(self._by_level["STUDY"], study_attributes):
                continue
            if level == "STUDY":
                row = self._with_header(study_attributes, study.study_instance_uid, study.first_sop_instance_uid)
                if row is not None:
                    yield row
                    if wants_patient_counts(self._query):
                        yield from self._other_studies_of(study_attributes, counted, skip_matching=True)
                continue
            yield from self._series_rows(study, study_attributes)

    def _other_studies_of(self, matched: Attributes, counted: set[str], *,
                          skip_matching: bool = False) -> Iterator[Attributes]:
        """Rows marked COUNT_ONLY for the matched patient's other studies here, so that
        NumberOfPatientRelated* count the patient's studies, not only the matching ones.
        With `skip_matching` (STUDY level), not those that match the query themselves:
        they come as rows of their own, which a count-only row must not stand in for."""
        patient_id = str(matched.get("PatientID", "") or "")
        if not patient_id:
            return
        key = patient_key(matched)
        for uid in dict.fromkeys(self._reader.studies_by_index("PatientID", patient_id, patient_id)):
            if uid == matched.get("StudyInstanceUID") or uid in counted:
                continue
            if self._study_filter is not None and not self._study_filter(uid):
                continue
            study = self._reader.study(uid)
            if study is None:
                continue
            row = study_row(study)
            if patient_key(row) != key:
                continue
            if skip_matching and match_all(self._by_level["PATIENT"], row) and \
                    match_all(self._by_level["STUDY"], row):
                continue
            counted.add(uid)
            row[COUNT_ONLY] = "1"
            yield row

    def _series_rows(self, study: StudyRecord, study_attributes: Attributes) -> Iterator[Attributes]:
        level = self._query.level
        series_records = list(self._reader.series(study.study_instance_uid))
        wanted_series = {s.series_instance_uid: s for s in series_records}
        if level == "SERIES":
            for series in series_records:
                row = series_row(study_attributes, series)
                if match_all(self._by_level["SERIES"], row):
                    full = self._with_header(row, study.study_instance_uid, series.first_sop_instance_uid)
                    if full is not None:
                        yield full
            return
        series_rows: dict[str, Attributes] = {}
        for uid, series in wanted_series.items():
            row = series_row(study_attributes, series)
            if match_all(self._by_level["SERIES"], row):
                series_rows[uid] = row
        if not series_rows:
            return
        for instance in self._reader.instances(study.study_instance_uid):
            parent = series_rows.get(instance.series_instance_uid)
            if parent is None:
                continue
            row = instance_row(parent, instance)
            if match_all(self._by_level["IMAGE"], row):
                full = self._with_header(row, study.study_instance_uid, instance.sop_instance_uid)
                if full is not None:
                    yield full

    def _with_header(self, row: Attributes, study_uid: str, sop_uid: str) -> Attributes | None:
        """Add (and match) keys the index does not keep, from the instance header."""
        if not self._unindexed and not self._extra_keys:
            return row
        if self._header_reader is None or not sop_uid:
            return row if not self._unindexed else None
        keywords = tuple(dict.fromkeys([c.keyword for c in self._unindexed] + list(self._extra_keys)))
        extra = self._header_reader(study_uid, sop_uid, keywords)
        if not match_all(self._unindexed, extra):
            return None
        merged = dict(row)
        for keyword, value in extra.items():
            merged.setdefault(keyword, value)
        return merged

    def _candidate_studies(self) -> Iterator[StudyRecord]:
        """Studies that may match: an index lookup when a condition allows, else all."""
        uids = self._indexed_candidates()
        keep = self._study_filter
        if uids is None:
            for study in self._reader.studies():
                if keep is None or keep(study.study_instance_uid):
                    yield study
            return
        for uid in uids:
            if keep is not None and not keep(uid):
                continue
            found = self._reader.study(uid)
            if found is not None:
                yield found

    def _indexed_candidates(self) -> list[str] | None:
        chosen = candidate_lookup(self._query)
        if chosen is None:
            return None
        how, condition = chosen
        if how == "uids":
            return list(dict.fromkeys(v.strip() for v in condition.value.split("\\") if v.strip()))
        keyword = condition.keyword
        if how == "single":
            value = condition.value.strip()
            if condition.vr == "DA":
                value = value.replace(".", "")
            return list(dict.fromkeys(self._reader.studies_by_index(keyword, value, value)))
        if how == "wildcard":
            return list(dict.fromkeys(self._reader.studies_by_index(keyword, _literal_prefix(condition.value), None)))
        low, _, high = condition.value.partition("-")  # "range": a DA range.
        low = low.strip().replace(".", "") or "0"
        high = high.strip().replace(".", "") or "99999999"
        return list(dict.fromkeys(self._reader.studies_by_index(keyword, low, high)))


def candidate_lookup(query: Query) -> tuple[str, Condition] | None:
    """How LocalQuery picks the studies that may match `query`: ("uids", the
    StudyInstanceUID condition: those studies), (the condition's kind: "single",
    "wildcard" or "range", the condition) for the index lookup of the first key of
    _INDEX_PRIORITY it can look up, or None: a scan of every study."""
    # Only keys that rows() matches at this level may narrow the candidates: a
    # study key in a PATIENT-level query is ignored there, so it must be here too.
    depth = LEVELS.index(query.level)
    conditions = {c.keyword: c for c in query.conditions if LEVELS.index(level_of(c.keyword) or "IMAGE") <= depth}
    uid_condition = conditions.get("StudyInstanceUID")
    if uid_condition is not None:
        return "uids", uid_condition
    for keyword in _INDEX_PRIORITY:
        condition = conditions.get(keyword)
        if condition is None:
            continue
        kind = condition.kind
        if "\\" in condition.value and kind != "range":
            continue  # Value lists: match by scan (rare for these keys).
        if kind == "single" or (kind == "range" and condition.vr == "DA") or \
                (kind == "wildcard" and _literal_prefix(condition.value)):
            return kind, condition
    return None


def exact_lookup(query: Query) -> bool:
    """True when the studies `query` may match are those its StudyInstanceUID key names
    or those one exact value of an indexed key selects (PatientID, AccessionNumber, ...):
    its cost is bounded by its matches, not by the size of the archive."""
    chosen = candidate_lookup(query)
    return chosen is not None and chosen[0] in ("uids", "single")


# Keys the front end fills itself; never looked up in a header.
_NOT_FROM_HEADER = frozenset(
    {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}
)


def _literal_prefix(pattern: str) -> str:
    for index, char in enumerate(pattern):
        if char in "*?":
            return pattern[:index]
    return pattern


def patient_key(row: Attributes) -> tuple[str, str]:
    return (str(row.get("PatientID", "")), str(row.get("IssuerOfPatientID", "")))


# Internal row key (never returned to a client): a study of a matched patient that is
# there only to be counted in NumberOfPatientRelated*.
COUNT_ONLY = "_count_only"


def wants_patient_counts(query: Query) -> bool:
    """A STUDY-level query asking for NumberOfPatientRelated*: in the Study Root model the
    patient's attributes are the study's (PS3.4 C.6.2.1.2, Table C.6-5 lists these three
    as optional study-level keys), and each counts all of the patient's studies (C.3.4),
    so the answer needs the patient's other studies too (COUNT_ONLY rows) and every
    range asked (no routing by the StudyInstanceUID)."""
    return query.level == "STUDY" and any(k in query.return_keys for k in PATIENT_COMPUTED)


def with_patient_counts(study_rows: Iterable[Attributes]) -> Iterator[Attributes]:
    """The matching study rows (deduplicated by StudyInstanceUID, COUNT_ONLY ones dropped),
    each with NumberOfPatientRelated* of its patient, counted over every row. Holds the
    rows until the last one: the counts are known only then."""
    rows: dict[str, Attributes] = {}
    matched: list[str] = []
    for row in study_rows:
        study_uid = str(row.get("StudyInstanceUID", ""))
        if row.get(COUNT_ONLY) != "1":
            if study_uid not in matched:
                matched.append(study_uid)
            rows[study_uid] = row
        else:
            rows.setdefault(study_uid, row)
    totals: dict[tuple[str, str], list[int]] = {}
    for row in rows.values():
        total = totals.setdefault(patient_key(row), [0, 0, 0])
        total[0] += 1
        total[1] += int(str(row.get("NumberOfStudyRelatedSeries", "0") or "0"))
        total[2] += int(str(row.get("NumberOfStudyRelatedInstances", "0") or "0"))
    for study_uid in matched:
        row = dict(rows[study_uid])
        studies, series, instances = totals[patient_key(row)]
        row["NumberOfPatientRelatedStudies"] = str(studies)
        row["NumberOfPatientRelatedSeries"] = str(series)
        row["NumberOfPatientRelatedInstances"] = str(instances)
        yield row


def aggregate_patients(study_rows: Iterable[Attributes]) -> Iterator[Attributes]:
    """Fold study rows (deduplicated by StudyInstanceUID) into one row per patient.

    A patient is returned when at least one of its rows matched (is not COUNT_ONLY); its
    attributes come from a matching row, its counts from every row."""
    patients: dict[tuple[str, str], Attributes] = {}
    seen: dict[tuple[str, str], set[str]] = {}
    matched: dict[tuple[str, str], None] = {}
    for row in study_rows:
        key = patient_key(row)
        count_only = row.get(COUNT_ONLY) == "1"
        if not count_only and key not in matched:
            matched[key] = None
            previous = patients.get(key)
            patient = {k: v for k, v in row.items() if level_of(k) in (None, "PATIENT") and k != COUNT_ONLY}
            patient.pop("StudyInstanceUID", None)
            for name in PATIENT_COMPUTED:
                patient[name] = previous[name] if previous is not None else "0"
            patients[key] = patient
        study_uid = str(row.get("StudyInstanceUID", ""))
        studies = seen.setdefault(key, set())
        if study_uid in studies:
            continue
        studies.add(study_uid)
        counted = patients.get(key)
        if counted is None:
            counted = patients[key] = {name: "0" for name in PATIENT_COMPUTED}
        patient = counted
        patient["NumberOfPatientRelatedStudies"] = str(int(str(patient["NumberOfPatientRelatedStudies"])) + 1)
        patient["NumberOfPatientRelatedSeries"] = str(
            int(str(patient["NumberOfPatientRelatedSeries"])) + int(str(row.get("NumberOfStudyRelatedSeries", "0")))
        )
        patient["NumberOfPatientRelatedInstances"] = str(
            int(str(patient["NumberOfPatientRelatedInstances"]))
            + int(str(row.get("NumberOfStudyRelatedInstances", "0")))
        )
    for key in matched:
        yield patients[key]


def unique_key(level: str, row: Attributes) -> tuple[str, ...]:
    """The key that identifies a row at its level, for de-duplication across replicas."""
    if level == "PATIENT":
        return patient_key(row)
    if level == "STUDY":
        return (str(row.get("StudyInstanceUID", "")),)
    if level == "SERIES":
        return (str(row.get("StudyInstanceUID", "")), str(row.get("SeriesInstanceUID", "")))
    return (str(row.get("StudyInstanceUID", "")), str(row.get("SOPInstanceUID", "")))
