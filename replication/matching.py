"""C-FIND attribute matching (PS3.4 C.2.2.2), as pure functions over plain data.

A `Query` is what a C-FIND identifier asks: a level, matching conditions and return
keys. It is plain data (JSON-serialisable) so that it can cross to peers unchanged.
Records are `Attributes` maps (keyword -> str | list[str]) with decoded strings.

Matching rules implemented:
- universal matching: a key sent empty matches everything and is only returned;
- single value matching: exact (PN case-insensitive, as most archives and Orthanc's
  default do; every other VR case-sensitive);
- wildcard matching: `*` (any run) and `?` (one character) for every VR except
  DA/TM/DT/UI and binary VRs;
- range matching for DA, TM and DT: `low-high`, `low-`, `-high`;
- list of UID matching: `uid1\\uid2\\...`;
- a multi-valued record value matches when any of its values matches;
- a record without the attribute (or empty) never matches a non-universal condition
  (a pattern of only `*` is universal: it matches a zero length value too);
- DT values may carry a UTC offset (`&ZZXX`): it is ignored when comparing, and a
  single value with a negative offset is not mistaken for a range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Mapping

from pacsnode.replication.model import AttributeValue

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
RANGE_VRS = frozenset({"DA", "TM", "DT"})
NO_WILDCARD_VRS = frozenset({"DA", "TM", "DT", "UI", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})


class QueryError(ValueError):
    """The identifier cannot be used for a query (the front end answers 0xA900/0xC000)."""


# One DT value: YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]] with an optional UTC offset &ZZXX.
_DT_VALUE = re.compile(r"\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?(?:[+-](?:0\d|1[0-4])[0-5]\d)?")
_DT_OFFSET = re.compile(r"[+-]\d{4}\Z")


@dataclass(frozen=True)
class Condition:
    """One matching key with a non-empty value."""

    keyword: str
    vr: str
    value: str  # As sent, multi-values joined with a backslash.

    @property
    def kind(self) -> str:
        if self.vr == "UI":
            return "uid-list" if "\\" in self.value else "single"
        if self.vr in RANGE_VRS and "-" in self.value:
            if self.vr == "DT" and _DT_VALUE.fullmatch(self.value.strip()):
                return "single"  # One date-time with a negative UTC offset, not a range.
            return "range"
        if self.vr not in NO_WILDCARD_VRS and ("*" in self.value or "?" in self.value):
            return "wildcard"
        return "single"


@dataclass(frozen=True)
class Query:
    level: str  # PATIENT, STUDY, SERIES or IMAGE
    conditions: tuple[Condition, ...] = ()
    return_keys: tuple[str, ...] = ()  # Keywords, in request order.
    model: str = "STUDY"  # Information model root: PATIENT or STUDY.

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise QueryError(f"unknown QueryRetrieveLevel {self.level!r}")

    def condition(self, keyword: str) -> Condition | None:
        for condition in self.conditions:
            if condition.keyword == keyword:
                return condition
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "level": self.level,
            "model": self.model,
            "conditions": [[c.keyword, c.vr, c.value] for c in self.conditions],
            "return_keys": list(self.return_keys),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> "Query":
        raw_conditions = data["conditions"]
        raw_keys = data["return_keys"]
        if not isinstance(raw_conditions, list) or not isinstance(raw_keys, list):
            raise QueryError("a query's conditions and return keys are lists")
        conditions = tuple(Condition(str(k), str(v), str(x)) for k, v, x in raw_conditions)
        return cls(
            level=str(data["level"]),
            model=str(data.get("model", "STUDY")),
            conditions=conditions,
            return_keys=tuple(str(k) for k in raw_keys),
        )


@dataclass
class MatchPlan:
    """Conditions split by the record level they apply to."""

    by_level: dict[str, list[Condition]] = field(default_factory=dict)


def _values(value: AttributeValue | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [value]


@lru_cache(maxsize=1024)
def _wildcard_regex(pattern: str, fold_case: bool) -> re.Pattern[str]:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts) + r"\Z", re.DOTALL | (re.IGNORECASE if fold_case else 0))


def normalize_time(value: str, *, upper: bool) -> str:
    """TM to HHMMSS.FFFFFF; a partial time is padded low (00...) or, as a range's upper end, high."""
    text = value.strip().replace(":", "")
    main, _, fraction = text.partition(".")
    if upper:
        main = main + "235959"[len(main) :]
        fraction = fraction.ljust(6, "9")[:6]
    else:
        main = main.ljust(6, "0")
        fraction = fraction.ljust(6, "0")[:6]
    return f"{main[:6]}.{fraction}"


