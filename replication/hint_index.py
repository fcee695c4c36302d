"""An index over instances held as hints, so that queries see them too.

A hint is a full copy kept for an owner that could not take it (sloppy quorum); it is
not in the store's query index. A study acknowledged while its owners were down lives
only in hints until they answer again: a C-FIND or C-GET that asks the hint holders
builds this small in-memory index over what they hold and runs the ordinary
`LocalQuery` on it. Pure logic: records in, `IndexReader` out. Hints are few (they are
replayed as soon as their owner answers), so the index is built per query.
"""

from __future__ import annotations

from typing import Iterable, Iterator

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

_STUDY_KEEP = PATIENT_KEYWORDS + STUDY_KEYWORDS + ("SpecificCharacterSet",)


def _pick(attributes: Attributes, keywords: tuple[str, ...]) -> Attributes:
    return {k: attributes[k] for k in keywords if k in attributes}


class HintIndex:
    """`IndexReader` over (record, attributes) pairs; the same instance held for two
    owners counts once."""

    def __init__(self, held: Iterable[tuple[InstanceRecord, Attributes]]) -> None:
        self._studies: dict[str, StudyRecord] = {}
        self._series: dict[str, dict[str, SeriesRecord]] = {}
        self._instances: dict[str, dict[str, InstanceRecord]] = {}
        for record, attributes in held:
            self._add(record, attributes)

    def _add(self, record: InstanceRecord, attributes: Attributes) -> None:
        study_uid = record.study_instance_uid
        instances = self._instances.setdefault(study_uid, {})
        if record.sop_instance_uid in instances:
            return
        instances[record.sop_instance_uid] = InstanceRecord(
            study_instance_uid=record.study_instance_uid,
            series_instance_uid=record.series_instance_uid,
            sop_instance_uid=record.sop_instance_uid,
            sop_class_uid=record.sop_class_uid,
            transfer_syntax_uid=record.transfer_syntax_uid,
            content_hash=record.content_hash,
            size_bytes=record.size_bytes,
            dataset_offset=record.dataset_offset,
            stored_at_ms=record.stored_at_ms,
            attributes=_pick(attributes, INSTANCE_KEYWORDS),
            version_logical=record.version_logical,
            version_node=record.version_node,
        )
        series_of_study = self._series.setdefault(study_uid, {})
        series = series_of_study.get(record.series_instance_uid)
        study = self._studies.get(study_uid)
        if study is None:
            study = StudyRecord(study_instance_uid=study_uid, attributes=_pick(attributes, _STUDY_KEEP),
                                first_sop_instance_uid=record.sop_instance_uid)
            self._studies[study_uid] = study
        if series is None:
            series = SeriesRecord(study_instance_uid=study_uid, series_instance_uid=record.series_instance_uid,
                                  attributes=_pick(attributes, SERIES_KEYWORDS),
                                  first_sop_instance_uid=record.sop_instance_uid)
            series_of_study[record.series_instance_uid] = series
            study.series_count += 1
        series.instance_count += 1
        study.instance_count += 1
        study.size_bytes += record.size_bytes
        study.updated_at_ms = max(study.updated_at_ms, record.stored_at_ms)
        modality = attributes.get("Modality")
        if isinstance(modality, str) and modality and modality not in study.modalities:
            study.modalities.append(modality)
        if record.sop_class_uid not in study.sop_classes:
            study.sop_classes.append(record.sop_class_uid)

    def __len__(self) -> int:
        return sum(len(held) for held in self._instances.values())

    # ----------------------------------------------------------------- IndexReader
    def study(self, study_instance_uid: str) -> StudyRecord | None:
        return self._studies.get(study_instance_uid)

    def studies(self) -> Iterator[StudyRecord]:
        yield from self._studies.values()

    def studies_by_index(self, keyword: str, low: str, high: str | None) -> Iterator[str]:
        # Every study: a superset is correct, since LocalQuery matches each condition on
        # the rows again, and the hints held are few.
        yield from self._studies

    def series(self, study_instance_uid: str) -> Iterator[SeriesRecord]:
        yield from self._series.get(study_instance_uid, {}).values()

    def instances(self, study_instance_uid: str) -> Iterator[InstanceRecord]:
        yield from self._instances.get(study_instance_uid, {}).values()
