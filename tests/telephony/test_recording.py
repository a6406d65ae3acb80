"""Recordings end to end (issue 22 point 3, protocol §8.6): PBX events posted to intake, a
real worker (inbox handlers, the dispatcher, the settle and recordings actors), the files
served by a small HTTP server on 127.0.0.1 (the customer's PBX) and a sandbox portal.
Checked from the portal's command log and call history by EXTERNAL_CALL_ID."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select

from app.extensions import db
from app.ingress import auth
from app.telephony import recording
from app.telephony.cli import describe
from app.telephony.models import Call
from tests.conftest import StubHandler, StubServer, wait_for
from tests.telephony.conftest import (
    dispatching_worker,
    employees,
    pbx,
    poster,
    sandbox_line,
)
from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET, oauth_app  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(180)

USERS = {"101": 1, "102": 2, "103": 3}
BASE64_MAX = 4096  # the worker's TELEPHONY_RECORD_BASE64_MAX here
ATTEMPTS = 3
SMALL = b"ID3" + bytes(range(256)) * 4        # 1,027 bytes: base64 through the outbox
LARGE = b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(20_000)  # over BASE64_MAX: the upload URL
ATTACH = "telephony.externalcall.attachrecord"
FINISH = "telephony.externalcall.finish"
FILES: dict[str, tuple[int, str, bytes]] = {  # path: status, Content-Type, body
    "/rec/small.mp3": (200, "audio/mpeg", SMALL),
    "/rec/long.wav": (200, "audio/x-wav", LARGE),
    "/rec/get": (200, "audio/mpeg", SMALL),   # no extension in the path: from the type
    "/rec/vm.mp3": (200, "audio/mpeg", SMALL),
    "/rec/missed.mp3": (200, "audio/mpeg", SMALL),
    "/rec/broken.mp3": (503, "text/plain", b"busy"),
    "/rec/talk.ogg": (200, "audio/ogg", b"OggS" + bytes(100)),
}


class PbxFiles(StubHandler):
    """The PBX's recordings; counts the requests per path."""

    hits: dict[str, int] = {}
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        path = self.path.split("?")[0]
        with self.lock:
            self.hits[path] = self.hits.get(path, 0) + 1
        status, kind, body = FILES.get(path, (404, "text/plain", b"no such recording"))
        self.reply(status, body, kind)


@pytest.fixture
def pbx_files() -> Any:
    PbxFiles.hits = {}
    server = StubServer(PbxFiles)
    yield server
    server.close()


@pytest.fixture
def line(oauth_app: Any, sandbox: Any, client: Any,  # noqa: F811 - the imported fixture
         start_worker: Any, redis_client: Any) -> dict[str, Any]:
    """A sandbox portal with three employees on extensions 101-103, its Portal row and map,
    a PBX API key, and a worker with small recording limits."""
    portal, info = sandbox_line(sandbox, employees(USERS), USERS)
    key = auth.issue_api_key(portal)
    dispatching_worker(start_worker, redis_client,
                       TELEPHONY_RECORD_BASE64_MAX=str(BASE64_MAX),
                       TELEPHONY_RECORD_ATTEMPTS=str(ATTEMPTS),
                       TELEPHONY_RECORD_RETRY_SECONDS="0.3")
    return {"member_id": info["member_id"], "portal_id": portal.id,
            "post": poster(client, key)}


def call_row(line: dict[str, Any], pbx_call_id: str) -> Call | None:
    db.session.expire_all()
    return db.session.scalars(select(Call).where(Call.portal_id == line["portal_id"],
                                                 Call.pbx_call_id == pbx_call_id)).first()


def settled(line: dict[str, Any], pbx_call_id: str) -> Call | None:
    """The call once its recording reached an end state (attached, failed or skipped)."""
    row = call_row(line, pbx_call_id)
    return row if row is not None and row.record_state in ("attached", "failed",
                                                           "skipped") else None


def answered(call_id: str, url: str, **record: Any) -> list[dict[str, Any]]:
    """start, answer, end (answered) and a record of one call, in that order."""
    return [pbx(call_id, "start", 0, direction="in", phone="+4930123456",
                extensions=["101", "102"]),
            pbx(call_id, "answer", 3, extension="101"),
            pbx(call_id, "end", 40, status="answered", duration=37),
            pbx(call_id, "record", 41, url=url, **record)]


def attaches(sandbox: Any, member_id: str, external: str) -> list[dict[str, Any]]:
    """attachRecord and upload commands the portal ran for this call."""
    return [e for e in sandbox.log(member_id)
            if e["method"] in (ATTACH, "upload") and e.get("external_call_id") == external]


