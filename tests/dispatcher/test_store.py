"""The dispatcher's SQL (app/dispatcher/store.py) on the database under test: what a round's
leases, a group's outcomes and a fetch's blockers write and read, and what they cost."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, update

from app.dispatcher import Priority, store, submit
from app.dispatcher.packer import pack_round
from app.extensions import db
from app.tenants.models import Portal, aware, utcnow
from tests.dispatcher.conftest import rows

LEASE = timedelta(seconds=80)


@pytest.fixture
def portal(app: Any) -> Portal:
    row = Portal(member_id="m-store", domain="store.example", status="active",
                 client_endpoint="https://store.example/rest/")
    db.session.add(row)
    db.session.commit()
    return row


@pytest.fixture
def statements(app: Any) -> Iterator[list[tuple[str, int]]]:
    """Every statement sent to the database meanwhile, with its number of parameter sets."""
    sent: list[tuple[str, int]] = []

    def heard(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
              executemany: bool) -> None:
        sent.append((statement, len(params) if executemany else 1))

    event.listen(db.engine, "before_cursor_execute", heard)
    yield sent
    event.remove(db.engine, "before_cursor_execute", heard)


def _queue(portal: Portal, count: int, **kwargs: Any) -> list[int]:
    ids = [submit(portal.id, "profile", {}, **kwargs) for _ in range(count)]
    db.session.commit()
    return ids


def _by_id() -> dict[int, Any]:
    return {r.id: r for r in rows()}


def _lease(ids: list[int], owner: str = "me", batch: str = "b0") -> set[int]:
    now = utcnow()
    return store.lease(db.engine, ids, owner=owner, batch_id=batch, now=now, until=now + LEASE)


def _outcome(command_id: int, **columns: Any) -> dict[str, Any]:
    row = {"id": command_id, "status": "done", "attempts_delta": 0, "not_before": None,
           "result": None, "error": None, "dead_reason": None, "completed_at": None,
           "outcome": None}
    return {**row, **columns}


def test_a_round_leases_each_batch_and_skips_what_another_engine_holds(portal):
    ids = _queue(portal, 7)
    assert _lease(ids[:2], owner="other", batch="theirs") == set(ids[:2])
    first = utcnow() - timedelta(minutes=5)  # ids[2] went out before and came back queued
    with db.engine.begin() as conn:
        conn.execute(update(store.T).where(store.T.c.id == ids[2])
                     .values(first_sent_at=first, attempts=1))
    now = utcnow()
    leased = store.lease_round(db.engine, [("b1", ids[:4]), ("b2", ids[4:])], owner="me",
                               now=now, until=now + LEASE)
    assert leased == {"b1": {ids[2], ids[3]}, "b2": set(ids[4:])}
    found = _by_id()
    assert [(found[i].lease_owner, found[i].batch_id) for i in ids] == [
        ("other", "theirs"), ("other", "theirs"), ("me", "b1"), ("me", "b1"),
        ("me", "b2"), ("me", "b2"), ("me", "b2")]
    assert {found[i].status for i in ids} == {"inflight"}
    assert [found[i].attempts for i in ids[2:]] == [2, 1, 1, 1, 1]
    assert aware(found[ids[2]].first_sent_at) == first  # kept: the horizon counts from it
    assert {aware(found[i].first_sent_at) for i in ids[3:]} == {now}
    assert {aware(found[i].lease_until) for i in ids[2:]} == {now + LEASE}


RESULTS = [{"ID": "7", "NAME": "Анна \"Q\" O'Neil", "TAGS": ["a", None, 1.5], "ON": True},
           None, "plain text", [1, {"x": []}], 0, False]


def test_outcomes_are_written_as_given_and_only_where_the_owner_still_holds_the_lease(portal):
    ids = _queue(portal, 11)
    _lease(ids[:10])
    _lease(ids[10:], owner="other")
    with db.engine.begin() as conn:  # the sweep recovered ids[9] meanwhile
        conn.execute(update(store.T).where(store.T.c.id == ids[9]).values(status="queued"))
    now, later = utcnow(), utcnow() + timedelta(seconds=30)
    error = {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many \"requests\""}
    outcomes = [_outcome(i, result=r, completed_at=now)
                for i, r in zip(ids[:6], RESULTS, strict=True)]
    outcomes += [
        _outcome(ids[6], status="queued", not_before=later, error=error),  # retry
        _outcome(ids[7], status="dead", dead_reason="ERROR_METHOD_NOT_FOUND: gone",
                 error={"error": "ERROR_METHOD_NOT_FOUND"}, completed_at=now),
        _outcome(ids[8], status="queued", attempts_delta=-1, error=error),  # not counted
        _outcome(ids[9], result={"late": 1}, completed_at=now),
        _outcome(ids[10], result={"theirs": 1}, completed_at=now)]
    store.record(db.engine, "me", outcomes)
    found = _by_id()
    assert [found[i].result for i in ids[:6]] == RESULTS
    assert [(found[i].status, aware(found[i].completed_at), found[i].error) for i in ids[:6]] == [
        ("done", now, None)] * 6
    assert {found[i].lease_until for i in ids[:9]} == {None}
    retry, dead, uncounted = found[ids[6]], found[ids[7]], found[ids[8]]
    assert (retry.status, aware(retry.not_before), retry.error, retry.attempts) == (
        "queued", later, error, 1)
    assert (dead.status, dead.dead_reason, aware(dead.completed_at)) == (
        "dead", "ERROR_METHOD_NOT_FOUND: gone", now)
    assert (uncounted.status, uncounted.attempts, uncounted.error) == ("queued", 0, error)
    assert (found[ids[9]].status, found[ids[9]].result) == ("queued", None)
    assert (found[ids[10]].status, found[ids[10]].result) == ("inflight", None)


def test_only_earlier_unfinished_commands_outside_the_fetch_block_a_key(portal):
    bulk_k = _queue(portal, 1, key="k", priority=Priority.BULK)[0]
    inflight_j = _queue(portal, 1, key="j")[0]
    waiting_m = _queue(portal, 1, key="m")[0]
    _lease([inflight_j])
    with db.engine.begin() as conn:
        conn.execute(update(store.T).where(store.T.c.id == waiting_m)
                     .values(not_before=utcnow() + timedelta(minutes=1)))
    k, j, m, n = (_queue(portal, 1, key=key)[0] for key in "kjmn")
    _queue(portal, 1, key="n")  # beyond the fetch, but after n's candidate
    ready = store.fetch_ready(db.engine, portal.id, utcnow(), 4)
    assert [c.id for c in ready.candidates] == [k, j, m, n] and not ready.complete
    assert {key: ready.blockers[key] for key in "kjm"} == {"k": bulk_k, "j": inflight_j,
                                                            "m": waiting_m}
    batches = pack_round(ready.candidates, ready.blockers, ready.deps, batches=2,
                         realtime_only_from=1, complete=ready.complete)
    assert [[c.id for c in b.commands] for b in batches] == [[n]]


def _postgres() -> bool:
    return db.engine.dialect.name == "postgresql"


def test_a_round_and_a_group_of_outcomes_cost_one_statement_each_on_postgresql(
        portal, statements):
    if not _postgres():
        pytest.skip("PostgreSQL's array statements; SQLite keeps a statement per batch")
    ids = _queue(portal, 150, key=None)
    ready = store.fetch_ready(db.engine, portal.id, utcnow(), 200)
    assert len(ready.candidates) == 150
    statements.clear()
    now = utcnow()
    store.lease_round(db.engine, [(f"b{n}", ids[n::3]) for n in range(3)], owner="me",
                      now=now, until=now + LEASE)
    store.record(db.engine, "me", [_outcome(i, result={"n": i}) for i in ids])
    writes = [(s, n) for s, n in statements if s.lstrip().upper().startswith("UPDATE")]
    assert [n for _, n in writes] == [1, 1], "one statement, one parameter set, each"
    assert {r.status for r in rows()} == {"done"}


def test_a_fetch_sends_its_keys_as_one_parameter_on_postgresql(portal, statements):
    if not _postgres():
        pytest.skip("PostgreSQL's array parameters")
    _queue(portal, 1, key="first")
    for n in range(300):
        submit(portal.id, "profile", {}, key=f"k{n}")
    db.session.commit()
    statements.clear()
    ready = store.fetch_ready(db.engine, portal.id, utcnow(), 1000)
    assert len(ready.candidates) == 301
    assert max(s.count("%(") for s, _ in statements) < 10  # not a placeholder per key


def test_sqlite_leases_by_primary_key_not_by_walking_the_status_index(portal, statements):
    if _postgres():
        pytest.skip("SQLite's query planner")
    ids = _queue(portal, 5)
    statements.clear()
    _lease(ids[:3])
    lease = next(s for s, _ in statements if s.lstrip().upper().startswith("UPDATE"))
    with db.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        params = [0] * lease.count("?")
        plan = " ".join(str(r) for r in raw.execute("EXPLAIN QUERY PLAN " + lease, params))
    assert "PRIMARY KEY" in plan and "ix_outbox_commands_status" not in plan, plan
