"""A call's recording: kept from the PBX's ``record`` event, attached after the finish.

Protocol §8.6: ``attachRecord`` needs a successful ``finish`` first, and Bitrix24's cloud
cannot download from a PBX on the customer's private network, so the app downloads the
file itself and uploads it. The steps, and where each runs:

- the ``record`` event (handlers.on_record, inside the inbox row's transaction) keeps the
  first recording on the call: its URL and voicemail flag (:func:`keep`); later ones are
  duplicates and change nothing;
- :func:`when_ready` decides, from the event handler or from finish's outcome handler:
  the recording waits while the finish has not ended; it is attached only after register's
  ``CALL_ID`` is bound (no collision) and ``finish`` ended done, and only for an answered
  call or a voicemail; otherwise it is skipped with the reason. When it may go, the call is
  marked queued and a job for the recordings actor (workers/telephony.py) is sent once the
  transaction commits;
- the actor (:func:`run`) claims the job, downloads the file from the PBX with no
  transaction open (httpx, a whole-download timeout, a size cap), picks a ``FILENAME``
  with a .mp3/.wav extension (:func:`filename_for`), then attaches it: a file up to
  ``TELEPHONY_RECORD_BASE64_MAX`` bytes as base64 ``FILE_CONTENT`` through the outbox
  (BULK, the call's ordering key; its outcome comes back to handlers.record_attached), a
  larger one by the two-step upload URL (app/dispatcher/upload.py), so its bytes never
  reach the outbox's table;
- a failed download (or upload) is tried again after ``TELEPHONY_RECORD_RETRY_SECONDS``,
  doubling, up to ``TELEPHONY_RECORD_ATTEMPTS`` tries; then the call shows why
  (``record_state`` failed, ``record_error``). A file that is not mp3/wav, or is over
  ``TELEPHONY_RECORD_MAX_BYTES``, is refused at once;
- :func:`sweep` (periodic) queues again the jobs whose message was lost, and the claims of
  workers that stopped mid-job.

The URL is the customer's PBX and may well be a private address: it is not blocked (only
http and https are fetched); app/ingress/PBX_EVENTS.md says what that trusts.
"""

from __future__ import annotations

import base64
import enum
import logging
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import httpx
from flask import current_app
from sqlalchemy import CursorResult, event, select, update
from sqlalchemy.orm import Session

from app import queue
from app.bitrix import errors
from app.dispatcher import Outcome, Priority, submit
from app.dispatcher.policy import Verdict, classify
from app.dispatcher.upload import upload_file
from app.extensions import db
from app.telephony.machine import State as CallState
from app.telephony.models import Call
from app.tenants.models import Portal, aware, utcnow
from app.tenants.status import PortalUnavailable

log = logging.getLogger(__name__)

ACTOR = "telephony_attach_record"  # workers/telephony.py declares it by this name
ATTACH = "telephony.externalCall.attachRecord"
ATTACHED = "telephony.attach_record"  # the outcome handler tag (handlers.record_attached)
QUEUE = "recordings"  # downloads may take a minute: they wait on no other queue's work
LEASE_EXTRA = 300.0  # seconds a claim outlives the download timeout (the upload comes after)
_JOBS = "b24relay_record_jobs"  # session.info key: jobs to send after the commit
USER_AGENT = "b24relay-recordings/0.1"
# Content types of the two formats attachRecord takes (§8.6: wav and mp3 only).
TYPES = {"audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mpeg3": "mp3", "audio/x-mpeg": "mp3",
         "audio/x-mpeg-3": "mp3", "audio/mpa": "mp3", "audio/wav": "wav", "audio/x-wav": "wav",
         "audio/wave": "wav", "audio/vnd.wave": "wav"}
