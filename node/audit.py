"""The audit trail: DICOM PS3.15 A.5 audit messages, in their JSON form, one per line.

Kept apart from the application log (which never holds patient data): this file is meant
to say who saw or changed which patient's studies, so it names patients and studies. It
is appended to and flushed per message; `pacsnode audit` reads it.

A message has the four parts of the A.5 schema: EventIdentification (EventID, action,
time, outcome, type codes), ActiveParticipant (the AE or certificate, its address, and
this node), AuditSourceIdentification (this node) and ParticipantObjectIdentification
(the patient, the studies, the query).

The file does not grow without end: once it holds `segment_bytes` it is closed, renamed
`audit-<UTC time>.jsonl` beside it (the time it was closed) and gzip-compressed in the
background (`zcat`/`zgrep` read it; the JSON lines compress ~30x), and a new file is
started. `read` goes through the closed segments, oldest first, then the open file.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import json
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
SEGMENT_BYTES = 16 * 1024 * 1024  # config.py's audit_log_segment_bytes default
_SEGMENT_TIME = re.compile(r"-\d{8}T\d{12}Z\d*$")  # audit-20261207T040628123456Z (a serial after Z if two share a time)

# EventID codes (DCM, PS3.16 CID 400) and their meaning.
EVENTS = {
    "application-activity": ("110100", "Application Activity"),
    "instances-accessed": ("110103", "DICOM Instances Accessed"),
    "instances-transferred": ("110104", "DICOM Instances Transferred"),
    "study-deleted": ("110105", "DICOM Study Deleted"),
    "export": ("110106", "Export"),
    "import": ("110107", "Import"),
    "query": ("110112", "Query"),
    "security-alert": ("110113", "Security Alert"),
    "user-authentication": ("110114", "User Authentication"),
}
# EventTypeCode (DCM, CID 401-405).
TYPES = {
    "application-start": ("110120", "Application Start"),
    "application-stop": ("110121", "Application Stop"),
    "login": ("110122", "Login"),
    "logout": ("110123", "Logout"),
    "node-authentication": ("110126", "Node Authentication"),
    "network-configuration": ("110128", "Network Configuration"),
    "security-configuration": ("110129", "Security Configuration"),
    "restricted-function": ("110132", "Use of Restricted Function"),
}
# EventOutcomeIndicator.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"


def _code(pair: tuple[str, str]) -> dict[str, str]:
    return {"csd-code": pair[0], "codeSystemName": "DCM", "originalText": pair[1]}


@dataclass
class Participant:
    """Who acted: an AE title (or a certificate's name) at an address."""

    user_id: str
    address: str = ""
    requestor: bool = True
    role: str = ""  # e.g. "Source", "Destination"

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"UserID": self.user_id, "UserIsRequestor": self.requestor}
        if self.address:
            entry["NetworkAccessPointID"] = self.address
            entry["NetworkAccessPointTypeCode"] = "2"  # IP address
        if self.role:
            entry["RoleIDCode"] = {"csd-code": {"Source": "110153", "Destination": "110152"}.get(self.role, ""),
                                   "codeSystemName": "DCM", "originalText": f"{self.role} Role ID"}
        return entry


@dataclass
class Subject:
    """What was acted on: the patient, studies, a query."""

    patient_id: str = ""
    study_instance_uids: Sequence[str] = ()
    instance_count: int = 0
    query: dict[str, Any] = field(default_factory=dict)
    sop_class_uid: str = ""
    description: str = ""  # For non-DICOM objects (a node id, a certificate).

    def to_json(self) -> list[dict[str, Any]]:
        objects: list[dict[str, Any]] = []
        if self.patient_id:
            objects.append({"ParticipantObjectID": self.patient_id, "ParticipantObjectTypeCode": "1",
                            "ParticipantObjectTypeCodeRole": "1",
                            "ParticipantObjectIDTypeCode": {"csd-code": "2", "originalText": "Patient Number"}})
        for uid in self.study_instance_uids:
            study: dict[str, Any] = {
                "ParticipantObjectID": uid, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
                "ParticipantObjectIDTypeCode": {"csd-code": "110180", "codeSystemName": "DCM",
                                                "originalText": "Study Instance UID"}}
            if self.instance_count:
                study["ParticipantObjectDescription"] = {"NumberOfInstances": self.instance_count}
                if self.sop_class_uid:
                    study["ParticipantObjectDescription"]["SOPClass"] = self.sop_class_uid
            objects.append(study)
        if self.query:
            text = json.dumps(self.query, sort_keys=True)
            objects.append({"ParticipantObjectID": self.sop_class_uid or "query", "ParticipantObjectTypeCode": "2",
                            "ParticipantObjectTypeCodeRole": "3",
                            "ParticipantObjectIDTypeCode": {"csd-code": "110181", "codeSystemName": "DCM",
                                                            "originalText": "SOP Class UID"},
                            "ParticipantObjectQuery": base64.b64encode(text.encode()).decode(),
                            "ParticipantObjectDetail": {"type": "QueryKeys", "value": self.query}})
        if self.description:
            objects.append({"ParticipantObjectID": self.description, "ParticipantObjectTypeCode": "2",
                            "ParticipantObjectTypeCodeRole": "13",  # Security resource
                            "ParticipantObjectIDTypeCode": {"csd-code": "12", "originalText": "URI"}})
        return objects