def _normalize_for_range(vr: str, value: str, *, upper: bool) -> str:
    value = value.strip()
    if vr == "DA":
        return value.replace(".", "")  # Old ACR-NEMA "YYYY.MM.DD" form.
    if vr == "TM":
        return normalize_time(value, upper=upper)
    # DT: compare as text padded to YYYYMMDDHHMMSS.FFFFFF (time zones ignored).
    value = _DT_OFFSET.sub("", value)
    date, time = value[:8], value[8:]
    if upper:
        date = date + "99991231"[len(date) :]
        time = normalize_time(time, upper=True) if time else "235959.999999"
    else:
        date = date.ljust(8, "0")
        time = normalize_time(time, upper=False) if time else "000000.000000"
    return date + time


def _range_ends(vr: str, value: str) -> tuple[str, str]:
    """Split `low-high`; for DT, at the hyphen that is not part of a UTC offset."""
    if vr == "DT":
        for index, char in enumerate(value):
            if char == "-":
                low, high = value[:index].strip(), value[index + 1 :].strip()
                if all(not part or _DT_VALUE.fullmatch(part) for part in (low, high)):
                    return low, high
    low, _, high = value.partition("-")
    return low, high


def match_value(condition: Condition, record_value: AttributeValue | None) -> bool:
    """Does one record attribute satisfy one condition?"""
    values = [v for v in _values(record_value) if v != ""]
    if not values:
        # C.2.2.2.4: "*" matches any run of characters, a zero length value included.
        return condition.vr not in NO_WILDCARD_VRS and any(
            alternative.strip() != "" and alternative.strip().strip("*") == ""
            for alternative in condition.value.split("\\")
        )
    kind = condition.kind
    query_value = condition.value
    if kind == "uid-list":
        wanted = {v.strip() for v in query_value.split("\\")}
        return any(v.strip() in wanted for v in values)
    if kind == "range":
        low_text, high_text = _range_ends(condition.vr, query_value)
        low = _normalize_for_range(condition.vr, low_text, upper=False) if low_text.strip() else None
        high = _normalize_for_range(condition.vr, high_text, upper=True) if high_text.strip() else None
        for value in values:
            normalized_low = _normalize_for_range(condition.vr, value, upper=False)
            if (low is None or normalized_low >= low) and (high is None or normalized_low <= high):
                return True
        return False
    fold = condition.vr == "PN"
    alternatives = query_value.split("\\") if "\\" in query_value else [query_value]
    for alternative in alternatives:
        alternative_kind = Condition(condition.keyword, condition.vr, alternative).kind
        if alternative_kind == "wildcard":
            regex = _wildcard_regex(alternative, fold)
            if any(regex.match(v) for v in values):
                return True
        elif condition.vr in RANGE_VRS:
            if any(
                _normalize_for_range(condition.vr, v, upper=False)
                == _normalize_for_range(condition.vr, alternative, upper=False)
                for v in values
            ):
                return True
        elif condition.vr in NUMERIC_VRS:
            if any(_numeric_equal(v, alternative) for v in values):
                return True
        elif fold:
            if any(v.strip().upper() == alternative.strip().upper() for v in values):
                return True
        elif any(v.strip() == alternative.strip() for v in values):
            return True
    return False


def _numeric_equal(left: str, right: str) -> bool:
    try:
        return float(left) == float(right)
    except ValueError:
        return left.strip() == right.strip()


def match_all(conditions: Iterable[Condition], attributes: Mapping[str, AttributeValue]) -> bool:
    """Every condition matches the record (an empty condition list matches everything)."""
    return all(match_value(c, attributes.get(c.keyword)) for c in conditions)
