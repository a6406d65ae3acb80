"""The dead-letters page over HTTP: what it shows (never a secret, always escaped), who may
act (an administrator of that portal, with a fresh form token), and what retry and discard
do to the rows."""

from __future__ import annotations

import html

from sqlalchemy import select

from app.extensions import db
from app.ingress import processing
from app.ingress.models import InboxEvent
from app.telephony.models import Call
from tests.ingress.conftest import add_inbox_row, make_portal
from tests.placements_calls.conftest import (
    dead_command,
    form_token_of,
    session_token,
    status_of,
)

URL = "/placements/app/dead-letters"
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'


def inbox_status(row_id: int) -> str | None:
    db.session.expire_all()
    row = db.session.get(InboxEvent, row_id)
    return row.status if row is not None else None


def page(client, token: str):
    return client.get(URL, query_string={"s": token})


def act(client, token: str, form_token: str | None, **fields: str):
    data = {"s": token, **fields}
    if form_token is not None:
        data["form_token"] = form_token
    return client.post(URL, data=data)


def test_the_page_hides_tokens_keys_and_the_portals_secrets(app, client):
    portal = make_portal(access_token="portal-access-TOKEN-1234567",
                         refresh_token="portal-refresh-TOKEN-7654321")
    portal.settings.pbx_secret = "pbx-shared-SECRET-99999"
    db.session.commit()
    add_inbox_row("dead", portal, event_type="ONCRMDEALUPDATE",
                  last_error="HTTP 401 for https://x.test/rest/crm.deal.get?auth=LEAKED-AUTH-123",
                  payload={"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "7"}},
                           "auth": {"access_token": "EVENT-ACCESS-abcdef",
                                    "application_token": "EVENT-APPTOKEN-abcdef"},
                           "note": "Bearer BEARER-VALUE-123456 and portal-access-TOKEN-1234567"})
    dead_command(portal, "crm.lead.add", reason="sent with pbx-shared-SECRET-99999",
                 auth="COMMAND-AUTH-123456", FIELDS={"TITLE": "x",
                                                     "api_key": "COMMAND-KEY-123456"})
    body = page(client, session_token(portal)).get_data(as_text=True)
    assert "ONCRMDEALUPDATE" in body and "crm.lead.add" in body  # the letters are there
    for secret in ("LEAKED-AUTH-123", "EVENT-ACCESS-abcdef", "EVENT-APPTOKEN-abcdef",
                   "BEARER-VALUE-123456", "portal-access-TOKEN-1234567",
                   "portal-refresh-TOKEN-7654321", "pbx-shared-SECRET-99999",
                   "COMMAND-AUTH-123456", "COMMAND-KEY-123456"):
        assert secret not in body, secret
    assert "[hidden]" in body


def test_attacker_values_are_escaped(app, client):
    portal = make_portal()
    add_inbox_row("dead", portal, source="pbx", event_type="start", last_error=SCRIPT,
                  payload={"event": "start", "call_id": "c1", "caller_name": IMG})
    dead_command(portal, "telephony.externalcall.register",
                 reason=f"ERROR_CORE: {SCRIPT}", USER_PHONE_INNER=IMG)
    body = page(client, session_token(portal)).get_data(as_text=True)
    assert SCRIPT not in body and IMG not in body and "<img" not in body
    assert html.escape(SCRIPT) in body or "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "onerror=alert(1)&gt;" in body


def test_retry_one_queues_the_event_again_for_a_worker(app, client):
    portal = make_portal()  # no user has an extension, no fallback: a start is unroutable
    start = {"call_id": "retried-1", "event": "start", "at": "2026-12-07T10:00:00+00:00",
             "direction": "in", "phone": "+4930123456", "extensions": ["101"]}
    row = add_inbox_row("dead", portal, source="pbx", event_type="start", payload=start,
                        order_key="retried-1", attempts=5, last_error="database was locked")
    token = session_token(portal)
    resp = act(client, token, form_token_of(page(client, token).get_data(as_text=True)),
               box="inbox", action="retry", id=str(row))
    assert resp.status_code == 200 and "1 dead letter(s) sent again." in resp.get_data(True)
    assert inbox_status(row) == "queued"
    assert processing.process(row) == "done"  # as the worker runs the message it was sent
    call = db.session.scalars(select(Call).where(Call.portal_id == portal.id)).one()
    assert (call.pbx_call_id, call.state) == ("retried-1", "unroutable")


def test_retry_all_of_a_kind_queues_those_commands_and_no_others(app, client):
    portal = make_portal()
    first, second = dead_command(portal, "user.current"), dead_command(portal, "user.current")
    other = dead_command(portal, "crm.lead.add")
    token = session_token(portal)
    resp = act(client, token, form_token_of(page(client, token).get_data(as_text=True)),
               box="outbox", action="retry", kind="user.current")
    assert "2 dead letter(s) sent again." in resp.get_data(as_text=True)
    assert [status_of(i) for i in (first, second, other)] == ["queued", "queued", "dead"]


