"""A portal's own routing rules (issue 24 point 2): GET /api/v1/calls/route against sandbox
portals over loopback, real Redis, the real database. Each portal routes by its own priority
of CRM kinds and its own rule about responsibles not at work, the app's where it has none;
a rules change is not answered from entries chosen under the old rules (the cache's TTL is
300 s: the change shows within seconds)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from app.extensions import db
from app.installation import settings_form
from app.telephony import routing
from app.tenants.models import Portal
from tests.conftest import wait_for
from tests.telephony.test_routing import ask, crm, make_line, searches
from tests.tenants.conftest import oauth_app  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(120)
BOB, CY = 2, 3  # Bob's day is open, Cy's closed (tests/telephony/test_routing.py USERS)


def _save(line: dict[str, Any], **values: str) -> None:
    portal = db.session.get(Portal, line["portal_id"])
    applied = settings_form.apply(portal, values)
    db.session.commit()
    settings_form.after_commit(portal, applied)


@pytest.fixture
def lines(oauth_app: Any, sandbox: Any) -> tuple[dict[str, Any], dict[str, Any]]:  # noqa: F811
    """Portals A and B, each with the same clients: a contact of Bob and a lead of Cy."""
    found = []
    for _ in range(2):
        line = make_line(sandbox)
        crm(sandbox, line, "contact", BOB)
        crm(sandbox, line, "lead", CY)
        found.append(line)
    return found[0], found[1]


def _user(client: Any, line: dict[str, Any]) -> int | None:
    status, body, _ = ask(client, line)
    return body["user_id"] if status == 200 else None


def test_each_portal_routes_by_its_own_rules(app, client, lines, sandbox, redis_client):
    a, b = lines
    _save(a, route_priority="lead, contact", route_skip_absent="0")
    assert _user(client, a) == CY  # the lead wins, and Cy is named though his day is closed
    assert _user(client, b) == BOB  # the app's contact,company,lead and skip-absent

    redis_client.flushdb()
    _save(a, route_skip_absent="1")
    assert _user(client, a) == BOB  # Cy skipped: the next kind, the contact

    redis_client.flushdb()
    _save(a, route_priority="company")  # kinds left out never route
    assert _user(client, a) is None
    assert _user(client, b) == BOB

    redis_client.flushdb()
    asked = len(searches(sandbox, a))
    _save(a, route_priority="none")
    assert _user(client, a) is None
    assert len(searches(sandbox, a)) == asked, "a portal that never routes does not ask"

    redis_client.flushdb()
    _save(a, route_priority="", route_skip_absent="")  # the app's rules back
    assert _user(client, a) == BOB


def test_a_rules_change_is_not_answered_from_the_old_rules_entries(app, client, lines,
                                                                  sandbox, redis_client):
    a, b = lines
    assert (_user(client, a), _user(client, b)) == (BOB, BOB)
    searched_b = len(searches(sandbox, b))
    assert redis_client.pttl(f"b24relay:route:{a['portal_id']}:+49301112223") > 290_000

    _save(a, route_priority="lead", route_skip_absent="0")
    saved = time.monotonic()
    wait_for(lambda: _user(client, a) == CY, timeout=10, interval=0.2)
    assert time.monotonic() - saved < routing.RULES_MEMO + 2.0, "served the old rules' answer"
    for _ in range(5):  # the new answer is cached, under the new rules
        assert _user(client, a) == CY
    assert routing.cached(a["portal_id"], "+49301112223").rules == "lead|0"

    # B's rules did not change: its entry is still served, Bitrix24 not asked again.
    assert _user(client, b) == BOB and len(searches(sandbox, b)) == searched_b


def test_an_answer_a_lookup_chose_under_the_old_rules_is_never_served(app, client, lines,
                                                                       redis_client):
    """A lookup that started before the save stores its answer with the rules it used."""
    a, _ = lines
    phone = "+49301112223"
    routing.store(a["portal_id"], phone, routing.Match(
        entity_type="CONTACT", entity_id=1, responsible=BOB, user_id=BOB, extension="102",
        rules="contact,company,lead|1"))
    assert routing.cached(a["portal_id"], phone) is not None
    _save(a, route_priority="lead", route_skip_absent="0")
    wait_for(lambda: routing.cached(a["portal_id"], phone) is None, timeout=routing.RULES_MEMO + 2)
    assert _user(client, a) == CY
