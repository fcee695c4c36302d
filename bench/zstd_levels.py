"""zstd levels on a bench data set's files and on pydicom's uncompressed test images: the
share of the bytes stored, and the thread CPU per instance to compress (what every C-STORE
and STOW-RS pays, node/codec.py) and to decompress (what every retrieve pays).

    .venv/bin/python bench/zstd_levels.py bench/work/data/<set dir> [--files 200] [--levels 1,-1,-2,-3,-5]

The set dir is one of bench/run.py's or bench/dicomweb.py's prepared sets (its `files/`
tree). Levels are compressed by one reused ZstdCompressor each, as the node does.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pydicom
import zstandard
from pydicom.data import get_testdata_files

_TEST_IMAGE_BYTES_MIN = 30_000


def set_files(directory: Path, count: int) -> list[bytes]:
    paths = sorted(p for p in (directory / "files").rglob("*") if p.is_file())[:count]
    return [p.read_bytes() for p in paths]


def test_images() -> list[bytes]:
    """pydicom's test files of 30 KB or more in an uncompressed transfer syntax."""
    found = []
    for path in sorted(set(get_testdata_files("*.dcm"))):
        if os.path.getsize(path) < _TEST_IMAGE_BYTES_MIN:
            continue
        try:
            syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - a test file without file meta: not one of these
            continue
        if not syntax.is_compressed:
            found.append(Path(path).read_bytes())
    return found


def measure(name: str, items: list[bytes], levels: list[int]) -> None:
    raw = sum(map(len, items))
    for level in levels:
        compressor, decompressor = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
        started = time.thread_time()
        frames = [compressor.compress(item) for item in items]
        compress_s = time.thread_time() - started
        started = time.thread_time()
        for frame in frames:
            decompressor.decompress(frame)
        decompress_s = time.thread_time() - started
        print(f"{name:28s} level {level:3d}: stored {sum(map(len, frames)) / raw:.3f} of the bytes, "
              f"compress {compress_s / len(items) * 1e3:.3f} ms, decompress {decompress_s / len(items) * 1e3:.3f} ms an instance")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set_dir", type=Path)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--levels", default="1,-1,-2,-3,-5")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    measure(args.set_dir.name, set_files(args.set_dir, args.files), levels)
    images = test_images()
    measure(f"pydicom test images ({len(images)})", images, levels)


if __name__ == "__main__":
    main()
