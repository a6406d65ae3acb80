"""Call lookup, a call's story and the call card over HTTP: found by phone in any way it is
typed, by PBX call id or CALL_ID; the whole story shown, escaped and without secrets; one
portal's session never reaches another portal's calls."""

from __future__ import annotations

import re

from app.dispatcher import outbox
from app.extensions import db
from app.tenants.models import Portal
from tests.ingress.conftest import add_inbox_row, make_portal
from tests.install.conftest import portal_row
from tests.placements_calls.conftest import dead_command, make_call, session_token

LOOKUP = "/placements/app/calls"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'


def find(client, token: str, q: str) -> str:
    resp = client.get(LOOKUP, query_string={"s": token, "q": q})
    assert resp.status_code == 200
    return resp.get_data(as_text=True)


def found(body: str) -> list[int]:
    """The call ids in the results table."""
    table = re.search(r'<table id="calls-found">(.*?)</table>', body, re.S)
    return [int(i) for i in re.findall(r'<tr data-id="(\d+)">', table.group(1))] if table else []


def with_story(portal: Portal, pbx_call_id: str, **values) -> int:
    """A call with two PBX events and two commands (register done, finish dead)."""
    call = make_call(portal, pbx_call_id, **values)
    for kind, second in (("start", 0), ("end", 40)):
        add_inbox_row("done", portal, source="pbx", event_type=kind, order_key=pbx_call_id,
                      payload={"call_id": pbx_call_id, "event": kind,
                               "at": f"2026-12-07T10:00:{second:02d}+03:00",
                               "caller_name": values.get("caller_name") or "Ann"})
    outbox.submit(portal.id, "telephony.externalcall.register",
                  {"PHONE_NUMBER": values.get("phone") or "", "auth": "CMD-AUTH-SECRET-1"},
                  key=f"call:{call.id}")
    db.session.commit()
    finish = dead_command(portal, "telephony.externalcall.finish",
                          reason=f"ERROR_CORE: {SCRIPT}", CALL_ID=values.get("b24_call_id"))
    from app.dispatcher.models import OutboxCommand

    db.session.get(OutboxCommand, finish).key = f"call:{call.id}"
    db.session.commit()
    return call.id


def test_a_call_is_found_by_phone_as_typed_pbx_call_id_or_call_id(app, client):
    portal = make_portal()
    wanted = make_call(portal, "pbx-4242", phone="+74951112233",
                       b24_call_id="externalCall.found.1").id
    make_call(portal, "pbx-other", phone="+74959999999")
    token = session_token(portal)
    for q in ("+74951112233", "+7 (495) 111-22-33", "74951112233", "pbx-4242",
              "externalCall.found.1"):
        assert found(find(client, token, q)) == [wanted], q
    assert 'id="no-calls"' in find(client, token, "+74950000000")
    for typed in (SCRIPT, IMG):  # the query comes back in the search box, as text
        body = find(client, token, typed)
        assert typed not in body and "<img" not in body


def test_the_story_shows_events_commands_and_outcomes_escaped_and_without_secrets(app, client):
    portal = make_portal()
    call_id = with_story(portal, "pbx-story", phone="+74951112233", caller_name=IMG,
                         b24_call_id="externalCall.story.1", finish_error=SCRIPT,
                         finish_outcome="dead")
    token = session_token(portal)
    body = find(client, token, "+74951112233")
    assert f"/placements/app/calls/{call_id}?s=" in body
    resp = client.get(f"{LOOKUP}/{call_id}", query_string={"s": token})
    assert resp.status_code == 200
    story = resp.get_data(as_text=True)
    assert story.count('data-event="start"') == 1 and story.count('data-event="end"') == 1
    assert 'data-method="telephony.externalcall.register"' in story
    assert 'data-method="telephony.externalcall.finish" data-status="dead"' in story
    assert "ERROR_CORE" in story  # the dead command's reason
    assert "finish: &lt;script&gt;" in story  # the note flask calls show prints, escaped
    assert SCRIPT not in story and IMG not in story and "<img" not in story
    assert "CMD-AUTH-SECRET-1" not in story and "[hidden]" in story


def test_another_portals_calls_are_not_found_nor_shown(app, client):
    mine, theirs = make_portal(), make_portal()
    their_call = with_story(theirs, "pbx-theirs", phone="+74957777777",
                            b24_call_id="externalCall.theirs.1")
    token = session_token(mine)
    for q in ("+74957777777", "pbx-theirs", "externalCall.theirs.1"):
        body = find(client, token, q)
        assert found(body) == [] and 'id="no-calls"' in body
    resp = client.get(f"{LOOKUP}/{their_call}", query_string={"s": token})
    assert resp.status_code == 404 and "pbx-theirs" not in resp.get_data(as_text=True)


def test_calls_are_for_administrators(app, client):
    portal = make_portal()
    call_id = with_story(portal, "pbx-admin-only", phone="+74951112233")
    token = session_token(portal, user_id=2, is_admin=False)
    assert client.get(LOOKUP, query_string={"s": token, "q": "pbx-admin-only"}).status_code \
        == 403
    resp = client.get(f"{LOOKUP}/{call_id}", query_string={"s": token})
    assert resp.status_code == 403 and "+74951112233" not in resp.get_data(as_text=True)
    assert client.get(f"{LOOKUP}/{call_id}").status_code == 401


def test_the_call_card_shows_the_story_of_its_call_id(sandbox, installed):
    portal = portal_row(installed["member_id"])
    with_story(portal, "pbx-card", phone="+74951112233", caller_name=IMG,
               b24_call_id="externalCall.card.1", ringing=[2], shown=[2])
    other = make_portal()
    with_story(other, "pbx-elsewhere", b24_call_id="externalCall.elsewhere.1")
    opened = sandbox.open_placement(installed["member_id"], placement="CALL_CARD", user_id=2,
                                    options={"CALL_ID": "externalCall.card.1"})
    assert opened["status"] == 200
    body = opened["body"]
    assert "pbx-card" in body and 'data-event="start"' in body
    assert 'data-method="telephony.externalcall.register"' in body
    assert IMG not in body and "CMD-AUTH-SECRET-1" not in body
    for unknown in ("externalCall.nobody.1", "externalCall.elsewhere.1"):
        opened = sandbox.open_placement(installed["member_id"], placement="CALL_CARD",
                                        options={"CALL_ID": unknown})
        assert opened["status"] == 200 and 'id="call-unknown"' in opened["body"], unknown
        assert "pbx-elsewhere" not in opened["body"]


def test_an_employee_cannot_read_a_calls_story_by_posting_its_call_id(sandbox, installed):
    # PLACEMENT_OPTIONS is the employee's own form field: any CALL_ID can be put there.
    portal = portal_row(installed["member_id"])
    with_story(portal, "pbx-not-theirs", phone="+74957654321",
               b24_call_id="externalCall.private.1", owner_user_id=1, ringing=[1], shown=[1])
    opened = sandbox.open_placement(installed["member_id"], placement="CALL_CARD", user_id=2,
                                    options={"CALL_ID": "externalCall.private.1"})
    assert opened["status"] == 200
    assert 'id="call-not-yours"' in opened["body"]
    assert "pbx-not-theirs" not in opened["body"] and "+74957654321" not in opened["body"]
    admin = sandbox.open_placement(installed["member_id"], placement="CALL_CARD", user_id=1,
                                   options={"CALL_ID": "externalCall.private.1"})
    assert "pbx-not-theirs" in admin["body"]
