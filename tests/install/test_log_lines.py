"""A sender's text in a log message cannot forge a log line (issue 21 point 5c).

An employee holding the application token posts a lifecycle event whose ``auth[user_id]``
carries a newline, a made-up log line and an ANSI escape; a real worker logs the warning
that names that user. The log keeps it on one line, the control characters escaped.
"""

from __future__ import annotations

from urllib.parse import urlencode

from sqlalchemy import select

from app.extensions import db
from app.ingress.models import InboxEvent
from tests.conftest import wait_for
from tests.install.conftest import iframe_form

FORGED = "2026-12-07 03:00:00,000 CRITICAL app.tenants forged: portal wiped"
USER_ID = f"2\n{FORGED}\x1b[2J\r"


def _processed() -> bool:
    db.session.remove()
    row = db.session.scalars(select(InboxEvent).where(InboxEvent.event_type == "ONAPPUPDATE")
                             .order_by(InboxEvent.id.desc())).first()
    return row is not None and row.status in ("done", "dead")


def test_a_user_id_with_a_newline_and_an_escape_stays_on_one_escaped_line(
        sandbox, installed, live_app, start_worker):
    worker = start_worker(threads=2, **live_app.worker_env())
    _, form = iframe_form(sandbox.open_placement(installed["member_id"], "DEFAULT", user_id=2))
    auth = {"domain": installed["domain"], "server_endpoint": installed["server_endpoint"],
            "client_endpoint": installed["client_endpoint"],
            "member_id": installed["member_id"],
            "application_token": installed["application_token"],
            "access_token": form["AUTH_ID"], "refresh_token": form["REFRESH_ID"],
            "expires_in": "3600", "user_id": USER_ID}
    body = urlencode({"event": "ONAPPUPDATE", "data[VERSION]": "2", "ts": "1",
                      **{f"auth[{k}]": v for k, v in auth.items()}})
    with live_app.http() as http:
        response = http.post("/b24/events", content=body,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    wait_for(_processed, timeout=30)

    wait_for(lambda: "carries the tokens of user" in worker.output(), timeout=10)
    output = worker.output()
    [line] = [line for line in output.splitlines() if "carries the tokens of user" in line]
    assert "user 2\\n" + FORGED + "\\x1b[2J\\r, who is not an administrator" in line
    assert not any(line.startswith(FORGED) for line in output.splitlines())
    assert "\x1b" not in output and "\r" not in output
