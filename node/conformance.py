"""The tables of docs/conformance-statement.md, generated from the DICOM front end's own
configuration (the presentation contexts its AE supports), so that the statement cannot
drift from the code: tests/unit/test_conformance.py fails when the document differs.

Regenerate the document's tables with `python -m pacsnode.node.conformance --write`.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from pathlib import Path

from pydicom.uid import UID

from pacsnode.node.config import NodeConfig

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance-statement.md"
_BLOCK = re.compile(r"(<!-- generated:(?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- end:(?P=name) -->)", re.DOTALL)


def _supported_contexts() -> list[object]:
    from pacsnode.node.dicom import DicomFrontEnd

    # _build_ae reads only the config: the exact AE a node starts with.
    stub = types.SimpleNamespace(_config=NodeConfig(node_id="conformance"))
    return list(DicomFrontEnd._build_ae(stub).supported_contexts)  # type: ignore[arg-type]


def _name(uid: str) -> str:
    return UID(uid).name if UID(uid).is_valid else uid


def sop_class_table() -> str:
    from pacsnode.node.commitment import SOP_CLASS_UID as COMMITMENT
    from pacsnode.node.dicom import FIND_MODELS, GET_MODELS, MOVE_MODELS

    rows = ["| SOP class | UID | SCU | SCP | DIMSE |", "| --- | --- | --- | --- | --- |"]
    storage = []
    for context in _supported_contexts():
        uid = str(context.abstract_syntax)  # type: ignore[attr-defined]
        if uid == "1.2.840.10008.1.1":
            rows.append(f"| {_name(uid)} | `{uid}` | no | yes | C-ECHO |")
        elif uid in FIND_MODELS:
            rows.append(f"| {_name(uid)} | `{uid}` | no | yes | C-FIND |")
        elif uid in GET_MODELS:
            rows.append(f"| {_name(uid)} | `{uid}` | no | yes | C-GET (C-STORE sub-operations on the same association) |")
        elif uid in MOVE_MODELS:
            rows.append(f"| {_name(uid)} | `{uid}` | no | yes | C-MOVE (C-STORE sub-operations on a new association) |")
        elif uid == COMMITMENT:
            rows.append(f"| {_name(uid)} | `{uid}` | no | yes | N-ACTION; N-EVENT-REPORT sent on the same or a new "
                        "association (3.8) |")
        else:
            storage.append(uid)
    for uid in sorted(storage, key=_name):
        rows.append(f"| {_name(uid)} | `{uid}` | yes (C-GET/C-MOVE sub-operations) | yes | C-STORE |")
    return "\n".join(rows) + "\n"


def transfer_syntax_table() -> str:
    """One row per transfer syntax, in the acceptor's order of preference for storage."""
    from pacsnode.node.commitment import SOP_CLASS_UID as COMMITMENT
    from pacsnode.node.dicom import FIND_MODELS, GET_MODELS, MOVE_MODELS

    kinds = ("Verification", "Query/Retrieve", "Storage", "Storage Commitment")
    by_kind: dict[str, list[str]] = {}
    for context in _supported_contexts():
        uid = str(context.abstract_syntax)  # type: ignore[attr-defined]
        syntaxes = [str(s) for s in context.transfer_syntax]  # type: ignore[attr-defined]
        kind = "Verification" if uid == "1.2.840.10008.1.1" else "Storage Commitment" if uid == COMMITMENT else (
            "Query/Retrieve" if uid in {**FIND_MODELS, **GET_MODELS, **MOVE_MODELS} else "Storage")
        previous = by_kind.setdefault(kind, syntaxes)
        if previous != syntaxes:
            raise ValueError(f"{kind} contexts differ in transfer syntaxes ({uid}); the table assumes one list per kind")
    order = list(dict.fromkeys(by_kind.get("Storage", []) + by_kind.get("Query/Retrieve", [])
                               + by_kind.get("Verification", []) + by_kind.get("Storage Commitment", [])))
    rows = ["| Transfer syntax | UID | " + " | ".join(kinds) + " |", "| --- | --- |" + " --- |" * len(kinds)]
    for syntax in order:
        marks = " | ".join("yes" if syntax in by_kind.get(kind, []) else "no" for kind in kinds)
        rows.append(f"| {_name(syntax)} | `{syntax}` | {marks} |")
    return "\n".join(rows) + "\n"


def limits_table() -> str:
    config = NodeConfig(node_id="conformance")
    rows = ["| Setting | Default | Effect |", "| --- | --- | --- |"]
    for name in ("ae_title", "max_pdu_bytes", "max_associations", "acse_timeout_s", "network_timeout_s",
                 "dimse_timeout_s", "move_connect_timeout_s", "require_called_ae_title", "instance_size_bytes_max",
                 "dataset_spool_threshold_bytes", "blob_file_bytes_min", "inflight_instance_bytes_max", "find_result_max",
                 "storage_commitment_timeout_s"):
        field = NodeConfig.__dataclass_fields__[name]
        value = getattr(config, name)
        rows.append(f"| `{name}` | `{value}` | {field.metadata['help']} |")
    return "\n".join(rows) + "\n"


GENERATORS = {
    "sop-classes": sop_class_table,
    "transfer-syntaxes": transfer_syntax_table,
    "limits": limits_table,
}


def render(text: str) -> str:
    """`text` with every generated block replaced by what the code gives today."""

    def replace(match: re.Match[str]) -> str:
        generator = GENERATORS.get(match.group("name"))
        if generator is None:
            raise ValueError(f"unknown generated block {match.group('name')!r}")
        return match.group(1) + generator() + match.group(4)

    return _BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the document's generated tables")
    args = parser.parse_args(argv)
    text = DOCUMENT.read_text()
    rendered = render(text)
    if args.write:
        DOCUMENT.write_text(rendered)
        return 0
    if rendered != text:
        print(f"{DOCUMENT} is out of date: run python -m pacsnode.node.conformance --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
