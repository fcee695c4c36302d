"""docs/conformance-statement.md's tables are what the code supports (no drift)."""

from __future__ import annotations

from pacsnode.node import conformance


def test_conformance_statement_tables_match_the_code() -> None:
    text = conformance.DOCUMENT.read_text()
    assert conformance.render(text) == text, "run: python -m pacsnode.node.conformance --write"


def test_every_generated_block_is_in_the_document() -> None:
    text = conformance.DOCUMENT.read_text()
    for name in conformance.GENERATORS:
        assert f"<!-- generated:{name} -->" in text and f"<!-- end:{name} -->" in text


def test_tables_name_the_services_and_syntaxes() -> None:
    sop = conformance.sop_class_table()
    assert "`1.2.840.10008.1.1` | no | yes | C-ECHO" in sop
    assert "Study Root Query/Retrieve Information Model - FIND" in sop
    assert "CT Image Storage | `1.2.840.10008.5.1.4.1.1.2` | yes" in sop
    syntaxes = conformance.transfer_syntax_table()
    assert "| Explicit VR Little Endian | `1.2.840.10008.1.2.1` | yes | yes | yes |" in syntaxes
    assert "JPEG 2000 Image Compression (Lossless Only) | `1.2.840.10008.1.2.4.90` | no | no | yes |" in syntaxes


def test_readme_links_point_at_files_in_the_repository() -> None:
    import re

    root = conformance.DOCUMENT.parents[1]
    readme = (root / "README.md").read_text()
    assert "../shared/" not in readme
    for target in re.findall(r"\]\((?!https?:)([^)#]+)\)", readme):
        assert (root / target).exists(), f"README links to {target}, which is not in the repository"