class AuditLog:
    """Appends audit messages to one file (thread-safe; one line, written, per message),
    starting a new file every `segment_bytes` (0: never) and compressing the closed one."""

    def __init__(self, path: Path | None, source_id: str, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.path = path
        self.source_id = source_id
        self.segment_bytes = segment_bytes
        # Held only around Python bookkeeping, never across the write itself: a lock held
        # through a syscall is held until its thread gets the GIL back, and with many
        # storing threads that made every audited instance wait in line (STOW-RS ran at
        # ~250 instances/s, the rate of one lock handoff per GIL switch interval).
        self._state = threading.Condition()
        self._fd: int | None = None
        self._writers = 0  # write_line calls between taking the descriptor and writing.
        self._size = 0  # Bytes in the open file.
        self._rotating = False
        self.written = 0
        self.failed = 0
        self.segments_closed = 0
        self.forward: Callable[[str], None] | None = None  # A syslog receiver too (node/audit_syslog.py).
        self._compressor: _SegmentCompressor | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: each message is one write() at the end of the file, whole, whatever
            # other threads append at the same time; unbuffered, so a line is in the file
            # once write_line returns.
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            self._size = os.fstat(self._fd).st_size
            self._compressor = _SegmentCompressor()
            # Segments closed but not compressed when the node last stopped (or died).
            for segment in _uncompressed_segments(path):
                self._compressor.submit(segment)

    @property
    def enabled(self) -> bool:
        return self._fd is not None or self.forward is not None

    def record(self, event: str, *, action: str = "E", outcome: str = SUCCESS, event_type: str = "",
               participants: Iterable[Participant] = (), subject: Subject | None = None,
               description: str = "") -> None:
        """Append one message (and queue it for the syslog receiver, when there is one).
        A failure to write is logged and counted, never raised."""
        if self._fd is None and self.forward is None:
            return
        identification: dict[str, Any] = {
            "EventID": _code(EVENTS[event]),
            "EventActionCode": action,
            "EventDateTime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": outcome,
        }
        if event_type:
            identification["EventTypeCode"] = [_code(TYPES[event_type])]
        if description:
            identification["EventOutcomeDescription"] = description[:200]
        message = {
            "EventIdentification": identification,
            "ActiveParticipant": [p.to_json() for p in participants]
            + [{"UserID": self.source_id, "UserIsRequestor": False, "AlternativeUserID": "pacsnode"}],
            "AuditSourceIdentification": {"AuditSourceID": self.source_id},
            "ParticipantObjectIdentification": subject.to_json() if subject else [],
        }
        self.write_line(json.dumps(message, separators=(",", ":")) + "\n")

    def write_line(self, line: str) -> None:
        """Append one finished message line (record's, or a DICOM worker's: node/workers.py)."""
        if self.forward is not None:
            self.forward(line)
        with self._state:
            if self._rotating:
                self._state.wait_for(lambda: not self._rotating)
            fd = self._fd
            if fd is None:
                return
            self._writers += 1  # close() and _rotate() wait for this write before closing fd.
        failure: OSError | ValueError | None = None
        data = b""
        try:
            data = line.encode("utf-8")
            rest = data
            while rest:
                rest = rest[os.write(fd, rest):]
        except (OSError, ValueError) as error:  # ValueError: a line that is not valid Unicode.
            failure = error
        finally:
            with self._state:
                self._writers -= 1
                if failure is None:
                    self.written += 1
                    self._size += len(data)
                else:
                    self.failed += 1
                rotate = (failure is None and self.segment_bytes > 0 and self._size >= self.segment_bytes
                          and not self._rotating and self._fd is not None)
                if rotate:
                    self._rotating = True
                self._state.notify_all()
        if failure is not None:
            log.error("audit.write_failed error=%s", failure)
        if rotate:
            self._rotate()

    def _rotate(self) -> None:
        """Close the full file as a segment and open a new one. Writers wait meanwhile (a
        rename and an open: well under a millisecond), so no line goes to neither file."""
        assert self.path is not None
        segment: Path | None = None
        try:
            with self._state:
                self._state.wait_for(lambda: self._writers == 0)
                fd = self._fd
                if fd is None:
                    return  # Closed meanwhile.
                segment = _segment_path(self.path)
                try:
                    os.rename(self.path, segment)
                    try:
                        new_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                    except OSError:
                        os.rename(segment, self.path)  # Back to the one file we can write.
                        raise
                except OSError as error:
                    # Keep appending to the file we have; try again a segment's bytes later.
                    log.error("audit.rotate_failed error=%s", error)
                    segment = None
                    self._size = 0
                    return
                self._fd, self._size = new_fd, 0
                self.segments_closed += 1
                os.close(fd)
        finally:
            with self._state:
                self._rotating = False
                self._state.notify_all()
        if segment is not None and self._compressor is not None:
            log.info("audit.segment.closed file=%s", segment.name)
            self._compressor.submit(segment)

    def close(self, compress_wait_s: float = 10.0) -> None:
        with self._state:
            fd, self._fd = self._fd, None
            self._state.wait_for(lambda: self._writers == 0 and not self._rotating)
        if fd is not None:
            os.close(fd)
        if self._compressor is not None:
            # A segment left uncompressed is compressed at the next start.
            self._compressor.close(compress_wait_s)


def _segment_path(path: Path) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    candidate = path.with_name(f"{path.stem}-{stamp}{path.suffix}")
    serial = 0
    while candidate.exists() or candidate.with_name(candidate.name + ".gz").exists():
        serial += 1  # Two rotations within one microsecond (a clock step back): never overwrite.
        candidate = path.with_name(f"{path.stem}-{stamp}{serial}{path.suffix}")
    return candidate


def segments(path: Path) -> list[Path]:
    """The closed segments of the audit file at `path`, oldest first: `STEM-<time>SUFFIX`,
    compressed (`.gz`) or not yet; a segment both compressed and not (a crash between the
    compressed file's rename and the plain one's removal) is listed once, compressed."""
    found: dict[str, Path] = {}
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in names:
        plain = name[:-3] if name.endswith(".gz") else name
        if not (plain.startswith(path.stem + "-") and plain.endswith(path.suffix)):
            continue
        middle = plain[:len(plain) - len(path.suffix)] if path.suffix else plain
        if not _SEGMENT_TIME.search(middle) or not middle.startswith(path.stem + "-"):
            continue
        if name.endswith(".gz") or plain not in found:
            found[plain] = path.parent / name
    return [found[key] for key in sorted(found)]


def _uncompressed_segments(path: Path) -> list[Path]:
    """Plain segments a crash left (compressed or not yet), after removing half-written
    compressed files (`.gz.tmp`)."""
    left: list[Path] = []
    for name in sorted(os.listdir(path.parent)):
        if not name.startswith(path.stem + "-"):
            continue
        if name.endswith(".gz.tmp"):
            (path.parent / name).unlink(missing_ok=True)
        elif name.endswith(path.suffix) and _SEGMENT_TIME.search(name[:len(name) - len(path.suffix)]):
            left.append(path.parent / name)
    return left


def segment_closed_at(segment: Path) -> datetime.datetime:
    """When a segment was closed (from its name): every message in it is older."""
    plain = segment.name[:-3] if segment.name.endswith(".gz") else segment.name
    stamp = plain.rpartition("-")[2][:22]  # 20261207T040628123456Z
    return datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=datetime.timezone.utc)


