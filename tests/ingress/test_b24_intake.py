"""POST /b24/events: verify, store once, queue, answer; refuse the rest without a trace."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from app.extensions import db
from app.ingress import enqueuer, processing
from app.ingress.models import InboxStatus
from tests.ingress.conftest import (
    FORM,
    b24_body,
    inbox_count,
    inbox_rows,
    make_portal,
    queued_messages,
)


def _rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("b24relay_events_rejected_total",
                                     {"source": "b24", "reason": reason}) or 0.0


def test_a_valid_event_is_stored_queued_and_answered_200(app, portal, deliver, redis_client):
    response = deliver.b24(portal, data={"FIELDS": {"ID": "759"}})
    assert response.status_code == 200
    [row] = inbox_rows()
    assert response.json["id"] == row.id
    assert (row.portal_id, row.member_id, row.source, row.event_type) == \
        (portal.id, portal.member_id, "b24", "ONCRMDEALUPDATE")
    assert row.payload["data"] == {"FIELDS": {"ID": "759"}}
    assert row.status == InboxStatus.QUEUED.value and not row.unverified
    assert queued_messages(redis_client, app) == 1


def test_a_duplicate_delivery_is_stored_and_queued_once(app, portal, deliver, redis_client):
    first, second = deliver.b24(portal), deliver.b24(portal)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json == {"id": first.json["id"], "duplicate": True}
    assert inbox_count() == 1
    assert queued_messages(redis_client, app) == 1


def test_different_events_of_one_portal_are_all_kept(portal, deliver):
    for deal in ("1", "2", "3"):
        assert deliver.b24(portal, data={"FIELDS": {"ID": deal}}).status_code == 200
    assert deliver.b24(portal, ts="1736405999").status_code == 200
    assert inbox_count() == 4


@pytest.mark.parametrize("case, status, reason", [
    ("forged token", 401, "forged_token"),
    ("missing token", 401, "missing_token"),
    ("unknown portal", 401, "forged_token"),
    ("install event with a wrong token for an active portal", 401, "forged_token"),
])
def test_unauthenticated_events_are_refused_and_leave_no_trace(
        app, portal, deliver, client, redis_client, case, status, reason):
    before = _rejected(reason)
    if case == "forged token":
        response = deliver.b24(portal, token="0" * 32)
    elif case == "missing token":
        response = deliver.b24(portal, token=None)
    elif case == "unknown portal":
        response = client.post("/b24/events", data=b24_body("f" * 32, "abc"), headers=FORM)
    else:
        response = deliver.b24(portal, token="0" * 32, event="ONAPPINSTALL")
    assert response.status_code == status
    assert response.json["error"] == reason
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0
    assert _rejected(reason) == before + 1


def test_an_unknown_portal_is_answered_like_a_forged_token(app, portal, deliver, client,
                                                           caplog):
    caplog.set_level("INFO", logger="app.ingress.views")
    forged = deliver.b24(portal, token="0" * 32)
    unknown = client.post("/b24/events", data=b24_body("f" * 32, "0" * 32), headers=FORM)
    assert (unknown.status_code, unknown.get_data()) == (forged.status_code, forged.get_data())
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "application_token does not match" in refusals[0]
    assert "no installation for member_id " + "f" * 32 in refusals[1]  # the operator still sees it


@pytest.mark.parametrize("body, content_type", [
    (b"event=ONCRMDEALUPDATE&auth%5Bmember_id=abc", FORM["Content-Type"]),   # broken key
    (b"event=X&event=Y&auth%5Bmember_id%5D=abc", FORM["Content-Type"]),     # twice
    (b"\xff\xfe", FORM["Content-Type"]),                                     # not UTF-8
    (b"auth%5Bmember_id%5D=abc&auth%5Bapplication_token%5D=t", FORM["Content-Type"]),  # no event
    (b"event=ONCRMDEALUPDATE&auth%5Bapplication_token%5D=t", FORM["Content-Type"]),  # no member
    (b"event=ONCRMDEALUPDATE&auth=flat", FORM["Content-Type"]),             # auth not a block
    (b"event=ONAPPINSTALL&auth%5Bmember_id%5D=" + b"a" * 65 +
     b"&auth%5Bapplication_token%5D=t", FORM["Content-Type"]),              # member_id too long
    (b"event=ONAPPINSTALL&auth%5Bmember_id%5D=a%27%3B--&auth%5Bapplication_token%5D=t",
     FORM["Content-Type"]),                                                 # not an id
    (b"", FORM["Content-Type"]),                                             # empty
    (b"0=a", FORM["Content-Type"]),                              # top-level keys all digits
    (b"0=ONAPPINSTALL&1=x", FORM["Content-Type"]),
    (b"0%5Bmember_id%5D=abc&0%5Bapplication_token%5D=t", FORM["Content-Type"]),
    (b'{"event": "ONCRMDEALUPDATE"}', "application/json"),                   # not a form
])
def test_malformed_bodies_get_400_and_leave_no_trace(app, client, portal, redis_client, body,
                                                     content_type):
    before = _rejected("malformed")
    response = client.post("/b24/events", data=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.json
    assert response.json["error"] == "malformed"
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0
    assert _rejected("malformed") == before + 1


@pytest.mark.parametrize("kw", [
    {"event": "ONCRMDEALUPDATE\x00"},
    {"data": {"FIELDS": {"ID": "7\x005"}}},
    {"data": {"FIELDS\x00": {"ID": "75"}}},
    {"event": "ONAPPINSTALL\x00", "token": None},  # first contact: no token to check
], ids=["event name", "a value", "a field name", "first contact"])
def test_a_nul_character_gets_400_and_no_outage_is_counted(app, portal, deliver, redis_client,
                                                           kw):
    """PostgreSQL cannot store NUL: once, it failed the INSERT and counted as an outage."""
    before = _rejected("db_unavailable"), _rejected("malformed")
    response = deliver.b24(portal, **kw)
    assert response.status_code == 400 and response.json["error"] == "malformed"
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0
    assert (_rejected("db_unavailable"), _rejected("malformed")) == (before[0], before[1] + 1)


def test_a_raw_nul_byte_gets_400(app, portal, client):
    body = b24_body(portal.member_id, portal.application_token).encode()
    response = client.post("/b24/events", data=body.replace(b"759", b"7\x009"), headers=FORM)
    assert response.status_code == 400 and inbox_count() == 0
    text = b24_body(portal.member_id, portal.application_token, data={"NOTE": "%00"})
    assert client.post("/b24/events", data=text, headers=FORM).status_code == 200  # a "%00"


@pytest.mark.parametrize("body", [
    b"event=X&" + b"n" * 100_000 + b"]=1",                      # a broken name
    b"event=X&data%5B" + b"n" * 100_000 + b"=1",                # unbalanced
    b"event=X&" + b"n" * 100_000,                               # no '='
], ids=["bad name", "unbalanced", "not a pair"])
def test_a_malformed_field_name_is_shown_cut_short(app, client, caplog, body):
    caplog.set_level("INFO", logger="app.ingress.views")
    response = client.post("/b24/events", data=body, headers=FORM)
    assert response.status_code == 400
    assert len(response.get_data()) < 200 and "n" * 30 in response.json["message"]
    assert response.json["message"].endswith("...'")
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(line) < 200


def test_a_body_over_the_limit_gets_413_and_leaves_no_trace(app, portal, deliver, redis_client):
    app.config["MAX_CONTENT_LENGTH"] = 2048
    before = _rejected("too_large")
    response = deliver.b24(portal, data={"FIELDS": {"ID": "1", "NOTE": "x" * 4096}})
    assert response.status_code == 413
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0
    assert _rejected("too_large") == before + 1


@pytest.mark.parametrize("token", ["valid", "forged"])
def test_a_body_over_the_field_cap_gets_400_before_its_token_is_checked(
        app, portal, client, redis_client, token):
    app_token = portal.application_token if token == "valid" else "0" * 32
    body = b24_body(portal.member_id, app_token) + "&" + "&".join(["data%5BX%5D%5B%5D=1"] * 1000)
    before = _rejected("malformed")
    response = client.post("/b24/events", data=body, headers=FORM)
    assert response.status_code == 400
    assert response.json == {"error": "malformed", "message": "more than 1000 fields"}
    assert inbox_count() == 0 and queued_messages(redis_client, app) == 0
    assert _rejected("malformed") == before + 1


def test_first_contact_install_is_accepted_provisionally(app, client, redis_client):
    response = client.post("/b24/events", headers=FORM,
                           data=b24_body("a" * 32, "fresh-token", event="ONAPPINSTALL",
                                         data={"VERSION": "1", "INSTALLED": "Y"}))
    assert response.status_code == 200
    [row] = inbox_rows()
    assert row.unverified and row.portal_id is None and row.event_type == "ONAPPINSTALL"
    assert queued_messages(redis_client, app) == 1


def test_install_event_for_a_portal_without_a_token_is_provisional(deliver):
    portal = make_portal(application_token=None, status="installing")
    assert deliver.b24(portal, token="new-token", event="ONAPPINSTALL").status_code == 200
    [row] = inbox_rows()
    assert row.unverified and row.portal_id == portal.id
    # any other event from it cannot be checked, so it is refused
    assert deliver.b24(portal, token="new-token").status_code == 401
    assert inbox_count() == 1


def test_a_token_changed_in_the_database_counts_for_the_next_event(portal, deliver):
    old = portal.application_token
    assert deliver.b24(portal, data={"FIELDS": {"ID": "1"}}).status_code == 200
    portal.application_token = "rotated-token"
    db.session.commit()
    assert deliver.b24(portal, token=old, data={"FIELDS": {"ID": "3"}}).status_code == 401
    assert deliver.b24(portal, token="rotated-token",
                       data={"FIELDS": {"ID": "2"}}).status_code == 200
    assert inbox_count() == 2


def test_database_down_answers_503_never_200(make_app, redis_client):
    down = make_app(SQLALCHEMY_DATABASE_URI="postgresql+psycopg://nobody@127.0.0.1:9/none")
    before = _rejected("db_unavailable")
    response = down.test_client().post("/b24/events", headers=FORM,
                                       data=b24_body("b" * 32, "tok"))
    assert response.status_code == 503
    assert response.json["error"] == "db_unavailable"
    assert _rejected("db_unavailable") == before + 1
    assert redis_client.llen(f"{down.config['DRAMATIQ_NAMESPACE']}:events") == 0


def test_a_database_that_never_answers_costs_a_bounded_wait_then_503(make_app, redis_client):
    """A server that accepts the connection and then says nothing (hung, or a half-open
    path): libpq would wait forever; the connect timeout turns that into a 503."""
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        port = silent.getsockname()[1]
        hung = make_app(SQLALCHEMY_DATABASE_URI=f"postgresql+psycopg://nobody@127.0.0.1:{port}/x",
                        DB_CONNECT_TIMEOUT=2)  # libpq's minimum
        started = time.monotonic()
        response = hung.test_client().post("/b24/events", headers=FORM,
                                           data=b24_body("c" * 32, "tok"))
        waited = time.monotonic() - started
        assert response.status_code == 503 and response.json["error"] == "db_unavailable"
        assert waited < 10, waited
        assert redis_client.llen(f"{hung.config['DRAMATIQ_NAMESPACE']}:events") == 0
    finally:
        silent.close()
        for conn in accepted:
            conn.close()


def test_database_unreachable_mid_traffic_answers_503(app, portal, deliver, database_url,
                                                       redis_client):
    """The pool is warm; then the database refuses every connection
    (restarting, or gone): each event gets 503, never a 200 and never a bare 500."""
    if not database_url.startswith("postgresql"):
        pytest.skip("needs PostgreSQL (ALLOW_CONNECTIONS)")
    assert deliver.b24(portal, data={"FIELDS": {"ID": "1"}}).status_code == 200
    name = db.engine.url.database
    admin = create_engine(make_url(database_url).set(database="postgres"),
                          isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
    try:
        before = _rejected("db_unavailable")
        # the requests share the test's session, whose failed reads expire ``portal``
        sender = SimpleNamespace(member_id=portal.member_id,
                                 application_token=portal.application_token)
        answers = [deliver.b24(sender, data={"FIELDS": {"ID": str(i)}}) for i in range(2, 5)]
        assert [(r.status_code, r.json["error"]) for r in answers] == \
            [(503, "db_unavailable")] * 3
        assert _rejected("db_unavailable") == before + 3
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    assert deliver.b24(portal, data={"FIELDS": {"ID": "5"}}).status_code == 200
    db.session().invalidate()  # the test's own pooled connections were terminated too
    db.session.remove()
    db.engine.dispose()
    assert inbox_count() == 2 and queued_messages(redis_client, app) == 2


def test_metrics_show_intake_counts_depth_and_latency(app, portal, deliver, client):
    deliver.b24(portal)
    deliver.b24(portal, token="bad")
    assert enqueuer.drain(app)  # the row is queued by the process's enqueuer thread
    scrape = {"Authorization": f"Bearer {app.config['METRICS_TOKEN']}"}
    text = client.get("/metrics", headers=scrape).get_data(as_text=True)
    assert 'b24relay_events_received_total{source="b24"}' in text
    assert 'b24relay_events_rejected_total{reason="forged_token",source="b24"}' in text
    assert 'b24relay_events_queued_total{source="b24",via="intake"}' in text
    assert 'b24relay_inbox_depth{status="queued"} 1.0' in text
    assert 'b24relay_event_ack_seconds_bucket{le="0.025",source="b24"}' in text


def _series(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def test_invented_event_names_share_one_metric_series(app, portal, deliver):
    stored = "b24relay_events_stored_total"
    processed = "b24relay_events_processed_total"
    before = _series(stored, source="b24", type="other")
    handled_before = _series(stored, source="b24", type="ONUSERADD")
    names = [f"ONINVENTED{i}" for i in range(5)]
    for name in names:
        assert deliver.b24(portal, event=name).status_code == 200
    assert deliver.b24(portal, event="ONUSERADD").status_code == 200
    assert _series(stored, source="b24", type="other") == before + 5
    assert _series(stored, source="b24", type="ONUSERADD") == handled_before + 1
    for row in inbox_rows()[:5]:  # a worker's pass over them, in process
        assert processing.process(row.id) == "unhandled"
    assert _series(processed, source="b24", type="other", outcome="unhandled") >= 5
    exposed = REGISTRY.collect()
    assert not any(name in str(sample.labels) for family in exposed for sample in family.samples
                   for name in names), "no series per invented name"


def test_an_inbox_that_cannot_be_written_answers_503_and_queues_nothing(app, portal, deliver,
                                                                       redis_client):
    assert deliver.b24(portal, data={"FIELDS": {"ID": "1"}}).status_code == 200  # pool warm
    db.session.remove()
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE inbox_events RENAME TO inbox_events_away"))
    try:
        before = _rejected("db_unavailable")
        response = deliver.b24(portal, data={"FIELDS": {"ID": "2"}})
        assert response.status_code == 503 and response.json["error"] == "db_unavailable"
        assert _rejected("db_unavailable") == before + 1
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE inbox_events_away RENAME TO inbox_events"))
    assert inbox_count() == 1 and queued_messages(redis_client, app) == 1



def test_intake_hands_its_connections_back_transactional(app, portal, deliver, database_url):
    """Intake's autocommit INSERT leaves no pooled connection in autocommit.

    On PostgreSQL intake runs its INSERT on the pool's own psycopg connection in
    autocommit; a connection handed back that way would make every later ORM
    transaction on it commit statement by statement, and a rollback undo nothing.
    """
    if not database_url.startswith("postgresql"):
        pytest.skip("the driver-level insert is PostgreSQL's")
    for i in range(3):
        assert deliver.b24(portal, ts=f"17364059{i:02d}").status_code == 200
    held = [db.engine.raw_connection() for _ in range(db.engine.pool.checkedin())]
    try:
        assert held and [c.driver_connection.autocommit for c in held] == [False] * len(held)
        # ...and the driver-level path did run: its INSERT is prepared at the first use
        # (SQLAlchemy's execute would let psycopg prepare only from the 5th).
        prepared = 0
        for conn in held:
            with conn.driver_connection.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_prepared_statements"
                            " WHERE statement LIKE 'INSERT INTO inbox_events%'")
                prepared += cur.fetchone()[0]
            conn.driver_connection.rollback()
        assert prepared >= 1
    finally:
        for conn in held:
            conn.close()
    db.session.execute(text("DELETE FROM inbox_events"))
    db.session.rollback()
    assert inbox_count() == 3



# Bodies as the protocol notes print them (§3.4, §3.5), written out by hand rather than by our
# encoder, with the seeded portal's member_id and application_token put in.
DOC_DEAL_UPDATE = (
    "event=ONCRMDEALUPDATE&event_handler_id=201&data%5BFIELDS%5D%5BID%5D=759&ts=1736405807"
    "&auth%5Baccess_token%5D=s6p6eclrvim6da22ft9ch94ekreb52lv&auth%5Bexpires%5D=1736409407"
    "&auth%5Bexpires_in%5D=3600&auth%5Bscope%5D=crm%2Ctelephony%2Cplacement%2Cuser_basic"
    "&auth%5Bdomain%5D=some-domain.bitrix24.com"
    "&auth%5Bserver_endpoint%5D=https%3A%2F%2Foauth.bitrix.info%2Frest%2F&auth%5Bstatus%5D=P"
    "&auth%5Bclient_endpoint%5D=https%3A%2F%2Fsome-domain.bitrix24.com%2Frest%2F"
    "&auth%5Bmember_id%5D={member_id}&auth%5Buser_id%5D=15"
    "&auth%5Bapplication_token%5D={token}")
# An event no user caused (a robot, an import): no tokens, only the five identifying fields.
DOC_NO_USER = (
    "event=ONCRMDEALUPDATE&event_handler_id=201&data%5BFIELDS%5D%5BID%5D=760&ts=1736405808"
    "&auth%5Bdomain%5D=some-domain.bitrix24.com"
    "&auth%5Bclient_endpoint%5D=https%3A%2F%2Fsome-domain.bitrix24.com%2Frest%2F"
    "&auth%5Bserver_endpoint%5D=https%3A%2F%2Foauth.bitrix.info%2Frest%2F"
    "&auth%5Bmember_id%5D={member_id}&auth%5Bapplication_token%5D={token}")
DOC_CALL_START = (
    "event=ONEXTERNALCALLSTART&event_handler_id=1055"
    "&data%5BPHONE_NUMBER%5D=%2B494951234567&data%5BPHONE_NUMBER_INTERNATIONAL%5D=%2B494951234567"
    "&data%5BEXTENSION%5D=&data%5BUSER_ID%5D=1269&data%5BCALL_LIST_ID%5D=0"
    "&data%5BLINE_NUMBER%5D=7&data%5BIS_MOBILE%5D=0"
    "&data%5BCALL_ID%5D=externalCall.89350264e026dace3f2b14d1f438257c.1773236989"
    "&data%5BCRM_ENTITY_TYPE%5D=CONTACT&data%5BCRM_ENTITY_ID%5D=797&ts=1773236988"
    "&auth%5Bdomain%5D=example.bitrix24.com&auth%5Bmember_id%5D={member_id}"
    "&auth%5Buser_id%5D=1269&auth%5Bapplication_token%5D={token}")


@pytest.mark.parametrize("raw, event_type, data", [
    (DOC_DEAL_UPDATE, "ONCRMDEALUPDATE", {"FIELDS": {"ID": "759"}}),
    (DOC_NO_USER, "ONCRMDEALUPDATE", {"FIELDS": {"ID": "760"}}),
    (DOC_CALL_START, "ONEXTERNALCALLSTART", {
        "PHONE_NUMBER": "+494951234567", "PHONE_NUMBER_INTERNATIONAL": "+494951234567",
        "EXTENSION": "", "USER_ID": "1269", "CALL_LIST_ID": "0", "LINE_NUMBER": "7",
        "IS_MOBILE": "0", "CALL_ID": "externalCall.89350264e026dace3f2b14d1f438257c.1773236989",
        "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": "797"}),
], ids=["deal update", "no user behind it", "click-to-call"])
def test_documented_bodies_are_stored_as_bitrix24_sends_them(app, client, portal, redis_client,
                                                             raw, event_type, data):
    body = raw.format(member_id=portal.member_id, token=portal.application_token)
    response = client.post("/b24/events", data=body, headers=FORM)
    assert response.status_code == 200, response.json
    [row] = inbox_rows()
    assert (row.event_type, row.payload["data"]) == (event_type, data)
    assert row.payload["auth"]["member_id"] == portal.member_id
    assert queued_messages(redis_client, app) == 1
