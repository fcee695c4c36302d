"""CORS of the node's HTTP server: a page of another origin may use GET and POST (QIDO,
WADO, STOW: what a viewer needs), never DELETE, which is routed (a study, series or
instance) but refused to every cross-origin preflight (node/http_server.py CORS_METHODS:
with `Access-Control-Allow-Origin: *` any web page could otherwise delete studies on a
node that trusts loopback callers). Every routed method is one or the other, and the
conformance statement (9.6) lists the methods the code allows. A real HttpServer on a
free loopback port, driven by httpx.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from starlette.routing import Mount, Route

from pacsnode.node import conformance
from pacsnode.node.http_server import CORS_METHODS, NOT_CROSS_ORIGIN_METHODS, HttpServer
from pacsnode.node.metrics import Metrics
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive

ORIGIN = "http://viewer.example"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HttpServer]:
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    served = HttpServer(host="127.0.0.1", port=0, archive=Archive(store), metrics=Metrics(lambda: {}),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=1_000_000, qido_result_max=10)
    served.start()
    try:
        yield served
    finally:
        served.stop()
        store.close()


def _routed(routes: list[Any], prefix: str = "") -> set[tuple[str, str]]:
    """(path, method) of every route of the app, mounts walked."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Mount) and route.routes:
            found |= _routed(list(route.routes), prefix + route.path)
        elif isinstance(route, Route):
            found |= {(prefix + route.path, method) for method in (route.methods or ())}
    return found


def _preflight(server: HttpServer, path: str, method: str, headers: str = "accept") -> httpx.Response:
    return httpx.options(f"http://127.0.0.1:{server.port}{path}", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers})


def test_every_routed_method_is_allowed_to_other_origins_or_refused_on_purpose(server: HttpServer) -> None:
    routed = _routed(list(server.app.routes))
    methods = {method for _path, method in routed}
    assert methods <= set(CORS_METHODS) | NOT_CROSS_ORIGIN_METHODS | {"HEAD"}  # HEAD needs no preflight.
    deletes = sorted(path for path, method in routed if method == "DELETE")
    assert deletes == ["/dicom-web/studies/{study}", "/dicom-web/studies/{study}/series/{series}",
                       "/dicom-web/studies/{study}/series/{series}/instances/{instance}"]
    for path in deletes:
        concrete = re.sub(r"\{(\w+)\}", "1.2.3", path)
        refused = _preflight(server, concrete, "DELETE")
        assert refused.status_code == 400, path
        assert "DELETE" not in refused.headers.get("access-control-allow-methods", "")
        allowed = _preflight(server, concrete, "GET")
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "*"
    stow = _preflight(server, "/dicom-web/studies", "POST", headers="content-type")
    assert stow.status_code == 200 and "POST" in stow.headers["access-control-allow-methods"]
    # A client that is not a browser is not bound by CORS: its DELETE reaches the route
    # (this single-node test Archive has no delete path: 501, not 405).
    assert httpx.delete(f"http://127.0.0.1:{server.port}/dicom-web/studies/1.2.3",
                        headers={"Origin": ORIGIN}).status_code == 501


def test_the_conformance_statement_lists_the_cors_methods() -> None:
    text = conformance.DOCUMENT.read_text()
    section = text[text.index("### 9.6 CORS"):]
    match = re.search(r"methods ((?:[A-Z]+, )*[A-Z]+), any\s+request header", section)
    assert match is not None
    assert tuple(match.group(1).split(", ")) == CORS_METHODS
    assert all(method in section for method in NOT_CROSS_ORIGIN_METHODS)
