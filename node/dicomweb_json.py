"""The DICOM JSON model (PS3.18 Annex F), as pure functions over plain data.

Two sources are converted: index rows (`Attributes`: keyword -> str | list[str], the
decoded strings C-FIND matches on) for QIDO-RS, and pydicom datasets (an instance's
header) for WADO-RS /metadata. The rules applied (PS3.18 F.2):

- an object keyed by the tag as 8 upper-case hex digits, each with its "vr";
- an attribute without a value is `{"vr": ...}` with no "Value";
- IS, DS and the binary numbers (US, SS, UL, SL, UV, SV, FL, FD) are JSON numbers;
- PN values are objects with "Alphabetic", "Ideographic" and "Phonetic" components
  (only those present);
- AT values are 8 hex digits; an empty value inside a multi-valued element is null;
- a value that cannot be read as its VR (a malformed IS, say) is null, never a string
  posing as a number.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from pacsnode.replication.model import AttributeValue

JsonAttributes = dict[str, dict[str, Any]]

INTEGER_VRS = frozenset({"IS", "US", "SS", "UL", "SL", "UV", "SV"})
FLOAT_VRS = frozenset({"DS", "FL", "FD"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PN_COMPONENTS = ("Alphabetic", "Ideographic", "Phonetic")


def tag_key(tag: int) -> str:
    """A tag as PS3.18 F.2.1 names it: 8 upper-case hex digits."""
    return f"{tag:08X}"


def keyword_vr(keyword: str) -> tuple[int, str] | None:
    """The tag and VR of a keyword from the data dictionary; None when unknown.

    Where the dictionary allows several VRs ("US or SS", "OB or OW"), the first is used.
    """
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return tag, vr.split(" or ")[0]


def person_name(value: str) -> dict[str, str] | None:
    """One PN value ("Alphabetic=Ideographic=Phonetic") as its JSON object."""
    groups = value.split("=")
    name = {component: text for component, text in zip(PN_COMPONENTS, groups) if text.strip()}
    return name or None


def number(vr: str, text: str) -> int | float | None:
    """An IS/DS/binary-number value as a JSON number (None when it is not one)."""
    text = text.strip()
    if not text:
        return None
    try:
        if vr in INTEGER_VRS:
            try:
                return int(text)
            except ValueError:
                as_float = float(text)  # "12.0" in an IS written by a careless modality.
                return int(as_float) if as_float.is_integer() else None
        result = float(text)
    except ValueError:
        return None
    if math.isnan(result) or math.isinf(result):
        return None  # JSON has no NaN/Infinity.
    return int(result) if vr == "DS" and result.is_integer() and "e" not in text.lower() and abs(result) < 2**53 else result


def json_value(vr: str, text: str) -> Any:
    """One value of a row attribute in its JSON form (None for an empty value)."""
    if text == "":
        return None
    if vr == "PN":
        return person_name(text)
    if vr in INTEGER_VRS or vr in FLOAT_VRS:
        return number(vr, text)
    if vr == "AT":
        return text.replace(",", "").replace("(", "").replace(")", "").upper()
    return text


def attribute(vr: str, value: AttributeValue | None) -> dict[str, Any]:
    """One attribute: {"vr": VR} when empty, else {"vr": VR, "Value": [...]}."""
    if vr == "SQ" or vr in BINARY_VRS or value is None:
        return {"vr": vr}
    values = value if isinstance(value, list) else ([value] if value != "" else [])
    if vr not in ("LT", "ST", "UT", "UR") and len(values) == 1 and "\\" in values[0]:
        values = values[0].split("\\")  # A multi-valued string kept joined.
    converted = [json_value(vr, v) for v in values]
    if not converted or all(v is None for v in converted):
        return {"vr": vr}
    return {"vr": vr, "Value": converted}


def row_to_json(row: Mapping[str, AttributeValue], keywords: Iterable[str],
                extra: Mapping[str, dict[str, Any]] | None = None) -> JsonAttributes:
    """A query row as a DICOM JSON object with exactly `keywords` (absent ones empty),
    plus `extra` attributes already in JSON form (RetrieveURL, InstanceAvailability);
    sorted by tag, as PS3.18 F.2.1 asks."""
    result: JsonAttributes = {}
    for keyword in keywords:
        known = keyword_vr(keyword)
        if known is None:
            continue
        tag, vr = known
        result[tag_key(tag)] = attribute(vr, row.get(keyword))
    if extra:
        for keyword, value in extra.items():
            known = keyword_vr(keyword)
            if known is not None:
                result[tag_key(known[0])] = value
    return dict(sorted(result.items()))


def dataset_to_json(dataset: Dataset, bulk_data_uri: Callable[[Any], str] | None = None,
                    bulk_data_threshold: int = 1024) -> JsonAttributes:
    """A pydicom dataset (an instance header) in the DICOM JSON model.

    pydicom's own converter applies Annex F; binary values above the threshold become
    BulkDataURIs when `bulk_data_uri` is given, else they are left out (`{"vr": ...}`).
    """

    def handler(element: Any) -> str:
        return bulk_data_uri(element) if bulk_data_uri is not None else ""

    converted: JsonAttributes = dataset.to_json_dict(bulk_data_threshold=bulk_data_threshold,
                                                     bulk_data_element_handler=handler)
    for key, value in list(converted.items()):
        if value.get("BulkDataURI") == "":
            converted[key] = {"vr": value["vr"]}
    return dict(sorted(converted.items()))
