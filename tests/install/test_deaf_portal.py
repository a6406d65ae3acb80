"""A short-form portal cannot be made deaf by copies of its ONAPPINSTALL (issue 21 point 1).

An employee knows what a portal's ONAPPINSTALL will look like but for its tokens: the
member_id (in their iframe form), the handler id (small, read here from the sandbox as
an attacker would guess it), the constant data, and ``ts`` to the second. Copies posted
ahead for the next thirty seconds, with the employee's own tokens, must not make
Bitrix24's real one a duplicate: it is processed, the portal gets its application token
and later events are verified. The same for a token holder and a real ONAPPUPDATE.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import func, select

from app.extensions import db
from app.ingress.models import InboxEvent
from tests.conftest import wait_for
from tests.install.conftest import iframe_form, portal_row

INSTALL_DATA = {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"}
COPIES = 30  # FIRST_CONTACT_PER_ADDRESS_PER_MINUTE: all one address may post


@pytest.fixture
def form_kind() -> str:
    """The short form: ONAPPINSTALL is the application token's only source."""
    return "short"


def _rows(event_type: str, *statuses: str) -> int:
    db.session.remove()
    query = select(func.count(InboxEvent.id)).where(InboxEvent.event_type == event_type)
    if statuses:
        query = query.where(InboxEvent.status.in_(statuses))
    return int(db.session.scalar(query) or 0)


def _handler_id(sandbox: Any, member_id: str, event: str) -> str:
    [binding] = [b for b in sandbox.bindings(member_id)["events"] if b["event"] == event]
    return str(binding["id"])


def _copy(portal: dict[str, Any], event: str, handler_id: str, ts: int,
          tokens: dict[str, str]) -> str:
    """The event as Bitrix24 will send it, but for the tokens: the employee's own."""
    auth = {"domain": portal["domain"], "member_id": portal["member_id"],
            "server_endpoint": portal["server_endpoint"],
            "client_endpoint": portal["client_endpoint"], "status": "L", **tokens}
    return urlencode({"event": event, "event_handler_id": handler_id,
                      **{f"data[{k}]": v for k, v in INSTALL_DATA.items()}, "ts": str(ts),
                      **{f"auth[{k}]": v for k, v in auth.items()}})


def _employee_tokens(sandbox: Any, member_id: str) -> dict[str, str]:
    """What an ordinary employee (user 2) finds in their own iframe form."""
    _, form = iframe_form(sandbox.open_placement(member_id, "DEFAULT", user_id=2))
    return {"access_token": form["AUTH_ID"], "refresh_token": form["REFRESH_ID"],
            "expires_in": "3600", "user_id": "2"}


def _post_copies(live_app: Any, bodies: list[str]) -> None:
    with live_app.http() as http:
        for body in bodies:
            resp = http.post("/b24/events", content=body,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert resp.status_code == 200 and resp.json()["duplicate"] is False, resp.text


def test_the_real_onappinstall_after_30_forged_copies_is_processed(
        sandbox, make_portal, live_app, start_worker):
    start_worker(threads=2, **live_app.worker_env())
    portal = make_portal()
    member_id = portal["member_id"]
    assert sandbox.install_app(member_id, live_app.url)["status"] == 200
    assert portal_row(member_id).application_token is None  # the short form: not yet

    handler_id = _handler_id(sandbox, member_id, "ONAPPINSTALL")
    tokens = {**_employee_tokens(sandbox, member_id), "application_token": "e" * 32}
    now = int(time.time())
    _post_copies(live_app, [_copy(portal, "ONAPPINSTALL", handler_id, ts, tokens)
                            for ts in range(now, now + COPIES)])

    [real] = sandbox.finish_install(member_id)["onappinstall"]
    assert real["status"] == 200
    row = wait_for(lambda: (r := portal_row(member_id)) and r.application_token and r,
                   timeout=60)
    assert row.application_token == portal["application_token"]
    assert row.auth_user_id == 1  # the installing admin's chain, not the employee's
    wait_for(lambda: _rows("ONAPPINSTALL", "done", "dead") == COPIES + 1, timeout=60)

    # Later events are verified: stored and handled, not kept provisionally.
    assert sandbox.trigger_event(member_id, "ONUSERADD", {"FIELDS": {"ID": "2"}})["statuses"] \
        == [200]
    wait_for(lambda: _rows("ONUSERADD", "done") == 1, timeout=30)


def test_a_real_onappupdate_after_copies_from_a_token_holder_is_processed(
        sandbox, installed, live_app, start_worker):
    start_worker(threads=2, **live_app.worker_env())
    member_id = installed["member_id"]
    before = portal_row(member_id)
    # A token holder (the full form hands employees the application token) copies ahead.
    tokens = {**_employee_tokens(sandbox, member_id),
              "application_token": installed["application_token"]}
    now = int(time.time())
    bodies = [_copy(installed, "ONAPPUPDATE", str(handler), ts, tokens)
              for ts in range(now, now + 10) for handler in range(1, 4)]
    _post_copies(live_app, bodies)

    with live_app.http() as http:  # Bitrix24's own, with the updating admin's new chain
        real = sandbox.issue_tokens(member_id, user_id=1)
        body = _copy(installed, "ONAPPUPDATE", "1", now,
                     {"access_token": real["access_token"],
                      "refresh_token": real["refresh_token"], "expires_in": "3600",
                      "user_id": "1", "application_token": installed["application_token"]})
        resp = http.post("/b24/events", content=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200 and resp.json()["duplicate"] is False, resp.text
    row = wait_for(lambda: (r := portal_row(member_id)) and
                   r.refresh_token == real["refresh_token"] and r, timeout=60)
    assert row.token_version > before.token_version