def finish_seq(sandbox: Any, member_id: str, external: str) -> int:
    [finish] = [e for e in sandbox.log(member_id, method=FINISH)
                if e.get("external_call_id") == external and e["error"] is None]
    return int(finish["seq"])


def test_a_recording_waits_for_the_finish_and_is_attached_once(line, sandbox, pbx_files):
    """Record before the end (and again, twice): one attach, after the finish, base64; a
    record after the finish: attached at once, a large file by the upload URL."""
    start, answer, end, record = answered("early-1", pbx_files.url + "/rec/small.mp3")
    line["post"](start, answer, record,
                 pbx("early-1", "record", 42, url=pbx_files.url + "/rec/small.mp3"),
                 pbx("early-1", "record", 43, url=pbx_files.url + "/rec/get"),  # differs
                 end)
    row = wait_for(lambda: settled(line, "early-1"), timeout=90)
    assert (row.record_state, row.record_error, row.finish_outcome) == ("attached", None, "done")
    [attach] = attaches(sandbox, line["member_id"], "early-1")
    assert attach["method"] == ATTACH and attach["error"] is None
    assert attach["params"]["FILENAME"] == "small.mp3" and "FILE_CONTENT" in attach["params"]
    assert attach["seq"] > finish_seq(sandbox, line["member_id"], "early-1")
    history = sandbox.call_history(line["member_id"], "early-1")["calls"]["early-1"]
    assert (history["finished"], history["records"]) == (1, 1)
    assert PbxFiles.hits == {"/rec/small.mp3": 1}, "downloaded once; the later records ignored"
    assert "record attached" in describe(row)

    line["post"](*answered("late-1", pbx_files.url + "/rec/long.wav")[:3])
    wait_for(lambda: (r := call_row(line, "late-1")) is not None and r.finish_outcome == "done",
             timeout=90)
    line["post"](answered("late-1", pbx_files.url + "/rec/long.wav")[3])
    row = wait_for(lambda: settled(line, "late-1"), timeout=90)
    assert (row.record_state, row.record_error) == ("attached", None)
    ask, upload = attaches(sandbox, line["member_id"], "late-1")
    assert ask["method"] == ATTACH and ask["params"] == {"CALL_ID": row.b24_call_id,
                                                         "FILENAME": "long.wav"}
    assert ask["params"].get("FILE_CONTENT") is None, "the large file's bytes are not in a row"
    assert upload["method"] == "upload" and upload["params"]["FILENAME"] == "long.wav"
    stat = next(s for s in sandbox.calls(line["member_id"])["finished"]
                if s["EXTERNAL_CALL_ID"] == "late-1")
    assert stat["RECORD"]["SIZE"] == len(LARGE) and stat["RECORDS_ATTACHED"] == 1


def test_unanswered_calls_get_only_a_voicemail(line, sandbox, pbx_files):
    missed = [pbx("miss-1", "start", 0, direction="in", phone="+4930999888",
                  extensions=["102"]),
              pbx("miss-1", "record", 19, url=pbx_files.url + "/rec/missed.mp3"),
              pbx("miss-1", "end", 20, status="no_answer", duration=0)]
    voicemail = [pbx("vm-1", "start", 0, direction="in", phone="+4930999777",
                     extensions=["103"]),
                 pbx("vm-1", "end", 30, status="no_answer", duration=0),
                 pbx("vm-1", "record", 31, url=pbx_files.url + "/rec/vm.mp3", voicemail=True)]
    said_at_end = [pbx("vm-2", "start", 0, direction="in", phone="+4930999666",
                       extensions=["103"]),
                   pbx("vm-2", "end", 30, status="no_answer", duration=0, voicemail=True),
                   pbx("vm-2", "record", 31, url=pbx_files.url + "/rec/vm.mp3")]
    line["post"](*missed, *voicemail, *said_at_end)
    vm = wait_for(lambda: settled(line, "vm-1"), timeout=90)
    vm2 = wait_for(lambda: settled(line, "vm-2"), timeout=90)
    assert (vm2.record_state, vm2.record_voicemail) == ("attached", True), "voicemail on end"
    miss = wait_for(lambda: settled(line, "miss-1"), timeout=90)
    assert (vm.record_state, vm.record_voicemail, vm.end_status) == ("attached", True,
                                                                     "no_answer")
    assert sandbox.call_history(line["member_id"], "vm-1")["calls"]["vm-1"]["records"] == 1
    assert miss.record_state == "skipped" and "not answered" in miss.record_error
    assert "record skipped: not attached: the call was not answered" in describe(miss)
    assert attaches(sandbox, line["member_id"], "miss-1") == []
    assert sandbox.call_history(line["member_id"], "miss-1")["calls"]["miss-1"]["finished"] == 1
    assert "/rec/missed.mp3" not in PbxFiles.hits, "not even downloaded"


