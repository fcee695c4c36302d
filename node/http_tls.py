"""HTTPS connections that tell the app who the client is: the ASGI TLS extension.

uvicorn terminates TLS (its `ssl_context_factory` option takes our context) but puts
nothing about the client's certificate in the request scope. `TlsHttpToolsProtocol` and
`TlsH11Protocol` subclass uvicorn's two HTTP/1.1 protocols (pinned in pyproject.toml:
uvicorn 0.30 to 0.x): once a connection is made each reads the peer certificate the
handshake verified and hands every request on that connection a scope with
`extensions["tls"]`, as the ASGI TLS extension spells it (`client_cert_chain`: PEM
strings, `tls_version`). Plain-HTTP connections pass untouched. The node serves with the
httptools one (a C parser and a shorter path per body write than h11's pure Python) when
httptools is installed; h11 stays selectable (HttpServer's `http_parser`).

`TlsServer` subclasses uvicorn's server to accept HTTPS connections itself: uvicorn hands
the listening socket to asyncio's `create_server`, which drops a failed TLS handshake
without a word (and builds every connection with the one context it was given). Here each
accepted connection gets the context current at that moment (a reloaded certificate serves
the next connection, node/cert_reload.py), its handshake a timeout, and a failed handshake
one log line (`http.tls.refused`, the peer address and a reason class, node/tls.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Callable

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pacsnode.node.tls import handshake_failure

log = logging.getLogger(__name__)

# ASGI TLS extension version numbers (the TLS record version).
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class _WithTls:
    """The app, with this connection's TLS facts added to each request's scope."""

    def __init__(self, app: ASGIApp, tls: dict[str, Any]) -> None:
        self._app = app
        self._tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions["tls"] = self._tls
        await self._app({**scope, "extensions": extensions}, receive, send)


def tls_facts(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension's fields we know: the verified client certificate, the version."""
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    return {"client_cert_chain": chain, "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
            "server_cert": None, "client_cert_name": None, "client_cert_error": None, "cipher_suite": None}


class TlsH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTls(self.app, tls_facts(ssl_object))


# The protocols by parser name. httptools is a dependency; a venv installed before it was
# (pyproject.toml changed, `make install` not run yet) serves with h11 rather than failing.
HTTP_PROTOCOLS: dict[str, type[asyncio.Protocol]] = {"h11": TlsH11Protocol}
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # Imports httptools.
except ImportError:  # pragma: no cover - httptools not installed
    pass
else:
    class TlsHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.app = _WithTls(self.app, tls_facts(ssl_object))

    HTTP_PROTOCOLS["httptools"] = TlsHttpToolsProtocol


def client_certificate_pem(scope: Scope) -> bytes | None:
    """The client's certificate (PEM) on an HTTPS request, or None."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return chain[0].encode("ascii") if chain else None


class TlsServer(uvicorn.Server):
    """uvicorn's server with an accept loop of ours for HTTPS (see the module's text).

    uvicorn's own startup runs with no socket (lifespan and state only); the accept loop
    then makes each connection with `loop.connect_accepted_socket` and uvicorn's protocol
    class, so a connection is served exactly as uvicorn's listener would serve it."""

    handshake_timeout_s = 10.0

    def __init__(self, config: uvicorn.Config, listener: socket.socket, context: Callable[[], ssl.SSLContext],
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        super().__init__(config)
        self._listener = listener
        self._context = context
        self._on_refused = on_refused
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self.refused = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        self._accepting = asyncio.create_task(self._accept_forever())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for task in [self._accepting, *self._handshakes]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._accepting, *self._handshakes] if t is not None],
                             return_exceptions=True)
        await super().shutdown(sockets=None)

    def _protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state)

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, address = await loop.sock_accept(self._listener)
            except OSError as error:  # Out of descriptors, a connection reset while queued: go on.
                log.warning("http.accept_failed error=%s", type(error).__name__)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handshake(connection, address))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, connection: socket.socket, address: Any) -> None:
        loop = asyncio.get_running_loop()
        host = str(address[0]) if isinstance(address, tuple) and address else str(address)
        try:
            await loop.connect_accepted_socket(self._protocol, connection, ssl=self._context(),
                                               ssl_handshake_timeout=self.handshake_timeout_s)
        except (OSError, ValueError, EOFError) as error:  # ssl.SSLError, timeouts and resets are OSErrors.
            connection.close()
            self.refused += 1
            reason, detail = handshake_failure(error)
            log.warning("http.tls.refused address=%s reason=%s detail=%s", host, reason, detail)
            if self._on_refused is not None:
                self._on_refused(host, reason)
