"""Shared fixtures: real pacsnode processes on 127.0.0.1 with free ports, cleaned up."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from pacsnode.sim.process import NodeProcess, free_port


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator["NodeFactory"]:
    factory = NodeFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


class NodeFactory:
    """Starts nodes for one test and stops every one of them afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[NodeProcess] = []

    def start(self, name: str = "node-1", *, extra_args: list[str] | None = None) -> NodeProcess:
        node = NodeProcess(self.root / name, node_id=name, extra_args=extra_args or [])
        self.nodes.append(node)
        return node.start()

    def close(self) -> None:
        for node in self.nodes:
            node.stop(timeout_s=15)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def storescp_port() -> int:
    return free_port()
