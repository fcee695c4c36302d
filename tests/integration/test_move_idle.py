"""issue 10/11: a C-MOVE that waits on a slow destination costs the node no CPU. The
node's sub-association to the destination (a RequestorAssociation, node/acceptor.py)
waits in poll/Event like an accepted one; pynetdicom's requestor polls (the node used to
run it at 0.2 ms: ~20% of a core for as long as the destination took)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, free_port

from . import clients, cpu

HOLD_S = 3.0


def test_a_c_move_waiting_on_a_slow_destination_costs_no_cpu(tmp_path: Path) -> None:
    if not cpu.has_proc():
        pytest.skip("needs /proc")
    entered = threading.Event()
    release = threading.Event()
    received: list[str] = []

    def on_store(event: Any) -> int:
        entered.set()
        release.wait(HOLD_S + 10)  # The slow destination: the node waits for this answer.
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    destination = AE(ae_title="SLOW")
    for context in AllStoragePresentationContexts:
        destination.add_supported_context(context.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    destination_port = free_port()
    server = destination.start_server(("127.0.0.1", destination_port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    node = NodeProcess(tmp_path / "data", extra_args=["--destination", f"SLOW=127.0.0.1:{destination_port}"])
    node.start()
    try:
        manifest = datagen.write_study_set(datagen.StudySetSpec(patients=1, instances_per_series=2, rows=8, cols=8,
                                                                seed=79), tmp_path / "files")
        assert set(clients.send_files(node.dicom_port, [Path(e["path"]) for e in manifest]).values()) == {0}
        outcome: list[int] = []
        mover = threading.Thread(target=lambda: outcome.append(clients.move(
            node.dicom_port, clients.identifier("STUDY", StudyInstanceUID=manifest[0]["study_uid"]), "SLOW")))
        mover.start()
        assert entered.wait(15), "the node never sent a C-STORE to the destination"
        pid = node.process.pid  # type: ignore[union-attr]
        time.sleep(0.2)
        # The node waits for the destination's C-STORE response for the next 2.5 s.
        steady, windows = cpu.median_window_fraction(pid, windows=5, window_s=(HOLD_S - 0.5) / 5)
        release.set()
        mover.join(30)
        assert outcome == [0x0000], outcome
        assert len(received) == 2
        # Two waiting associations (the C-MOVE's and its sub-association) plus the node's
        # background timers: as the idle-association bound in test_protocol_hardening.
        assert steady < 0.02, windows
    finally:
        release.set()
        node.stop()
        server.shutdown()
    assert "Traceback" not in node.log_text()


def test_an_association_busy_longer_than_the_network_timeout_is_not_idle(tmp_path: Path) -> None:
    """A C-MOVE whose sub-operations take longer than network_timeout_s: the requestor sends
    nothing while it waits (only the node sends, pending responses), so pynetdicom's idle
    timer, restarted only by received PDUs and checked between requests, found the
    association idle the moment the C-MOVE ended and aborted it
    (`dicom.association.idle_timeout`). Busy is not idle: the same association must then
    still answer a C-ECHO."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

    network_timeout_s = 2.0
    per_store_s = 0.6

    def on_store(event: Any) -> int:
        time.sleep(per_store_s)  # A slow destination: the move lasts longer than the timeout.
        return 0x0000

    destination = AE(ae_title="SLOW")
    for context in AllStoragePresentationContexts:
        destination.add_supported_context(context.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    destination_port = free_port()
    server = destination.start_server(("127.0.0.1", destination_port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    node = NodeProcess(tmp_path / "data", extra_args=["--destination", f"SLOW=127.0.0.1:{destination_port}",
                                                      "--network-timeout-s", f"{network_timeout_s:g}"])
    node.start()
    try:
        manifest = datagen.write_study_set(datagen.StudySetSpec(patients=1, instances_per_series=6, rows=8, cols=8,
                                                                seed=81), tmp_path / "files")
        assert len(manifest) * per_store_s > 1.5 * network_timeout_s
        assert set(clients.send_files(node.dicom_port, [Path(e["path"]) for e in manifest]).values()) == {0}
        ae = clients.scu_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="PACSNODE")
        assert assoc.is_established
        try:
            started = time.monotonic()
            final = None
            for status, _identifier in assoc.send_c_move(
                    clients.identifier("STUDY", StudyInstanceUID=manifest[0]["study_uid"]), "SLOW",
                    StudyRootQueryRetrieveInformationModelMove):
                if status and status.Status != 0xFF00:
                    final = int(status.Status)
            took = time.monotonic() - started
            assert final == 0x0000, (final, took)
            assert took > network_timeout_s
            time.sleep(0.5)  # The node's reactor checks the idle timer right after the request.
            assert assoc.is_established, node.log_text()[-2000:]
            echo = assoc.send_c_echo()
            assert "Status" in echo and echo.Status == 0x0000
        finally:
            if assoc.is_established:
                assoc.release()
        assert "dicom.association.idle_timeout" not in node.log_text()
    finally:
        node.stop()
        server.shutdown()
