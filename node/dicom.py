"""The DICOM front end: pynetdicom handlers that turn DIMSE requests into Archive calls.

Only this module knows DICOM status codes. Every handler catches what the archive
raises for bad input or operating errors and answers a clear status; an unexpected
exception propagates and pynetdicom answers a failure (0xC211/0xC311...), never Success.
Handlers run on pynetdicom's association threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import mmap
import socketserver
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

from pydicom.datadict import dictionary_has_tag, dictionary_keyword, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.dsutils import encode as encode_dataset
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacsnode.node.blob_files import BlobFiles, BlobPointer, Part10Stream, TempBlob
from pacsnode.node import acceptor, association_guard, codec, commitment, find_rows, ingest, iocm, raw_send, spool, tls, \
    write_trace
from pacsnode.node import identifier as request_identifier
from pacsnode.node.config import NodeConfig
from pacsnode.node import dicom_guard
from pacsnode.node.dicom_guard import DicomGuard
from pacsnode.node.ingest import InvalidInstance, decode_sequence, instance_from_part10
from pacsnode.replication.archive import (
    ArchiveApi,
    IncompleteAnswer,
    InstanceLocation,
    ReadError,
    RetrievePlan,
    WriteStatus,
)
from pacsnode.replication.matching import Condition, Query, QueryError
from pacsnode.replication.model import Attributes, Instance
from pacsnode.replication.query import level_of

if TYPE_CHECKING:
    from pacsnode.node.security import NodeSecurity

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_STORE_FAILED = 0xA701  # Project sub-code: fewer than W replicas / store error.
STATUS_IDENTIFIER_MISMATCH = 0xA900
STATUS_UNABLE_TO_PROCESS = 0xC000
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
STATUS_RETRIEVE_OUT_OF_RESOURCES = 0xA702  # C-GET/C-MOVE: unable to perform sub-operations.
STATUS_SUBOPERATIONS_WARNING = 0xB000  # C-GET/C-MOVE: sub-operations complete, one or more failed.
# The front end's two thread pools (compression of received instances; read-ahead of
# C-GET/C-MOVE sub-operations): threads are made on demand up to these and then kept idle.
COMPRESS_POOL_THREADS = 4
# A C-STORE data set below this is compressed on the association's thread, after its
# header read (~6 us for a 1.7 KB one-instance study), not handed to the pool (~40 us of
# CPU: the submit, the future, a pool thread's wake-up): bench/README.md, "stop 33, helper P".
COMPRESS_INLINE_BYTES_MAX = 64 * 1024
READ_POOL_THREADS = 4
STATUS_FIND_INCOMPLETE = 0xC001  # Project sub-code: part of the archive could not be asked.
# An internal error (a bug, an unexpected failure) is answered with the code pynetdicom
# uses for an exception in a handler, with a short ErrorComment, never as bad input.
STATUS_FIND_INTERNAL_ERROR = 0xC311
STATUS_GET_INTERNAL_ERROR = 0xC411
STATUS_MOVE_INTERNAL_ERROR = 0xC511

# Acceptor preference (pynetdicom picks the first of ours the requestor proposed): every
# encapsulated syntax pydicom knows first (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG,
# HEVC...), so that a compressed instance is taken as it is; then the native ones,
# Explicit VR Little Endian before Implicit (it keeps the VRs), Deflated, Big Endian.
_NATIVE_SYNTAXES = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
]
TRANSFER_SYNTAXES: list[str] = [
    str(ts) for ts in AllTransferSyntaxes if str(ts) not in _NATIVE_SYNTAXES
] + _NATIVE_SYNTAXES

FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
}
RETRIEVE_UNIQUE_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_BINARY_NUMBER_VRS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float}


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


@dataclass(frozen=True)
class FrontEndStats:
    associations: int
    requests: dict[str, int]


class DicomFrontEnd:
    """Owns the pynetdicom AE and its listening server."""

    def __init__(self, config: NodeConfig, archive: ArchiveApi, security: "NodeSecurity | None" = None,
                 blob_files: BlobFiles | None = None) -> None:
        self._config = config
        # pynetdicom's documented switches: it formats every C-FIND/C-GET/C-MOVE request
        # identifier and every C-FIND response identifier (pretty_dataset) for a DEBUG log
        # line whether or not DEBUG is on (4% of a node's GIL time on a 200-row C-FIND).
        # The node logs its own one-line events, without patient data.
        _pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
        _pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
        # The store's blobs directory, when it is in this process: a spooled instance is
        # then compressed into a file there, never into memory (node/blob_files.py).
        self._blob_files = blob_files
        self._security = security
        self.guard = DicomGuard.from_config(config, security.audit if security is not None else None)
        self._archive = self.guard.archive(archive)  # Stores and retrieves reach the audit trail.
        self._tls_server: Any = None
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._server: Any = None
        self._compressor = concurrent.futures.ThreadPoolExecutor(max_workers=COMPRESS_POOL_THREADS, thread_name_prefix="pacsnode-zstd")
        # Reads and decompresses the next instances of C-GETs and C-MOVEs (RetrieveReadAhead).
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=READ_POOL_THREADS, thread_name_prefix="pacsnode-read")
        self.spool = acceptor.SpoolSettings(
            threshold_bytes=config.dataset_spool_threshold_bytes, size_max_bytes=config.instance_size_bytes_max,
            budget=spool.InflightBudget(config.inflight_instance_bytes_max), directory=spool.spool_directory(config.data_dir))
        self.ae = self._build_ae()
        # Storage Commitment (node/commitment.py): served when the archive can check the cluster.
        self.commitment: commitment.CommitmentScp | None = None
        # (A DICOM worker's archive asks the node over the worker channel.)
        if commitment.CommitmentScp.supported(self._archive):
            self.commitment = commitment.CommitmentScp(config, self.ae, self._archive, self._move_tls)
        else:  # An archive without the cluster check: not offered.
            self.ae.remove_supported_context(commitment.SOP_CLASS_UID)
        # IHE IOCM rejection notes (node/iocm.py): applied where the archive can delete.
        self._rejections = iocm.RejectionNotes(self._archive) if iocm.RejectionNotes.supported(self._archive) \
            else None
        self.guard.configure(self.ae)  # Strict mode: unknown calling AE titles rejected.

    # ----------------------------------------------------------------- setup
    def _build_ae(self) -> AE:
        config = self._config
        ae = acceptor.NodeAE(ae_title=config.ae_title)
        ae.spool = getattr(self, "spool", None)  # Received data sets (node/spool.py); see AcceptorDIMSE.
        ae.maximum_pdu_size = config.max_pdu_bytes
        ae.maximum_associations = config.max_associations
        ae.dimse_timeout = config.dimse_timeout_s
        ae.acse_timeout = config.acse_timeout_s
        ae.network_timeout = config.network_timeout_s
        ae.connection_timeout = config.move_connect_timeout_s
        ae.require_called_aet = config.require_called_ae_title
        ae.add_supported_context(Verification)
        for sop_class in (*FIND_MODELS, *GET_MODELS, *MOVE_MODELS):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.2"])
        # Every storage SOP class, every transfer syntax; SCU+SCP roles so that a C-GET
        # requestor's role selection (it acts as Storage SCP) is accepted.
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:  # Always set in pynetdicom's list.
                ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        ae.add_supported_context(commitment.SOP_CLASS_UID, commitment.TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, raw_send.set_nodelay),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_ABORTED, self._on_aborted),
            *([(evt.EVT_N_ACTION, self.commitment.on_n_action)] if self.commitment is not None else []),
        ]

    def start(self) -> None:
        removed = spool.clear_directory(self.spool.directory)  # Left by a crash mid-transfer.
        if removed:
            log.info("dicom.spool.cleared files=%d", removed)
        handlers = self.guard.wrap(self.handlers())  # Access control and audit around each handler.
        self._server = acceptor.start_server(self.ae, (self._config.host, self._config.dicom_port), handlers)
        if self._config.dicom_tls_port and self._security is not None and self._security.files is not None:
            self._tls_server = tls.start_dicom_tls_server(
                self.ae, (self._config.host, self._config.dicom_tls_port),
                tls.dicom_server_context(self._security.files, self._config.dicom_tls_client_cert), handlers,
                on_refused=self.guard.tls_refused)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self._config.dicom_port

    @property
    def tls_port(self) -> int:
        return int(self._tls_server.server_address[1]) if self._tls_server is not None else 0

    def stop(self, *, grace_s: float = 10.0) -> None:
        """Stop accepting; let open associations finish for `grace_s`, then abort them."""
        if self.commitment is not None:
            self.commitment.stop()
        tls_server, self._tls_server = self._tls_server, None
        tls.stop_dicom_server(self.ae, tls_server, grace_s)
        server, self._server = self._server, None
        if server is None:
            return
        socketserver.BaseServer.shutdown(server)  # Leave the accept loop: no new associations.
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in list(server.active_associations):
            log.warning("dicom.association.aborted_on_shutdown calling_ae_title=%s", assoc.requestor.ae_title)
            assoc.abort()
        server.server_close()
        self._compressor.shutdown(wait=False)
        self._reader.shutdown(wait=False, cancel_futures=True)
        if server in self.ae._servers:
            self.ae._servers.remove(server)

    def statistics(self) -> FrontEndStats:
        with self._counts_lock:
            return FrontEndStats(associations=self._counts["associations"], requests=dict(self._counts))

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self._counts[name] += 1

    # ----------------------------------------------------------------- association events
    def _on_established(self, event: Any) -> None:
        self._count("associations")
        association_guard.log_event(logging.INFO, "dicom.association.established", event.assoc)

    def _on_aborted(self, event: Any) -> None:
        association_guard.log_event(logging.INFO, "dicom.association.aborted", event.assoc)

    def _on_echo(self, event: Any) -> int:
        self._count("c_echo")
        return STATUS_SUCCESS

    # ----------------------------------------------------------------- C-STORE
    def _on_store(self, event: Any) -> Dataset | int:
        self._count("c_store")
        data = event.request.DataSet
        if write_trace.enabled():
            write_trace.mark("rx", str(event.request.AffectedSOPInstanceUID or ""))
        try:
            if isinstance(data, spool.SpoolBuffer) and data.refusal is not None:
                return self._refused(event, data)
            if isinstance(data, spool.SpoolBuffer) and data.spooled:
                return self._store_spooled(event, data)
            return self._store_in_memory(event)
        finally:
            if isinstance(data, spool.SpoolBuffer):
                data.close()  # Releases its in-memory reservation and removes its file.

    def _refused(self, event: Any, data: spool.SpoolBuffer) -> Dataset:
        """A data set the acceptor did not keep (node/spool.py): 0xA700, one log line."""
        config = self._config
        limit = {spool.Refusal.TOO_LARGE: config.instance_size_bytes_max,
                 spool.Refusal.INFLIGHT: config.inflight_instance_bytes_max}.get(cast(spool.Refusal, data.refusal), 0)
        log.warning("dicom.store.rejected reason=%s size_bytes=%d limit_bytes=%d calling_ae_title=%s",
                    cast(spool.Refusal, data.refusal).value, data.size_bytes, limit, event.assoc.requestor.ae_title)
        comments = {spool.Refusal.TOO_LARGE: "instance is over the size limit",
                    spool.Refusal.INFLIGHT: "node is holding too many instance bytes; try again",
                    spool.Refusal.SPOOL_FAILED: "could not write the instance to a temporary file"}
        return _status(STATUS_OUT_OF_RESOURCES, comments[cast(spool.Refusal, data.refusal)])

    def _store_spooled(self, event: Any, data: spool.SpoolBuffer) -> Dataset | int:
        """A data set received into a file: validate its header from the file, hash and
        compress it in chunks, store it; the instance is never in memory whole. With the
        store in this process, the compressed copy goes to a file in its blobs directory
        (renamed into place by the store, node/blob_files.py) and is mapped, not read;
        otherwise (DICOM worker processes) it is held in memory, reserved in the budget."""
        request = event.request
        transfer_syntax = str(event.context.transfer_syntax)
        path = data.finish()
        temp: TempBlob | None = None
        reserved = 0
        try:
            if self._blob_files is not None:
                content_hash, temp = spool.digest_and_compress_to_file(
                    path, data.dataset_offset, transfer_syntax, self._config.zstd_level, self._blob_files)
                blob = self._blob_files.map(BlobPointer(temp.path.name, temp.size_bytes, temp.crc32), "spooled") \
                    if temp.size_bytes else b""
                blob_bytes = temp.size_bytes
            else:
                content_hash, blob, reserved = spool.digest_and_compress(path, data.dataset_offset, transfer_syntax,
                                                                         self.spool.budget, self._config.zstd_level)
                blob_bytes = reserved
        except spool.OverBudget:
            log.warning("dicom.store.rejected reason=%s size_bytes=%d limit_bytes=%d calling_ae_title=%s",
                        spool.Refusal.INFLIGHT.value, data.size_bytes, self._config.inflight_instance_bytes_max,
                        event.assoc.requestor.ae_title)
            return _status(STATUS_OUT_OF_RESOURCES, "node is holding too many instance bytes; try again")
        except OSError as error:  # Disk full or unwritable blobs directory.
            log.warning("dicom.store.rejected reason=blob-file-failed size_bytes=%d error=%s calling_ae_title=%s",
                        data.size_bytes, type(error).__name__, event.assoc.requestor.ae_title)
            return _status(STATUS_OUT_OF_RESOURCES, "could not write the compressed instance")
        try:
            with open(path, "rb") as source, mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as part10:
                try:
                    instance = ingest.instance_from_spooled(
                        part10, path, data.dataset_offset, transfer_syntax, content_hash_value=content_hash,
                        blob=blob, affected_sop_class_uid=str(request.AffectedSOPClassUID or "") or None,
                        affected_sop_instance_uid=str(request.AffectedSOPInstanceUID or "") or None)
                except InvalidInstance as error:
                    log.warning("dicom.store.rejected reason=%s status=0x%04X calling_ae_title=%s", error.reason,
                                error.status, event.assoc.requestor.ae_title)
                    return _status(error.status, error.reason)
                del blob
                if temp is not None:
                    instance = dataclasses.replace(instance, blob_file=temp)
                log.info("dicom.store.spooled size_bytes=%d blob_bytes=%d blob_file=%s", data.size_bytes, blob_bytes,
                         "yes" if temp is not None else "no")
                return self._archive_store(instance)
        finally:
            self.spool.budget.release(reserved)
            if temp is not None:  # Renamed by the store when kept; else no longer needed.
                try:
                    temp.path.unlink()
                except FileNotFoundError:
                    pass

    def _store_in_memory(self, event: Any) -> Dataset | int:
        request = event.request
        try:
            dataset_bytes = request.DataSet.getvalue()
        except AttributeError:
            log.warning("dicom.store.rejected reason=no-dataset")
            return _status(STATUS_UNABLE_TO_PROCESS, "no dataset")
        if len(dataset_bytes) > self._config.instance_size_bytes_max:
            log.warning("dicom.store.rejected reason=too-large size_bytes=%d", len(dataset_bytes))
            return _status(STATUS_OUT_OF_RESOURCES, "instance is over the size limit")
        transfer_syntax = str(event.context.transfer_syntax)
        part10 = codec.part10_prefix(str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
                                     transfer_syntax, event.assoc.requestor.ae_title) + dataset_bytes
        # Compress on another thread while this one reads the header (zstandard and
        # hashlib release the GIL): the two costs overlap instead of adding up. A small
        # instance is compressed here: the hand-over cost more than the overlap saves.
        compressed: concurrent.futures.Future[bytes] | None = None
        blob = b""
        if len(part10) >= COMPRESS_INLINE_BYTES_MAX:
            compressed = self._compressor.submit(codec.compress, part10, self._config.zstd_level)
        try:
            instance = instance_from_part10(
                part10,
                len(part10) - len(dataset_bytes),
                transfer_syntax,
                affected_sop_class_uid=str(request.AffectedSOPClassUID or "") or None,
                affected_sop_instance_uid=str(request.AffectedSOPInstanceUID or "") or None,
                compress_level=None if compressed is not None else self._config.zstd_level,
            )
        except InvalidInstance as error:
            if compressed is not None:
                compressed.cancel()
            log.warning(
                "dicom.store.rejected reason=%s status=0x%04X calling_ae_title=%s",
                error.reason,
                error.status,
                event.assoc.requestor.ae_title,
            )
            return _status(error.status, error.reason)
        if compressed is not None:
            instance = dataclasses.replace(instance, blob=compressed.result())
        return self._archive_store(instance)

    def _archive_store(self, instance: Instance) -> Dataset | int:
        note = None
        if instance.sop_class_uid == iocm.KOS_SOP_CLASS_UID and self._rejections is not None:
            try:
                note = iocm.parse_note(bytes(instance.part10))
            except iocm.NoteError as error:
                log.warning("dicom.iocm.rejected reason=%s", error)
                return _status(STATUS_OUT_OF_RESOURCES, str(error))
            except Exception as error:  # An undecodable KOS: stored as any instance, not applied as a note.
                log.warning("dicom.iocm.undecodable error=%s", type(error).__name__)
        write_trace.mark("archive", instance.sop_instance_uid)
        result = self._archive.store(instance)
        write_trace.mark("stored", instance.sop_instance_uid)
        if result.status == WriteStatus.SUCCESS and note is not None and self._rejections is not None:
            if not self._rejections.apply(note):
                return _status(STATUS_STORE_FAILED, "rejection note stored, not applied to all; send again")
        if result.status == WriteStatus.SUCCESS:
            log.debug(
                "dicom.store.stored sop_instance_uid=%s outcome=%s latency_ms=%d",
                instance.sop_instance_uid,
                result.outcome,
                result.latency_ms,
            )
            return STATUS_SUCCESS
        if result.status == WriteStatus.OUT_OF_RESOURCES:
            return _status(STATUS_OUT_OF_RESOURCES, result.message or "out of resources")
        return _status(STATUS_STORE_FAILED, result.message or "store failed")

    # ----------------------------------------------------------------- C-FIND
    def _on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        self._count("c_find")
        model = FIND_MODELS.get(str(event.request.AffectedSOPClassUID), "STUDY")
        try:
            # Read from its bytes once (node/identifier.py; the guard read it so already), or
            # pydicom's Dataset when that cannot be done for certain.
            fast = request_identifier.of_request(event)
            query, requested = find_request(fast if fast is not None else event.identifier, model)
        except QueryError as error:
            log.warning("dicom.find.rejected reason=%s", error)
            yield _status(STATUS_IDENTIFIER_MISMATCH, str(error)), None
            return
        except Exception as error:  # Undecodable identifier.
            log.warning("dicom.find.rejected reason=undecodable-identifier error=%s", type(error).__name__)
            yield _status(STATUS_UNABLE_TO_PROCESS, "cannot decode the identifier"), None
            return
        syntax = event.context.transfer_syntax
        encoding = (bool(syntax.is_implicit_VR), bool(syntax.is_little_endian))
        matches = 0
        cancelled = CancelFlag(event)

        def stop_or_wait() -> bool:
            """The archive's `is_cancelled`, which it asks before it waits for more rows
            (node/runtime.py: before each take from its row bridge; per row elsewhere): the
            Pending responses the association holds back go out first (node/acceptor.py
            _send_pending_find_response)."""
            raw_send.flush_deferred_responses()
            return cancelled()

        rows = self._archive.find(query, stop_or_wait)
        # The node's associations send a Pending response with its identifier themselves
        # (AcceptorDIMSE.send_find_row: no pydicom writer, no pynetdicom per-row loop);
        # pynetdicom then sends only the final response. Not for a deflated or big-endian
        # syntax, nor when the association cannot (another EVT_DIMSE_SENT handler bound):
        # such a row is yielded to pynetdicom as before.
        send_row = getattr(event.assoc.dimse, "send_find_row", None) \
            if syntax.is_little_endian and not syntax.is_deflated else None
        context_id, message_id = int(event.context.context_id), int(event.request.MessageID)
        sop_class_uid = str(event.request.AffectedSOPClassUID)
        # What every row's identifier shares, worked out once for the C-FIND (find_rows.py).
        identifiers = find_rows.ascii_identifiers(tuple(requested), query.level, self._config.ae_title, encoding[0]) \
            if send_row is not None else None
        try:
            for row in rows:
                if cancelled():
                    break
                if send_row is not None and identifiers is not None:
                    identifier = identifiers.encode(row)
                    if identifier is None:
                        identifier = encode_dataset(self._response(query, requested, row), encoding[0], True, False)
                    if identifier is not None and send_row(context_id, message_id, sop_class_uid, identifier):
                        matches += 1
                        dicom_guard.count_sent_row(event)  # The audit trail counts it (it is not yielded).
                        if self._config.find_result_max and matches >= self._config.find_result_max:
                            log.warning("dicom.find.capped matches=%d", matches)
                            break
                        continue
                # Most rows are ASCII text: encoded once, here (node/find_rows.py).
                response = find_rows.ascii_response(requested, row, query.level, self._config.ae_title, *encoding)
                yield STATUS_PENDING, response if response is not None else self._response(query, requested, row)
                matches += 1
                if self._config.find_result_max and matches >= self._config.find_result_max:
                    log.warning("dicom.find.capped matches=%d", matches)
                    break
        except IncompleteAnswer as error:
            # Never a partial Success: the rows sent are true, the answer is not whole.
            log.warning("dicom.find.incomplete level=%s matches=%d unreachable_studies=%d unreachable_ranges=%d",
                        query.level, matches, error.shortfall.studies, error.shortfall.ranges)
            yield _status(STATUS_FIND_INCOMPLETE, error.shortfall.describe()), None
            return
        except Exception as error:  # A bug or an unexpected failure: say so, not "bad identifier".
            log.error("dicom.find.failed level=%s matches=%d error=%s", query.level, matches, type(error).__name__)
            yield _status(STATUS_FIND_INTERNAL_ERROR, "internal error; see the node log"), None
            return
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()
        if cancelled():
            log.info("dicom.find.cancelled level=%s matches=%d", query.level, matches)
            yield STATUS_CANCEL, None
            return
        # The audit trail records every query (node/dicom_guard.py); at INFO this line cost
        # ~5% of a one-row C-FIND's node CPU (py-spy, issue 10), as dicom.store.stored would.
        log.debug("dicom.find.done level=%s matches=%d", query.level, matches)

    def _response(self, query: Query, requested: list[str], row: Attributes) -> Dataset:
        response = Dataset()
        non_ascii = False
        for keyword in requested:
            if keyword == "QueryRetrieveLevel":
                continue
            if keyword == "SpecificCharacterSet":
                continue
            if keyword == "RetrieveAETitle":
                response.RetrieveAETitle = self._config.ae_title
                continue
            if keyword == "InstanceAvailability":
                response.InstanceAvailability = "ONLINE"
                continue
            value = row.get(keyword)
            set_element(response, keyword, value)
            if value is not None and not _is_ascii(value):
                non_ascii = True
        response.QueryRetrieveLevel = query.level
        if non_ascii:
            response.SpecificCharacterSet = find_rows.response_charset(row)
        return response

    # ----------------------------------------------------------------- C-GET / C-MOVE
    def _retrieve_query(self, event: Any, models: dict[str, str]) -> Query:
        model = models.get(str(event.request.AffectedSOPClassUID), "STUDY")
        query = query_from_identifier(event.identifier, model)
        if query.level == "PATIENT" and model != "PATIENT":
            raise QueryError("PATIENT level is only valid in the Patient Root model")
        keys = [c for c in query.conditions if c.keyword in RETRIEVE_UNIQUE_KEYS]
        if not keys:
            raise QueryError("a retrieve needs a unique key (PatientID, StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID)")
        wildcard = next((c.keyword for c in keys if "*" in c.value or "?" in c.value), None)
        if wildcard is not None:
            raise QueryError(f"{wildcard} is a unique key: a retrieve takes values, not wildcards")
        return query

    def _read(self, location: InstanceLocation) -> tuple[bytes | Part10Stream, int]:
        """An instance to send: whole bytes, or a Part10Stream for an own copy kept as a
        blob file (the archive's `open_streamed`, when it has one)."""
        open_streamed = getattr(self._archive, "open_streamed", None)
        try:
            if open_streamed is not None:
                found: tuple[bytes | Part10Stream, int] = open_streamed(location)
                return found
            return self._archive.read(location)
        except ReadError as error:
            log.error("dicom.retrieve.unreadable sop_instance_uid=%s reason=%s", location.sop_instance_uid, error)
            raise

    def _stored(self, location: InstanceLocation) -> raw_send.StoredDataset:
        return raw_send.StoredDataset(
            sop_class_uid=location.sop_class_uid,
            sop_instance_uid=location.sop_instance_uid,
            transfer_syntax_uid=location.transfer_syntax_uid,
            load=lambda: self._read(location),
        )

    def _on_get(self, event: Any) -> Iterator[Any]:
        self._count("c_get")
        try:
            query = self._retrieve_query(event, GET_MODELS)
        except QueryError as error:
            log.warning("dicom.get.rejected reason=%s", error)
            acceptor.refuse_retrieve(event.assoc)
            yield 1
            yield _status(STATUS_IDENTIFIER_MISMATCH, str(error)), None
            return
        except Exception as error:
            log.warning("dicom.get.rejected reason=undecodable-identifier error=%s", type(error).__name__)
            acceptor.refuse_retrieve(event.assoc)
            yield 1
            yield _status(STATUS_UNABLE_TO_PROCESS, "cannot decode the identifier"), None
            return
        try:
            plan = self._archive.locate(query)
        except Exception as error:  # A bug or an unexpected failure, not the caller's identifier.
            log.error("dicom.get.failed level=%s error=%s", query.level, type(error).__name__)
            acceptor.refuse_retrieve(event.assoc)
            yield 1
            yield _status(STATUS_GET_INTERNAL_ERROR, "internal error; see the node log"), None
            return
        locations = plan.locations
        # The instances are read (and decompressed) on the reader pool up to
        # RETRIEVE_READ_AHEAD ahead of the one pynetdicom sends, never on this thread; what
        # is read ahead is reserved in the in-flight budget (RetrieveReadAhead). The first
        # one's read starts now, while pynetdicom takes the count and makes the first
        # sub-operation, not when that sub-operation asks for it (issue 10: the time to
        # the first instance).
        # Its start line is written once the first C-STORE request is out, while its
        # response is awaited (or now, with nothing to send): a log write on the way to
        # the first instance let the reader thread's first read take the GIL (0.1-0.4 ms).
        started = functools.partial(log.info, "dicom.get.start level=%s instances=%d unreachable=%d", query.level,
                                    len(locations), plan.unreachable)
        read_ahead = RetrieveReadAhead(self._reader, self._read, self.spool.budget, first_sent=started)
        read_ahead.prefetch(locations, 1)
        try:
            if not locations:
                started()
            yield len(locations) + plan.unreachable
            cancelled = CancelFlag(event)
            for dataset in read_ahead.stored(locations):
                if cancelled():
                    log.info("dicom.retrieve.cancelled instances=%d", len(locations))
                    yield STATUS_CANCEL, None
                    return
                yield STATUS_PENDING, dataset
        finally:
            read_ahead.close()  # Cancels what is still queued on the reader pool.
        if plan.unreachable:
            yield self._incomplete_retrieve(plan), None

    def _on_move(self, event: Any) -> Iterator[Any]:
        self._count("c_move")
        destination = self._config.destination(str(event.move_destination or ""))
        if destination is None:
            log.warning("dicom.move.rejected reason=unknown-destination move_destination=%s", event.move_destination)
            yield None, None
            return
        try:
            query = self._retrieve_query(event, MOVE_MODELS)
        except QueryError as error:
            log.warning("dicom.move.rejected reason=%s", error)
            yield destination.host, destination.port
            acceptor.refuse_retrieve(event.assoc)
            yield 1
            yield _status(STATUS_IDENTIFIER_MISMATCH, str(error)), None
            return
        except Exception as error:
            log.warning("dicom.move.rejected reason=undecodable-identifier error=%s", type(error).__name__)
            yield destination.host, destination.port
            acceptor.refuse_retrieve(event.assoc)
            yield 1
            yield _status(STATUS_UNABLE_TO_PROCESS, "cannot decode the identifier"), None
            return
        try:
            plan = self._archive.locate(query)
        except Exception as error:  # A bug or an unexpected failure, not the caller's identifier.
            log.error("dicom.move.failed level=%s error=%s", query.level, type(error).__name__)
            yield destination.host, destination.port
            acceptor.refuse_retrieve(event.assoc)
            yield 1
            yield _status(STATUS_MOVE_INTERNAL_ERROR, "internal error; see the node log"), None
            return
        locations = plan.locations
        contexts = _contexts_for(locations)
        # As a C-GET's: written once the first C-STORE request is out (or now, with none).
        started = functools.partial(log.info, "dicom.move.start level=%s instances=%d unreachable=%d "
                                    "move_destination=%s", query.level, len(locations), plan.unreachable,
                                    destination.ae_title)
        acceptor.expect_move_destination(event.assoc, destination.ae_title, f"{destination.host}:{destination.port}",
                                         len(locations) + plan.unreachable)
        # The first instances are read while pynetdicom sets up the sub-association.
        read_ahead = RetrieveReadAhead(self._reader, self._read, self.spool.budget, first_sent=started)
        read_ahead.prefetch(locations)
        try:
            if not locations:
                started()
            yield destination.host, destination.port, {
                "contexts": contexts,
                "evt_handlers": [(evt.EVT_CONN_OPEN, raw_send.set_nodelay)],
                "max_pdu": self._config.max_pdu_bytes,
                **self._move_tls(destination),
            }
            yield len(locations) + plan.unreachable
            cancelled = CancelFlag(event)
            for dataset in read_ahead.stored(locations):
                if cancelled():
                    log.info("dicom.retrieve.cancelled instances=%d", len(locations))
                    yield STATUS_CANCEL, None
                    return
                yield STATUS_PENDING, dataset
        finally:
            read_ahead.close()  # Cancels what is still queued on the reader pool.
        if plan.unreachable:
            yield self._incomplete_retrieve(plan), None

    def _incomplete_retrieve(self, plan: RetrievePlan) -> Dataset:
        """The final status of a C-GET/C-MOVE that could not ask part of the archive: each
        unreachable study or range is one failed sub-operation (pynetdicom adds them, as
        the remaining ones, to NumberOfFailedSuboperations). Warning 0xB000 when instances
        were found, 0xA702 when nothing could be; never Success (PS3.4 C.4.2.1.3, C.4.3.1.3)."""
        log.warning("dicom.retrieve.incomplete instances=%d unreachable_studies=%d unreachable_ranges=%d",
                    len(plan.locations), plan.shortfall.studies, plan.shortfall.ranges)
        code = STATUS_SUBOPERATIONS_WARNING if plan.locations else STATUS_RETRIEVE_OUT_OF_RESOURCES
        return _status(code, plan.shortfall.describe())


    def _move_tls(self, destination: Any) -> dict[str, Any]:
        """C-MOVE to a `+tls` destination: TLS with our certificate, the cluster CA as trust anchor."""
        if not destination.tls or self._security is None or self._security.files is None:
            return {}
        return {"tls_args": (tls.dicom_client_context(self._security.files), destination.host)}


# Instances of one C-GET/C-MOVE read and decompressed ahead of the one being sent.
RETRIEVE_READ_AHEAD = 2


class RetrieveReadAhead:
    """Reads the instances of one retrieve on `pool`, `window` ahead of the one being sent.

    Each read-ahead result (Part-10 bytes) is reserved in `budget` until its turn; a read
    that finds the budget spent drops its bytes and the instance is read again, on the
    sending thread, when its turn comes (big instances then go one at a time). A blob
    kept as a file is read ahead as an open Part10Stream (nothing decompressed yet, no
    budget). Stored bytes are passed on as read: nothing is decoded."""

    def __init__(self, pool: concurrent.futures.Executor,
                 read: Callable[[InstanceLocation], tuple[bytes | Part10Stream, int]], budget: spool.InflightBudget,
                 window: int = RETRIEVE_READ_AHEAD, first_sent: Callable[[], None] | None = None) -> None:
        self._pool = pool
        self._first_sent = first_sent  # Called once the first instance's request is out (a log line).
        self._read = read
        self._budget = budget
        self._window = window
        self._pending: list[concurrent.futures.Future[tuple[bytes | Part10Stream, int] | None]] = []
        self._futures: dict[int, concurrent.futures.Future[tuple[bytes | Part10Stream, int] | None]] = {}

    def _read_reserved(self, location: InstanceLocation) -> tuple[bytes | Part10Stream, int] | None:
        part10, offset = self._read(location)
        if not self._budget.reserve(_held_bytes(part10)):
            return None
        return part10, offset

    def _submit(self, locations: list[InstanceLocation], index: int) -> None:
        if index < len(locations) and index not in self._futures:
            future = self._pool.submit(self._read_reserved, locations[index])
            self._futures[index] = future
            self._pending.append(future)

    def prefetch(self, locations: list[InstanceLocation], count: int | None = None) -> None:
        """Start reading the first `count` instances now (default: the first and the
        window after it, as `stored(locations)` would by the first one's `sent`). C-MOVE:
        while the sub-association to the destination is being set up; C-GET: the first
        one, while pynetdicom makes its first sub-operation (the others' reads wait for
        its request to be out, so as not to take the GIL from its send)."""
        for index in range(self._window + 1 if count is None else count):
            self._submit(locations, index)

    def stored(self, locations: list[InstanceLocation]) -> Iterator[raw_send.StoredDataset]:
        """Each instance as a StoredDataset. The reads of the next `window` instances are
        started once its C-STORE request has gone out (StoredDataset.sent), so that they
        run while the sender waits for the peer's response; an instance whose read was
        not started by then (the one before it was never sent) is read when its turn comes."""
        for index, location in enumerate(locations):
            self._submit(locations, index)
            future = self._futures.pop(index)
            yield raw_send.StoredDataset(
                sop_class_uid=location.sop_class_uid,
                sop_instance_uid=location.sop_instance_uid,
                transfer_syntax_uid=location.transfer_syntax_uid,
                load=lambda future=future, location=location: self._take(future, location),  # type: ignore[misc]
                sent=lambda index=index: self._submit_ahead(locations, index),  # type: ignore[misc]
            )

    def _submit_ahead(self, locations: list[InstanceLocation], index: int) -> None:
        for ahead in range(index + 1, index + self._window + 1):
            self._submit(locations, ahead)
        first_sent, self._first_sent = self._first_sent, None
        if first_sent is not None:
            first_sent()

    def _take(self, future: "concurrent.futures.Future[tuple[bytes | Part10Stream, int] | None]",
              location: InstanceLocation) -> tuple[bytes | Part10Stream, int]:
        self._pending.remove(future)
        if not future.done():
            raw_send.flush_deferred_responses()  # A Pending C-MOVE response is not kept waiting on a read.
        result = future.result()  # Raises the read's ReadError: the sub-operation fails.
        if result is None:
            raw_send.flush_deferred_responses()
            return self._read(location)
        self._budget.release(_held_bytes(result[0]))
        return result

    def close(self) -> None:
        """Cancel the reads not started; give back the budget of those done or running.
        `first_sent` is called here if no request went out (every sub-operation failed)."""
        first_sent, self._first_sent = self._first_sent, None
        if first_sent is not None:
            first_sent()
        pending, self._pending = self._pending, []
        for future in pending:
            if not future.cancel():
                future.add_done_callback(self._release)

    def _release(self, future: "concurrent.futures.Future[tuple[bytes | Part10Stream, int] | None]") -> None:
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        if result is not None:
            self._budget.release(_held_bytes(result[0]))
            if isinstance(result[0], Part10Stream):
                result[0].close()


def _held_bytes(part10: "bytes | Part10Stream") -> int:
    """Memory a read instance holds: a Part10Stream holds an open file, not its bytes."""
    return 0 if isinstance(part10, Part10Stream) else len(part10)


class CancelFlag:
    """Sticky C-CANCEL check: pynetdicom's `event.is_cancelled` is true only once. An
    association that is gone (aborted, released) counts as cancelled too, so that a
    request waiting for rows stops as soon as its requestor has left."""

    def __init__(self, event: Any) -> None:
        self._event = event
        self._cancelled = False

    def __call__(self) -> bool:
        if not self._cancelled and (self._event.is_cancelled or not self._event.assoc.is_established or not self._event.assoc.dul.is_alive()):
            self._cancelled = True
        return self._cancelled


def _contexts_for(locations: list[InstanceLocation]) -> list[Any]:
    """Presentation contexts for a C-MOVE sub-association: each (SOP class, stored syntax),
    with the uncompressed syntaxes offered beside an uncompressed stored one."""
    pairs = list(dict.fromkeys((loc.sop_class_uid, loc.transfer_syntax_uid) for loc in locations))
    contexts = []
    for sop_class, syntax in pairs[:128]:
        if syntax in raw_send.UNCOMPRESSED:
            syntaxes = [syntax] + [s for s in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2") if s != syntax]
        else:
            syntaxes = [syntax]
        contexts.append(build_context(sop_class, syntaxes))
    if len(pairs) > 128:
        log.warning("dicom.move.contexts_truncated pairs=%d", len(pairs))
    return contexts


def query_from_identifier(identifier: Dataset, model: str) -> Query:
    """Build a Query from a C-FIND/C-GET/C-MOVE identifier. Raises QueryError."""
    return find_request(identifier, model)[0]


@functools.lru_cache(maxsize=4096)
def _keyword(tag: int) -> str:
    """DataElement.keyword of `tag` (a dictionary keyword, "" for private, unknown and
    repeater tags), without its two dictionary lookups per element and query."""
    return dictionary_keyword(tag) if dictionary_has_tag(tag) else ""


def find_request(identifier: "Dataset | request_identifier.Identifier", model: str) -> tuple[Query, list[str]]:
    """query_from_identifier's Query, and the keywords of the identifier's elements in
    order (QueryRetrieveLevel and SpecificCharacterSet included: the keys a C-FIND
    response carries), from one pass over the identifier (each pass sorts its tags and
    looks every element up: ~40 us of a C-FIND at ~14 keys). Raises QueryError."""
    if identifier is None:
        raise QueryError("no identifier")
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not level:
        raise QueryError("missing QueryRetrieveLevel")
    if level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        raise QueryError(f"unknown QueryRetrieveLevel {level[:16]!r}")
    if level == "PATIENT" and model == "STUDY":
        raise QueryError("PATIENT level is not part of the Study Root model")
    conditions: list[Condition] = []
    return_keys: list[str] = []
    requested: list[str] = []
    for element in identifier:
        keyword = _keyword(element.tag)
        if keyword:
            requested.append(keyword)
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        return_keys.append(keyword)
        if element.VR == "SQ" or element.value is None or element.value == "":
            continue
        value = element.value
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        elif isinstance(value, bytes):
            continue  # Binary values cannot be matched; returned empty.
        else:
            text = str(value)
        if text.strip() == "" or text == "*":
            continue  # Universal matching.
        conditions.append(Condition(keyword, str(element.VR), text))
    return Query(level=level, conditions=tuple(conditions), return_keys=tuple(return_keys), model=model), requested


def set_element(dataset: Dataset, keyword: str, value: Any) -> None:
    """Set `keyword` from a row value (str or list of str), or empty when unknown."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return
    vr = dictionary_VR(tag)
    if vr == "SQ":
        element = decode_sequence(value) if isinstance(value, str) else None
        if element is not None and element.tag == tag:
            dataset[tag] = element  # The stored items (issue 11: they came back empty).
        else:
            setattr(dataset, keyword, [])
        return
    if value is None or value == "" or value == []:
        dataset.add_new(tag, vr, None)
        return
    values = value if isinstance(value, list) else [value]
    converter = _BINARY_NUMBER_VRS.get(vr)
    try:
        if converter is not None:
            converted = [converter(v) for v in values]
            dataset.add_new(tag, vr, converted if len(converted) > 1 else converted[0])
        else:
            dataset.add_new(tag, vr, values if len(values) > 1 else values[0])
    except (TypeError, ValueError):
        dataset.add_new(tag, vr, None)


def _is_ascii(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_ascii(v) for v in value)
    return str(value).isascii()


def is_known_level(keyword: str) -> bool:
    return level_of(keyword) is not None
