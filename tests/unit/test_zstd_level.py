"""NodeConfig.zstd_level is the level C-STORE compresses at: a real DicomFrontEnd on a free
loopback port over a RocksStore (itself left at the default level), a pynetdicom SCU
storing one instance, and the blob the store holds compared with zstd's own output."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from pacsnode.node.codec import ZSTD_LEVEL, compress
from pacsnode.node.config import NodeConfig
from pacsnode.node.dicom import DicomFrontEnd
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive
from pacsnode.sim.datagen import StudySetSpec, write_study_set


@pytest.mark.parametrize("level", [19, ZSTD_LEVEL])
def test_c_store_compresses_at_the_configured_level(tmp_path: Path, level: int) -> None:
    spec = StudySetSpec(patients=1, series_per_study=1, instances_per_series=1, rows=64, cols=64, seed=41)
    entry = write_study_set(spec, tmp_path / "data")[0]
    dataset = dcmread(entry["path"])
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    config = NodeConfig(node_id="t", data_dir=tmp_path, host="127.0.0.1", dicom_port=0, zstd_level=level)
    front_end = DicomFrontEnd(config, Archive(store))
    front_end.start()
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        association = ae.associate("127.0.0.1", front_end.port, ae_title="PACSNODE")
        assert association.is_established
        try:
            status = association.send_c_store(dataset)
        finally:
            association.release()
        assert status.Status == 0x0000
        stored = store.read_stored(entry["study_uid"], entry["sop_uid"])
        assert stored is not None
        part10 = store.read_part10(entry["study_uid"], entry["sop_uid"])
        other = 19 if level == ZSTD_LEVEL else ZSTD_LEVEL
        assert compress(part10, level) != compress(part10, other)  # The levels tell apart on this instance.
        assert bytes(stored.blob) == compress(part10, level)
    finally:
        front_end.stop(grace_s=1)
        store.close()
