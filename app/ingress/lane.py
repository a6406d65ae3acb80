"""The common Bitrix24 event, stored and answered before Flask builds a request for it.

Almost every POST to ``/b24/events`` is a new event from an installed portal whose
application token matches: one statement stores it (``delivery.stored_if_token_matches``,
the token checked inside the INSERT) and the answer is ``{"id": …, "duplicate": false}``.
For that case Flask's request context, routing and response machinery cost more of the
web tier's CPU than parsing and storing the event: in bench/ingest's closed loop under
gunicorn, the same code with and without this lane spent 0.60-0.65 and 0.80-0.88 ms of web
CPU per event (issue #13).

So this WSGI middleware, outermost in ``create_app``, tries that one case itself, in an
app context, and answers only if the event was stored. Everything else goes on to Flask
untouched, with the body put back: another path or method, no ``Content-Length`` or one
over ``MAX_CONTENT_LENGTH``, another content type, a malformed form, a token that does
not match, a duplicate, first contact, a database error. The view then takes its checked
path and gives every refusal (400, 401, 413, 503) as before, without trying the fast
INSERT a second time. Nothing is answered here that the view would answer differently:
same status, same JSON, the same metrics counted once.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask

from app.ingress import delivery, metrics
from app.ingress.auth import Rejected

PATH = "/b24/events"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class IntakeLane:
    """WSGI middleware: new, verified Bitrix24 events stored and answered without Flask."""

    def __init__(self, app: Flask, inner: WSGIApp) -> None:
        self.app = app
        self.inner = inner

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        length = self._length(environ)
        if length is None:
            return self.inner(environ, start_response)
        started = time.perf_counter()
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)  # for Flask, should the lane not answer
        environ[delivery.LANE_STARTED] = started
        if len(body) != length:  # the client went away mid-body: Flask answers it
            return self.inner(environ, start_response)
        with self.app.app_context():
            try:
                stored = delivery.stored_if_token_matches(delivery.parse_b24_form(body))
            except Rejected:  # malformed, or the database failed: the view says which
                stored = None
            if stored is not None:
                metrics.RECEIVED.labels("b24").inc()
                answer = delivery.ack_body(stored.id, duplicate=False)
                metrics.ACK_LATENCY.labels("b24").observe(time.perf_counter() - started)
        if stored is None:
            return self.inner(environ, start_response)
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(answer)))])
        return [answer]

    def _length(self, environ: dict[str, Any]) -> int | None:
        """The body's length if this request is one the lane may try, else None."""
        if environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD") != "POST":
            return None
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        if mimetype != delivery.FORM_TYPE:
            return None
        raw = environ.get("CONTENT_LENGTH") or ""
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        if not (raw.isascii() and raw.isdigit()) or not limit or int(raw) > limit:
            return None
        return int(raw)


def init_app(app: Flask) -> None:
    """Put the lane in front of everything else ``app.wsgi_app`` does."""
    app.wsgi_app = IntakeLane(app, app.wsgi_app)  # type: ignore[method-assign]
