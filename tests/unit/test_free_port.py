"""free_port: the ports tests and benchmarks give their servers."""

from __future__ import annotations

import socket

from pacsnode.sim import process


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [process.free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    # An outgoing connection's source port comes from the ephemeral range; a port drawn
    # from it can be taken between free_port() and the server's bind.
    low = process._ephemeral_low()
    for _ in range(50):
        port = process.free_port()
        assert process._LOWEST_PORT <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out() -> None:
    holders = []
    try:
        for _ in range(20):
            port = process.free_port()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", port))
            sock.listen()
            holders.append((port, sock))
        held = {port for port, _ in holders}
        assert not held & {process.free_port() for _ in range(200)}
    finally:
        for _, sock in holders:
            sock.close()


def test_each_xdist_worker_draws_from_its_own_slice(monkeypatch) -> None:
    # `make test` runs two pytest-xdist workers: a port drawn by one (its node not yet
    # listening) must never be drawn by the other.
    low, high = process._LOWEST_PORT, process._ephemeral_low()
    middle = low + (high - low) // 2
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    first = {process.free_port() for _ in range(100)}
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    second = {process.free_port() for _ in range(100)}
    assert all(low <= port < middle for port in first), sorted(first)[-3:]
    assert all(middle <= port < high for port in second), sorted(second)[:3]
