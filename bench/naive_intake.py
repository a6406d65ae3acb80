"""The naive durable handler bench/ingest.py compares intake with (issue #13).

What an afternoon's Flask code does to keep the same promise as ``/b24/events`` (an
acknowledged event is committed): parse the form, compare the token held in a dict, one
``INSERT … ON CONFLICT DO NOTHING`` committed per event, one ``LPUSH``, answer 200 with
the row's id. It checks nothing else (no size limits, no first contact, no provisional
events, no metrics) and keeps the token in clear in memory.

Reads ``DATABASE_URL``, ``REDIS_URL`` and ``NAIVE_TOKENS`` (a JSON file of member_id ->
application_token) at import; the table ``naive_inbox`` is created by the bench.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading

import psycopg
import redis
from flask import Flask, Response, request

TABLE_DDL = ("CREATE TABLE IF NOT EXISTS naive_inbox (id BIGSERIAL PRIMARY KEY,"
             " member_id TEXT NOT NULL, dedupe_key TEXT NOT NULL, payload JSONB NOT NULL,"
             " received_at TIMESTAMPTZ NOT NULL DEFAULT now(), UNIQUE (member_id, dedupe_key))")
INSERT = ("INSERT INTO naive_inbox (member_id, dedupe_key, payload) VALUES (%s, %s, %s)"
          " ON CONFLICT (member_id, dedupe_key) DO NOTHING RETURNING id")
EXISTING = "SELECT id FROM naive_inbox WHERE member_id = %s AND dedupe_key = %s"

app = Flask(__name__)
TOKENS: dict[str, str] = (json.loads(open(os.environ["NAIVE_TOKENS"]).read())  # noqa: SIM115
                          if os.environ.get("NAIVE_TOKENS") else {})
QUEUE = redis.Redis.from_url(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/5")
_local = threading.local()


def _conn() -> psycopg.Connection:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(os.environ["DATABASE_URL"].replace(
            "postgresql+psycopg://", "postgresql://"), autocommit=True)
    return conn


@app.get("/healthz")
def healthz() -> tuple[str, int]:
    """For the bench's readiness poll."""
    return "ok", 200


@app.post("/b24/events")
def events() -> Response | tuple[str, int]:
    """Check the token, store the event once (committed), queue its id, answer 200."""
    form = request.form
    member_id = form.get("auth[member_id]", "")
    expected = TOKENS.get(member_id, "")
    token = form.get("auth[application_token]", "")
    if not expected or not hmac.compare_digest(expected.encode(), token.encode()):
        return "forged token", 401
    key = hashlib.sha256("|".join([form.get("event", ""), form.get("event_handler_id", ""),
                                   form.get("ts", ""), form.get("data[FIELDS][ID]", "")])
                         .encode()).hexdigest()
    payload = json.dumps({k: v for k, v in form.items() if not k.startswith("auth[")})
    with _conn().cursor() as cur:
        row = cur.execute(INSERT, (member_id, key, payload)).fetchone()
        if row is None:
            row = cur.execute(EXISTING, (member_id, key)).fetchone()
    QUEUE.lpush("naive:events", row[0])
    return Response(json.dumps({"id": row[0]}), mimetype="application/json")
