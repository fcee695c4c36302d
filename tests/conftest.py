"""Shared fixtures: real pacsnode processes on 127.0.0.1 with free ports, cleaned up."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from pacsnode.sim.process import NodeProcess, free_port


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent when it is not installed.
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs two pytest-xdist workers (`-n 2 --dist loadgroup`). Every integration
    test goes to one of them, one after another in file order as without xdist: they start
    node processes and wait on real time, and running two at once would make each the other's
    load. The unit and property tests (in-process, mostly CPU) run in the other worker,
    one test at a time from the queue, and fill in on both once the integration tests end.

    pytest-xdist's own loadgroup (xdist_group marks) renames node ids, which pytest 9.2 no
    longer lets it do, so the grouping is made here, through xdist's scheduler hook."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationInOneWorker(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "tests/integration" if nodeid.startswith("tests/integration/") else nodeid

    return IntegrationInOneWorker(config, log)


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
