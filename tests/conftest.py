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


# Integration test files whose tests start one node (or none) at a time: their own work
# unit under pytest-xdist, which runs beside the cluster tests' (see below).
SINGLE_NODE_FILES = frozenset(f"tests/integration/{name}.py" for name in (
    "test_single_node", "test_quick_start", "test_large_instance", "test_qr_semantics", "test_dicomweb_big_frames",
    "test_protocol_hardening", "test_durability", "test_http_security", "test_iocm", "test_store_audit",
    "test_orthanc_diff", "test_browser", "test_move_idle", "test_workers",
))


# pytest-xdist versions whose LoadScopeScheduling._split_scope (the method its own
# LoadGroupScheduling overrides to group tests; an underscore name, not a documented
# hook) IntegrationGroups below was tested with. pyproject.toml pins it; on another
# version `make test` stops at once (tests/unit/test_xdist_groups.py checks both).
TESTED_XDIST_VERSIONS = frozenset({"3.8.0"})


def integration_scope(nodeid: str) -> str:
    """The work unit of a test under `make test`'s two workers: one for the cluster
    tests, one for the single-node files (SINGLE_NODE_FILES), each test of the rest its own."""
    if not nodeid.startswith("tests/integration/"):
        return nodeid
    path = nodeid.split("::", 1)[0]
    return "tests/integration (single node)" if path in SINGLE_NODE_FILES else "tests/integration (clusters)"


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent when it is not installed.
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs two pytest-xdist workers (`-n 2 --dist loadgroup`). The integration
    tests form two work units, each run by one worker in file order: the cluster tests
    (several node processes, membership timings) one after another as without xdist, and
    the single-node files (SINGLE_NODE_FILES) one after another beside them; so at most one
    cluster test and one single-node test run at once, never two clusters. The unit and
    property tests (in-process, mostly CPU) are taken one at a time by whichever worker is
    free. Measured (bench/README.md, 2026-12-08): the cluster tests are most of the time.

    pytest-xdist's own loadgroup (xdist_group marks) renames node ids, which pytest 9.2 no
    longer lets it do, so the grouping is made here, through xdist's scheduler hook and a
    subclass of its LoadScopeScheduling (tested versions only: TESTED_XDIST_VERSIONS)."""
    if config.getoption("dist") != "loadgroup":
        return None
    import xdist
    from xdist.scheduler import LoadScopeScheduling

    if xdist.__version__ not in TESTED_XDIST_VERSIONS:
        raise pytest.UsageError(f"pytest-xdist {xdist.__version__} is untested with tests/conftest.py's "
                                f"IntegrationGroups (tested: {', '.join(sorted(TESTED_XDIST_VERSIONS))})")

    class IntegrationGroups(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return integration_scope(nodeid)

    return IntegrationGroups(config, log)


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
