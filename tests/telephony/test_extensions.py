"""Extensions to users (issue 22 point 5, protocol §8.10), end to end: PBX events posted to
intake, a real worker (inbox handlers, the dispatcher, the settle actor, the installation's
user sync actor) and a sandbox portal, checked from the portal's command log.

- an override routes a 5-digit extension (Bitrix24 keeps 1-4 digits in UF_PHONE_INNER) and
  wins over a user's UF_PHONE_INNER; one naming an inactive user is ignored, and
  ``flask calls extensions list`` says so;
- an extension that maps to nobody asks for a user sync of the portal, once per
  TELEPHONY_UNKNOWN_EXTENSION_SYNC_INTERVAL, without holding the call: its card goes to the
  fallback user, and the next call to that extension reaches the user the sync found.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from app.dispatcher import nudge
from app.extensions import db
from app.ingress import auth
from app.tenants.models import Portal, PortalSettings, PortalStatus, utcnow
from app.tenants.users import PortalUser, extension_map, set_override
from tests.conftest import wait_for
from tests.ingress.conftest import make_portal
from tests.telephony.conftest import map_extensions, pbx
from tests.telephony.test_end_to_end import card_log, finished
from tests.tenants.conftest import CLIENT_ID, CLIENT_SECRET, oauth_app  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(180)

MAPPED = {"101": 1, "102": 2, "103": 3}
# In the sandbox portal: user 4 inactive, user 5 added after the app's last user sync.
PORTAL_USERS = [{"id": 1, "name": "Ada", "admin": True, "extension": "101"},
                {"id": 2, "name": "Bob", "extension": "102"},
                {"id": 3, "name": "Cy", "extension": "103"},
                {"id": 4, "name": "Dee", "extension": "104", "active": False},
                {"id": 5, "name": "Eve", "extension": "105"}]


@pytest.fixture
def pbx_line(oauth_app: Any, sandbox: Any, client: Any,  # noqa: F811 - the imported fixture
             start_worker: Any, redis_client: Any) -> dict[str, Any]:
    """A sandbox portal, its row (fallback user 1) with users 1-3 mapped and user 4 known
    inactive, a PBX API key and a worker whose dispatcher listens."""
    info = sandbox.create_portal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                 users=PORTAL_USERS)
    portal = Portal(member_id=info["member_id"], domain=info["domain"],
                    client_endpoint=info["client_endpoint"],
                    server_endpoint=info["server_endpoint"], access_token=info["access_token"],
                    refresh_token=info["refresh_token"],
                    expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                    status=PortalStatus.ACTIVE.value, installed_at=utcnow())
    portal.settings = PortalSettings(crm_create=False, default_user_id=1)
    db.session.add(portal)
    db.session.commit()
    map_extensions(portal, MAPPED)
    db.session.add(PortalUser(portal_id=portal.id, user_id=4, name="Dee", extension=None,
                              active=False))
    db.session.commit()
    key = auth.issue_api_key(portal)
    start_worker(threads=4, DISPATCH_SWEEP_INTERVAL="1", DISPATCH_LINGER_MS="0",
                 TELEPHONY_UNKNOWN_EXTENSION_SYNC_INTERVAL="300")
    wait_for(lambda: redis_client.pubsub_numsub(nudge.channel(redis_client))[0][1] >= 1,
             timeout=30)

    def post(*events: dict[str, Any]) -> None:
        for event in events:
            response = client.post("/api/v1/calls/events", json=event,
                                   headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 202, response.get_data(as_text=True)

    return {"member_id": info["member_id"], "portal_id": portal.id, "portal": portal,
            "post": post}


def _missed(line: dict[str, Any], call_id: str, *extensions: str) -> None:
    """An incoming call ringing ``extensions``, not answered; waits for its finish."""
    line["post"](pbx(call_id, "start", 0, direction="in", phone="+4930111222",
                     extensions=list(extensions)),
                 pbx(call_id, "end", 9, status="no_answer", duration=0))
    wait_for(lambda: finished(line["portal_id"], call_id), timeout=60)


def _cli(app: Any, *args: str) -> str:
    result = app.test_cli_runner().invoke(args=["calls", "extensions", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_an_override_routes_a_five_digit_extension_and_wins_over_uf_phone_inner(
        pbx_line, sandbox, oauth_app):  # noqa: F811 - the imported fixture
    member = pbx_line["member_id"]
    out = _cli(oauth_app, "set", "--member-id", member, "20001", "3", "--note", "reception")
    assert "20001 -> user 3 (User 3)" in out
    _cli(oauth_app, "set", "--member-id", member, "101", "2", "--note", "Ada's desk, shared")
    _missed(pbx_line, "five-1", "20001")
    assert card_log(sandbox, member, "five-1") == [("register", 3), ("show", [3]),
                                                   ("finish", 3)]
    _missed(pbx_line, "shared-1", "101")
    assert card_log(sandbox, member, "shared-1") == [("register", 2), ("show", [2]),
                                                     ("finish", 2)]
    assert "20001            -> user 3        in use  (reception)" in _cli(
        oauth_app, "list", "--member-id", member)
    _cli(oauth_app, "unset", "--member-id", member, "101")
    db.session.expire_all()
    assert extension_map(pbx_line["portal"])["101"] == 1  # UF_PHONE_INNER applies again


def test_an_override_naming_an_inactive_or_unknown_user_is_ignored(
        pbx_line, sandbox, oauth_app):  # noqa: F811 - the imported fixture
    member = pbx_line["member_id"]
    out = _cli(oauth_app, "set", "--member-id", member, "20002", "4")
    assert "IGNORED while the user is inactive" in out
    _cli(oauth_app, "set", "--member-id", member, "102", "99")  # nobody the sync knows
    listed = _cli(oauth_app, "list", "--member-id", member)
    assert "IGNORED: user 4 is inactive" in listed
    assert "IGNORED: user 99 is unknown" in listed
    _missed(pbx_line, "inactive-1", "20002", "102")
    # Neither the inactive user 4 nor the unknown 99: 102 stays Bob's (user 2).
    assert card_log(sandbox, member, "inactive-1") == [("register", 2), ("show", [2]),
                                                       ("finish", 2)]


def _user_get_rounds(sandbox: Any, member_id: str) -> int:
    return len(sandbox.log(member_id, method="user.get"))


def test_an_unknown_extension_asks_for_one_user_sync_per_interval(pbx_line, sandbox):
    member = pbx_line["member_id"]
    assert _user_get_rounds(sandbox, member) == 0
    _missed(pbx_line, "unknown-1", "105")
    # Not held for the sync: registered for the fallback user, who finished it.
    assert card_log(sandbox, member, "unknown-1") == [("register", 1), ("finish", 1)]
    # The sync the unknown 105 asked for maps it to Eve (user 5), added since the last one.
    wait_for(lambda: _row(pbx_line["portal_id"], 5), timeout=60)
    assert _user_get_rounds(sandbox, member) == 1  # one page: 5 users

    _missed(pbx_line, "unknown-2", "106")  # unknown too, within the interval
    _missed(pbx_line, "known-now", "105")
    assert card_log(sandbox, member, "known-now") == [("register", 5), ("show", [5]),
                                                      ("finish", 5)]
    assert _user_get_rounds(sandbox, member) == 1, "one user.get round per interval"
    db.session.expire_all()
    assert extension_map(pbx_line["portal"]) == {"101": 1, "102": 2, "103": 3, "105": 5}


def _row(portal_id: int, user_id: int) -> PortalUser | None:
    db.session.expire_all()
    return db.session.scalars(select(PortalUser).where(
        PortalUser.portal_id == portal_id, PortalUser.user_id == user_id,
        PortalUser.extension.is_not(None))).first()


def test_the_merged_map_keeps_only_active_users(app):
    portal = make_portal()
    map_extensions(portal, {"101": 1, "102": 2})
    db.session.add(PortalUser(portal_id=portal.id, user_id=3, extension="103", active=False))
    set_override(portal, "20001", 1)
    set_override(portal, "20003", 3)  # inactive: ignored
    set_override(portal, "102", 1)  # wins over Bob's UF_PHONE_INNER
    db.session.commit()
    assert extension_map(portal) == {"101": 1, "102": 1, "20001": 1}
