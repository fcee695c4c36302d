"""The chaos runner's pynetdicom store client when its node dies in the middle of a store."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt

from pacsnode.sim import chaos_clients
from pacsnode.sim.faultproxy import FaultProxy
from pacsnode.sim.process import free_port


def test_the_store_client_stops_at_a_store_without_response_on_the_nodes_own_requestor(tmp_path: Path) -> None:
    """A node killed while it stores the second of three files (its connection dropped
    before it answers): the client records the first as stored, stops at the second (no
    response: pynetdicom's empty status) and sends no third, whose wait -- begun on an
    association already gone, before its reactor had seen the abort -- was the chaos
    runner's 45 s DIMSE timeout with pynetdicom's plain requestor. Its associations are
    the node's requestor's (node/acceptor.py), whose waits end with the connection."""
    source = Path(str(get_testdata_file("CT_small.dcm")))
    meta = dcmread(source, stop_before_pixels=True).file_meta
    sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.dcm"
        shutil.copyfile(source, path)
        paths.append(str(path))
    proxy = FaultProxy()
    requests: list[Any] = []
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        with lock:
            requests.append(event.assoc)
            second = len(requests) == 2
        if second:
            proxy.reset("node")  # The node dies before it answers.
        return 0x0000

    scp = AE(ae_title="PACSNODE")
    scp.add_supported_context(sop_class, syntax)
    server = scp.start_server(("127.0.0.1", free_port()), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = proxy.add_link("node", "127.0.0.1", server.server_address[1])
        outcome = chaos_clients.store_files(port, [(path, sop_class, syntax) for path in paths])
    finally:
        proxy.close()
        scp.shutdown()
    assert outcome.statuses == {paths[0]: 0x0000, paths[1]: None, paths[2]: None}
    assert outcome.error == "no response"
    assert len(requests) == 2  # No third request.
