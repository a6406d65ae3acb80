"""A forger floods a portal that waits for its late ONAPPINSTALL: Bitrix24's events still get in.

The portal sends the short iframe form (protocol §2.3), so after the installer POST it
is active without its application_token until ONAPPINSTALL arrives (§2.4), and events
meanwhile are kept provisionally. Any employee knows the portal's member_id (it is in
his iframe form) and can post events with made-up tokens from his own machine. The
events Bitrix24 delivers come through the handlers the app bound, whose URL carries
the portal's handler key; the forger's do not (app/tenants/handler_key.py).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.dispatcher import direct
from app.extensions import db
from app.ingress.models import InboxEvent
from app.installation import plan
from tests.install.conftest import CLIENT_ID, CLIENT_SECRET, portal_row, process_queued
from tests.install.test_late_events import _asked_about, _statuses

MADE_UP = "e" * 32
PER_PORTAL, PER_ADDRESS = 40, 15  # the unkeyed ration, and one address's share of it
ADDRESSES = [f"198.51.100.{n}" for n in range(1, 5)] + ["2001:db8:7::1", "2001:db8:7::2"]
REAL_USERS = range(2, 12)


def _forge(http: httpx.Client, portal: dict[str, Any], user_id: int, address: str) -> int:
    """An ONUSERADD for ``portal`` posted by an employee who does not know the application
    token or the handler key; ``address`` is his, as the front proxy reports it."""
    body = urlencode({"event": "ONUSERADD", "event_handler_id": "5", "ts": str(int(time.time())),
                      "data[FIELDS][ID]": str(user_id), "auth[domain]": portal["domain"],
                      "auth[member_id]": portal["member_id"], "auth[application_token]": MADE_UP})
    return http.post("/b24/events", content=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": address}
    ).status_code


def _provisional(outcome: str) -> float:
    return REGISTRY.get_sample_value("b24relay_provisional_events_total",
                                     {"outcome": outcome}) or 0.0


def _kept() -> int:
    db.session.remove()
    return int(db.session.scalar(select(func.count(InboxEvent.id))
                                 .where(InboxEvent.status == "provisional")) or 0)


def _waiting_portal(sandbox: Any, live_app: Any) -> dict[str, Any]:
    users = [{"id": 1, "name": "Ada", "admin": True, "extension": "101"}]
    users += [{"id": i, "name": f"U{i}", "extension": str(200 + i)} for i in REAL_USERS]
    users += [{"id": 99, "name": "Eve", "extension": "299"}]  # the employee
    portal = sandbox.create_portal(users=users, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                   app_url=live_app.url, iframe_form="short")
    mid = portal["member_id"]
    sandbox.hold_events(mid, "ONAPPINSTALL")  # the queue server is slow with it
    assert sandbox.install_app(mid, live_app.url)["status"] == 200
    assert [d["state"] for d in sandbox.finish_install(mid)["onappinstall"]] == ["held"]
    assert portal_row(mid).application_token is None  # the window is open
    return portal


def test_a_forged_flood_in_the_window_neither_refuses_nor_outlives_bitrix24s_events(
        sandbox, live_app):
    live_app.app.config.update(PROVISIONAL_EVENTS_PER_PORTAL=PER_PORTAL,
                               PROVISIONAL_EVENTS_PER_ADDRESS=PER_ADDRESS)
    portal = _waiting_portal(sandbox, live_app)
    mid = portal["member_id"]
    forged_before = _provisional("forged")

    # The flood: 25 forgeries from each of six addresses (150, well over the ration),
    # with Bitrix24's own events arriving in the middle of it and after it.
    answers: dict[str, list[int]] = {}
    real = iter(REAL_USERS)
    with live_app.http() as http:
        for n, address in enumerate(ADDRESSES):
            answers[address] = [_forge(http, portal, 1000 + 100 * n + i, address)
                                for i in range(25)]
            sandbox.trigger_event(mid, "ONUSERADD", {"FIELDS": {"ID": str(next(real))}},
                                  wait=False)
    for user in real:  # after the flood
        sandbox.trigger_event(mid, "ONUSERADD", {"FIELDS": {"ID": str(user)}}, wait=False)
    log = [d for d in sandbox.wait_deliveries(mid, timeout=20) if d["event"] == "ONUSERADD"]
    assert [d["status"] for d in log] == [200] * len(REAL_USERS)  # every one stored

    # The forger got at most the unkeyed ration, and no address more than its share.
    accepted = sum(a.count(200) for a in answers.values())
    assert accepted == PER_PORTAL
    assert all(a.count(200) <= PER_ADDRESS for a in answers.values()), answers
    assert {s for a in answers.values() for s in a} == {200, 429}
    assert _kept() == PER_PORTAL + len(REAL_USERS)  # the store stays bounded

    # ONAPPINSTALL arrives: Bitrix24's events are released and handled, the rest dropped.
    assert sandbox.release_events(mid) == {"released": 1}
    [onappinstall] = [d for d in sandbox.wait_deliveries(mid, timeout=10)
                      if d["event"] == "ONAPPINSTALL"]
    assert onappinstall["status"] == 200
    assert set(process_queued("ONAPPINSTALL")) == {"done"}
    assert portal_row(mid).application_token == portal["application_token"]
    assert process_queued("ONUSERADD") == ["done"] * len(REAL_USERS)
    assert _statuses("ONUSERADD") == [(str(u), "done") for u in REAL_USERS]
    assert sorted(_asked_about(mid), key=int) == [str(u) for u in REAL_USERS]
    assert _provisional("forged") == forged_before + PER_PORTAL
    assert _kept() == 0

    # After the window nothing changes: the application token decides, key or not.
    with live_app.http() as http:
        assert _forge(http, portal, 5000, ADDRESSES[0]) == 401


def test_the_handler_key_is_in_every_binding_and_an_old_binding_is_replaced(sandbox, live_app):
    portal = _waiting_portal(sandbox, live_app)
    mid = portal["member_id"]
    bound = sandbox.bindings(mid)["events"]
    urls = {b["handler"] for b in bound}
    assert len(bound) == len(plan.EVENTS) and len(urls) == 1
    [url] = urls
    key = parse_qs(urlsplit(url).query)["k"][0]
    assert url == f"{live_app.url}/b24/events?k={key}" and len(key) >= 22
    # The ONAPPINSTALL the installer bound went to that URL, key and all.
    assert sandbox.release_events(mid) == {"released": 1}
    [onappinstall] = [d for d in sandbox.wait_deliveries(mid, timeout=10)
                      if d["event"] == "ONAPPINSTALL"]
    assert (onappinstall["url"], onappinstall["status"]) == (url, 200)

    # A portal bound before handler keys existed: the next setup binds the keyed URL and
    # unbinds the old one (each binding delivers: left alone, every event came twice).
    row = portal_row(mid)
    for name in plan.EVENTS:
        direct.call_method(row, "event.unbind", {"event": name, "handler": url})
        direct.call_method(row, "event.bind", {"event": name,
                                                "handler": f"{live_app.url}/b24/events"})
    assert sandbox.install_app(mid, live_app.url)["status"] == 200
    assert {(b["event"], b["handler"]) for b in sandbox.bindings(mid)["events"]} == {
        (name, url) for name in plan.EVENTS}
    out = sandbox.trigger_event(mid, "ONUSERADD", {"FIELDS": {"ID": "2"}})
    assert out["statuses"] == [200]  # once, to the keyed URL
