"""The application_token check at SaaS scale: no cache, so every change counts at once.

Intake compares a keyed hash of the event's token with the one stored beside the encrypted
token, inside the statement that stores the event: a token replaced or cleared by a commit
is refused from that commit on, in every process, and 10,000 portals cost what one does.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx
from sqlalchemy import func, select, update

from app.extensions import db
from app.ingress import token_hash
from app.ingress.models import InboxEvent
from app.installation import install
from app.tenants.models import Portal, PortalStatus
from tests.ingress.conftest import FORM, b24_body, make_portal


def _post(url: str, portal: Portal, token: str) -> httpx.Response:
    body = b24_body(portal.member_id, token, ts=str(time.time_ns()))
    return httpx.post(f"{url}/b24/events", content=body, headers=FORM, timeout=10)


def _warm(url: str, portal: Portal, token: str) -> None:
    """Events accepted by the server's processes (each of its workers, likely)."""
    for _ in range(5):
        assert _post(url, portal, token).status_code == 200


def test_a_new_token_counts_in_another_process_as_soon_as_its_commit_returns(app, gunicorn):
    portal = make_portal()
    old, new = portal.application_token, secrets.token_hex(16)
    _warm(gunicorn.url, portal, old)
    assert install.record_application_token(portal, new)
    db.session.commit()
    assert _post(gunicorn.url, portal, old).status_code == 401
    assert _post(gunicorn.url, portal, new).status_code == 200


def test_an_uninstalled_portals_dropped_token_is_refused_in_another_process_at_once(
        app, gunicorn):
    portal = make_portal()
    token = portal.application_token
    _warm(gunicorn.url, portal, token)
    portal.status = PortalStatus.UNINSTALLED.value  # its token died with the installation
    portal.application_token = None
    db.session.commit()
    assert _post(gunicorn.url, portal, token).status_code == 401


def test_a_token_written_by_another_app_counts_for_the_next_event(app, client, make_app):
    portal = make_portal()
    old, new = portal.application_token, secrets.token_hex(16)
    assert _post_in(client, portal, old).status_code == 200
    other = make_app()
    with other.app_context():
        assert install.record_application_token(db.session.get(Portal, portal.id), new)
        db.session.commit()
    assert _post_in(client, portal, old).status_code == 401
    assert _post_in(client, portal, new).status_code == 200


def test_events_spread_over_many_portals_are_each_checked_against_their_own(app, client):
    portals = [make_portal() for _ in range(50)]
    for portal in portals:
        assert _post_in(client, portal, portal.application_token).status_code == 200
    neighbour = portals[1].application_token  # a real token, of another portal
    assert _post_in(client, portals[0], neighbour).status_code == 401
    assert db.session.scalar(select(func.count()).select_from(InboxEvent)) == len(portals)


def _post_in(client: Any, portal: Portal, token: str) -> Any:
    body = b24_body(portal.member_id, token, ts=str(time.time_ns()))
    return client.post("/b24/events", data=body, headers=FORM)


def test_the_stored_hash_is_set_with_the_token_and_never_the_token_itself(app):
    portal = make_portal()
    stored = db.session.scalar(select(Portal.application_token_hash)
                               .where(Portal.id == portal.id))
    assert stored and portal.application_token not in stored
    assert token_hash.matches(stored, portal.application_token)
    assert not token_hash.matches(stored, portal.application_token[:-1] + "x")


def test_a_row_from_before_the_hash_is_checked_and_filled_on_first_use(app, deliver):
    portal = make_portal()
    db.session.execute(update(Portal).where(Portal.id == portal.id)
                       .values(application_token_hash=None))
    db.session.commit()
    assert deliver.b24(portal, token="forged" + portal.application_token).status_code == 401
    assert deliver.b24(portal).status_code == 200
    stored = db.session.scalar(select(Portal.application_token_hash)
                               .where(Portal.id == portal.id))
    assert token_hash.matches(stored, portal.application_token)


def test_a_hash_made_under_another_secret_key_is_made_again(app, deliver):
    portal = make_portal()
    db.session.execute(update(Portal).where(Portal.id == portal.id)
                       .values(application_token_hash="00000000:" + "ab" * 32))
    db.session.commit()
    assert deliver.b24(portal).status_code == 200
    stored = db.session.scalar(select(Portal.application_token_hash)
                               .where(Portal.id == portal.id))
    assert token_hash.current(stored) and token_hash.matches(stored, portal.application_token)
