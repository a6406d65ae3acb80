"""A per-portal budget for verified events (issue 21 point 2): a token holder's flood is
cut with 429 at so many events and bytes a minute, other portals go on, and an event type
the app does not handle has a lower size cap."""

from __future__ import annotations

import threading
import time

import httpx
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.extensions import db
from app.ingress.models import InboxEvent
from tests.ingress.conftest import FORM, Gunicorn, b24_body, make_portal


def _rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("b24relay_events_rejected_total",
                                     {"source": "b24", "reason": reason}) or 0.0


def _stored(portal_id: int) -> int:
    db.session.rollback()
    return int(db.session.scalar(select(func.count(InboxEvent.id))
                                 .where(InboxEvent.portal_id == portal_id)) or 0)


def _early_in_a_minute(margin: float = 20.0) -> None:
    """Start a flood early in a minute, so that the budget's window does not end within it."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.1)


def test_a_flood_of_verified_events_is_cut_at_the_count_budget_and_other_portals_go_on(
        app, deliver):
    app.config["INTAKE_EVENTS_PER_PORTAL_PER_MINUTE"] = 20
    flooder, other = make_portal(), make_portal()
    before = _rejected("portal_budget")
    _early_in_a_minute()
    answers = [deliver.b24(flooder, data={"FIELDS": {"ID": str(i)}}) for i in range(30)]
    assert [a.status_code for a in answers] == [200] * 20 + [429] * 10
    assert answers[-1].json["error"] == "portal_budget"
    assert _stored(flooder.id) == 20
    assert _rejected("portal_budget") == before + 10
    assert deliver.b24(other).status_code == 200 and _stored(other.id) == 1
    # Forged events for the flooder are still forged (401), not spent budget.
    assert deliver.b24(flooder, token="f" * 32, ts="1").status_code == 401


def test_the_byte_budget_counts_the_bodies(app, deliver):
    app.config["INTAKE_BYTES_PER_PORTAL_PER_MINUTE"] = 40_000
    flooder = make_portal()
    _early_in_a_minute()
    codes = [deliver.b24(flooder, data={"FIELDS": {"ID": str(i), "X": "x" * 9000}}).status_code
             for i in range(8)]
    assert codes == [200] * 4 + [429] * 4  # ~9.3 KB each: a fifth would pass 40 KB
    assert _stored(flooder.id) == 4


def test_an_event_the_app_does_not_handle_has_a_lower_size_cap(app, deliver):
    app.config["INTAKE_UNHANDLED_MAX_BYTES"] = 4096
    portal = make_portal()
    big = {"FIELDS": {"ID": "1", "X": "x" * 8000}}
    unhandled = deliver.b24(portal, event="ONMADEUPEVENT", data=big)
    assert unhandled.status_code == 413 and unhandled.json["error"] == "too_large"
    assert deliver.b24(portal, event="ONUSERADD", data=big).status_code == 200  # handled
    assert deliver.b24(portal, event="ONMADEUPEVENT").status_code == 200  # small
    assert _stored(portal.id) == 2


def test_through_gunicorn_four_connections_are_cut_at_the_budget(app):
    flooder, other = make_portal(), make_portal()
    member_id, token = flooder.member_id, flooder.application_token  # no ORM in the threads
    budget = 200
    server = Gunicorn(app.config, WEB_CONCURRENCY="2", WEB_THREADS="4",
                      INTAKE_EVENTS_PER_PORTAL_PER_MINUTE=str(budget))
    codes: list[int] = []
    try:
        _early_in_a_minute(margin=30)

        def flood(sender: int) -> None:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                for i in range(100):
                    body = b24_body(member_id, token,
                                    data={"FIELDS": {"ID": f"{sender}-{i}"}})
                    codes.append(http.post("/b24/events", content=body, headers=FORM)
                                 .status_code)

        senders = [threading.Thread(target=flood, args=(n,)) for n in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        body = b24_body(other.member_id, other.application_token)
        other_code = httpx.post(server.url + "/b24/events", content=body, headers=FORM,
                                timeout=10).status_code
    finally:
        server.stop()
    stored = _stored(flooder.id)
    # Exact within one process; two processes share their counts at least once a second or
    # every twentieth of the budget, so each may overshoot by that much at most.
    assert budget <= stored <= budget + 2 * (budget // 20 + 8), stored
    assert sorted(set(codes)) == [200, 429] and codes.count(200) == stored
    assert other_code == 200
    print(f"\n{len(codes)} flood events, {stored} stored (budget {budget})")
