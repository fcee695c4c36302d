"""Library log records stay one line, without tracebacks or exception texts (which can
quote patient data), unless the node runs at DEBUG."""

from __future__ import annotations

import logging
import sys

from pacsnode.node.protocol_log import OneLineLibraryRecords


def _record(name: str, msg: object, args: tuple[object, ...] | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("DOE^JOHN is not a valid value")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


def _formatted(record: logging.LogRecord, keep: bool = False) -> str:
    assert OneLineLibraryRecords(keep_tracebacks=keep).filter(record)
    return logging.Formatter("%(name)s %(message)s").format(record)


def test_exception_records_become_one_line_with_the_type_only() -> None:
    text = _formatted(_record("pynetdicom.dul", ValueError("DOE^JOHN"), exc=True))
    assert text == "pynetdicom.dul exception=ValueError"
    text = _formatted(_record("pynetdicom.fsm", "Unable to decode the received PDU data", exc=True))
    assert text == "pynetdicom.fsm Unable to decode the received PDU data exception=ValueError"


def test_grpc_core_tracebacks_become_one_line() -> None:
    """Seen in CI: a peer Query stream cancelled by its caller mid-write made grpc's core log
    a multi-line traceback in the node log (tests/integration/test_bounded.py)."""
    record = _record("grpc._cython.cygrpc", "ExecuteBatchError raised in core by servicer method [/pacsnode.v1.Data/Query]",
                     exc=True)
    text = _formatted(record)
    assert "Traceback" not in text and "\n" not in text
    assert text.startswith("grpc._cython.cygrpc ExecuteBatchError raised in core by servicer method")


def test_tracebacks_formatted_into_the_message_become_one_line() -> None:
    message = "\nTraceback (most recent call last):\n  File \"x.py\", line 1, in f\nKeyError: 'DOE^JOHN'"
    assert _formatted(_record("pynetdicom.service_class", message)) == "pynetdicom.service_class traceback exception=KeyError"
    assert _formatted(_record("pynetdicom.acse", "Association Rejected\nResult: x")) == "pynetdicom.acse Association Rejected"


def test_our_records_and_debug_are_untouched() -> None:
    ours = _record("pacsnode.node.dicom", "dicom.store.rejected reason=%s", ("x",))
    assert _formatted(ours) == "pacsnode.node.dicom dicom.store.rejected reason=x"
    kept = _formatted(_record("pynetdicom.dul", "boom", exc=True), keep=True)
    assert "Traceback" in kept
