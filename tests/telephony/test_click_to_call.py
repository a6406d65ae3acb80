"""Click-to-call (issue 23 point 1): a click in the sandbox portal reaches a stand-in PBX as a
signed originate, the PBX's call joins the click's CALL_ID (never registered again), and a
click that cannot ring is finished with its reason, so the clicker's card closes.

Real parts: the sandbox portal delivers ONEXTERNALCALLSTART over HTTP to the app served on
loopback, a real worker runs the inbox, the originate actor and the dispatcher, and the PBX
is a real HTTP server on loopback that checks the signature as PBX_EVENTS.md tells PBXs to.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from app.dispatcher import nudge
from app.extensions import db
from app.ingress import auth
from app.telephony import click
from app.telephony.models import Originate
from app.tenants.models import Portal, PortalSettings
from tests.conftest import StubHandler, StubServer, wait_for
from tests.install.conftest import installed, live_app, make_portal  # noqa: F401 - fixtures
from tests.telephony.conftest import pbx

pytestmark = pytest.mark.timeout(180)
SECRET = "s3cret-for-tests"


@pytest.fixture
def form_kind() -> str:
    """One iframe form is enough here (the install tests cover both)."""
    return "full"


class PBX:
    """A stand-in PBX webhook: records each originate, answers with ``status``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.lock = threading.Lock()
        pbx_ = self

        class Handler(StubHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stamp = self.headers.get(click.TIMESTAMP_HEADER, "")
                want = "sha256=" + hmac.new(SECRET.encode(), stamp.encode() + b"." + body,
                                            hashlib.sha256).hexdigest()
                signed = hmac.compare_digest(want, self.headers.get(click.SIGNATURE_HEADER, ""))
                fresh = abs(time.time() - int(stamp or 0)) < 300
                with pbx_.lock:
                    pbx_.requests.append({"body": json.loads(body), "signed": signed,
                                          "fresh": fresh})
                self.reply(pbx_.status if signed else 401, b"{}", "application/json")

        self.server = StubServer(Handler)


@pytest.fixture
def setup(installed: dict[str, Any], sandbox: Any, client: Any, start_worker: Any,  # noqa: F811
          redis_client: Any) -> Any:
    pbx_ = PBX()
    portal = Portal.by_member_id(installed["member_id"])
    assert portal is not None
    settings = portal.settings or PortalSettings(portal=portal)
    settings.pbx_originate_url, settings.pbx_secret = pbx_.server.url + "/originate", SECRET
    db.session.add(settings)
    db.session.commit()
    key = auth.issue_api_key(portal)
    start_worker(threads=4, periodic=True, DISPATCH_SWEEP_INTERVAL="1", DISPATCH_LINGER_MS="0",
                 TELEPHONY_ORIGINATE_DEADLINE="4", TELEPHONY_ORIGINATE_REPORT_TIMEOUT="3",
                 TELEPHONY_ORIGINATE_SWEEP_INTERVAL="1", TELEPHONY_DEFAULT_COUNTRY="DE")
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=30)

    def post(*events: dict[str, Any]) -> None:
        for event in events:
            response = client.post("/api/v1/calls/events", json=event,
                                   headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 202, response.get_data(as_text=True)

    yield {"member_id": installed["member_id"], "portal_id": portal.id, "pbx": pbx_,
           "post": post}
    pbx_.server.close()


def _click(sandbox: Any, member_id: str, user: int, phone: str = "+4930777111",
           ts: int | None = None) -> str:
    out = sandbox.trigger_event(member_id, "ONEXTERNALCALLSTART",
                                {"PHONE_NUMBER": phone, "USER_ID": str(user)}, user_id=user,
                                overrides={"ts": ts or int(time.time())})
    assert out["statuses"] == [200], out
    return str(out["data"]["CALL_ID"])


def _originate(portal_id: int, call_id: str, *states: str) -> Originate | None:
    db.session.expire_all()
    row = db.session.scalars(select(Originate).where(
        Originate.portal_id == portal_id, Originate.b24_call_id == call_id)
        .order_by(Originate.id.desc())).first()
    return row if row is not None and (not states or row.state in states) else None


def _finishes(sandbox: Any, member_id: str, call_id: str) -> list[dict[str, Any]]:
    return [e for e in sandbox.log(member_id, method="telephony.externalcall.finish")
            if e["params"].get("CALL_ID") == call_id]


def test_a_click_rings_the_pbx_once_and_its_call_is_finished_not_registered(setup, sandbox):
    member_id, pbx_ = setup["member_id"], setup["pbx"]
    call_id = _click(sandbox, member_id, 1)
    # The double click, a second later: the portal dedups it onto the same CALL_ID and sends
    # a second event (not a copy of the first: intake would drop that as a duplicate).
    assert _click(sandbox, member_id, 1, ts=int(time.time()) + 1) == call_id
    wait_for(lambda: _originate(setup["portal_id"], call_id, "sent"), timeout=30)
    time.sleep(1.0)  # a second originate, if one were coming
    [sent] = pbx_.requests
    assert sent["signed"] and sent["fresh"]
    assert sent["body"] == {"kind": "click", "call_id": call_id, "extension": "101",
                            "phone": "+4930777111", "dtmf": None, "is_mobile": False,
                            "line": sent["body"]["line"], "user_id": 1, "text": None,
                            "voice": None}
    # The PBX rings 101, then the number, and reports the call with the originate's id.
    setup["post"](
        pbx("pbx-c1", "start", 0, direction="out", phone="+4930777111", extensions=["101"],
            origin_id=call_id),
        pbx("pbx-c1", "answer", 4, extension="101"),
        pbx("pbx-c1", "end", 20, status="answered", duration=15.5))
    wait_for(lambda: _finishes(sandbox, member_id, call_id), timeout=60)
    assert _originate(setup["portal_id"], call_id).state == "joined"
    registers = sandbox.log(member_id, method="telephony.externalcall.register")
    assert [e for e in registers if e["params"].get("EXTERNAL_CALL_ID") == "pbx-c1"] == []
    [finish] = _finishes(sandbox, member_id, call_id)
    assert finish["status"] == 200
    assert (finish["params"]["USER_ID"], finish["params"]["STATUS_CODE"],
            finish["params"]["DURATION"]) == ("1", "200", "16")
    assert sandbox.calls(member_id)["active"] == []
    assert sandbox.counters(member_id)["violations"]["register_for_click_to_call"] == 0


def test_a_user_without_an_extension_gets_his_card_closed_with_the_reason(setup, sandbox):
    member_id = setup["member_id"]
    call_id = _click(sandbox, member_id, 3)  # Cy has no extension
    wait_for(lambda: _finishes(sandbox, member_id, call_id), timeout=60)
    [finish] = _finishes(sandbox, member_id, call_id)
    assert (finish["status"], finish["params"]["STATUS_CODE"],
            finish["params"]["FAILED_REASON"]) == (200, "OTHER", click.NO_EXTENSION)
    assert setup["pbx"].requests == []
    row = wait_for(lambda: _originate(setup["portal_id"], call_id, "failed"))
    assert row.error == click.NO_EXTENSION
    assert sandbox.calls(member_id)["active"] == []
    # A later click on the same number is a fresh call, and rings nothing either.
    assert _click(sandbox, member_id, 3) != call_id


def _forge(client: Any, portal: dict[str, Any], user: int, token: str | None,
           call_id: str, phone: str = "+4990012345") -> None:
    """An ONEXTERNALCALLSTART posted by an employee, not by Bitrix24: the application token
    is the one his iframe shows him (full form), the auth token (if any) his own."""
    auth = {"domain": portal["domain"], "member_id": portal["member_id"],
            "server_endpoint": portal["server_endpoint"],
            "client_endpoint": portal["client_endpoint"],
            "application_token": portal["application_token"], "user_id": "3",
            **({"access_token": token, "expires_in": "3600"} if token else {})}
    data = {"PHONE_NUMBER": phone, "PHONE_NUMBER_INTERNATIONAL": phone, "USER_ID": str(user),
            "CALL_ID": call_id, "LINE_NUMBER": "", "IS_MOBILE": "0", "CALL_LIST_ID": "0"}
    body = urlencode({"event": "ONEXTERNALCALLSTART", "event_handler_id": "7",
                      **{f"data[{k}]": v for k, v in data.items()},
                      **{f"auth[{k}]": v for k, v in auth.items()}, "ts": str(int(time.time()))})
    response = client.post("/b24/events", data=body,
                           content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200, response.get_data(as_text=True)


def test_a_click_forged_by_an_employee_rings_nobody_and_finishes_nothing(setup, sandbox, client,
                                                                        installed):  # noqa: F811
    """Cy (no admin, no extension) posts clicks naming Bob (extension 102) and a premium
    number: with his own token, with a made-up one, and with none. None rings Bob's phone
    or touches the named CALL_ID; each is kept, refused, with its reason. Bob's own click
    still rings."""
    member_id, portal_id, pbx_ = setup["member_id"], setup["portal_id"], setup["pbx"]
    own = sandbox.issue_tokens(member_id, 3)["access_token"]
    cases = {"externalCall.forged.own": own, "externalCall.forged.made-up": "f" * 32,
             "externalCall.forged.none": None}
    for call_id, token in cases.items():
        _forge(client, installed, 2, token, call_id)
    rows = {call_id: wait_for(lambda c=call_id: _originate(portal_id, c, "refused"), timeout=60)
            for call_id in cases}
    assert rows["externalCall.forged.own"].error == "the click's token is user 3's, not user 2's"
    assert rows["externalCall.forged.made-up"].error.startswith("Bitrix24 refused the click's")
    assert rows["externalCall.forged.none"].error.startswith("the click came without")
    call_id = _click(sandbox, member_id, 2)  # Bob's real click, after the forgeries
    wait_for(lambda: _originate(portal_id, call_id, "sent"), timeout=30)
    assert [r["body"]["call_id"] for r in pbx_.requests] == [call_id]
    assert [r["body"]["extension"] for r in pbx_.requests] == ["102"]
    for forged in cases:
        assert _finishes(sandbox, member_id, forged) == []


def test_a_pbx_that_is_down_gets_retries_until_the_click_is_stale(setup, sandbox):
    member_id, pbx_ = setup["member_id"], setup["pbx"]
    pbx_.status = 503
    call_id = _click(sandbox, member_id, 2)
    row = wait_for(lambda: _originate(setup["portal_id"], call_id, "failed"), timeout=60)
    assert row.error.startswith("the PBX did not take the originate within 4 s: HTTP 503")
    assert len(pbx_.requests) >= 3, "tried again with backoff"
    finish = wait_for(lambda: _finishes(sandbox, member_id, call_id), timeout=60)[0]
    assert finish["params"]["STATUS_CODE"] == "503"
    assert sandbox.calls(member_id)["active"] == []


def test_a_pbx_that_refuses_fails_the_click_at_once(setup, sandbox):
    setup["pbx"].status = 400
    call_id = _click(sandbox, setup["member_id"], 2)
    row = wait_for(lambda: _originate(setup["portal_id"], call_id, "failed"), timeout=60)
    assert row.error.startswith("the PBX refused the originate: HTTP 400")
    assert len(setup["pbx"].requests) == 1
    finish = wait_for(lambda: _finishes(sandbox, setup["member_id"], call_id), timeout=60)[0]
    assert finish["params"]["STATUS_CODE"] == "603"


def test_a_call_the_pbx_never_reports_is_finished_by_the_sweep(setup, sandbox):
    member_id = setup["member_id"]
    call_id = _click(sandbox, member_id, 2)
    wait_for(lambda: _originate(setup["portal_id"], call_id, "sent"), timeout=30)
    finish = wait_for(lambda: _finishes(sandbox, member_id, call_id), timeout=60)[0]
    assert (finish["params"]["STATUS_CODE"], finish["params"]["FAILED_REASON"]) == (
        "480", click.NEVER_REPORTED)
    assert _originate(setup["portal_id"], call_id).state == "failed"
    assert sandbox.calls(member_id)["active"] == []


def test_an_outgoing_start_without_origin_id_joins_a_recent_click(setup, sandbox):
    member_id = setup["member_id"]
    call_id = _click(sandbox, member_id, 2, phone="+4930555444")
    wait_for(lambda: _originate(setup["portal_id"], call_id, "sent"), timeout=30)
    setup["post"](
        pbx("pbx-c2", "start", 0, direction="out", phone="030 555444", extensions=["102"]),
        pbx("pbx-c2", "end", 9, status="busy", duration=0))
    wait_for(lambda: _finishes(sandbox, member_id, call_id), timeout=60)
    [finish] = _finishes(sandbox, member_id, call_id)
    assert (finish["params"]["USER_ID"], finish["params"]["STATUS_CODE"]) == ("2", "486")
    assert _originate(setup["portal_id"], call_id).pbx_call_id == "pbx-c2"
