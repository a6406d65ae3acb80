"""No inbox row keeps an event's tokens in clear: not while it waits, is parked, or is dead.

The tokens are looked for in the raw database: the SQLite file's bytes (with its WAL
and journal), or on PostgreSQL the inbox table's rows as text.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
from sqlalchemy import text

from app.extensions import db
from app.ingress.formparse import encode_form
from app.ingress.sealed import SEALED_FIELD
from tests.conftest import wait_for
from tests.ingress.conftest import FORM, b24_body, inbox_rows, statuses
from tests.install.conftest import CLIENT_ID, CLIENT_SECRET, USERS, live_app, portal_row  # noqa: F401


def raw_database(database_url: str) -> bytes:
    """What an attacker with the database files, or a database dump, would read."""
    db.session.remove()
    if database_url.startswith("sqlite:///"):
        path = Path(database_url[len("sqlite:///"):])
        return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-journal"))
                        if p.exists())
    rows = db.session.execute(text("SELECT t::text FROM inbox_events t")).scalars()
    return "\n".join(rows).encode()


def _post(url: str, event: str, auth: dict[str, str], **data: str) -> httpx.Response:
    """An event as Bitrix24 posts it, with the auth block given."""
    body = encode_form({"event": event, "event_handler_id": "7",
                        "data": data or {"FIELDS": {"ID": "1"}}, "ts": str(uuid.uuid4().int)[:10],
                        "auth": {"expires_in": "3600", "user_id": "1", **auth}})
    return httpx.post(f"{url}/b24/events", content=body, headers=FORM, timeout=30)


def _user_tokens() -> dict[str, str]:
    return {"access_token": f"acc{uuid.uuid4().hex}", "refresh_token": f"ref{uuid.uuid4().hex}"}


def test_no_inbox_row_keeps_an_events_tokens_in_clear(app, sandbox, live_app,  # noqa: F811
                                                      start_handler_worker, effects,
                                                      database_url):
    portal = sandbox.create_portal(users=USERS, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                   app_url=live_app.url)
    member_id, app_token = portal["member_id"], portal["application_token"]
    # ONAPPINSTALL is the first the app hears of the portal (its installer URL never ran).
    out = sandbox.install_app(member_id, live_app.url, send_onappinstall=True,
                              install_url=live_app.url + "/healthz")
    assert [d["status"] for d in out["onappinstall"]] == [200]
    [waiting] = inbox_rows()
    assert waiting.unverified and set(waiting.payload["auth"]).isdisjoint(
        {"access_token", "refresh_token", "application_token"})
    assert SEALED_FIELD in waiting.payload
    assert app_token.encode() not in raw_database(database_url)

    start_handler_worker(threads=2, **live_app.worker_env())
    # The handler got the sealed tokens: it verified them with app.info and kept the chain.
    installed = wait_for(lambda: (r := portal_row(member_id)) and r.refresh_token and r,
                         timeout=60)
    assert installed.application_token == app_token
    secrets = [app_token, installed.access_token, installed.refresh_token]

    # ONAPPUPDATE with a new admin chain: its handler gets the tokens too.
    chain = sandbox.issue_tokens(member_id, user_id=1)
    auth = {"member_id": member_id, "application_token": app_token,
            "access_token": chain["access_token"], "refresh_token": chain["refresh_token"],
            "server_endpoint": portal["server_endpoint"], "domain": portal["domain"],
            "client_endpoint": portal["client_endpoint"]}
    assert _post(live_app.url, "ONAPPUPDATE", auth, VERSION="2").status_code == 200
    wait_for(lambda: portal_row(member_id).refresh_token == chain["refresh_token"], timeout=60)
    secrets += [chain["access_token"], chain["refresh_token"]]

    # Events that end done, dead, and parked (no handler), each with a user's tokens.
    for event in ("TESTEFFECT", "TESTBROKEN", "ONCRMDEALUPDATE"):
        tokens = _user_tokens()
        secrets += tokens.values()
        response = _post(live_app.url, event, {"member_id": member_id,
                                               "application_token": app_token, **tokens})
        assert response.status_code == 200, response.text
    wait_for(lambda: statuses() == {"done": 3, "dead": 1, "unhandled": 1}, timeout=60)
    assert len(effects()) == 1

    raw = raw_database(database_url)
    assert member_id.encode() in raw  # the rows are there to be read
    found = [s for s in secrets if s.encode() in raw]
    assert found == [], "tokens in clear in the database"
    assert all(SEALED_FIELD not in row.payload for row in inbox_rows()
               if row.status in ("done", "dead")), "a finished row keeps no sealed tokens"


def test_a_sealed_field_from_the_sender_is_dropped(app, client, portal, redis_client):
    body = b24_body("a" * 32, "t", event="ONAPPINSTALL") + f"&{SEALED_FIELD}=gAAAAAforged"
    assert client.post("/b24/events", data=body, headers=FORM).status_code == 200
    body = b24_body(portal.member_id, portal.application_token) + f"&{SEALED_FIELD}=gAAAAAx"
    assert client.post("/b24/events", data=body, headers=FORM).status_code == 200
    install, other = inbox_rows()
    assert install.payload[SEALED_FIELD] != "gAAAAAforged"  # intake's own, in its place
    assert SEALED_FIELD not in other.payload