def test_discard_deletes_dead_letters_and_keeps_an_unsettled_command(app, client, caplog):
    portal = make_portal()
    event = add_inbox_row("dead", portal, event_type="ONCRMDEALUPDATE")
    keep_event = add_inbox_row("dead", portal, event_type="ONCRMLEADADD")
    gone, waiting = dead_command(portal), dead_command(portal, settled=False)
    token = session_token(portal)
    body = page(client, token).get_data(as_text=True)
    caplog.set_level("INFO")
    act(client, token, form_token_of(body), box="inbox", action="discard", id=str(event))
    body = page(client, token).get_data(as_text=True)
    resp = act(client, token, form_token_of(body), box="outbox", action="discard",
               kind="user.current")
    assert "1 dead letter(s) discarded." in resp.get_data(as_text=True)
    assert "1 kept for now" in resp.get_data(as_text=True)
    assert (inbox_status(event), inbox_status(keep_event)) == (None, "dead")
    assert (status_of(gone), status_of(waiting)) == (None, "dead")
    assert f"inbox dead letter {event} of portal {portal.member_id} discarded" in caplog.text
    assert f"outbox dead letter {gone} of portal {portal.id} discarded" in caplog.text


def test_another_portals_letters_are_neither_shown_nor_changed(app, client):
    from placements.settings import form_token

    mine, theirs = make_portal(), make_portal()
    their_event = add_inbox_row("dead", theirs, event_type="THEIRSECRETEVENT")
    their_command = dead_command(theirs, "their.method")
    token = session_token(mine)
    body = page(client, token).get_data(as_text=True)
    assert "THEIRSECRETEVENT" not in body and "their.method" not in body
    for fields in ({"box": "inbox", "id": str(their_event)},
                   {"box": "outbox", "id": str(their_command)},
                   {"box": "inbox", "kind": "b24:THEIRSECRETEVENT"},
                   {"box": "outbox", "kind": "their.method"}):
        for action in ("retry", "discard"):
            resp = act(client, token, form_token.issue(mine, 1), action=action, **fields)
            assert resp.status_code == 404, (fields, action)
    assert (inbox_status(their_event), status_of(their_command)) == ("dead", "dead")


def test_a_form_token_of_another_portal_changes_nothing(app, client):
    mine, theirs = make_portal(), make_portal()
    their_event = add_inbox_row("dead", theirs)
    their_form = form_token_of(page(client, session_token(theirs)).get_data(as_text=True))
    resp = act(client, session_token(mine), their_form, box="inbox", action="retry",
               id=str(their_event))
    assert resp.status_code in (403, 404)
    assert inbox_status(their_event) == "dead"


def test_a_non_admin_can_neither_see_nor_retry_nor_discard(app, client):
    from placements.settings import form_token

    portal = make_portal()
    event, command = add_inbox_row("dead", portal), dead_command(portal)
    token = session_token(portal, user_id=2, is_admin=False)
    assert page(client, token).status_code == 403
    for box, row in (("inbox", event), ("outbox", command)):
        for action in ("retry", "discard"):
            resp = act(client, token, form_token.issue(portal, 2), box=box, action=action,
                       id=str(row))
            assert resp.status_code == 403
    assert (inbox_status(event), status_of(command)) == ("dead", "dead")


def test_without_or_with_a_spent_form_token_nothing_changes(app, client):
    portal = make_portal()
    first, second = add_inbox_row("dead", portal), add_inbox_row("dead", portal)
    command = dead_command(portal)
    token = session_token(portal)
    resp = act(client, token, None, box="inbox", action="retry", id=str(first))
    assert resp.status_code == 403 and inbox_status(first) == "dead"
    resp = act(client, token, "forged", box="outbox", action="discard", id=str(command))
    assert resp.status_code == 403 and status_of(command) == "dead"
    form = form_token_of(page(client, token).get_data(as_text=True))
    assert act(client, token, form, box="inbox", action="retry", id=str(first)).status_code == 200
    replay = act(client, token, form, box="inbox", action="retry", id=str(second))
    assert replay.status_code == 403 and "already used" in replay.get_data(as_text=True)
    assert inbox_status(second) == "dead"
    replay = act(client, token, form, box="outbox", action="discard", id=str(command))
    assert replay.status_code == 403 and status_of(command) == "dead"


def test_without_a_session_the_page_is_refused(app, client):
    portal = make_portal()
    add_inbox_row("dead", portal, event_type="ONCRMDEALUPDATE")
    for resp in (client.get(URL), client.get(URL, query_string={"s": "forged"})):
        assert resp.status_code == 401 and "ONCRMDEALUPDATE" not in resp.get_data(True)


def test_the_page_speaks_the_sessions_language(app, client):
    portal = make_portal()
    add_inbox_row("dead", portal, event_type="ONCRMDEALUPDATE")
    body = page(client, session_token(portal, lang="ru")).get_data(as_text=True)
    assert "Недоставленные" in body and "Повторить все" in body and "Retry all" not in body
