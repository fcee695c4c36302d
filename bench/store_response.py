"""Server CPU per C-STORE with the acceptor's own C-STORE-RSP encoding vs pynetdicom's.

    .venv/bin/python bench/store_response.py [--instances 1000] [--pairs 4]

One in-process acceptor (node/acceptor.py) with a handler that answers Success at once,
and dcmtk's storescu sending `--instances` tiny CT data sets over one association, so the
server's CPU per store is mostly the DIMSE layer. Each pair runs twice: with the
StoreResponseHook's handler the only EVT_DIMSE_SENT handler (the response is one PDU the
acceptor encodes), then with a second no-op handler bound (pynetdicom builds, announces
and encodes the response message, as it did before). Printed in pairs because the
machine's load varies.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage

from pacsnode.node import acceptor
from pacsnode.sim.process import free_port


def write_tiny(directory: Path, count: int) -> None:
    for index in range(count):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CTImageStorage, generate_uid(), "BENCH"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(directory / f"{index}.dcm", enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsnode-rsp-") as tmp:
        write_tiny(Path(tmp), args.instances)
        ae = acceptor.NodeAE(ae_title="BENCH")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.store_response_hook = acceptor.StoreResponseHook(lambda event: None, lambda assoc, message_id, status: None)
        server = acceptor.start_server(ae, ("127.0.0.1", free_port()), [(evt.EVT_C_STORE, lambda event: 0x0000)])
        server.bind(evt.EVT_DIMSE_SENT, ae.store_response_hook.handler)

        def server_us_per_store() -> float:
            started = time.process_time()
            subprocess.run(["storescu", "-aec", "BENCH", "127.0.0.1", str(server.server_address[1]), "+sd", tmp],
                           check=True, capture_output=True)
            return (time.process_time() - started) / args.instances * 1e6

        def other(event: object) -> None:
            return None

        print(f"load {os.getloadavg()[0]:.1f}")
        try:
            for _ in range(args.pairs):
                ours = server_us_per_store()
                server.bind(evt.EVT_DIMSE_SENT, other)
                theirs = server_us_per_store()
                server.unbind(evt.EVT_DIMSE_SENT, other)
                print(f"server CPU per store: acceptor-encoded response {ours:6.0f} us, pynetdicom's {theirs:6.0f} us")
        finally:
            ae.shutdown()


if __name__ == "__main__":
    main()
