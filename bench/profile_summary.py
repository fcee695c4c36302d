"""Summarise py-spy's raw (collapsed-stack) output: where a process's samples went.

    .venv/bin/python bench/profile_summary.py FILE.txt [FILE.txt ...] [--top 25]

py-spy `record --format raw` writes one line per distinct stack, `frame;frame;... COUNT`
(outermost first). This prints, per file, the share of samples in each of the write
path's parts (a sample counts for the first part, from the innermost frame outwards,
whose pattern one of its frames matches) and the functions with the most own samples.
bench/cluster.py --profile DIR writes such files (one per node) and runs this on them.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

# (part, substrings of a frame "function (file:line)"): checked from the innermost frame
# outwards, the first match names the sample's part.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rocksdb write (synced WriteBatch)", ("_write (pacsnode/node/store.py", "store.py:_write")),
    ("store: build batch, index, counters", ("node/store.py",)),
    ("zstd compress", ("compress (pacsnode/node/codec.py",)),
    ("zstd decompress / verify", ("decompress (pacsnode/node/codec.py",)),
    ("header read (pydicom)", ("pydicom/",)),
    ("peer receive (StoreInstance handler)", ("peer_server.py", "peer_handler.py")),
    ("peer send (transport, chunking)", ("grpc_transport.py", "peer_wire.py")),
    ("grpc.aio machinery", ("grpc/", "_cython/_cygrpc")),
    ("coordinator", ("replication/coordinator.py",)),
    ("DICOM front end (pacsnode)", ("node/dicom.py", "node/acceptor.py", "node/ingest.py", "node/runtime.py")),
    ("pynetdicom", ("pynetdicom/",)),
    ("membership / SWIM", ("swim", "membership")),
    ("asyncio event loop", ("asyncio/",)),
    ("threading / idle waits", ("threading.py", "concurrent/futures")),
)


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for part, patterns in PARTS:
            if any(p in frame for p in patterns):
                return part
    return "other"


def summary(path: Path, top: int) -> str:
    stacks = read_stacks(path)
    total = sum(count for _frames, count in stacks) or 1
    parts: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        parts[part_of(frames)] += count
        own[frames[-1] if frames else "?"] += count
    lines = [f"## {path.name}: {total} samples", "", "| part | share |", "|---|---|"]
    lines += [f"| {part} | {100 * count / total:.1f}% |" for part, count in parts.most_common()]
    lines += ["", f"Top {top} functions by own samples:", ""]
    lines += [f"- {100 * count / total:5.1f}%  {frame}" for frame, count in own.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        print(summary(path, args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
