"""QIDO-RS request parameters (PS3.18 8.3.4, 10.6) to the archive's `Query`, as pure logic.

A QIDO URL names a level (studies, series, instances), maybe a study and a series in its
path, and carries matching keys, `includefield`, `fuzzymatching`, `limit` and `offset` as
query parameters. The result is the same `Query` a C-FIND identifier gives, so the
coordinator matches it with the same rules and routes it by study when the path (or a
StudyInstanceUID key) names one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from pacsnode.replication.matching import Condition, Query
from pacsnode.replication.model import INSTANCE_KEYWORDS, PATIENT_KEYWORDS, SERIES_KEYWORDS, STUDY_KEYWORDS
from pacsnode.replication.query import SERIES_COMPUTED, STUDY_COMPUTED

LEVEL_OF_RESOURCE = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}

# PS3.18 Table 10.6.3-3..5: what a QIDO answer carries by default at each level (with
# the study description and the counts viewers' study lists show, which the index keeps).
STUDY_DEFAULT = (
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)
SERIES_DEFAULT = (
    "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "SeriesDate", "SeriesTime",
    "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
)
INSTANCE_DEFAULT = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames")

# includefield=all: every attribute the index keeps at the level and above (no header reads).
ALL_FIELDS = {
    "STUDY": PATIENT_KEYWORDS + STUDY_KEYWORDS + STUDY_COMPUTED,
    "SERIES": PATIENT_KEYWORDS + STUDY_KEYWORDS + SERIES_KEYWORDS + SERIES_COMPUTED,
    "IMAGE": PATIENT_KEYWORDS + STUDY_KEYWORDS + SERIES_KEYWORDS + SERIES_COMPUTED + INSTANCE_KEYWORDS,
}
_RESERVED = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
# Not DICOM attributes but parameters some clients add (cache busters, formats).
_IGNORED = frozenset({"_", "accept", "charset"})


class QidoError(ValueError):
    """The request cannot be answered as asked (HTTP 400 with this text)."""


@dataclass(frozen=True)
class QidoRequest:
    query: Query
    keywords: tuple[str, ...]  # The attributes each result carries, in order.
    limit: int | None
    offset: int
    fuzzy_requested: bool  # fuzzymatching=true: PN keys without wildcards match anywhere in the name.


def attribute_keyword(name: str) -> str:
    """A QIDO attribute ID (keyword or 8 hex digits) as a keyword; QidoError when unknown."""
    text = name.strip()
    if "." in text:
        raise QidoError(f"sequence matching is not supported: {text[:80]}")
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        keyword = keyword_for_tag(int(text, 16))
        if keyword:
            return str(keyword)
        raise QidoError(f"unknown attribute tag {text}")
    if tag_for_keyword(text) is not None:
        return text
    raise QidoError(f"unknown attribute {text[:80]!r}")


def _vr(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return str(dictionary_VR(tag)).split(" or ")[0] if tag is not None else "UN"


def _non_negative(name: str, values: list[str]) -> int | None:
    if not values:
        return None
    try:
        value = int(values[-1])
    except ValueError:
        raise QidoError(f"{name} must be a whole number, got {values[-1][:20]!r}") from None
    if value < 0:
        raise QidoError(f"{name} must be >= 0, got {value}")
    return value


def default_keywords(level: str, nested: bool) -> tuple[str, ...]:
    """The attributes returned without includefield: the level's, plus (PS3.18 10.6.3.3)
    the study's for un-nested series and instance searches and the series' for
    un-nested instances; a nested search still names its parents' UIDs."""
    if level == "STUDY":
        return STUDY_DEFAULT
    parents: tuple[str, ...]
    if level == "SERIES":
        parents = ("StudyInstanceUID",) if nested else STUDY_DEFAULT
        return tuple(dict.fromkeys(parents + SERIES_DEFAULT))
    parents = ("StudyInstanceUID", "SeriesInstanceUID") if nested else STUDY_DEFAULT + SERIES_DEFAULT
    return tuple(dict.fromkeys(parents + INSTANCE_DEFAULT))


