"""What one peer copy costs over grpc.aio, as a unary call vs as a message on an open
bidirectional stream (by hand, not CI).

    .venv/bin/python bench/peer_copy_rpc.py [--messages 1500] [--payload-bytes 132000] [--rounds 2]
                                            [--modes unary,stream,raw] [--tls]

Two processes on loopback (a grpc.aio server, this process as the client), raw bytes (no
protobuf), one message in flight: for each mode in turn, the client's and the server's
CPU per message (/proc, process time) and the round trip's p50. The gap between unary and
stream is gRPC's per-call machinery (call object, metadata, status, the server's per-call
task), which node/store_stream.py's StoreStream avoids for the cluster's copies.

`raw` is the floor a transport without gRPC would start from: the same message and reply
length-prefixed on one asyncio TCP connection (asyncio streams, no HTTP/2, no completion
queue). `--tls`: every mode with mutual TLS from a fresh cluster CA (node/ca.py): gRPC with
node/tls.py's credentials, raw with ssl contexts of the same profile (TLS 1.2+, the CA as
the only trust anchor, the client's certificate required), so the comparison includes
the cost TLS adds to each.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import ssl
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from pacsnode.node import ca, tls


def _same(value: bytes) -> bytes:
    return value


REPLY = b"ok" * 10


def _files(tls_dir: str | None, name: str) -> tls.TlsFiles | None:
    return tls.TlsFiles(Path(tls_dir) / name) if tls_dir else None


def _server_context(files: tls.TlsFiles) -> ssl.SSLContext:
    return tls.dicom_server_context(files, "required")


def _client_context(files: tls.TlsFiles) -> ssl.SSLContext:
    context = tls.dicom_client_context(files)
    context.check_hostname = True  # The server's certificate must name PEER_TLS_NAME, as gRPC's override asks.
    return context


async def _serve_raw(ports: Any, tls_dir: str | None) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = struct.unpack(">I", await reader.readexactly(4))[0]
                await reader.readexactly(size)
                writer.write(struct.pack(">I", len(REPLY)) + REPLY)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    files = _files(tls_dir, "server")
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=_server_context(files) if files else None)
    ports.put((server.sockets[0].getsockname()[1], os.getpid()))
    await server.serve_forever()


async def _serve(ports: Any, tls_dir: str | None = None) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])

    async def unary(request: bytes, context: Any) -> bytes:
        return b"ok" * 10

    async def bidi(requests: Any, context: Any) -> Any:
        async for _request in requests:
            yield b"ok" * 10

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Copy", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _same, _same),
        "Stream": grpc.stream_stream_rpc_method_handler(bidi, _same, _same)}),))
    files = _files(tls_dir, "server")
    port = (server.add_secure_port("127.0.0.1:0", tls.server_credentials(files)) if files
            else server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    ports.put((port, os.getpid()))
    await server.wait_for_termination()


def _server_main(ports: Any, mode: str, tls_dir: str | None) -> None:
    asyncio.run(_serve_raw(ports, tls_dir) if mode == "raw" else _serve(ports, tls_dir))


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def round_trips(one: Callable[[], Awaitable[None]], server_pid: int, messages: int) -> str:
    """`one` 50 times to warm up, then `messages` times measured: the table cells "client CPU ms
    | server CPU ms | p50 ms | load |" per message (CPU from /proc; bench/peer_copy_options.py
    uses it too)."""
    for _ in range(50):
        await one()
    client_before, server_before = time.process_time(), _cpu_s(server_pid)
    latencies = []
    for _ in range(messages):
        started = time.perf_counter()
        await one()
        latencies.append(time.perf_counter() - started)
    client_ms = (time.process_time() - client_before) * 1000 / messages
    server_ms = (_cpu_s(server_pid) - server_before) * 1000 / messages
    latencies.sort()
    return f"{client_ms:.3f} | {server_ms:.3f} | {latencies[messages // 2] * 1000:.3f} | {os.getloadavg()[0]:.1f} |"


async def _client(port: int, server_pid: int, mode: str, messages: int, payload: bytes,
                  tls_dir: str | None) -> None:
    files = _files(tls_dir, "client")
    closing: list[Any] = []
    if mode == "raw":
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=_client_context(files) if files else None,
            server_hostname=ca.PEER_TLS_NAME if files else None)
        closing.append(writer)

        async def one() -> None:
            writer.write(struct.pack(">I", len(payload)) + payload)
            size = struct.unpack(">I", await reader.readexactly(4))[0]
            await reader.readexactly(size)
    else:
        options = [("grpc.max_send_message_length", 8 << 20)]
        channel = (grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(files),
                                           options=options + tls.CHANNEL_OPTIONS) if files
                   else grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options))
        closing.append(channel)
        unary = channel.unary_unary("/bench.Copy/Unary", request_serializer=_same, response_deserializer=_same)
        stream = channel.stream_stream("/bench.Copy/Stream", request_serializer=_same, response_deserializer=_same)
        call = stream()

        async def one() -> None:
            if mode == "unary":
                await unary(payload)
            else:
                await call.write(payload)
                await call.read()
    print(f"| {mode}{' (TLS)' if files else ''} | {await round_trips(one, server_pid, messages)}", flush=True)
    for thing in closing:
        if isinstance(thing, asyncio.StreamWriter):
            thing.close()
        else:
            await thing.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--payload-bytes", type=int, default=132_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="unary,stream,raw", help="comma-separated: unary, stream, raw")
    parser.add_argument("--tls", action="store_true", help="mutual TLS for every mode (a fresh CA)")
    args = parser.parse_args()
    tls_dir = tempfile.mkdtemp(prefix="peer-copy-rpc-") if args.tls else None
    if tls_dir:
        ca_dir = Path(tls_dir) / "ca"
        ca.init_ca(ca_dir)
        for name in ("server", "client"):  # Two node certificates, as two peers have.
            ca.issue(ca_dir, Path(tls_dir) / name, name)
    spawn = multiprocessing.get_context("spawn")  # No fork of a process that has used gRPC.
    payload = os.urandom(args.payload_bytes)
    try:
        print("| mode | client CPU ms/message | server CPU ms/message | round trip p50 ms | load (1 min) |")
        print("|---|---|---|---|---|")
        for _round in range(args.rounds):
            for mode in args.modes.split(","):
                ports: Any = spawn.Queue()
                server = spawn.Process(target=_server_main, args=(ports, mode, tls_dir))
                server.start()
                try:
                    port, server_pid = ports.get(timeout=30)
                    asyncio.run(_client(port, server_pid, mode, args.messages, payload, tls_dir))
                finally:
                    server.kill()
                    server.join()
    finally:
        if tls_dir:
            shutil.rmtree(tls_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
