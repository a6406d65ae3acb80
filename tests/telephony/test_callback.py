"""Web-form callbacks (issue 23 point 2, protocol §8.9): ONEXTERNALCALLBACKSTART from the
sandbox portal becomes one TYPE 4 call registered with the form's CRM entity and its
responsible, one signed employee-first originate carrying the text to read, and one finish
from the PBX's events; a callback nobody can take, or a PBX that is down, is finished with
its reason.

Real parts: the sandbox portal delivers the event over HTTP to the app on loopback, a real
worker runs the inbox, the callback and originate actors and the dispatcher against the
sandbox, and the PBX is a real HTTP server on loopback checking the signature
(tests/telephony/test_click_to_call.py's stand-in). Checked from the sandbox's command log.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.dispatcher import nudge
from app.extensions import db
from app.ingress import auth
from app.telephony import callback
from app.telephony.models import Originate
from app.tenants.models import Portal, PortalSettings, utcnow
from tests.conftest import wait_for
from tests.install.conftest import installed, live_app, make_portal  # noqa: F401 - fixtures
from tests.telephony.conftest import pbx
from tests.telephony.test_click_to_call import PBX, SECRET, form_kind  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(180)
PHONE = "+4930777222"
TEXT = "Callback request from the website: a question about delivery"
REGISTER, FINISH = "telephony.externalcall.register", "telephony.externalcall.finish"


@pytest.fixture
def cb(request: Any, installed: dict[str, Any], sandbox: Any, client: Any,  # noqa: F811
       start_worker: Any, redis_client: Any) -> Any:
    """As test_click_to_call's set-up: the portal's webhook on a stand-in PBX, a worker;
    callbacks are good for 4 s (or the seconds given by an indirect parameter)."""
    pbx_ = PBX()
    portal = Portal.by_member_id(installed["member_id"])
    assert portal is not None
    settings = portal.settings or PortalSettings(portal=portal)
    settings.pbx_originate_url, settings.pbx_secret = pbx_.server.url + "/cb", SECRET
    db.session.add(settings)
    db.session.commit()
    key = auth.issue_api_key(portal)
    start_worker(threads=4, periodic=True, DISPATCH_SWEEP_INTERVAL="1", DISPATCH_LINGER_MS="0",
                 TELEPHONY_CALLBACK_DEADLINE=str(getattr(request, "param", 4)),
                 TELEPHONY_ORIGINATE_REPORT_TIMEOUT="3",
                 TELEPHONY_ORIGINATE_SWEEP_INTERVAL="1", TELEPHONY_DEFAULT_COUNTRY="DE")
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=30)

    def post(*events: dict[str, Any]) -> None:
        response = client.post("/api/v1/calls/events", json={"events": list(events)},
                               headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 202, response.get_data(as_text=True)

    yield {"member_id": installed["member_id"], "portal_id": portal.id, "pbx": pbx_,
           "post": post}
    pbx_.server.close()


def _fallback(portal_id: int, user: int | None) -> None:
    portal = db.session.get(Portal, portal_id)
    assert portal is not None and portal.settings is not None
    portal.settings.default_user_id = user
    db.session.commit()


def _callback(sandbox: Any, member_id: str, **data: Any) -> None:
    out = sandbox.trigger_event(member_id, "ONEXTERNALCALLBACKSTART",
                                {"PHONE_NUMBER": PHONE, "TEXT": TEXT, "VOICE": "ruinternalfemale",
                                 **data})
    assert out["statuses"] == [200], out
    assert "CALL_ID" not in out["data"] and "USER_ID" not in out["data"]


def _row(portal_id: int, *states: str) -> Originate | None:
    db.session.expire_all()
    row = db.session.scalars(select(Originate).where(
        Originate.portal_id == portal_id, Originate.kind == "callback")
        .order_by(Originate.id.desc())).first()
    return row if row is not None and (not states or row.state in states) else None


def _log(sandbox: Any, member_id: str, method: str, call_id: str | None = None) -> list[Any]:
    return [e for e in sandbox.log(member_id, method=method)
            if call_id is None or e["params"].get("CALL_ID") == call_id]


def _contact(sandbox: Any, member_id: str, responsible: int) -> int:
    made = sandbox.add_crm(member_id, "contact", {
        "NAME": "Eve", "PHONE": [{"VALUE": PHONE}], "ASSIGNED_BY_ID": str(responsible)})
    return int(made.get("ID") or made.get("id"))


def test_a_callback_is_registered_for_the_responsible_rung_with_the_text_and_finished_once(
        cb, sandbox):
    member_id, pbx_ = cb["member_id"], cb["pbx"]
    _fallback(cb["portal_id"], 1)
    contact = _contact(sandbox, member_id, responsible=2)  # Bob, extension 102
    _callback(sandbox, member_id, CRM_ENTITY_TYPE="CONTACT", CRM_ENTITY_ID=str(contact))
    row = wait_for(lambda: _row(cb["portal_id"], "sent"), timeout=60)
    [register] = _log(sandbox, member_id, REGISTER)
    params = register["params"]
    assert register["status"] == 200
    assert {k: str(params.get(k)) for k in ("TYPE", "USER_ID", "CRM_ENTITY_TYPE",
                                            "CRM_ENTITY_ID", "SHOW", "PHONE_NUMBER")} == {
        "TYPE": "4", "USER_ID": "2", "CRM_ENTITY_TYPE": "CONTACT",
        "CRM_ENTITY_ID": str(contact), "SHOW": "0", "PHONE_NUMBER": PHONE}
    assert params["EXTERNAL_CALL_ID"] == row.external_call_id
    assert params["CALL_START_DATE"].endswith("+00:00")
    call_id = row.b24_call_id
    assert call_id and call_id.startswith("externalCall.")
    time.sleep(1.0)  # a second originate, if one were coming
    [sent] = pbx_.requests
    assert sent["signed"] and sent["fresh"]
    assert {k: sent["body"][k] for k in ("kind", "call_id", "extension", "phone", "text",
                                         "voice", "user_id")} == {
        "kind": "callback", "call_id": call_id, "extension": "102", "phone": PHONE,
        "text": TEXT, "voice": "ruinternalfemale", "user_id": 2}
    # The PBX rings 102 (reading the text), then the client, and reports the call.
    cb["post"](
        pbx("pbx-cb1", "start", 0, direction="out", phone=PHONE, extensions=["102"],
            origin_id=call_id),
        pbx("pbx-cb1", "answer", 6, extension="102"),
        pbx("pbx-cb1", "end", 40, status="answered", duration=31.2))
    wait_for(lambda: _log(sandbox, member_id, FINISH, call_id), timeout=60)
    time.sleep(1.0)  # a second finish, if one were coming
    [finish] = _log(sandbox, member_id, FINISH, call_id)
    assert finish["status"] == 200
    assert (finish["params"]["USER_ID"], finish["params"]["STATUS_CODE"],
            finish["params"]["DURATION"]) == ("2", "200", "32")
    assert len(_log(sandbox, member_id, REGISTER)) == 1, "the PBX's start registered nothing"
    assert _row(cb["portal_id"]).state == "joined"
    assert sandbox.calls(member_id)["active"] == []


def test_a_callback_nobody_can_take_is_registered_and_finished_with_the_reason(cb, sandbox):
    member_id = cb["member_id"]
    _fallback(cb["portal_id"], 3)  # Cy: the responsible and the fallback, no extension
    contact = _contact(sandbox, member_id, responsible=3)
    _callback(sandbox, member_id, CRM_ENTITY_TYPE="CONTACT", CRM_ENTITY_ID=str(contact))
    row = wait_for(lambda: _row(cb["portal_id"], "failed"), timeout=60)
    assert row.error == callback.NO_EXTENSION
    finish = wait_for(lambda: _log(sandbox, member_id, FINISH), timeout=60)[0]
    [register] = _log(sandbox, member_id, REGISTER)
    assert register["status"] == 200 and str(register["params"]["TYPE"]) == "4"
    [done] = [c for c in sandbox.calls(member_id)["finished"]
              if c["CALL_ID"] == finish["params"]["CALL_ID"]]
    assert done["EXTERNAL_CALL_ID"] == row.external_call_id  # the callback's own register's
    assert (finish["status"], finish["params"]["USER_ID"], finish["params"]["STATUS_CODE"],
            finish["params"]["FAILED_REASON"]) == (200, "3", "OTHER", callback.NO_EXTENSION)
    assert cb["pbx"].requests == []
    assert sandbox.calls(member_id)["active"] == []


def test_a_callback_without_anyone_to_ring_fails_visibly_and_registers_nothing(cb, sandbox):
    member_id = cb["member_id"]
    _fallback(cb["portal_id"], None)
    _callback(sandbox, member_id)  # no client in the CRM either
    row = wait_for(lambda: _row(cb["portal_id"], "failed"), timeout=60)
    assert row.error == callback.NOBODY and row.b24_call_id is None
    assert _log(sandbox, member_id, REGISTER) == [] and cb["pbx"].requests == []


def test_a_callback_to_a_pbx_that_is_down_is_retried_then_finished_as_failed(cb, sandbox):
    member_id, pbx_ = cb["member_id"], cb["pbx"]
    pbx_.status = 503
    _fallback(cb["portal_id"], 1)  # no client in the CRM: the fallback, Ada (101), calls
    _callback(sandbox, member_id)
    row = wait_for(lambda: _row(cb["portal_id"], "failed"), timeout=60)
    assert row.error.startswith("the PBX did not take the originate within 4 s: HTTP 503")
    assert len(pbx_.requests) >= 3, "tried again with backoff"
    assert {r["body"]["extension"] for r in pbx_.requests} == {"101"}
    finish = wait_for(lambda: _log(sandbox, member_id, FINISH, row.b24_call_id), timeout=60)
    [register] = _log(sandbox, member_id, REGISTER)
    assert str(register["params"]["USER_ID"]) == "1"
    assert (finish[0]["params"]["STATUS_CODE"], finish[0]["params"]["USER_ID"]) == ("503", "1")
    assert sandbox.calls(member_id)["active"] == []


@pytest.mark.parametrize("cb", [120], indirect=True)
def test_a_callback_whose_message_was_lost_is_chosen_by_the_sweep(cb, sandbox):
    """The broker lost the choice's message (a row left "choosing"): the periodic sweep
    queues it again, and the callback goes on, registered once and rung once."""
    member_id = cb["member_id"]
    _fallback(cb["portal_id"], 2)
    row = Originate(kind="callback", portal_id=cb["portal_id"], phone=PHONE, is_mobile=False,
                    text=TEXT, state="choosing", attempts=0,
                    created_at=utcnow() - timedelta(seconds=callback.STALE_CHOICE + 5))
    db.session.add(row)
    db.session.commit()
    wait_for(lambda: _row(cb["portal_id"], "sent"), timeout=60)
    time.sleep(2.0)  # sweeps that might choose it again
    [register] = _log(sandbox, member_id, REGISTER)
    assert str(register["params"]["USER_ID"]) == "2"
    [sent] = cb["pbx"].requests
    assert (sent["body"]["kind"], sent["body"]["extension"]) == ("callback", "102")
