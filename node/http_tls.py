"""HTTPS connections that tell the app who the client is: the ASGI TLS extension.

uvicorn terminates TLS (its `ssl_context_factory` option takes our context) but puts
nothing about the client's certificate in the request scope. `TlsH11Protocol` subclasses
uvicorn's h11 protocol (pinned in pyproject.toml: uvicorn 0.30 to 0.x): once a connection
is made it reads the peer certificate the handshake verified and hands every request on
that connection a scope with `extensions["tls"]`, as the ASGI TLS extension spells it
(`client_cert_chain`: PEM strings, `tls_version`). Plain-HTTP connections pass untouched.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

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


def client_certificate_pem(scope: Scope) -> bytes | None:
    """The client's certificate (PEM) on an HTTPS request, or None."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return chain[0].encode("ascii") if chain else None