class _SegmentCompressor:
    """One background thread that gzips closed segments: FILE -> FILE.gz.tmp (fsync) ->
    FILE.gz (rename, directory fsync) -> FILE removed. A crash at any step leaves every
    line readable, in the plain file or the complete .gz; the next start finishes it."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, segment: Path) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-compress", daemon=True)
                self._thread.start()
        self._queue.put(segment)

    def close(self, wait_s: float) -> None:
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(wait_s)

    def _run(self) -> None:
        while True:
            segment = self._queue.get()
            if segment is None:
                return
            try:
                compress_segment(segment)
            except OSError as error:
                log.error("audit.compress_failed file=%s error=%s", segment.name, error)


def compress_segment(segment: Path) -> Path:
    """gzip one closed segment in place (see _SegmentCompressor); returns the .gz path."""
    target = segment.with_name(segment.name + ".gz")
    if target.exists():
        segment.unlink(missing_ok=True)  # Compressed before a crash; only the removal was left.
        return target
    temp = segment.with_name(segment.name + ".gz.tmp")
    with open(segment, "rb") as source, open(temp, "wb") as raw:
        with gzip.GzipFile(filename=segment.name, mode="wb", fileobj=raw, compresslevel=6) as packed:
            while chunk := source.read(1024 * 1024):
                packed.write(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    os.rename(temp, target)
    directory = os.open(segment.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    segment.unlink()
    return target


# --------------------------------------------------------------------------- reading


def parse_since(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """`2025-01-31`, `2025-01-31T10:00`, an ISO time with zone, or a duration ago (`90m`, `2h`, `7d`)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].isdigit():
        return now - datetime.timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since wants an ISO date/time or a duration such as 2h or 7d, got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def read(path: Path, since: datetime.datetime | None = None) -> Iterator[dict[str, Any]]:
    """Every message of the audit trail at `path`: its closed segments (`segments`), oldest
    first, then the file itself; with `since`, segments closed before it are skipped (all
    their messages are older). A path that is itself a segment (plain or .gz) is read alone."""
    if path.name.endswith(".gz") or _SEGMENT_TIME.search(path.stem):
        yield from _read_file(path)
        return
    for segment in segments(path):
        if since is None or segment_closed_at(segment) >= since:
            yield from _read_file(segment)
    if path.exists() or not segments(path):
        yield from _read_file(path)


