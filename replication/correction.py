"""Corrections: versioned study-level overlays of patient and study attributes. Pure code.

`pacsnode modify` and `pacsnode merge-patient` never rewrite stored instances. A
correction is kept per study, next to its instances, as a last-writer-wins map:
keyword -> (value, version that set it). Two corrections of one study merge keyword by
keyword, the newer version winning (`Correction.merge`: commutative, associative,
idempotent), so every replica ends with the same overlay whatever order the corrections
reach it in, and a later correction wins over an earlier one. The overlay applies to
every instance of the study, including instances stored after it (as dcm4chee's study
attribute updates do): a re-store of the original bytes after a modify does not undo it.

What it changes: the study record (C-FIND, QIDO), and the header of every instance as
retrieval sends it (`node/correct.py` rewrites the header bytes only). The bytes
received stay stored unchanged.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from pacsnode.replication.hlc import Version
from pacsnode.replication.model import Attributes

# The attributes a correction may change: keyword -> (tag, VR). Patient and study level
# only, all in groups 0008-0020 (node/correct.py relies on that: it rewrites the elements
# before the first one of group 0x0021 or later, never what follows, pixel data included).
CORRECTABLE: dict[str, tuple[int, str]] = {
    "PatientName": (0x00100010, "PN"),
    "PatientID": (0x00100020, "LO"),
    "IssuerOfPatientID": (0x00100021, "LO"),
    "PatientBirthDate": (0x00100030, "DA"),
    "PatientSex": (0x00100040, "CS"),
    "AccessionNumber": (0x00080050, "SH"),
    "ReferringPhysicianName": (0x00080090, "PN"),
    "StudyDescription": (0x00081030, "LO"),
    "StudyID": (0x00200010, "SH"),
}
# The last tag a correction can touch (StudyID); node/correct.py rewrites up to here.
LAST_CORRECTABLE_TAG = max(tag for tag, _vr in CORRECTABLE.values())

_MAX_CHARS = {"LO": 64, "SH": 16, "CS": 16, "DA": 8}
_PN_GROUP_CHARS = 64
_DATE = re.compile(r"^(\d{4})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])$")
_CS = re.compile(r"^[A-Z0-9 _]*$")

# A listing entry's third field for a study's correction starts with this (content hashes
# are hex, tombstone marks start with '~'); the entry's SOP field is CORRECTION_SOP.
ENTRY_PREFIX = "^"
CORRECTION_SOP = ""


class CorrectionRefusal(enum.Enum):
    NOT_CORRECTABLE = "not-correctable"  # Not in CORRECTABLE.
    BAD_VALUE = "bad-value"  # Too long, wrong characters, not a date, ...
    NOTHING_TO_CHANGE = "nothing-to-change"  # No attribute given.


class InvalidCorrection(ValueError):
    """A requested change that is refused; `reason` says why, `keyword` which attribute."""

    def __init__(self, reason: CorrectionRefusal, keyword: str, detail: str) -> None:
        super().__init__(f"{keyword}: {detail}" if keyword else detail)
        self.reason = reason
        self.keyword = keyword


def check_changes(changes: Mapping[str, str]) -> dict[str, str]:
    """The changes, validated (values stripped of surrounding spaces); raises
    InvalidCorrection naming the first attribute refused. Never echoes a value (PHI)."""
    if not changes:
        raise InvalidCorrection(CorrectionRefusal.NOTHING_TO_CHANGE, "", "no attribute to change")
    checked: dict[str, str] = {}
    for keyword, raw in changes.items():
        if keyword not in CORRECTABLE:
            raise InvalidCorrection(CorrectionRefusal.NOT_CORRECTABLE, keyword,
                                    "may not be changed (allowed: " + ", ".join(sorted(CORRECTABLE)) + ")")
        value = str(raw).strip()
        vr = CORRECTABLE[keyword][1]
        if "\\" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise InvalidCorrection(CorrectionRefusal.BAD_VALUE, keyword, "backslash or control character")
        if vr == "PN":
            if value.count("=") > 2 or any(len(group) > _PN_GROUP_CHARS for group in value.split("=")):
                raise InvalidCorrection(CorrectionRefusal.BAD_VALUE, keyword, "not a person name (PN)")
        elif len(value) > _MAX_CHARS[vr]:
            raise InvalidCorrection(CorrectionRefusal.BAD_VALUE, keyword, f"longer than {_MAX_CHARS[vr]} characters")
        if vr == "DA" and value and not _DATE.match(value):
            raise InvalidCorrection(CorrectionRefusal.BAD_VALUE, keyword, "not a date YYYYMMDD")
        if vr == "CS" and not _CS.match(value):
            raise InvalidCorrection(CorrectionRefusal.BAD_VALUE, keyword, "not a code string")
        if keyword == "PatientSex" and value not in ("", "M", "F", "O"):
            raise InvalidCorrection(CorrectionRefusal.BAD_VALUE, keyword, "must be M, F, O or empty")
        if keyword == "PatientID" and not value:
            raise InvalidCorrection(CorrectionRefusal.BAD_VALUE, keyword, "may not be empty")
        if vr != "PN" and vr != "LO" and not value.isascii():
            raise InvalidCorrection(CorrectionRefusal.BAD_VALUE, keyword, "must be ASCII")
        checked[keyword] = value
    return checked


@dataclass(frozen=True)
class Correction:
    """One study's overlay: keyword -> (value, version of the change that set it)."""

    study_instance_uid: str
    fields: Mapping[str, tuple[str, Version]] = field(default_factory=dict)

    @classmethod
    def of(cls, study_instance_uid: str, changes: Mapping[str, str], version: Version) -> "Correction":
        return cls(study_instance_uid, {k: (v, version) for k, v in changes.items()})

    @property
    def version(self) -> Version:
        """The newest change in it (what a node's clock observes)."""
        return max((v for _value, v in self.fields.values()), default=Version())

    def values(self) -> dict[str, str]:
        return {keyword: value for keyword, (value, _version) in self.fields.items()}

    def merge(self, other: "Correction") -> "Correction":
        """Keyword by keyword, the newer version wins."""
        merged = dict(self.fields)
        for keyword, (value, version) in other.fields.items():
            if keyword not in merged or merged[keyword][1] < version:
                merged[keyword] = (value, version)
        return Correction(self.study_instance_uid, merged)

    def covers(self, other: "Correction") -> bool:
        """Whether merging `other` into this changes nothing."""
        return self.merge(other).fields == dict(self.fields)

    def to_json(self) -> dict[str, object]:
        return {"study": self.study_instance_uid,
                "fields": {k: [value, version.mark()] for k, (value, version) in sorted(self.fields.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> "Correction":
        raw = data.get("fields")
        fields: dict[str, tuple[str, Version]] = {}
        if isinstance(raw, dict):
            for keyword, pair in raw.items():
                if keyword in CORRECTABLE and isinstance(pair, list) and len(pair) == 2:
                    fields[str(keyword)] = (str(pair[0]), Version.from_mark(str(pair[1])))
        return cls(str(data["study"]), fields)

    def dumps(self) -> str:
        """Canonical JSON (sorted keys, compact): equal corrections give equal text."""
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    @classmethod
    def loads(cls, text: str | bytes) -> "Correction":
        return cls.from_json(json.loads(text))

    def entry_content(self) -> str:
        """The third field of its listing entry (and what its digest entry hashes)."""
        return ENTRY_PREFIX + self.dumps()


def is_correction_entry(content: str) -> bool:
    return content.startswith(ENTRY_PREFIX)


def correction_of_entry(content: str) -> Correction:
    return Correction.loads(content[len(ENTRY_PREFIX):])


def newest_correction(rows: Iterable[Attributes]) -> Correction | None:
    """The merge of the corrections the rows carry (`_correction`, replication/query.py)."""
    merged: Correction | None = None
    seen: set[str] = set()
    for row in rows:
        text = row.get("_correction")
        if not isinstance(text, str) or not text or text in seen:
            continue
        seen.add(text)
        try:
            correction = Correction.loads(text)
        except (ValueError, KeyError):
            continue
        merged = correction if merged is None else merged.merge(correction)
    return merged


def with_correction(row: Attributes, correction: Correction) -> Attributes:
    """A row of the corrected study with the correction's values and mark."""
    if str(row.get("StudyInstanceUID", "")) != correction.study_instance_uid:
        return row
    if row.get("_correction") == correction.dumps():
        return row
    result = apply(row, correction)
    result["_correction"] = correction.dumps()
    return result


def apply(attributes: Attributes, correction: Correction | None) -> Attributes:
    """A copy of `attributes` with the correction's values put over them."""
    result: Attributes = dict(attributes)
    if correction is not None:
        result.update(correction.values())
    return result