def fuzzy_name(value: str) -> str:
    """PS3.18 leaves fuzzy matching of names to the server: here a name key without
    wildcards matches wherever it appears in the name, in any component, case-insensitively
    (PN matching folds case): `smi` finds SMITH^JOHN and DOE^SMIRNA. A key with `*` or `?`
    is the caller's own pattern and is left as it is; each `\\`-separated value likewise."""
    return "\\".join(part if ("*" in part or "?" in part or not part.strip()) else f"*{part.strip()}*"
                      for part in value.split("\\"))


def parse_qido(resource: str, params: Iterable[tuple[str, str]], *, study_instance_uid: str | None = None,
               series_instance_uid: str | None = None) -> QidoRequest:
    """Build the Query for GET .../{resource}?{params}; raises QidoError on a bad request."""
    level = LEVEL_OF_RESOURCE[resource]
    values: dict[str, list[str]] = {}
    conditions: dict[str, str] = {}
    include: list[str] = []
    for raw_name, value in params:
        name = raw_name.strip()
        lowered = name.lower()
        if lowered in _RESERVED:
            values.setdefault(lowered, []).append(value)
            if lowered == "includefield":
                include.extend(v for v in (part.strip() for part in value.split(",")) if v)
            continue
        if lowered in _IGNORED:
            continue
        keyword = attribute_keyword(name)
        if value.strip() == "" or value == "*":
            include.append(keyword)  # Universal matching: only asks for the attribute.
            continue
        if keyword in conditions:
            raise QidoError(f"{keyword} is given twice")
        conditions[keyword] = value
    for keyword, uid in (("StudyInstanceUID", study_instance_uid), ("SeriesInstanceUID", series_instance_uid)):
        if uid is not None:
            if keyword in conditions and conditions[keyword] != uid:
                raise QidoError(f"{keyword} in the query differs from the one in the path")
            conditions[keyword] = uid
    fuzzy = any(v.strip().lower() == "true" for v in values.get("fuzzymatching", []))
    built = []
    for keyword, value in conditions.items():
        vr = _vr(keyword)
        if vr == "PN" and fuzzy:
            value = fuzzy_name(value)
        if vr == "UI":
            value = value.replace(",", "\\")  # PS3.18 8.3.4.1: a UID list is comma-separated.
        built.append(Condition(keyword, vr, value))
    nested = study_instance_uid is not None
    keywords = list(default_keywords(level, nested))
    for name in include:
        if name.lower() == "all":
            keywords.extend(ALL_FIELDS[level])
        else:
            keywords.append(attribute_keyword(name))
    keywords.extend(conditions)  # A matching key is returned too (as C-FIND does).
    ordered = tuple(dict.fromkeys(k for k in keywords if k not in ("QueryRetrieveLevel", "SpecificCharacterSet")))
    return QidoRequest(
        query=Query(level=level, conditions=tuple(built), return_keys=ordered, model="STUDY"),
        keywords=ordered,
        limit=_non_negative("limit", values.get("limit", [])),
        offset=_non_negative("offset", values.get("offset", [])) or 0,
        fuzzy_requested=fuzzy,
    )


def sort_key(level: str):  # type: ignore[no-untyped-def]
    """A stable order for pages (limit/offset): newest study first, then by UIDs and numbers,
    so that the same search pages the same way whichever replicas answered it."""

    def number(value: object) -> float:
        try:
            return float(str(value))
        except ValueError:
            return 0.0

    def key(row: dict[str, object]) -> tuple[object, ...]:
        date = str(row.get("StudyDate") or "")
        time = str(row.get("StudyTime") or "")
        # Newest first: invert the digits so that a plain ascending sort does it.
        inverted = (date + time).translate(str.maketrans("0123456789", "9876543210"))
        return (
            0 if date else 1,  # Studies without a date last.
            inverted,
            str(row.get("StudyInstanceUID") or ""),
            number(row.get("SeriesNumber")) if level != "STUDY" else 0.0,
            str(row.get("SeriesInstanceUID") or "") if level != "STUDY" else "",
            number(row.get("InstanceNumber")) if level == "IMAGE" else 0.0,
            str(row.get("SOPInstanceUID") or "") if level == "IMAGE" else "",
        )

    return key
