"""The README stays true to the code: every setting is documented with its default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pacsnode.node.config import NodeConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_configuration_reference() -> None:
    text = README.read_text()
    reference = text[text.index("### Configuration reference"):]
    defaults = NodeConfig(node_id="x")
    for field in dataclasses.fields(NodeConfig):
        row = next((line for line in reference.splitlines() if line.startswith(f"| `{field.name}` |")), None)
        assert row is not None, f"README configuration reference lacks {field.name}"
        value = getattr(defaults, field.name)
        if field.name in ("node_id", "destinations", "seeds", "peer_routes", "known_aes", "site_replicas"):
            continue
        shown = row.split("|")[2].strip().strip("`")
        expected = str(value).lower() if isinstance(value, bool) else str(value)
        if isinstance(value, float) and value.is_integer():
            expected = str(int(value))
        assert shown == expected, f"README says {field.name} defaults to {shown}, code says {expected}"


def test_readme_gives_the_two_commands() -> None:
    text = README.read_text()
    assert "make start" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci and "dcmtk" in ci
