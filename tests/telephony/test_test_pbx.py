"""The test PBX (sandbox/pbx.py, issue 23 point 7) and a click driven end to end with it.

Real parts: the sandbox portal delivers ONEXTERNALCALLSTART over HTTP to the app on
loopback; a real worker sends the signed originate to the test PBX, an HTTP server on
loopback; the test PBX checks the signature and posts the call's PBX events to the app's
PBX API over HTTP; the worker finishes the click's call in the sandbox.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.dispatcher import nudge
from app.extensions import db
from app.ingress import auth
from app.telephony import click
from app.telephony.models import Originate
from app.tenants.models import Portal
from sandbox.pbx import TestPBX
from tests.conftest import wait_for
from tests.install.conftest import installed, live_app, make_portal  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(180)
SECRET = "a-test-pbx-secret-of-some-length"
# The originate body's fields as issue 23 point 6 fixes them (extras may come with them).
INTERFACE = {"kind", "call_id", "extension", "phone", "dtmf", "is_mobile", "text"}


@pytest.fixture
def form_kind() -> str:
    return "full"


def _send(pbx: TestPBX, body: dict[str, Any], stamp: int, secret: str = SECRET) -> httpx.Response:
    raw = json.dumps(body).encode()
    return httpx.post(pbx.url, content=raw, headers={
        click.TIMESTAMP_HEADER: str(stamp), click.SIGNATURE_HEADER: click.sign(secret, stamp, raw)})


def test_the_test_pbx_takes_only_genuine_fresh_originates():
    body = {"kind": "click", "call_id": "externalCall.1", "extension": "101",
            "phone": "+4930777111", "dtmf": None, "is_mobile": False, "text": None}
    with TestPBX(app="http://127.0.0.1:9", api_key="unused", secret=SECRET,
                 report=False) as pbx:
        now = int(time.time())
        assert _send(pbx, body, now, secret="another-secret-entirely").status_code == 401
        assert _send(pbx, body, now - 301).status_code == 401  # stale: a replayed request
        raw = json.dumps(body).encode()
        assert httpx.post(pbx.url, content=raw).status_code == 401  # unsigned
        tampered = httpx.post(pbx.url, content=raw.replace(b"+4930777111", b"+4930666000"),
                              headers={click.TIMESTAMP_HEADER: str(now),
                                       click.SIGNATURE_HEADER: click.sign(SECRET, now, raw)})
        assert tampered.status_code == 401
        assert pbx.originates == []
        assert [r.reason for r in pbx.refused] == [
            "bad signature", "stale timestamp", "unsigned", "bad signature"]
        # The app's signer (app/telephony/click.py) is what the PBX's check accepts.
        assert _send(pbx, body, now).status_code == 200
        [taken] = pbx.originates
        assert taken.body == body


@pytest.fixture
def rig(installed: dict[str, Any], live_app: Any, sandbox: Any,  # noqa: F811
        start_worker: Any, redis_client: Any) -> Any:
    """The installed sandbox portal, its originate settings on a test PBX, a worker."""
    portal = Portal.by_member_id(installed["member_id"])
    assert portal is not None
    key = auth.issue_api_key(portal)
    pbx = TestPBX(app=live_app.url, api_key=key, secret=SECRET, ring=0.3, talk=2.2).start()
    runner = live_app.app.test_cli_runner()
    result = runner.invoke(args=["portals", "settings", installed["member_id"],
                                 f"pbx_originate_url={pbx.url}", f"pbx_secret={SECRET}"])
    assert result.exit_code == 0, result.output
    start_worker(threads=4, periodic=True, DISPATCH_SWEEP_INTERVAL="1", DISPATCH_LINGER_MS="0",
                 TELEPHONY_ORIGINATE_REPORT_TIMEOUT="20", TELEPHONY_DEFAULT_COUNTRY="DE")
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=30)
    yield {"member_id": installed["member_id"], "portal_id": portal.id, "pbx": pbx}
    pbx.close()


def _click(sandbox: Any, member_id: str, user: int, phone: str, ts: int) -> str:
    out = sandbox.trigger_event(member_id, "ONEXTERNALCALLSTART",
                                {"PHONE_NUMBER": phone, "USER_ID": str(user)}, user_id=user,
                                overrides={"ts": ts})
    assert out["statuses"] == [200], out
    return str(out["data"]["CALL_ID"])


def _finishes(sandbox: Any, member_id: str, call_id: str) -> list[dict[str, Any]]:
    return [e for e in sandbox.log(member_id, method="telephony.externalcall.finish")
            if e["params"].get("CALL_ID") == call_id]


def test_a_click_rings_the_test_pbx_once_and_its_report_finishes_the_call(rig, sandbox):
    member_id, pbx = rig["member_id"], rig["pbx"]
    now = int(time.time())
    call_id = _click(sandbox, member_id, 1, "+4930777111", now)
    # The double click: the portal hands it the same CALL_ID, in a second event.
    assert _click(sandbox, member_id, 1, "+4930777111", now + 1) == call_id
    wait_for(lambda: _finishes(sandbox, member_id, call_id), timeout=60)
    time.sleep(1.5)  # a second originate or finish, if one were coming
    [taken] = pbx.originates
    assert pbx.refused == [] and pbx.errors == []
    assert INTERFACE <= set(taken.body)
    assert {k: taken.body[k] for k in INTERFACE} == {
        "kind": "click", "call_id": call_id, "extension": "101", "phone": "+4930777111",
        "dtmf": None, "is_mobile": False, "text": None}
    # The test PBX reported start (origin_id), answer, end; the app joined them to the click.
    assert [(e["event"], status) for e, status in pbx.posted] == [
        ("start", 202), ("answer", 202), ("end", 202)]
    assert pbx.posted[0][0]["origin_id"] == call_id
    [finish] = _finishes(sandbox, member_id, call_id)
    assert finish["status"] == 200
    assert (finish["params"]["USER_ID"], finish["params"]["STATUS_CODE"],
            finish["params"]["DURATION"]) == ("1", "200", str(math.ceil(pbx.talk)))
    registers = sandbox.log(member_id, method="telephony.externalcall.register")
    assert [e for e in registers if e["params"].get("EXTERNAL_CALL_ID") == taken.pbx_call_id] \
        == []
    assert sandbox.calls(member_id)["active"] == []
    assert sandbox.counters(member_id)["violations"]["register_for_click_to_call"] == 0
    db.session.expire_all()
    row = db.session.scalars(select(Originate).where(
        Originate.portal_id == rig["portal_id"], Originate.b24_call_id == call_id)).one()
    assert (row.state, row.pbx_call_id) == ("joined", taken.pbx_call_id)


def test_an_unanswered_click_is_finished_once_as_not_answered(rig, sandbox):
    member_id, pbx = rig["member_id"], rig["pbx"]
    pbx.answer = False
    call_id = _click(sandbox, member_id, 2, "+4930777222", int(time.time()))
    wait_for(lambda: _finishes(sandbox, member_id, call_id), timeout=60)
    time.sleep(1.0)
    [finish] = _finishes(sandbox, member_id, call_id)
    assert (finish["params"]["USER_ID"], finish["params"]["STATUS_CODE"]) == ("2", "480")
    assert [e["event"] for e, _ in pbx.posted] == ["start", "end"]
    assert sandbox.calls(member_id)["active"] == []
