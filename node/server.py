"""The node process: opens the store, wires the archive and the DICOM front end, and
shuts everything down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config

from pacsnode.node.config import ConfigError, NodeConfig
from pacsnode.node.dicom import DicomFrontEnd
from pacsnode.node.ingest import header_attributes
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive
from pacsnode.replication.model import Attributes, StoreError

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"


def load_identity(config: NodeConfig) -> dict[str, Any]:
    """Persist the node's identity and bump its boot generation on every start.

    A data dir belongs to one node id: starting it under another id is refused, since its
    data would then be attributed to the wrong owner.
    """
    path = config.data_dir / IDENTITY_FILE
    identity: dict[str, Any] = {}
    if path.exists():
        try:
            identity = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        if identity.get("node_id") not in (None, config.node_id):
            raise ConfigError(
                f"data dir {config.data_dir} belongs to node {identity['node_id']!r}, "
                f"not {config.node_id!r}; use --node-id {identity['node_id']} or another --data-dir"
            )
    identity.update(
        node_id=config.node_id,
        cluster_id=config.cluster_id,
        site=config.site,
        generation=int(identity.get("generation", 0)) + 1,
    )
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as handle:
        json.dump(identity, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return identity


class Node:
    """One pacsnode process (single node: a ring of one)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.identity = load_identity(config)
        try:
            self.store = RocksStore(
                config.data_dir / "store",
                disk_free_bytes_min=config.disk_free_bytes_min,
                instance_size_bytes_max=config.instance_size_bytes_max,
            )
        except Exception as error:  # rocksdict: lock held by another process, corrupt files
            raise StoreError(f"cannot open the store in {config.data_dir}: {error}") from None
        self.archive = Archive(self.store, header_reader=self._header_reader)
        self.front_end = DicomFrontEnd(config, self.archive)
        self._stopped = threading.Event()

    def _header_reader(self, study_uid: str, sop_uid: str, keywords: tuple[str, ...]) -> Attributes:
        try:
            return header_attributes(self.store.read_part10(study_uid, sop_uid), keywords)
        except (KeyError, StoreError):
            return {}

    def start(self) -> None:
        self.front_end.start()
        stats = self.store.statistics()
        log.info(
            "node.started node_id=%s generation=%d ae_title=%s dicom=%s:%d instances=%d studies=%d data_dir=%s",
            self.config.node_id,
            self.identity["generation"],
            self.config.ae_title,
            self.config.host,
            self.front_end.port,
            stats.instances,
            stats.studies,
            self.config.data_dir,
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("node.stopping node_id=%s", self.config.node_id)
        self.front_end.stop(grace_s=10.0)
        self.store.close()
        log.info("node.stopped node_id=%s", self.config.node_id)

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly."""
        wake = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("node.signal signal=%s", signal.Signals(signum).name)
            wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not wake.wait(1.0):
                pass
        finally:
            self.stop()


def configure_logging(level: str, data_dir: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        handlers=handlers,
        force=True,
    )
    # pynetdicom logs every PDU at INFO and identifiers (patient data) at DEBUG; pydicom
    # warns about invalid values by quoting them (a birth date is patient data). Neither
    # may reach the node's log: only our own event lines do.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level.upper() != "DEBUG" else logging.INFO)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.Formatter.converter = time.gmtime
