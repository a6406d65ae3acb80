"""Rotation safety: no refresher presents a spent token, no older answer overwrites a newer row."""

from __future__ import annotations

import threading

from app.dispatcher import direct
from app.extensions import db
from app.tenants import service, tokens
from tests.tenants.conftest import reload_portal


def test_a_second_refresh_of_the_same_version_is_a_no_op(make_portal, sandbox):
    portal, _ = make_portal()
    first = tokens.refresh(portal, seen_version=1)
    again = tokens.refresh(portal, seen_version=1)  # a caller that saw the old chain
    assert first == again and first.token_version == 2
    counters = sandbox.counters(portal.member_id)
    assert counters["refreshes"] == 1
    assert counters["violations"]["refresh_token_reuse"] == 0


def test_a_new_chain_stored_mid_refresh_wins_over_the_late_answer(
        oauth_app, make_portal, sandbox, relay_factory):
    portal, _ = make_portal()
    relay = relay_factory(forward="after_release")  # parks the refresh until released
    oauth_app.config["B24_OAUTH_TOKEN_URL"] = relay.url
    sandbox.expire_tokens(portal.member_id)
    outcome: dict[str, object] = {}

    def caller() -> None:
        with oauth_app.app_context():
            mine = service.get_portal(portal.member_id)
            try:
                outcome["result"] = direct.call_method(mine, "user.current")
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcome["error"] = exc
            db.session.remove()

    thread = threading.Thread(target=caller)
    thread.start()
    assert relay.arrived.wait(20)  # the refresh of chain version 1 is in flight
    fresh = sandbox.issue_tokens(portal.member_id)  # meanwhile an admin opens the app
    service.store_new_chain(portal, access_token=fresh["access_token"],
                            refresh_token=fresh["refresh_token"], expires_in=3600)
    relay.release.set()  # now the old chain's answer arrives, late
    thread.join(30)

    assert "error" not in outcome and outcome["result"]["ID"] == "1"
    assert sandbox.counters(portal.member_id)["refreshes"] == 1  # the old chain did rotate...
    stored = reload_portal(portal.member_id)
    assert stored.access_token == fresh["access_token"]  # ...but its answer was discarded
    assert stored.refresh_token == fresh["refresh_token"]
    assert stored.token_version == 2 and stored.refresh_started_at is None
