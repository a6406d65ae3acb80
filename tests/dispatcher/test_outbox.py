"""Submitting to the outbox: commands live and die with the caller's transaction."""

from __future__ import annotations

import pytest
import redis

from app.dispatcher import Priority, nudge, ref, submit
from app.extensions import db
from app.ingress.models import InboxEvent, InboxStatus
from tests.dispatcher.conftest import rows


def _inbox_row(portal_id: int) -> InboxEvent:
    event = InboxEvent(portal_id=portal_id, member_id="m", source="b24", event_type="ONTEST",
                       dedupe_key="k1", payload={}, status=InboxStatus.PROCESSING.value)
    db.session.add(event)
    db.session.commit()
    return event


def test_commands_commit_with_the_inbox_row_and_nudge_once_after_the_commit(make_portal,
                                                                              nudges):
    portal, _ = make_portal()
    event = _inbox_row(portal.id)
    first = submit(portal.id, "crm.deal.add", {"fields": {"TITLE": "a"}},
                   handler="tests.deal", context={"inbox_id": event.id})
    submit(portal.id, "crm.deal.update", {"id": ref(first, "ID")}, key="deal", after=first)
    assert nudges.read(wait=0.2) == [], "nothing may be nudged before the commit"
    event.status = InboxStatus.DONE.value
    db.session.commit()
    assert nudges.read() == [[portal.id]]
    stored = rows(portal.id)
    assert [(r.method, r.status, r.handler, r.context, r.settled) for r in stored] == [
        ("crm.deal.add", "queued", "tests.deal", {"inbox_id": event.id}, False),
        ("crm.deal.update", "queued", None, None, True)]
    assert [r.priority for r in stored] == [Priority.NORMAL, Priority.NORMAL], "the default"
    assert stored[1].after_id == first and stored[1].params == {"id": f"$ref[{first}][ID]"}


def test_a_rolled_back_handler_leaves_no_command_and_no_nudge(make_portal, nudges):
    portal, _ = make_portal()
    event = _inbox_row(portal.id)
    submit(portal.id, "crm.deal.add", {"fields": {"TITLE": "a"}})
    event.status = InboxStatus.DONE.value
    db.session.rollback()
    db.session.commit()  # a later, empty commit must not carry the forgotten nudge
    assert nudges.read() == []
    assert rows(portal.id) == []


@pytest.mark.parametrize("method, options", [
    ("batch", {"priority": Priority.REALTIME}), ("crm.deal.add", {"priority": 7}),
    ("crm.deal.add", {"priority": "realtime"}), ("crm.deal.add", {"context": {"a": 1}})])
def test_submit_refuses_what_the_outbox_cannot_send(make_portal, method, options):
    portal, _ = make_portal()
    with pytest.raises(ValueError):
        submit(portal.id, method, {}, **options)


def test_nudges_stay_inside_their_redis_database(redis_url):
    """Pub/sub ignores database numbers: two deployments (or two test workers) on one Redis
    server must not wake each other's engines for a portal id that is not theirs."""
    ours = redis.Redis.from_url(redis_url)
    db_number = ours.connection_pool.connection_kwargs.get("db", 0) or 0
    theirs = redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=ours.connection_pool.connection_class,
        **{**ours.connection_pool.connection_kwargs, "db": (db_number + 1) % 16}))
    listener = theirs.pubsub()
    listener.subscribe(nudge.channel(theirs))
    listener.get_message(timeout=1)  # the subscribe confirmation
    nudge.publish(ours, [10])
    assert listener.get_message(timeout=0.5) is None
    nudge.publish(theirs, [11])
    heard = listener.get_message(timeout=2)
    assert heard is not None and nudge.decode(heard["data"]) == [11]
    listener.close()
