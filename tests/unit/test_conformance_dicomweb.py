"""docs/conformance-statement.md's DICOMweb resource table (section 9.1) is what the node
routes: every resource and method of DicomWeb.routes() listed, nothing listed that is not."""

from __future__ import annotations

import re

from pacsnode.node import conformance
from pacsnode.node.dicomweb import DicomWeb


def _documented() -> set[tuple[str, str]]:
    text = conformance.DOCUMENT.read_text()
    section = text[text.index("### 9.1 Resources"):text.index("### 9.2")]
    pairs = set()
    for match in re.finditer(r"^\| `([^`]+)` \| ([A-Z, ]+) \|", section, re.MULTILINE):
        for method in match.group(2).split(","):
            pairs.add((match.group(1), method.strip()))
    return pairs


def test_the_dicomweb_table_lists_every_route_and_method() -> None:
    web = DicomWeb(archive=None, instance_size_bytes_max=1, qido_result_max=1)
    try:
        routed = {(re.sub(r"\{(\w+)(:path)?\}", r"{\1}", route.path), method)
                  for route in web.routes() for method in (route.methods or ()) if method != "HEAD"}
    finally:
        web.close()
    assert routed and _documented() == routed
