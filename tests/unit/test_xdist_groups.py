"""`make test`'s two pytest-xdist workers group the integration tests through a subclass of
xdist's LoadScopeScheduling (tests/conftest.py): the installed xdist must be one it was
tested with, and that class's grouping method must still be the one it overrides."""

from __future__ import annotations

import inspect

import xdist
from xdist.scheduler import LoadScopeScheduling

from tests.conftest import SINGLE_NODE_FILES, TESTED_XDIST_VERSIONS, integration_scope


def test_the_installed_pytest_xdist_is_a_tested_version() -> None:
    assert xdist.__version__ in TESTED_XDIST_VERSIONS
    # The method IntegrationGroups overrides, with the signature it overrides.
    assert list(inspect.signature(LoadScopeScheduling._split_scope).parameters) == ["self", "nodeid"]


def test_cluster_tests_share_one_unit_single_node_files_another_the_rest_their_own() -> None:
    single = sorted(SINGLE_NODE_FILES)[0]
    assert integration_scope("tests/integration/test_cluster.py::test_a") == \
        integration_scope("tests/integration/test_chaos.py::test_b[1]") == "tests/integration (clusters)"
    assert integration_scope(f"{single}::test_c") == integration_scope(f"{single}::test_d") == \
        "tests/integration (single node)"
    assert integration_scope("tests/unit/test_ring.py::test_e") == "tests/unit/test_ring.py::test_e"
    assert integration_scope("tests/unit/test_ring.py::test_e") != integration_scope("tests/unit/test_ring.py::test_f")
