"""An ONAPPINSTALL from an unknown portal (unverified first contact): small, and rationed."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from app.ingress.formparse import encode_form
from app.ingress.sealed import SEALED_FIELD
from app.tenants import handler_key
from app.tenants.models import PortalStatus
from tests.ingress.conftest import (
    FORM,
    b24_body,
    inbox_count,
    inbox_rows,
    make_portal,
    queued_messages,
)

AUTH = {"access_token": "acc", "refresh_token": "ref", "application_token": "app",
        "expires": "1762093575", "expires_in": "3600", "scope": "crm,telephony",
        "domain": "portal.bitrix24.test", "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "P", "client_endpoint": "https://portal.bitrix24.test/rest/", "user_id": "1"}


def _install(member_id: str | None = None, data: dict | None = None, **auth: object) -> str:
    """A first-contact ONAPPINSTALL form as Bitrix24 sends it (protocol §2.4)."""
    return encode_form({
        "event": "ONAPPINSTALL", "event_handler_id": "1",
        "data": data or {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"},
        "ts": "1762089975",
        "auth": {**AUTH, "member_id": member_id or uuid.uuid4().hex, **auth}})


def _post(client, body: str, address: str = "203.0.113.7", path: str = "/b24/events"):
    return client.post(path, data=body, headers=FORM, environ_base={"REMOTE_ADDR": address})


def _same_minute() -> None:
    """Counting windows are calendar minutes: start a ceiling test early in one."""
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


def test_only_what_verification_and_the_handler_need_is_stored(client, redis_client):
    bulky = {"VERSION": "1", "LANGUAGE_ID": "en", "NOTE": "x" * 5000,
             "NESTED": {str(i): {"A": "b" * 100} for i in range(200)}}
    body = _install(data=bulky, extra="y" * 20000, nested={"a": "z" * 1000})
    assert len(body) > 40_000
    assert _post(client, body).status_code == 200
    [row] = inbox_rows()
    assert row.unverified
    assert set(row.payload) == {"event", "ts", "data", "auth", SEALED_FIELD}
    assert row.payload["data"] == {"VERSION": "1", "LANGUAGE_ID": "en"}
    assert set(row.payload["auth"]) == set(AUTH) - {"access_token", "refresh_token",
                                                    "application_token"} | {"member_id"}
    assert len(json.dumps(row.payload)) < 1500


@pytest.mark.parametrize("field", ["domain", "access_token"])
def test_one_still_large_when_pruned_gets_413_and_nothing_is_stored(app, client, redis_client,
                                                                   field):
    response = _post(client, _install(**{field: "d" * 5000}))
    assert response.status_code == 413
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0


def test_events_of_known_portals_are_stored_whole(portal, deliver):
    assert deliver.b24(portal, data={"FIELDS": {"ID": "1", "NOTE": "x" * 5000}}).status_code == 200
    assert inbox_rows()[0].payload["data"]["FIELDS"]["NOTE"] == "x" * 5000


def test_first_contacts_are_rationed_per_address_and_in_total(make_app, redis_client, portal):
    web = make_app(FIRST_CONTACT_PER_ADDRESS_PER_MINUTE=3, FIRST_CONTACT_PER_MINUTE=5)
    client = web.test_client()
    _same_minute()
    first = [_post(client, _install(), "203.0.113.1").status_code for _ in range(4)]
    assert first == [200, 200, 200, 429], "the address's own ceiling"
    second = [_post(client, _install(), "203.0.113.2").status_code for _ in range(3)]
    assert second == [200, 200, 429], "the global ceiling (the refused 4th did not count)"
    refused = _post(client, _install(), "203.0.113.3")
    assert refused.status_code == 429 and refused.json["error"] == "first_contact_limit"
    assert inbox_count() == 5
    # Portals the app knows are not rationed.
    ok = _post(client, b24_body(portal.member_id, portal.application_token), "203.0.113.1")
    assert ok.status_code == 200 and inbox_count() == 6


def test_a_portal_installed_by_its_admin_is_not_rationed_while_it_waits_for_its_token(
        app, make_app, redis_client):
    # The short iframe form carries no APPLICATION_TOKEN: /install stores the portal
    # without one, and only its ONAPPINSTALL brings it. Refusing that would be final. It
    # comes through the binding the installer made, whose URL carries the handler key.
    web = make_app(FIRST_CONTACT_PER_ADDRESS_PER_MINUTE=1, FIRST_CONTACT_PER_MINUTE=2)
    client = web.test_client()
    waiting = make_portal(application_token=None, status=PortalStatus.ACTIVE.value)
    with web.app_context():
        key = handler_key.for_member(waiting.member_id)
    _same_minute()
    statuses = [_post(client, _install(waiting.member_id, data={"VERSION": str(v)}),
                      path=f"/b24/events?k={key}").status_code for v in range(3)]
    assert statuses == [200, 200, 200]
    assert [row.unverified for row in inbox_rows()] == [True, True, True]
    # Without the key (an employee's forgeries, with or without a made-up one) it is
    # rationed like an unknown portal's: nobody floods the inbox and the auth server.
    forged = [_post(client, _install(waiting.member_id, data={"VERSION": str(v)}), "203.0.113.8",
                    path=f"/b24/events?k={'A' * len(key)}" if v else "/b24/events").status_code
              for v in range(3, 5)]
    assert forged == [200, 429] and inbox_count() == 4
    # An uninstalled portal is rationed like an unknown one.
    gone = make_portal(status=PortalStatus.UNINSTALLED.value)
    assert [_post(client, _install(gone.member_id, data={"VERSION": str(v)}),
                  "203.0.113.9").status_code for v in range(2)] == [200, 429]


def test_without_redis_first_contacts_are_still_stored(app, make_app):
    web = make_app(REDIS_URL="redis://127.0.0.1:9/0", FIRST_CONTACT_PER_ADDRESS_PER_MINUTE=1,
                   FIRST_CONTACT_PER_MINUTE=1)
    client = web.test_client()
    for _ in range(3):
        started = time.perf_counter()
        assert _post(client, _install()).status_code == 200
        assert time.perf_counter() - started < 1.0
    assert inbox_count() == 3
