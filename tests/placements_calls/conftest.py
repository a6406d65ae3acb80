"""Dead letters and call pages: portals and their rows, page sessions, the pages' forms.

The HTTP tests seed rows as intake, workers and the dispatcher leave them and drive the
pages with Flask's client; the browser tests use the install suite's live app and sandbox
portal (imported below), with the full iframe form only (the install tests cover both).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from app.dispatcher import outbox
from app.dispatcher.models import CommandStatus, OutboxCommand
from app.extensions import db
from app.telephony.models import Call
from app.tenants.models import Portal, utcnow
from placements import page_session
from tests.install.conftest import installed, live_app, make_portal  # noqa: F401 - fixtures


@pytest.fixture
def form_kind() -> str:
    """One iframe form is enough here (tests/install runs both)."""
    return "full"


def session_token(portal: Portal, user_id: int = 1, is_admin: bool = True,
                  lang: str = "en") -> str:
    """A page session, as the DEFAULT placement issues it to a verified user."""
    return page_session.issue(portal, user_id, is_admin, lang)


def form_token_of(body: str) -> str:
    """The single-use form token a page carries."""
    match = re.search(r'name="form_token" value="([^"]+)"', body)
    assert match, body
    return match.group(1)


def dead_command(portal: Portal, method: str = "user.current", *, settled: bool = True,
                 reason: str = "QUERY_LIMIT_EXCEEDED: too many requests",
                 **params: Any) -> int:
    """A command the dispatcher gave up on (its outcome delivered when ``settled``)."""
    command_id = outbox.submit(portal.id, method, params or {"ID": 1})
    row = db.session.get(OutboxCommand, command_id)
    assert row is not None
    row.status, row.dead_reason, row.outcome = CommandStatus.DEAD.value, reason, "dead"
    row.attempts, row.completed_at, row.settled = 3, utcnow(), settled
    db.session.commit()
    return command_id


def make_call(portal: Portal, pbx_call_id: str, **values: Any) -> Call:
    """A call row as telephony leaves it."""
    call = Call(portal_id=portal.id, pbx_call_id=pbx_call_id, state=values.pop("state", "ended"),
                direction=values.pop("direction", "in"), started_at=utcnow(), **values)
    db.session.add(call)
    db.session.commit()
    return call


def status_of(command_id: int) -> str | None:
    """A command's status read afresh (None: deleted)."""
    db.session.expire_all()
    row = db.session.get(OutboxCommand, command_id)
    return row.status if row is not None else None
