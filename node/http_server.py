"""The node's HTTP front end: DICOMweb under /dicom-web, the web page, /metrics, /healthz
and /readyz, served by uvicorn on a thread of its own.

Starlette + uvicorn: a small, well-kept ASGI stack (Starlette's routing, streaming
responses and CORS middleware; uvicorn's HTTP/1.1 server), no framework on top. uvicorn
runs with httptools' parser on a uvloop loop, as its own "auto" choice would when both
are installed (both are dependencies; asyncio's loop where uvloop does not build). The HTTP
loop parses and writes bytes (and decompresses a WADO-RS retrieve's own blob files that
are in the page cache: node/dicomweb.py); archive calls run on Starlette's thread pool, as the
DIMSE handlers run on pynetdicom's threads, and reach the node's loop the same way.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import uvicorn
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacsnode.node.audit import AuditLog
from pacsnode.node.dicomweb import DicomWeb, LocalHeaders, LocalReads
from pacsnode.node.http_guard import HttpAccess, HttpAudit, HttpGuard
from pacsnode.node.http_tls import HTTP_PROTOCOLS, TlsServer
from pacsnode.node.metrics import CONTENT_TYPE, Metrics
from pacsnode.node.dicomweb_stow_budget import StowBudgetStats

uvloop_new_event_loop: Callable[[], asyncio.AbstractEventLoop] | None
try:  # A dependency where it builds (pyproject.toml: not on Windows); asyncio's own loop without it.
    from uvloop import new_event_loop as uvloop_new_event_loop
except ImportError:  # pragma: no cover - platforms without uvloop
    uvloop_new_event_loop = None

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_VIEWER_DIR = Path(__file__).resolve().parent / "ohif"  # Laid out by `make viewer` (not in git).
# Headers a browser client may read (CORS): DICOMweb's warnings, multipart types, paging.
EXPOSED_HEADERS = ["Warning", "Content-Type", "Content-Length", "Content-Location", "Location"]
# Methods a page of another origin may use (CORS preflight): what viewers need (QIDO, WADO,
# STOW). DELETE is routed (a study, series or instance: DicomWeb.delete) and left out on
# purpose: with `Access-Control-Allow-Origin: *`, any web page a user opens could list the
# studies (GET) and delete them on a node that trusts its loopback callers
# (`loopback_trusted`) or, without TLS, anyone. Deletes are for non-browser clients (curl,
# scripts, `pacsnode` tools), which CORS does not restrict, and same-origin pages.
CORS_METHODS = ("GET", "POST", "OPTIONS")
NOT_CROSS_ORIGIN_METHODS = frozenset({"DELETE"})  # Routed, refused to other origins' preflights.

_ID_AFTER = re.compile(r"/(studies|series|instances|frames|bulkdata)/[^/]+")


def route_label(path: str) -> str:
    """A request path with its UIDs replaced, as a bounded metrics label."""
    if path.startswith("/dicom-web/"):
        head, bulk, _rest = path.partition("/bulk/")
        return _ID_AFTER.sub(lambda m: f"/{m.group(1)}/{{{m.group(1)}}}", head) + ("/bulk/{path}" if bulk else "")
    if path in ("/metrics", "/healthz", "/readyz", "/api/cluster", "/"):
        return path
    if path.startswith("/ui/"):
        return "/ui/"
    return "other"


class _Timing:
    """ASGI middleware: counts every answer and times it to its last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_counted)
        finally:
            self._metrics.observe_http(route_label(scope["path"]), scope["method"], status, time.monotonic() - started)