MIME = {"mp3": "audio/mpeg", "wav": "audio/wav"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_DISPOSITION = re.compile(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", re.I)


class RecordState(enum.StrEnum):
    """Where a call's recording stands (``calls.record_state``; None: no record event)."""

    WAITING = "waiting"    # for the finish (or for its outcome)
    QUEUED = "queued"      # a job is due at record_next_at
    WORKING = "working"    # a worker has it until record_next_at
    SENT = "sent"          # attachRecord is in the outbox
    ATTACHED = "attached"
    FAILED = "failed"      # tried and given up: record_error says why
    SKIPPED = "skipped"    # never to be attached (unanswered, collision, dead finish)


class Refused(Exception):
    """The file can never be attached: not mp3/wav, too large, not an http(s) URL."""


class DownloadFailed(Exception):
    """This try failed; another may work (the PBX down, a 404 before the file is written)."""


# ------------------------------------------------------------ the event, and when it may go


def keep(row: Call, event_: dict[str, Any]) -> None:
    """A ``record`` event: keep the call's first recording, then see whether it may go."""
    if row.record_state is not None:
        log.info("call %s: a second record event changes nothing", row.id)
        return
    row.record_url = str(event_["url"])
    # on the record event, or said already by the call's end (PBX_EVENTS.md: either)
    row.record_voicemail = bool(row.record_voicemail) or event_.get("voicemail") is True
    row.record_state = RecordState.WAITING.value
    row.record_attempts = 0
    when_ready(row)


def when_ready(row: Call) -> None:
    """Queue a waiting recording once the call's finish is done, or skip it for good."""
    if row.record_state != RecordState.WAITING.value:
        return
    why, final = _blocked(row)
    if why is None:
        row.record_error = None
        queue_job(row, 0.0)
    elif final:
        row.record_state, row.record_error = RecordState.SKIPPED.value, why
    else:
        row.record_error = why  # still waiting; shown by ``flask calls show``


def _blocked(row: Call) -> tuple[str | None, bool]:
    """(why the recording cannot go now, or None; whether that is for good)."""
    if row.collision:
        return "not attached: the call's CALL_ID is bound to another PBX call (collision)", True
    if row.state in (CallState.SKIPPED.value, CallState.UNROUTABLE.value):
        return f"not attached: the call was not registered ({row.state})", True
    if row.register_error is not None:
        return f"not attached: register failed: {row.register_error}"[:2000], True
    if row.finish_outcome == "dead":
        return f"not attached: finish failed: {row.finish_error}"[:2000], True
    if row.finish_outcome is None and row.finish_error is not None:
        return f"not attached: {row.finish_error}"[:2000], True  # never finished from here
    if row.finish_outcome != "done":
        if row.finish_outcome == "unknown":
            return "waits: finish's outcome is unknown", False
        return "waits for the call's finish", False
    if row.end_status != "answered" and not row.record_voicemail:
        return (f"not attached: the call was not answered ({row.end_status}) and the "
                "recording is not a voicemail"), True
    return None, False


def queue_job(row: Call, delay: float) -> None:
    """Mark the recording queued (due in ``delay`` seconds); its job goes after the commit."""
    row.record_state = RecordState.QUEUED.value
    row.record_next_at = utcnow() + timedelta(seconds=delay)
    _send_after_commit(db.session(), row.id, delay)


def _send_after_commit(session: Session, call_id: int, delay: float) -> None:
    session.info.setdefault(_JOBS, {})[call_id] = delay


@event.listens_for(Session, "after_commit")
def _send_jobs(session: Session) -> None:
    jobs = session.info.pop(_JOBS, None)
    for call_id, delay in (jobs or {}).items():
        try:
            queue.enqueue(ACTOR, call_id, queue_name=QUEUE, delay_ms=int(delay * 1000) or None)
        except Exception as exc:  # noqa: BLE001 - the sweep sends it; the commit stands
            log.warning("call %s: recording job not sent (%s); the sweep will", call_id, exc)


@event.listens_for(Session, "after_rollback")
def _forget_jobs(session: Session) -> None:
    session.info.pop(_JOBS, None)


# ------------------------------------------------------------ the job


@dataclass(frozen=True)
class Job:
    """What a claimed recording job needs, read before the download (no row held)."""

    call_id: int
    portal_id: int
    pbx_call_id: str
    b24_call_id: str
    url: str
    attempt: int


def run(call_id: int) -> None:
    """The recordings actor's work: claim the job, download, attach (or retry, or give up)."""
    job = _claim(call_id)
    if job is None:
        return
    cfg = current_app.config
    try:
        data, content_type, name_hint = download(job.url, int(cfg["TELEPHONY_RECORD_MAX_BYTES"]),
                                                 float(cfg["TELEPHONY_RECORD_TIMEOUT"]))
        filename = filename_for(job.url, content_type, name_hint, data, job.pbx_call_id)
    except Refused as exc:
        _finish_job(job, RecordState.FAILED, f"refused: {exc}")
        return
    except DownloadFailed as exc:
        _retry(job, f"download: {exc}")
        return
    if len(data) <= int(cfg["TELEPHONY_RECORD_BASE64_MAX"]):
        _attach_small(job, filename, data)
    else:
        _attach_large(job, filename, data)


def _claim(call_id: int) -> Job | None:
    """Take a due queued job (one attempt more), or None: not queued, not due, or taken."""
    now = utcnow()
    lease = float(current_app.config["TELEPHONY_RECORD_TIMEOUT"]) + LEASE_EXTRA
    claimed = cast(CursorResult, db.session.execute(
        update(Call).where(Call.id == call_id, Call.record_state == RecordState.QUEUED.value,
                           Call.record_next_at <= now + timedelta(seconds=1))
        .values(record_state=RecordState.WORKING.value,
                record_next_at=now + timedelta(seconds=lease),
                record_attempts=Call.record_attempts + 1)
        .execution_options(synchronize_session=False))).rowcount
    if not claimed:
        db.session.rollback()
        return None
    row = db.session.execute(select(Call.portal_id, Call.pbx_call_id, Call.b24_call_id,
                                    Call.record_url, Call.record_attempts)
                             .where(Call.id == call_id)).one()
    db.session.commit()  # nothing is held while the file comes
    return Job(call_id, row.portal_id, row.pbx_call_id, str(row.b24_call_id),
               str(row.record_url), int(row.record_attempts))


def _working(job: Job) -> Call | None:
    """The call's row, locked, while this job still holds it (else None, rolled back)."""
    touched = cast(CursorResult, db.session.execute(
        update(Call).where(Call.id == job.call_id,
                           Call.record_state == RecordState.WORKING.value,
                           Call.record_attempts == job.attempt)
        .values(updated_at=utcnow()).execution_options(synchronize_session=False))).rowcount
    if not touched:
        db.session.rollback()
        log.info("call %s: the recording job was taken over; this one stops", job.call_id)
        return None
    return db.session.scalars(select(Call).where(Call.id == job.call_id)
                              .execution_options(populate_existing=True)).one()


def _finish_job(job: Job, state: RecordState, error: str | None,
                file_id: int | None = None) -> None:
    row = _working(job)
    if row is None:
        return
    row.record_state, row.record_error, row.record_next_at = state.value, error, None
    row.record_file_id = file_id
    db.session.commit()
    if error:
        log.warning("call %s: recording %s: %s", job.call_id, state.value, error)


def _retry(job: Job, error: str) -> None:
    """Try again later, or give up after the last attempt, keeping the reason."""
    cfg = current_app.config
    attempts = int(cfg["TELEPHONY_RECORD_ATTEMPTS"])
    if job.attempt >= attempts:
        _finish_job(job, RecordState.FAILED, f"gave up after {job.attempt} attempt(s): {error}")
        return
    row = _working(job)
    if row is None:
        return
    row.record_error = f"attempt {job.attempt} of {attempts} failed: {error}"[:2000]
    queue_job(row, float(cfg["TELEPHONY_RECORD_RETRY_SECONDS"]) * 2 ** (job.attempt - 1))
    db.session.commit()


def _attach_small(job: Job, filename: str, data: bytes) -> None:
    """Base64 in attachRecord's params, through the outbox (BULK, the call's key)."""
    row = _working(job)
    if row is None:
        return
    submit(job.portal_id, ATTACH,
           {"CALL_ID": job.b24_call_id, "FILENAME": filename,
            "FILE_CONTENT": base64.b64encode(data).decode("ascii")},
           key=f"call:{job.call_id}", priority=Priority.BULK, handler=ATTACHED,
           context={"call": job.call_id})
    row.record_state, row.record_next_at = RecordState.SENT.value, None
    db.session.commit()


def _attach_large(job: Job, filename: str, data: bytes) -> None:
    """FILENAME alone gives an upload URL; the file is posted there (direct, now)."""
    portal = db.session.get(Portal, job.portal_id)
    if portal is None:
        db.session.rollback()
        return
    ext = filename.rsplit(".", 1)[-1]
    try:
        result = upload_file(portal, ATTACH, {"CALL_ID": job.b24_call_id, "FILENAME": filename},
                             filename, data, MIME[ext])
    except errors.BitrixError as exc:
        db.session.rollback()
        if classify(exc) is Verdict.PERMANENT:
            _finish_job(job, RecordState.FAILED, f"attachRecord (upload URL) failed: {exc}")
        else:
            _retry(job, f"attachRecord (upload URL): {exc}")
        return
    except PortalUnavailable as exc:
        db.session.rollback()
        _retry(job, f"portal unavailable: {exc}")
        return
    db.session.commit()  # what the direct path wrote (activity, a refreshed chain)
    _finish_job(job, RecordState.ATTACHED, None, _file_id(result))


def _file_id(result: Any) -> int | None:
    value = str(result.get("FILE_ID") or "") if isinstance(result, dict) else ""
    return int(value) if value.isdigit() else None


def attached(row: Call, outcome: Outcome) -> None:
    """attachRecord's outcome (the base64 path): attached, or failed with the reason."""
    if row.record_state != RecordState.SENT.value:
        return  # settled before, or the job was queued again since
    if outcome.ok:
        row.record_state, row.record_error = RecordState.ATTACHED.value, None
        row.record_file_id = _file_id(outcome.result)
    else:
        row.record_state = RecordState.FAILED.value
        row.record_error = f"attachRecord {outcome.kind.value}: {outcome.reason}"[:2000]


def sweep() -> int:
    """Queue again the jobs whose message was lost and the claims of stopped workers; the
    number sent."""
    now = utcnow()
    grace = timedelta(seconds=float(current_app.config["TELEPHONY_RECORD_SWEEP_INTERVAL"]))
    db.session.execute(
        update(Call).where(Call.record_state == RecordState.WORKING.value,
                           Call.record_next_at < now)
        .values(record_state=RecordState.QUEUED.value, record_next_at=now)
        .execution_options(synchronize_session=False))
    due = db.session.scalars(select(Call.id).where(
        Call.record_state == RecordState.QUEUED.value,
        Call.record_next_at <= now - grace).limit(1000)).all()
    for call_id in due:
        _send_after_commit(db.session(), call_id, 0.0)
    db.session.commit()
    return len(due)


# ------------------------------------------------------------ download and name


def download(url: str, max_bytes: int, timeout: float) -> tuple[bytes, str, str]:
    """The file at ``url``: (bytes, content type, a file name from Content-Disposition or "").

    Only http(s); redirects are followed. Over ``max_bytes`` (by Content-Length or as it
    comes) is refused; anything else that goes wrong (a status other than 200, a transport
    error, the whole ``timeout`` passed, an empty body) fails this try only.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise Refused(f"not an http(s) URL: {url[:200]}")
    deadline = time.monotonic() + timeout
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=True,
                          headers={"User-Agent": USER_AGENT}) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise DownloadFailed(f"the PBX answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise Refused(f"the file is {int(declared)} bytes, over "
                              f"TELEPHONY_RECORD_MAX_BYTES ({max_bytes})")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise Refused(f"the file is over TELEPHONY_RECORD_MAX_BYTES ({max_bytes})")
                if time.monotonic() > deadline:
                    raise DownloadFailed(f"not downloaded within {timeout:g} s")
                chunks.append(chunk)
            content_type = response.headers.get("content-type", "")
            disposition = response.headers.get("content-disposition", "")
    except httpx.HTTPError as exc:
        raise DownloadFailed(f"{type(exc).__name__}: {exc}"[:500]) from exc
    data = b"".join(chunks)
    if not data:
        raise DownloadFailed("the PBX sent an empty file")
    found = _DISPOSITION.search(disposition)
    return data, content_type, unquote(found.group(1)) if found else ""


def sniff(data: bytes) -> str | None:
    """mp3 or wav by the file's first bytes, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        return "mp3"
    return None


def filename_for(url: str, content_type: str, name_hint: str, data: bytes,
                 pbx_call_id: str) -> str:
    """attachRecord's FILENAME, always ending in .mp3 or .wav (§8.6): the extension of the
    URL's path (or of the answer's file name), else of the Content-Type, else of the
    file's own first bytes; any other format is refused, saying what it was."""
    mime = content_type.split(";")[0].strip().lower()
    for name in (unquote(urlsplit(url).path.rsplit("/", 1)[-1]), name_hint):
        stem, dot, ext = name.rpartition(".")
        if dot and ext.lower() in MIME:
            return _safe(stem, pbx_call_id) + "." + ext.lower()
    ext_found = TYPES.get(mime) or sniff(data)
    if ext_found is None:
        path_ext = urlsplit(url).path.rpartition(".")[2] if "." in urlsplit(url).path else ""
        raise Refused("not a mp3 or wav recording (Content-Type "
                      f"{mime or 'none'}, URL path extension {path_ext[:10] or 'none'}); "
                      "attachRecord takes mp3 and wav only")
    before, _, after = unquote(urlsplit(url).path.rsplit("/", 1)[-1]).rpartition(".")
    return _safe(before or after, pbx_call_id) + "." + ext_found


def _safe(stem: str, fallback: str) -> str:
    """A file name stem of safe characters (the PBX call id when nothing is left)."""
    cleaned = _SAFE_NAME.sub("_", stem).strip("._")[:100]
    return cleaned or _SAFE_NAME.sub("_", fallback).strip("._")[:100] or "record"


def due_at(row: Call) -> str:
    """When a queued recording's next try is due (for ``flask calls show``)."""
    moment = aware(row.record_next_at)
    return moment.isoformat(timespec="seconds") if moment else "-"
