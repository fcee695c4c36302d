"""grpc.aio channel and server options for the cluster's copies (by hand, not CI).

    .venv/bin/python bench/peer_copy_options.py [--configs default,read256k,frame1m,window] [--rounds 2]
                                                [--messages 1500] [--payload-bytes 132000]

Two processes on loopback (a grpc.aio server, this process as the client), one
bidirectional stream, one 132 KB message in flight and a 20-byte reply, as
node/store_stream.py sends a copy: for each option set in turn (a fresh server and
channel each, both with the same options), the client's and the server's CPU per
message (/proc) and the round trip's p50. The option sets:

- default: what node/peer_server.py GRPC_OPTIONS sets (message size limits) and nothing else;
- read256k: gRPC's TCP read chunk at 256 KiB (`grpc.experimental.tcp_read_chunk_size`,
  and its min/max), so that a copy is read in fewer, larger reads;
- frame1m: HTTP/2 frames of up to 1 MiB (`grpc.http2.max_frame_size`; 16 KiB by default);
- window: no BDP probing and a 4 MiB look-ahead (`grpc.http2.bdp_probe` 0,
  `grpc.http2.lookahead_bytes`), so the flow-control window is large from the start.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_copy_rpc import _same, round_trips  # noqa: E402  # The same serializer and timing loop.

LIMITS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
CONFIGS: dict[str, list[tuple[str, int]]] = {
    "default": [],
    "read256k": [("grpc.experimental.tcp_read_chunk_size", 262144),
                 ("grpc.experimental.tcp_min_read_chunk_size", 262144),
                 ("grpc.experimental.tcp_max_read_chunk_size", 4 << 20)],
    "frame1m": [("grpc.http2.max_frame_size", 1 << 20)],
    "window": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4 << 20)],
}
REPLY = b"ok" * 10


async def _serve(name: str, ports: Any) -> None:
    server = grpc.aio.server(options=LIMITS + CONFIGS[name])

    async def bidi(requests: Any, context: Any) -> Any:
        async for _request in requests:
            yield REPLY

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Copy", {
        "Stream": grpc.stream_stream_rpc_method_handler(bidi, _same, _same)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put((port, os.getpid()))
    await server.wait_for_termination()


def _server_main(name: str, ports: Any) -> None:
    asyncio.run(_serve(name, ports))


async def _client(name: str, port: int, server_pid: int, messages: int, payload: bytes) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=LIMITS + CONFIGS[name])
    call = channel.stream_stream("/bench.Copy/Stream", request_serializer=_same, response_deserializer=_same)()

    async def one() -> None:
        await call.write(payload)
        await call.read()

    print(f"| {name} | {await round_trips(one, server_pid, messages)}", flush=True)
    await call.done_writing()
    await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--payload-bytes", type=int, default=132_000)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")  # No fork of a process that has used gRPC.
    payload = os.urandom(args.payload_bytes)
    print("| options | client CPU ms/message | server CPU ms/message | round trip p50 ms | load (1 min) |")
    print("|---|---|---|---|---|")
    for _round in range(args.rounds):
        for name in args.configs.split(","):
            ports: Any = spawn.Queue()
            server = spawn.Process(target=_server_main, args=(name, ports))
            server.start()
            try:
                port, server_pid = ports.get(timeout=30)
                asyncio.run(_client(name, port, server_pid, args.messages, payload))
            finally:
                server.kill()
                server.join()


if __name__ == "__main__":
    main()
