"""What one peer copy costs over grpc.aio, as a unary call vs as a message on an open
bidirectional stream (by hand, not CI).

    .venv/bin/python bench/peer_copy_rpc.py [--messages 1500] [--payload-bytes 132000] [--rounds 2]

Two processes on loopback (a grpc.aio server, this process as the client), raw bytes (no
protobuf), one message in flight: for each mode in turn, the client's and the server's
CPU per message (/proc, process time) and the round trip's p50. The gap is gRPC's
per-call machinery (call object, metadata, status, the server's per-call task), which
node/store_stream.py's StoreStream avoids for the cluster's copies.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from typing import Any

import grpc


def _same(value: bytes) -> bytes:
    return value


async def _serve(ports: Any) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])

    async def unary(request: bytes, context: Any) -> bytes:
        return b"ok" * 10

    async def bidi(requests: Any, context: Any) -> Any:
        async for _request in requests:
            yield b"ok" * 10

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Copy", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _same, _same),
        "Stream": grpc.stream_stream_rpc_method_handler(bidi, _same, _same)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put((port, os.getpid()))
    await server.wait_for_termination()


def _server_main(ports: Any) -> None:
    asyncio.run(_serve(ports))


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _client(port: int, server_pid: int, mode: str, messages: int, payload: bytes) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)])
    unary = channel.unary_unary("/bench.Copy/Unary", request_serializer=_same, response_deserializer=_same)
    stream = channel.stream_stream("/bench.Copy/Stream", request_serializer=_same, response_deserializer=_same)
    call = stream()
    for _ in range(50):  # Warm both.
        await unary(payload)
        await call.write(payload)
        await call.read()
    client_before, server_before = time.process_time(), _cpu_s(server_pid)
    latencies = []
    for _ in range(messages):
        started = time.perf_counter()
        if mode == "unary":
            await unary(payload)
        else:
            await call.write(payload)
            await call.read()
        latencies.append(time.perf_counter() - started)
    client_ms = (time.process_time() - client_before) * 1000 / messages
    server_ms = (_cpu_s(server_pid) - server_before) * 1000 / messages
    latencies.sort()
    print(f"| {mode} | {client_ms:.3f} | {server_ms:.3f} | {latencies[messages // 2] * 1000:.3f} | "
          f"{os.getloadavg()[0]:.1f} |")
    await call.done_writing()
    await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--payload-bytes", type=int, default=132_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=_server_main, args=(ports,))
    server.start()
    try:
        port, server_pid = ports.get(timeout=30)
        payload = os.urandom(args.payload_bytes)
        print("| mode | client CPU ms/message | server CPU ms/message | round trip p50 ms | load (1 min) |")
        print("|---|---|---|---|---|")
        for _round in range(args.rounds):
            for mode in ("unary", "stream"):
                asyncio.run(_client(port, server_pid, mode, args.messages, payload))
    finally:
        server.kill()
        server.join()


if __name__ == "__main__":
    main()
