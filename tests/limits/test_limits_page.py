"""The settings page's dispatcher limits and routing rules (issue 24 point 2), over real
HTTP: the live app, the sandbox portal opening the page as its iframe, the test database.

The form is submitted as a browser submits it: every field of ``#settings-form``, including
the limits, which sit in the page's "Dispatcher limits" table outside the form element and
belong to it by their ``form`` attribute.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import httpx

from app.extensions import db
from tests.install.conftest import portal_row
from tests.placements_settings.conftest import (
    EMPLOYEE,
    install_another,
    open_page,
    session_of,
)

FORM = "settings-form"
LIMIT_FIELDS = ("max_batches_in_flight", "sequential", "route_priority", "route_skip_absent")


class _Fields(HTMLParser):
    """The fields a browser sends when ``#settings-form`` is submitted, as they are shown."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.values: dict[str, str] = {}
        self._inside = False
        self._select: str | None = None
        self._first: str | None = None
        self._area: str | None = None

    def _ours(self, attrs: dict[str, str | None]) -> bool:
        return self._inside or attrs.get("form") == FORM

    def handle_starttag(self, tag: str, raw: list[tuple[str, str | None]]) -> None:
        attrs = dict(raw)
        name = attrs.get("name")
        if tag == "form":
            self._inside = attrs.get("id") == FORM
        elif tag == "input" and name and self._ours(attrs):
            if attrs.get("type") != "checkbox" or "checked" in attrs:
                self.values[name] = attrs.get("value") or ""
        elif tag == "select" and name and self._ours(attrs):
            self._select, self._first = name, None
        elif tag == "option" and self._select:
            if self._first is None:
                self._first = attrs.get("value") or ""
                self.values.setdefault(self._select, self._first)
            if "selected" in attrs:
                self.values[self._select] = attrs.get("value") or ""
        elif tag == "textarea" and name and self._ours(attrs):
            self._area = name
            self.values[name] = ""

    def handle_data(self, data: str) -> None:
        if self._area:
            self.values[self._area] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea":
            self._area = None


def fields(page: str) -> dict[str, str]:
    parser = _Fields()
    parser.feed(page)
    return parser.values


def submit(live_app: Any, page: str, **changes: str) -> httpx.Response:
    """Submit the page's settings form with ``changes`` typed in."""
    with live_app.http() as http:
        return http.post("/placements/settings", data={**fields(page), **changes})


def _stored(member_id: str) -> tuple[Any, ...]:
    db.session.remove()
    s = portal_row(member_id).settings
    return s.max_batches_in_flight, s.sequential, s.route_priority, s.route_skip_absent


def _field_error(page: str, field: str) -> str:
    found = re.search(rf'<p class="field-error" id="error-{field}"[^>]*>([^<]*)</p>', page)
    return found.group(1) if found else ""


def test_an_admin_saves_limits_and_routing_rules_from_the_page(sandbox, installed, live_app):
    member_id = installed["member_id"]
    page = open_page(sandbox, member_id)
    shown = fields(page)
    assert {k: shown[k] for k in LIMIT_FIELDS} == dict.fromkeys(LIMIT_FIELDS, "")
    assert "automatic: 60" in page  # the app's rule on the standard plan, as a placeholder

    saved = submit(live_app, page, max_batches_in_flight="8", sequential="1",
                   route_priority="lead, contact", route_skip_absent="0")
    assert saved.status_code == 200 and "Settings saved." in saved.text, saved.text
    assert _stored(member_id) == (8, True, "lead,contact", False)
    again = fields(saved.text)
    assert {k: again[k] for k in LIMIT_FIELDS} == {
        "max_batches_in_flight": "8", "sequential": "1", "route_priority": "lead,contact",
        "route_skip_absent": "0"}
    # Saving the page as it is shown changes nothing; "none" survives a round trip.
    assert "Settings saved." in submit(live_app, saved.text, route_priority="none").text
    page = open_page(sandbox, member_id)
    assert fields(page)["route_priority"] == "none"
    assert "Settings saved." in submit(live_app, page).text
    assert _stored(member_id) == (8, True, "", False)

    # Back to automatic and the app's rules.
    back = submit(live_app, open_page(sandbox, member_id), max_batches_in_flight="",
                  sequential="", route_priority="", route_skip_absent="")
    assert back.status_code == 200
    assert _stored(member_id) == (None, None, None, None)


def test_bad_values_are_shown_by_their_fields_and_nothing_is_saved(sandbox, installed,
                                                                   live_app):
    member_id = installed["member_id"]
    refused = submit(live_app, open_page(sandbox, member_id), max_batches_in_flight="500",
                     route_priority="contact, deal, contact", crm_source="WEB")
    assert refused.status_code == 400
    assert "Nothing was saved" in refused.text
    assert "a number from 1 to 60" in _field_error(refused.text, "max_batches_in_flight")
    assert "is not a CRM kind" in _field_error(refused.text, "route_priority")
    assert 'id="max_batches_in_flight"' in refused.text and 'aria-invalid="true"' in refused.text
    typed = fields(refused.text)  # what the admin typed comes back to be corrected
    assert (typed["max_batches_in_flight"], typed["route_priority"]) == (
        "500", "contact, deal, contact")
    assert _stored(member_id) == (None, None, None, None)
    db.session.remove()
    assert portal_row(member_id).settings.crm_source is None  # all or nothing


def test_an_employee_sees_the_limits_but_no_field(sandbox, installed, live_app):
    member_id = installed["member_id"]
    admin = open_page(sandbox, member_id)
    submit(live_app, admin, max_batches_in_flight="5")
    page = open_page(sandbox, member_id, user_id=EMPLOYEE)
    assert 'name="max_batches_in_flight"' not in page and 'name="sequential"' not in page
    assert re.search(r'id="batches-in-flight">\s*5\s*<', page), page


def test_a_page_of_portal_a_cannot_change_portal_bs_limits(sandbox, installed, make_portal,
                                                           live_app):
    a = installed
    b = install_another(sandbox, make_portal, live_app)
    page_a, page_b = open_page(sandbox, a["member_id"]), open_page(sandbox, b["member_id"])
    # B's page session with A's form token (and A's fields): refused, neither portal changes.
    crossed = {**fields(page_a), "s": session_of(page_b), "max_batches_in_flight": "2",
               "sequential": "1", "route_priority": "lead"}
    with live_app.http() as http:
        resp = http.post("/placements/settings", data=crossed)
    assert resp.status_code == 403
    assert _stored(a["member_id"]) == _stored(b["member_id"]) == (None, None, None, None)
    # A's own save (a fresh page: the refused post spent A's token) changes A only.
    assert "Settings saved." in submit(live_app, open_page(sandbox, a["member_id"]),
                                       sequential="1").text
    assert _stored(a["member_id"])[1] is True and _stored(b["member_id"])[1] is None