def http_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The HTTP thread's event loop: "uvloop" (libuv, its transports in C: a body write
    goes to the socket without asyncio's Python transport, and what the socket did not take
    waits as a reference, not a copy), "asyncio", or "auto" (uvloop when installed).
    WADO-RS of 80 CT (42 MB), alternating: see bench/README.md, DICOMweb."""
    if name not in ("uvloop", "asyncio", "auto"):
        raise ValueError(f"no event loop {name!r}: uvloop, asyncio or auto")
    if name == "asyncio" or (name == "auto" and uvloop_new_event_loop is None):
        return asyncio.new_event_loop
    if uvloop_new_event_loop is None:
        raise ValueError("uvloop is not installed")
    return uvloop_new_event_loop


async def warm_up() -> None:
    """One-time costs paid before the first request instead of by it: Starlette's
    run_in_threadpool goes through anyio, which imports its asyncio back end on its first
    call (measured with py-spy: ~30 ms of CPU, most of a fresh node's first series
    /metadata) and starts its first worker thread."""
    await run_in_threadpool(lambda: None)


class StowCollector:
    """/metrics figures of the STOW-RS memory budget (stow_bytes_max), read at scrape time."""

    def __init__(self, statistics: Callable[[], StowBudgetStats]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        yield GaugeMetricFamily("pacsnode_stow_held_bytes", "STOW-RS request bytes held in memory now (parts "
                                "arriving and parts being stored), of stow_bytes_max.", value=stats.used_bytes)
        yield GaugeMetricFamily("pacsnode_stow_limit_bytes", "stow_bytes_max.", value=stats.limit_bytes)
        yield GaugeMetricFamily("pacsnode_stow_waiting_requests", "STOW-RS requests waiting for memory now "
                                "(reading no more of their bodies).", value=stats.waiting_requests)
        yield CounterMetricFamily("pacsnode_stow_budget_waits", "Times a STOW-RS request had to wait for memory.",
                                  value=stats.waits)
        yield CounterMetricFamily("pacsnode_stow_budget_timeouts", "STOW-RS requests that waited longer than "
                                  "store_timeout_ms for memory (answered 503, or 202 with what they stored).",
                                  value=stats.timeouts)


class HttpServer:
    """uvicorn serving the node's Starlette app on `http_host:http_port`: HTTPS with
    `ssl_context` (node/tls.py), every request decided by `access` (node/http_guard.py),
    DICOMweb requests written to `audit`."""

    def __init__(self, *, host: str, port: int, archive: Any, metrics: Metrics,
                 ready: Callable[[], dict[str, Any]], cluster: Callable[[], dict[str, Any]] | None = None,
                 instance_size_bytes_max: int, qido_result_max: int, ssl_context: ssl.SSLContext | None = None,
                 access: HttpAccess | None = None, audit: AuditLog | None = None,
                 viewer_dir: Path | None = None, local_headers: LocalHeaders | None = None,
                 owns: Callable[[str], bool] | None = None, local_reads: LocalReads | None = None,
                 http_parser: str = "auto",
                 http_loop: str = "auto", stow_bytes_max: int = 2 * 1024**3, stow_wait_s: float = 30.0) -> None:
        """`http_parser` ("auto", "httptools" or "h11") and `http_loop` ("auto", "uvloop"
        or "asyncio") choose uvicorn's protocol and the HTTP thread's loop (node/http_tls.py,
        `http_loop_factory`); "auto" is httptools on uvloop, the fastest measured, each
        when installed."""
        if http_parser == "auto":
            http_parser = "httptools" if "httptools" in HTTP_PROTOCOLS else "h11"
        if http_parser not in HTTP_PROTOCOLS:
            raise ValueError(f"no HTTP parser {http_parser!r} here: auto, {', '.join(HTTP_PROTOCOLS)}")
        self._http_protocol = HTTP_PROTOCOLS[http_parser]
        self._loop_factory = http_loop_factory(http_loop)
        self._host = host
        self._viewer_dir = (viewer_dir or DEFAULT_VIEWER_DIR).resolve()
        self._port = port
        self._metrics = metrics
        self.metrics = metrics
        self._ready = ready
        self._cluster = cluster
        self._ssl_context = ssl_context
        self._access = access or HttpAccess(tls=ssl_context is not None)
        self.audit = HttpAudit(audit or AuditLog(None, "pacsnode"))
        self.dicomweb = DicomWeb(archive, instance_size_bytes_max=instance_size_bytes_max,
                                 qido_result_max=qido_result_max, audit=self.audit, local_headers=local_headers,
                                 deletes_need_admin=self._access.tls, owns=owns, local_reads=local_reads,
                                 stow_bytes_max=stow_bytes_max, stow_wait_s=stow_wait_s)
        metrics.registry.register(StowCollector(self.dicomweb.stow_statistics))
        self.app = self._build_app()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def _build_app(self) -> Starlette:
        routes = [
            Route("/", lambda request: RedirectResponse("/ui/"), methods=["GET"]),
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            Route("/metrics", self._metrics_page, methods=["GET"]),
            Route("/api/cluster", self._cluster_page, methods=["GET"]),
            Mount("/dicom-web", routes=self.dicomweb.routes()),
        ]
        routes.append(Route("/viewer", lambda request: RedirectResponse("/viewer/"), methods=["GET", "HEAD"]))
        routes.append(Route("/viewer/{path:path}", self._viewer, methods=["GET", "HEAD"]))
        if WEB_DIR.is_dir():
            routes.append(Mount("/ui", app=StaticFiles(directory=WEB_DIR, html=True), name="ui"))
        middleware = [
            Middleware(_Timing, metrics=self._metrics),
            Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=list(CORS_METHODS),
                       allow_headers=["*"], expose_headers=EXPOSED_HEADERS, max_age=600),
            Middleware(HttpGuard, access=self._access, audit=self.audit),  # Refusals are counted and CORS-readable.
        ]
        return Starlette(routes=routes, middleware=middleware)

    # ------------------------------------------------------------------ endpoints
    async def _healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def _readyz(self, request: Request) -> Response:
        state = await run_in_threadpool(self._ready)
        return JSONResponse(state, status_code=200 if state.get("ready") else 503)

    async def _metrics_page(self, request: Request) -> Response:
        body = await run_in_threadpool(self._metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    async def _viewer(self, request: Request) -> Response:
        """OHIF's files, and its index.html for every route of the single-page app."""
        root = self._viewer_dir
        if not (root / "index.html").is_file():
            return PlainTextResponse("no viewer here: run `make viewer` and restart the node", status_code=404)
        wanted = (root / request.path_params["path"]).resolve()
        if wanted.is_relative_to(root) and wanted.is_file():
            return FileResponse(wanted)
        return FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})

    async def _cluster_page(self, request: Request) -> Response:
        if self._cluster is None:
            return PlainTextResponse("no cluster view", status_code=404)
        try:
            data = await run_in_threadpool(self._cluster)
        except Exception as error:
            log.error("http.cluster.failed error=%r", error)
            return PlainTextResponse("the cluster view failed; see the node log", status_code=503)
        return JSONResponse(data)

    # ------------------------------------------------------------------ lifecycle
    def set_ssl_context(self, context: ssl.SSLContext) -> None:
        """A reloaded certificate: new HTTPS connections use `context` (open ones keep theirs)."""
        if self._ssl_context is None:
            raise ValueError("this HTTP port serves plain HTTP: no TLS context to replace")
        self._ssl_context = context

    @property
    def tls_refused_count(self) -> int:
        return self._server.refused if isinstance(self._server, TlsServer) else 0

    @property
    def scheme(self) -> str:
        return "https" if self._ssl_context is not None else "http"

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1]) if self._socket is not None else self._port

    def start(self) -> None:
        """Bind now (a taken port fails the start, as the DICOM port does) and serve on a thread."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets whose proto
        # says TCP, and an accepted socket takes the listener's. Without it every response
        # on a kept-alive connection (headers, then body) waited ~40 ms for the client's
        # delayed ACK. Linux also passes the listener's TCP_NODELAY on to accepted sockets.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        self._socket = sock
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, server_header=False, http=self._http_protocol)
        # HTTPS: our accept loop (node/http_tls.py) with the context current at each accept.
        self._server = (uvicorn.Server(config) if self._ssl_context is None else
                        TlsServer(config, sock, lambda: self._ssl_context, self.audit.tls_refused))  # type: ignore[arg-type,return-value]
        server = self._server

        async def serve() -> None:
            await warm_up()
            await server.serve(sockets=[sock] if self._ssl_context is None else None)

        def run() -> None:
            with asyncio.Runner(loop_factory=self._loop_factory) as runner:
                runner.run(serve())

        self._thread = threading.Thread(target=run, name="pacsnode-http", daemon=True)
        self._thread.start()
        log.info("http.started host=%s port=%d scheme=%s", self._host, self.port, self.scheme)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self.dicomweb.close()
