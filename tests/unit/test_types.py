"""mypy --strict on ring/, replication/ and node/ (the settings are pyproject.toml's [tool.mypy]).

Run through mypy's public API (`mypy.api.run`), with an incremental cache in .mypy_cache/
of the repository. The folders are mapped under the `pacsnode` namespace by setuptools
(pyproject's package-dir), which mypy cannot follow, so the test builds the same mapping
as symbolic links (.mypy_cache/src/pacsnode/<folder> -> <folder>) and reports mypy's lines
with the repository's own paths. A module that cannot be strict yet is listed in
pyproject's [[tool.mypy.overrides]] with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("ring", "replication", "node")
MAPPED = ("node", "ring", "replication", "proto", "cli", "sim")  # pyproject's [tool.setuptools.package-dir]


def _source_tree(cache: Path) -> Path:
    """.mypy_cache/src/pacsnode/<folder> -> ROOT/<folder>: the import names setuptools gives them."""
    base = cache / "src"
    package = base / "pacsnode"
    package.mkdir(parents=True, exist_ok=True)
    for folder in MAPPED:
        link = package / folder
        target = ROOT / folder
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return base


def test_ring_replication_and_node_are_strictly_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ROOT / ".mypy_cache"
    base = _source_tree(cache)
    monkeypatch.setenv("MYPYPATH", str(base))
    packages = [arg for folder in CHECKED for arg in ("-p", f"pacsnode.{folder}")]
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                                      str(cache), "--no-error-summary", "--show-error-codes", *packages])
    # mypy names files by where it found them: give the repository's paths instead.
    prefixes = (f"{base}/pacsnode/", f"{os.path.relpath(base)}/pacsnode/")
    lines = []
    for line in stdout.splitlines():
        for prefix in prefixes:
            line = line.replace(prefix, "")
        if line.strip():
            lines.append(line)
    assert status == 0 and not stderr, (
        f"mypy --strict found {len(lines)} problem(s) in {', '.join(CHECKED)} "
        "(fix them, or, if a module cannot be strict yet, add it to pyproject's [[tool.mypy.overrides]] "
        "with the reason):\n" + "\n".join(lines) + (f"\n{stderr}" if stderr else ""))