def test_a_failing_download_is_tried_a_bounded_number_of_times(line, sandbox, pbx_files):
    line["post"](*answered("fail-1", pbx_files.url + "/rec/broken.mp3"),
                 *answered("ogg-1", pbx_files.url + "/rec/talk.ogg"))
    row = wait_for(lambda: settled(line, "fail-1"), timeout=90)
    assert row.record_state == "failed" and row.record_attempts == ATTEMPTS
    assert row.record_error == (f"gave up after {ATTEMPTS} attempt(s): download: the PBX "
                                "answered HTTP 503")
    assert "record failed: gave up after 3 attempt(s)" in describe(row)
    assert PbxFiles.hits["/rec/broken.mp3"] == ATTEMPTS
    ogg = wait_for(lambda: settled(line, "ogg-1"), timeout=90)
    assert ogg.record_state == "failed" and ogg.record_error.startswith(
        "refused: not a mp3 or wav recording (Content-Type audio/ogg")
    assert PbxFiles.hits["/rec/talk.ogg"] == 1, "a wrong format is not tried again"
    for external in ("fail-1", "ogg-1"):
        assert attaches(sandbox, line["member_id"], external) == []
        assert sandbox.call_history(line["member_id"], external)["calls"][external][
            "finished"] == 1


# ---------------------------------------------------------------- the rules, without a worker


def _ended(**fields: Any) -> Call:
    base: dict[str, Any] = {"state": "ended", "end_status": "answered", "collision": False,
                            "finish_outcome": "done", "record_voicemail": False}
    base.update(fields)
    row = Call(**base)
    recording.keep(row, {"url": "http://10.0.0.5/r.mp3", "voicemail": base["record_voicemail"]})
    return row


@pytest.mark.parametrize(("fields", "state", "error"), [
    ({"collision": True, "finish_outcome": None,
      "finish_error": "not finished: collision"}, "skipped", "not attached: the call's CALL_ID"),
    ({"finish_outcome": "dead", "finish_error": "User is not found or is not active"},
     "skipped", "not attached: finish failed: User is not found"),
    ({"finish_outcome": None, "register_error": "Unsupported phone number format"},
     "skipped", "not attached: register failed: Unsupported phone number format"),
    ({"state": "skipped", "finish_outcome": None}, "skipped", "not attached: the call was not"),
    ({"finish_outcome": "unknown"}, "waiting", "waits: finish's outcome is unknown"),
    ({"state": "answered", "finish_outcome": None, "end_status": None}, "waiting",
     "waits for the call's finish"),
    ({"end_status": "busy", "finish_outcome": "done"}, "skipped",
     "not attached: the call was not answered (busy)"),
])
def test_when_a_recording_may_go(app, fields, state, error):
    row = _ended(**fields)
    assert (row.record_state, row.record_error[:len(error)]) == (state, error)
    assert row.record_url == "http://10.0.0.5/r.mp3"


@pytest.mark.parametrize(("url", "content_type", "hint", "data", "name"), [
    ("http://pbx/rec/2026/11/a%20b.MP3", "application/octet-stream", "", SMALL, "a_b.mp3"),
    ("http://pbx/monitor?id=5", "audio/x-wav; charset=binary", "", LARGE, "monitor.wav"),
    ("http://pbx/monitor.php?id=5", "application/octet-stream", "call-5.wav", LARGE,
     "call-5.wav"),
    ("http://pbx/dl/5", "application/octet-stream", "", LARGE, "5.wav"),  # by its first bytes
    ("http://pbx/dl/", "", "", b"\xff\xfb\x90\x00" + bytes(10), "pbx-9.mp3"),
])
def test_the_file_name_always_ends_in_mp3_or_wav(url, content_type, hint, data, name):
    assert recording.filename_for(url, content_type, hint, data, "pbx-9") == name


def test_other_formats_are_refused_with_the_reason():
    with pytest.raises(recording.Refused, match="Content-Type audio/ogg, URL path extension ogg"):
        recording.filename_for("http://pbx/r/x.ogg", "audio/ogg", "", b"OggS", "pbx-9")
