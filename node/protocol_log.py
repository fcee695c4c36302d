"""Keep the node's log to one line per event, with no tracebacks for a peer's mistake and
no patient data, whatever the libraries underneath print.

- pynetdicom logs some protocol errors with `LOGGER.exception` (a multi-line traceback
  whose message is the exception's text). The acceptor logs its own event line for each
  peer mistake (node/acceptor.py); what pynetdicom still logs is kept as one line: the
  traceback is dropped and an exception's text is replaced by its type (unless the node
  runs at DEBUG).
- pydicom reports a malformed dataset with `warnings.warn`, which Python prints to stderr
  in two lines and which can quote element values (a name, a birth date). Warnings go to
  the `py.warnings` logger, shown at DEBUG only.
- grpc's core logs a traceback when a peer cancels a stream while the server writes to it
  (`ExecuteBatchError raised in core by servicer method`: a C-FIND abandoned across the
  cluster does that); it is kept as one line the same way.
- A thread that dies of an exception prints a traceback to stderr; it becomes one line
  `thread.crashed thread=... error=<type>` instead (at DEBUG, with the traceback).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_LIBRARY_PREFIXES = ("pynetdicom", "grpc")


class OneLineLibraryRecords(logging.Filter):
    """A handler filter: library records with an exception become one line."""

    def __init__(self, keep_tracebacks: bool) -> None:
        super().__init__()
        self._keep_tracebacks = keep_tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        if self._keep_tracebacks or not record.name.startswith(_LIBRARY_PREFIXES):
            return True
        if record.exc_info:
            error = record.exc_info[1]
            if isinstance(record.msg, BaseException):
                record.msg, record.args = "exception=%s", (type(record.msg).__name__,)
            elif error is not None:
                record.msg = f"{record.getMessage()} exception={type(error).__name__}"
                record.args = None
            record.exc_info = None
            record.exc_text = None
        elif isinstance(record.msg, BaseException):
            record.msg, record.args = "exception=%s", (type(record.msg).__name__,)
        else:
            message = record.getMessage()
            if "\n" in message:  # pynetdicom formats handler tracebacks into the message itself.
                lines = [line for line in message.splitlines() if line.strip()]
                if any(line.startswith("Traceback (most recent call last)") for line in lines):
                    record.msg, record.args = "traceback exception=%s", (lines[-1].split(":", 1)[0].strip(),)
                else:
                    record.msg, record.args = (lines[0] if lines else ""), None
        return True


def _thread_excepthook(args: Any) -> None:
    name = args.thread.name if args.thread is not None else "unknown"
    log.error("thread.crashed thread=%s error=%s", name, getattr(args.exc_type, "__name__", "unknown"),
              exc_info=(args.exc_type, args.exc_value, args.exc_traceback) if log.isEnabledFor(logging.DEBUG)
              else None)


def install(level: str) -> None:
    """Apply the rules above to the root logger's handlers (call after logging is configured)."""
    debug = level.upper() == "DEBUG"
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OneLineLibraryRecords) for f in handler.filters):
            handler.addFilter(OneLineLibraryRecords(keep_tracebacks=debug))
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    threading.excepthook = _thread_excepthook
