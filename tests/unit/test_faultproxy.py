"""sim/faultproxy.py on real loopback sockets: pass, block (held, then delivered in order),
delay, reset, and a target that is down."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from typing import Iterator

import pytest

from pacsnode.sim.faultproxy import FaultProxy
from pacsnode.sim.process import free_port


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


@pytest.fixture()
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture()
def proxy() -> Iterator[FaultProxy]:
    with FaultProxy() as p:
        yield p


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts = b""
    while len(parts) < size:
        chunk = sock.recv(size - len(parts))
        if not chunk:
            break
        parts += chunk
    return parts


def test_bytes_pass_both_ways_and_are_counted(proxy: FaultProxy, echo_port: int) -> None:
    port = proxy.add_link("a>b", "127.0.0.1", echo_port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"hello" * 1000)
        assert _recv_exactly(sock, 5000) == b"hello" * 1000
    stats = proxy.stats()["a>b"]
    assert stats.connections == 1 and stats.bytes_forward == 5000 and stats.bytes_backward == 5000


def test_a_blocked_link_holds_bytes_and_delivers_them_in_order_when_healed(proxy: FaultProxy,
                                                                           echo_port: int) -> None:
    port = proxy.add_link("a>b", "127.0.0.1", echo_port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"one")
        assert _recv_exactly(sock, 3) == b"one"
        proxy.block("a>b")
        assert proxy.blocked() == ["a>b"]
        sock.sendall(b"two")
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(10)
        proxy.unblock("a>b")
        sock.settimeout(5)
        assert _recv_exactly(sock, 3) == b"two"
    # A connection opened during the cut hangs until the cut heals, then works.
    proxy.block("a>b")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"late")
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(10)
        proxy.unblock("a>b")
        sock.settimeout(5)
        assert _recv_exactly(sock, 4) == b"late"


def test_delay_and_reset(proxy: FaultProxy, echo_port: int) -> None:
    port = proxy.add_link("a>b", "127.0.0.1", echo_port)
    proxy.delay("a>b", 200)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"x")
        assert _recv_exactly(sock, 1) == b"x"
        assert time.monotonic() - started >= 0.35  # 200 ms each way.
        proxy.delay("a>b", 0)
        proxy.reset("a>b")
        sock.settimeout(5)
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass


def test_a_delayed_link_with_jitter_keeps_order_and_does_not_serialise_chunks(proxy: FaultProxy,
                                                                              echo_port: int) -> None:
    port = proxy.add_link("a>b", "127.0.0.1", echo_port)
    proxy.delay("a>b", 100, jitter_ms=50)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        sock.sendall(b"\x00")
        assert _recv_exactly(sock, 1) == b"\x00"
        assert time.monotonic() - started >= 0.1  # At least (100 - 50) ms each way.
        # 40 separate writes 10 ms apart, each delayed 50-150 ms each way: they arrive in
        # order, and together in about 0.4 s + one round trip; a proxy that made each
        # chunk wait for the one before would take 40 x 100 ms or more.
        started = time.monotonic()
        for index in range(1, 41):
            sock.sendall(bytes([index]))
            time.sleep(0.01)
        assert _recv_exactly(sock, 40) == bytes(range(1, 41))
        assert time.monotonic() - started < 3.0
    with pytest.raises(ValueError):
        proxy.delay("a>b", 10, jitter_ms=20)


def test_a_target_that_is_down_closes_the_client_connection(proxy: FaultProxy) -> None:
    port = proxy.add_link("a>b", "127.0.0.1", free_port())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
    assert proxy.stats()["a>b"].refused == 1


def test_a_base_delay_survives_heal_all(proxy: FaultProxy, echo_port: int) -> None:
    port = proxy.add_link("a>b", "127.0.0.1", echo_port)
    proxy.base_delay("a>b", 150)
    proxy.delay("a>b", 0)  # A fault's change; heal_all puts the link's own latency back.
    proxy.heal_all()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"x")
        assert _recv_exactly(sock, 1) == b"x"
        assert time.monotonic() - started >= 0.25  # 150 ms each way.
