"""bench/scu.py's requestor recovers the responses pynetdicom 3.0.4's reactor drops through
subclasses (BenchAE, BenchAssociation), not by replacing pynetdicom's functions at run
time, and only on the pynetdicom version they were written against."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pynetdicom.association
from pynetdicom._globals import MODE_REQUESTOR
from pynetdicom.dimse_primitives import C_STORE

SCU_PATH = Path(__file__).resolve().parents[2] / "bench" / "scu.py"


@pytest.fixture(scope="module")
def scu() -> Any:
    """bench/scu.py imported as a module (it sets logging levels at import: put back after)."""
    pynetdicom_level = logging.getLogger("pynetdicom").level
    root_handlers = list(logging.getLogger().handlers)
    spec = importlib.util.spec_from_file_location("bench_scu_under_test", SCU_PATH)
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
    logging.getLogger().handlers[:] = root_handlers


def test_pynetdicom_is_left_as_it_is(scu: Any) -> None:
    """Importing the benchmark's SCU replaces nothing of pynetdicom's (it used to assign its
    own Association._serve_request)."""
    serve = pynetdicom.association.Association.__dict__["_serve_request"]
    assert serve.__module__ == "pynetdicom.association" and serve.__qualname__ == "Association._serve_request"
    assert scu.BenchAssociation._serve_request is not pynetdicom.association.Association._serve_request


def test_the_installed_pynetdicom_is_tested_and_another_is_refused(scu: Any) -> None:
    assert pynetdicom.__version__ in scu.TESTED_PYNETDICOM_VERSIONS
    scu.check_pynetdicom_version(pynetdicom.__version__)
    with pytest.raises(scu.UntestedPynetdicom):
        scu.check_pynetdicom_version("3.0.5")


def _response() -> C_STORE:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.Status = 0x0000
    response.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    response.AffectedSOPInstanceUID = "1.2.3"
    return response


def test_a_response_the_reactor_takes_goes_back_to_the_queue(scu: Any) -> None:
    """What the reactor does with a C-STORE response it took off the DIMSE queue in the race
    (bench/scu.py): pynetdicom's association drops it, the benchmark's puts it back and
    counts it."""
    plain = pynetdicom.association.Association(pynetdicom.AE(), MODE_REQUESTOR)
    plain._serve_request(_response(), 1)
    assert plain.dimse.get_msg(block=False) == (None, None)  # Dropped: what the subclass is for.

    before = scu.RECOVERED_RESPONSES
    bench = scu.BenchAssociation(scu.BenchAE(ae_title="BENCH"), MODE_REQUESTOR)
    response = _response()
    bench._serve_request(response, 1)
    assert bench.dimse.get_msg(block=False) == (1, response)
    assert scu.RECOVERED_RESPONSES == before + 1


def test_bench_ae_associates_and_echoes_as_pynetdicoms(scu: Any) -> None:
    """BenchAE.associate (pynetdicom's AE.associate with the class changed) against a node
    acceptor: a BenchAssociation, established, C-ECHO answered, released."""
    from pynetdicom.sop_class import Verification

    from pacsnode.node import acceptor
    from pacsnode.sim.process import free_port

    server_ae = acceptor.NodeAE(ae_title="SERVER")
    server_ae.add_supported_context(Verification)
    server = acceptor.start_server(server_ae, ("127.0.0.1", free_port()), [])
    try:
        assert scu.echo("SERVER", server.server_address[1]) == 0x0000
        ae = scu._new_ae()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="SERVER")
        assert isinstance(assoc, scu.BenchAssociation) and assoc.is_established
        assert [cx.context_id for cx in assoc.accepted_contexts] == [1]
        assert int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()
        assert assoc.is_released
    finally:
        server_ae.shutdown()