def _read_file(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue  # A line cut short by a crash.


def patients_of(message: dict[str, Any]) -> set[str]:
    return {o["ParticipantObjectID"] for o in message.get("ParticipantObjectIdentification", [])
            if o.get("ParticipantObjectTypeCode") == "1"}


def studies_of(message: dict[str, Any]) -> set[str]:
    return {o["ParticipantObjectID"] for o in message.get("ParticipantObjectIdentification", [])
            if o.get("ParticipantObjectIDTypeCode", {}).get("csd-code") == "110180"}


def select(messages: Iterable[dict[str, Any]], *, since: datetime.datetime | None = None,
           patient_id: str = "", event: str = "") -> list[dict[str, Any]]:
    """Messages at or after `since`, about `patient_id` (directly, or about a study the log
    ties to that patient elsewhere: a retrieve by StudyInstanceUID names no patient)."""
    chosen = list(messages)
    if since is not None:
        chosen = [m for m in chosen if _time(m) >= since]
    if event:
        chosen = [m for m in chosen if m["EventIdentification"]["EventID"]["originalText"].lower().replace(" ", "-")
                  == event or EVENTS.get(event, ("", ""))[0] == m["EventIdentification"]["EventID"]["csd-code"]]
    if patient_id:
        studies: set[str] = set()
        for message in chosen:
            if patient_id in patients_of(message):
                studies |= studies_of(message)
        chosen = [m for m in chosen if patient_id in patients_of(m) or studies_of(m) & studies]
    return chosen


def _time(message: dict[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(message["EventIdentification"]["EventDateTime"])


def render(messages: Sequence[dict[str, Any]]) -> str:
    rows = [("TIME", "EVENT", "ACTION", "OUTCOME", "USER", "ADDRESS", "PATIENT", "STUDIES", "DETAIL")]
    for message in messages:
        ident = message["EventIdentification"]
        requestor: dict[str, Any] = next(
            (p for p in message.get("ActiveParticipant", []) if p.get("UserIsRequestor")), {})
        studies = sorted(studies_of(message))
        types = ",".join(t["originalText"] for t in ident.get("EventTypeCode", []))
        detail = " ".join(x for x in (types, ident.get("EventOutcomeDescription", "")) if x)
        rows.append((ident["EventDateTime"], ident["EventID"]["originalText"], ident["EventActionCode"],
                     ident["EventOutcomeIndicator"], requestor.get("UserID", ""),
                     requestor.get("NetworkAccessPointID", ""), ",".join(sorted(patients_of(message))),
                     (studies[0] + (f" +{len(studies) - 1}" if len(studies) > 1 else "")) if studies else "",
                     detail))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def record_modify(audit: "AuditLog", participant: Participant, *, study_instance_uid: str, level: str,
                  status: str, studies: int, attributes: Sequence[str], via: str) -> None:
    """A correction asked of this node (`pacsnode modify`: one study; `merge-patient`: every
    study of a patient): DICOM Instances Accessed with action U (PS3.15 A.5.3.8). The
    attribute names are recorded, never their values."""
    audit.record("instances-accessed", action="U", outcome=SUCCESS if status == "modified" else MINOR_FAILURE,
                 participants=[participant],
                 subject=Subject(study_instance_uids=[study_instance_uid] if study_instance_uid else []),
                 description=f"{via} modify {level}: {status}, {studies} studies, attributes "
                             + ",".join(attributes))


def record_delete(audit: "AuditLog", participant: Participant, *, study_instance_uid: str, level: str,
                  status: str, instances: int, via: str) -> None:
    """A delete asked of this node (`pacsnode delete`, DICOMweb DELETE): a study as DICOM Study
    Deleted, a series or an instance as DICOM Instances Accessed with action D (PS3.15 A.5.3)."""
    audit.record("study-deleted" if level == "study" else "instances-accessed", action="D",
                 outcome=SUCCESS if status == "deleted" else MINOR_FAILURE, participants=[participant],
                 subject=Subject(study_instance_uids=[study_instance_uid] if study_instance_uid else [],
                                 instance_count=instances),
                 description=f"{via} delete {level}: {status}, {instances} instances")
