"""``/metrics`` as a stranger and as the operator's Prometheus (issue 21, point 3).

A stranger who could read it listed the customers: the dispatcher's series were labelled
with every active portal's member_id, which is also what a forged ONAPPINSTALL needs. Now
it answers only the bearer of ``METRICS_TOKEN``, is not served at all without one, and no
label names a portal (the dispatcher's carry the plan).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from app.config import ConfigError, from_environment, validate
from app.dispatcher.engine import Engine
from app.dispatcher.models import OutboxCommand
from app.dispatcher.sweep import sweep
from app.extensions import db
from app.tenants.models import Portal
from tests.conftest import wait_for
from tests.install.conftest import LiveApp, process_queued


@pytest.fixture
def form_kind() -> str:
    """One portal of each iframe form is installed by hand below, so no parametrising."""
    return "full"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _scrape(live_app: LiveApp, **headers: str) -> httpx.Response:
    with live_app.http() as http:
        return http.get("/metrics", headers=headers)


def test_metrics_answer_only_the_bearer_of_the_token(live_app):
    token = live_app.app.config["METRICS_TOKEN"]
    wrong = token[:-1] + ("a" if token[-1] != "a" else "b")  # as long, one character off
    refused = [_scrape(live_app),
               _scrape(live_app, **_bearer(wrong)),
               _scrape(live_app, Authorization="Bearer"),
               _scrape(live_app, Authorization=f"Basic {token}"),
               _scrape(live_app, Authorization=token)]
    assert [r.status_code for r in refused] == [401] * len(refused)
    assert all("b24relay_" not in r.text for r in refused)
    assert refused[0].headers["WWW-Authenticate"].startswith("Bearer")
    allowed = _scrape(live_app, **_bearer(token))
    assert allowed.status_code == 200 and "b24relay_events_received_total" in allowed.text


def test_without_a_token_metrics_are_not_served(live_app):
    live_app.app.config["METRICS_TOKEN"] = None  # production that set none
    answers = [_scrape(live_app), _scrape(live_app, **_bearer("anything-at-all-0123456789"))]
    assert [r.status_code for r in answers] == [404, 404]
    with live_app.http() as http:  # the same answer as a path that does not exist
        assert http.get("/no-such-page").text == answers[0].text


def test_production_generates_no_token_and_refuses_a_short_one(tmp_path, monkeypatch):
    for name, value in {"B24_CLIENT_ID": "app.prod", "B24_CLIENT_SECRET": "s",
                        "SECRET_KEY": "k", "TOKEN_ENCRYPTION_KEY": "x",
                        "B24RELAY_SINGLE_HOST": "1"}.items():
        monkeypatch.setenv(name, value)
    assert from_environment(tmp_path)["METRICS_TOKEN"] is None
    assert not (tmp_path / ".metrics_token").exists()
    monkeypatch.setenv("TOKEN_ENCRYPTION_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("METRICS_TOKEN", "t" * 40)
    assert from_environment(tmp_path)["METRICS_TOKEN"] == "t" * 40
    monkeypatch.setenv("METRICS_TOKEN", "short")
    with pytest.raises(ConfigError, match="METRICS_TOKEN must be at least 16"):
        validate(from_environment(tmp_path))


def _install(sandbox: Any, make_portal: Any, live_app: LiveApp, **extra: Any) -> dict[str, Any]:
    """A sandbox portal with the app installed through /install and its ONAPPINSTALL."""
    portal = make_portal(**extra)
    result = sandbox.install_app(portal["member_id"], live_app.url)
    assert result["status"] == 200, result["body"]
    finished = sandbox.finish_install(portal["member_id"])
    assert [d["status"] for d in finished["onappinstall"]] == [200]
    assert process_queued("ONAPPINSTALL") == ["done"]
    return portal


def _outbox(member_ids: list[str]) -> list[str]:
    """The statuses of these portals' outbox commands, as committed now."""
    db.session.remove()
    return list(db.session.scalars(
        select(OutboxCommand.status).join(Portal, Portal.id == OutboxCommand.portal_id)
        .where(Portal.member_id.in_(member_ids))))


def _leaks(text: str, portals: list[dict[str, Any]]) -> list[str]:
    """The lines of a scrape that name one of these portals (member_id or domain)."""
    names = [p["member_id"] for p in portals] + [p["domain"] for p in portals]
    return [line for line in text.splitlines() for name in names if name in line]


def test_no_metric_names_a_portal(live_app, sandbox, make_portal):
    portals = [_install(sandbox, make_portal, live_app),
               _install(sandbox, make_portal, live_app, iframe_form="short")]
    members = [p["member_id"] for p in portals]
    token = live_app.app.config["METRICS_TOKEN"]
    for member_id in members:  # intake: Bitrix24 posts an event of each portal
        sent = sandbox.trigger_event(member_id, "ONUSERADD", {"FIELDS": {"ID": "2"}})
        assert sent["statuses"] == [200]
    assert process_queued("ONUSERADD") == ["done", "done"]  # each submits a user.get
    waiting = _scrape(live_app, **_bearer(token)).text  # no engine yet: they wait in the outbox
    assert not _leaks(waiting, portals), _leaks(waiting, portals)
    assert 'b24relay_outbox_depth{plan="standard",' in waiting
    engine = Engine(live_app.app).start()
    try:
        assert len(sweep().nudged) == 2  # the workers' backstop wakes the dispatcher
        wait_for(lambda: (s := _outbox(members)) and set(s) == {"done"}, timeout=30)
    finally:
        engine.stop(timeout=5)
    sent = _scrape(live_app, **_bearer(token)).text
    # No line names either portal, though the run is in the output, by plan.
    assert not _leaks(sent, portals), _leaks(sent, portals)
    assert 'b24relay_dispatch_commands_total{outcome="done",plan="standard"}' in sent
    assert 'b24relay_events_stored_total{source="b24",type="ONUSERADD"}' in sent
