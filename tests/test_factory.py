"""The app factory wires a working app from a test mapping."""

from __future__ import annotations

from sqlalchemy import select

from app.extensions import db
from app.tenants.models import Portal, PortalStatus


def test_test_mapping_wins_over_environment(make_app, monkeypatch):
    monkeypatch.setenv("APP_PUBLIC_URL", "https://from-env.example")
    app = make_app(APP_PUBLIC_URL="https://from-test.example")
    assert app.config["APP_PUBLIC_URL"] == "https://from-test.example"
    assert app.config["TESTING"] is True


def test_health_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readiness_fails_when_redis_is_unreachable(make_app):
    app = make_app(REDIS_URL="redis://127.0.0.1:1/0")
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["checks"]["redis"].startswith("error")


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_what_the_intake_endpoints_did(app, client):
    scrape = {"Authorization": f"Bearer {app.config['METRICS_TOKEN']}"}
    before = client.get("/metrics", headers=scrape).get_data(as_text=True)
    refused = client.post("/b24/events", data="event=ONAPPINSTALL",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert refused.status_code == 400
    resp = client.get("/metrics", headers=scrape)
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    after = resp.get_data(as_text=True)
    name = "b24relay_events_rejected_total"
    assert _sample(after, name, source="b24", reason="malformed") == \
        _sample(before, name, source="b24", reason="malformed") + 1
    assert "b24relay_event_ack_seconds_bucket" in after


def test_portal_round_trip_with_plan_limits(app):
    portal = Portal(member_id="a" * 32, domain="acme.bitrix24.com",
                    client_endpoint="https://acme.bitrix24.com/rest/")
    portal.set_plan("enterprise")
    db.session.add(portal)
    db.session.commit()
    db.session.expire_all()
    found = Portal.by_member_id("a" * 32)
    assert found is not None
    assert (found.rate_per_second, found.rate_burst) == (5.0, 250)
    assert found.status == PortalStatus.INSTALLING.value
    assert db.session.scalars(select(Portal)).all() == [found]
