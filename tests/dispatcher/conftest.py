"""Dispatcher test helpers: sandbox portals with their Portal rows, an engine in this process,
and a look at the nudge channel."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from app.dispatcher import nudge
from app.dispatcher.models import OutboxCommand
from app.extensions import db
from tests.conftest import wait_for
from tests.tenants.conftest import make_portal, oauth_app  # noqa: F401 - fixtures


def rows(portal_id: int | None = None) -> list[OutboxCommand]:
    """Every outbox row (of one portal), as committed now, by id."""
    db.session.expire_all()
    query = select(OutboxCommand).order_by(OutboxCommand.id)
    if portal_id is not None:
        query = query.where(OutboxCommand.portal_id == portal_id)
    return list(db.session.scalars(query))


def settled(portal_id: int, count: int, timeout: float = 20.0) -> list[OutboxCommand]:
    """Wait until ``count`` of the portal's commands are done or dead; return all rows."""
    def finished() -> list[OutboxCommand] | None:
        found = rows(portal_id)
        final = [r for r in found if r.status in ("done", "dead")]
        return found if len(final) >= count else None

    return wait_for(finished, timeout=timeout)


@pytest.fixture
def nudges(redis_client: Any) -> Iterator[Any]:
    """A subscription to the nudge channel; ``read()`` returns the portal ids heard so far."""
    pubsub = redis_client.pubsub()
    pubsub.subscribe(nudge.channel(redis_client))
    wait_for(lambda: pubsub.get_message(timeout=0.1))  # the subscribe confirmation

    class Heard:
        def read(self, wait: float = 0.3) -> list[list[int]]:
            out = []
            while (message := pubsub.get_message(timeout=wait)) is not None:
                out.append(nudge.decode(message["data"]))
            return out

    yield Heard()
    pubsub.close()


@pytest.fixture
def start_engine(oauth_app: Any) -> Iterator[Any]:  # noqa: F811 - the imported fixture
    """Factory: a dispatcher engine in this process (settings over the test app's); stopped
    after the test."""
    from app.dispatcher.engine import Engine

    started: list[Engine] = []

    def start(**settings: Any) -> Engine:
        saved = {k: oauth_app.config.get(k) for k in settings}
        oauth_app.config.update(settings)
        try:
            engine = Engine(oauth_app).start()
        finally:
            oauth_app.config.update(saved)
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop(timeout=5)
        assert engine._thread is not None and not engine._thread.is_alive(), "engine still runs"


def call_commands(portal: Any, call: int) -> list[int]:
    """register, show, finish for one call, ordered by the call's key, the later two
    referencing the registration's CALL_ID."""
    from app.dispatcher import ref, submit

    key = f"call-{call}"
    reg = submit(portal.id, "telephony.externalcall.register",
                 {"USER_ID": 1, "PHONE_NUMBER": f"+49301234{call:04d}", "TYPE": 2,
                  "EXTERNAL_CALL_ID": f"pbx-{call}", "SHOW": 0}, key=key)
    show = submit(portal.id, "telephony.externalcall.show",
                  {"CALL_ID": ref(reg, "CALL_ID"), "USER_ID": 1}, key=key)
    fin = submit(portal.id, "telephony.externalcall.finish",
                 {"CALL_ID": ref(reg, "CALL_ID"), "USER_ID": 1, "DURATION": 5}, key=key)
    return [reg, show, fin]
