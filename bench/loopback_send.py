"""What sending a WADO-RS study's bytes over loopback costs by itself: 80 parts of a
200-byte header and 525 KB (the 80 CT study, 42 MB) written to a reader process, thread
CPU of the writer, median of 10 runs: a blocking `sendall`, and an asyncio stream
(write + drain) on uvloop, as uvicorn writes a response body.

    .venv/bin/python bench/loopback_send.py
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import uvloop

PARTS = 80
PART_BYTES = 525_000
RUNS = 10
_READER = """
import socket, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
b = bytearray(1 << 20)
while s.recv_into(b):
    pass
"""


def _reader(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _READER, str(port)])


def blocking(data: list[bytes]) -> float:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        times = []
        for _ in range(RUNS):
            reader = _reader(server.getsockname()[1])
            connection, _address = server.accept()
            with connection:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                started = time.thread_time()
                for index in range(PARTS):
                    connection.sendall(b"x" * 200)
                    connection.sendall(data[index % len(data)])
                times.append((time.thread_time() - started) * 1000)
            reader.wait()
        return statistics.median(times)


async def _streamed(data: list[bytes]) -> float:
    times: list[float] = []
    done = asyncio.Event()

    async def handle(_reader_stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.thread_time()
        for index in range(PARTS):
            writer.write(b"x" * 200)
            writer.write(data[index % len(data)])
            await writer.drain()
        times.append((time.thread_time() - started) * 1000)
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for _ in range(RUNS):
        done.clear()
        reader = _reader(port)
        await done.wait()
        await asyncio.to_thread(reader.wait)
    server.close()
    return statistics.median(times)


def main() -> int:
    data = [os.urandom(PART_BYTES) for _ in range(4)]
    print(f"blocking sendall: {blocking(data):.2f} ms thread CPU per {PARTS * PART_BYTES / 1e6:.0f} MB, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"uvloop stream write+drain: {uvloop.run(_streamed(data)):.2f} ms, load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
