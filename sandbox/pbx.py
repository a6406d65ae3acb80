"""A test PBX: takes b24relay's originate requests and reports the calls they become.

    python -m sandbox.pbx --app http://127.0.0.1:8000 --api-key b24r_... --secret S
    python -m sandbox.pbx ... --port 8090 --no-answer --ring 2 --talk 30

It is what app/ingress/PBX_EVENTS.md asks of a PBX, over real HTTP on 127.0.0.1:

- ``POST`` (any path) is an originate request. Its ``X-B24Relay-Signature`` must be
  ``sha256=`` + hex HMAC-SHA256 of ``"<X-B24Relay-Timestamp>.<raw body>"`` under the
  secret, and the timestamp within ``max_skew`` seconds (300) of this clock: otherwise
  401 and nothing happens. A signed test request (``"kind": "test"``: the settings
  page's "send a test originate") is answered 200 ``{"test": true}`` and places no call
  (:attr:`TestPBX.tests`). Any other body without ``extension`` or ``phone`` is 400.
- A genuine one is answered ``status`` (200; set it to 503 to play a PBX that is down),
  and then, in the background, the call is reported to ``<app>/api/v1/calls/events``
  with the portal's API key, one event a request, as a PBX would: ``start`` (direction
  ``out``, ``origin_id`` = the originate's ``call_id``, the extension, the number, the
  line) after ``ring`` seconds ``answer`` by the extension and after ``talk`` more
  seconds ``end`` answered with that duration; with ``answer=False`` an ``end``
  ``no_answer`` after ``ring`` seconds instead. ``report=False`` reports nothing (a PBX
  that never reports the call).

Importable for tests and benches: :class:`TestPBX` (a context manager) keeps every
request it took (:attr:`TestPBX.originates`, each with its arrival time) and every event
it posted, and calls ``on_originate`` as each genuine request arrives.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.server
import itertools
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

TIMESTAMP_HEADER = "X-B24Relay-Timestamp"
SIGNATURE_HEADER = "X-B24Relay-Signature"
EVENTS_PATH = "/api/v1/calls/events"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The header value a genuine request carries (PBX_EVENTS.md, "Originate requests")."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def check(secret: str, timestamp: str | None, body: bytes, given: str | None,
          max_skew: float = 300.0, now: float | None = None) -> str | None:
    """Why a request is not genuine (None when it is): missing headers, a stale or
    malformed timestamp, or a signature that does not match (compared in constant time)."""
    if not timestamp or not given:
        return "unsigned"
    try:
        stamp = int(timestamp)
    except ValueError:
        return "bad timestamp"
    if abs((time.time() if now is None else now) - stamp) > max_skew:
        return "stale timestamp"
    if not hmac.compare_digest(signature(secret, timestamp, body), given):
        return "bad signature"
    return None


@dataclass
class Originate:
    """One request the PBX took: its body, when it arrived, and the PBX call it became."""

    body: dict[str, Any]
    received: float  # time.time() at arrival
    pbx_call_id: str
    status: int


@dataclass
class Refused:
    """A request the PBX refused (401, 400), and why."""

    status: int
    reason: str
    received: float


@dataclass
class TestPBX:
    """The test PBX; ``start()`` it (or use ``with``), give :attr:`url` to the portal as its
    ``pbx_originate_url``, ``close()`` it."""

    __test__ = False  # not a pytest test class

    app: str
    api_key: str
    secret: str
    answer: bool = True
    ring: float = 0.2
    talk: float = 1.0
    report: bool = True
    status: int = 200
    max_skew: float = 300.0
    host: str = "127.0.0.1"
    port: int = 0
    on_originate: Callable[[Originate], None] | None = None
    originates: list[Originate] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)  # signed test requests taken
    posted: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []
        self._http = httpx.Client(base_url=self.app.rstrip("/"), timeout=30.0,
                                  headers={"Authorization": f"Bearer {self.api_key}"})
        self._server: http.server.ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ the server

    def start(self) -> TestPBX:
        """Listen (``port`` 0: a free one) and serve in a daemon thread."""
        pbx = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = pbx._take(body, self.headers.get(TIMESTAMP_HEADER),
                                           self.headers.get(SIGNATURE_HEADER))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="test-pbx",
                         daemon=True).start()
        return self

    @property
    def url(self) -> str:
        """The originate URL to set as the portal's ``pbx_originate_url``."""
        return f"http://{self.host}:{self.port}/originate"

    def close(self, wait: float = 10.0) -> None:
        """Stop taking requests; wait up to ``wait`` s for calls still being reported."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        deadline = time.monotonic() + wait
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._http.close()

    def __enter__(self) -> TestPBX:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ an originate

    def _take(self, body: bytes, stamp: str | None, given: str | None
              ) -> tuple[int, dict[str, Any]]:
        now = time.time()
        why = check(self.secret, stamp, body, given, self.max_skew, now)
        if why is not None:
            with self._lock:
                self.refused.append(Refused(401, why, now))
            return 401, {"error": why}
        try:
            data = json.loads(body)
            if isinstance(data, dict) and data.get("kind") == "test":
                with self._lock:
                    self.tests.append(data)
                return 200, {"test": True, "call_id": None}  # signed right; no call placed
            if not isinstance(data, dict) or not data.get("extension") or not data.get("phone"):
                raise ValueError("extension and phone are required")
        except ValueError as exc:
            with self._lock:
                self.refused.append(Refused(400, str(exc), now))
            return 400, {"error": str(exc)}
        row = Originate(body=data, received=now, pbx_call_id=f"testpbx-{next(self._ids)}",
                        status=self.status)
        with self._lock:
            self.originates.append(row)
        if self.on_originate is not None:
            self.on_originate(row)
        if 200 <= self.status < 300 and self.report:
            thread = threading.Thread(target=self._report, args=(row,), daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
        return self.status, {"call_id": row.pbx_call_id}

    def _report(self, row: Originate) -> None:
        """The call's events, posted as they happen."""
        call, body = row.pbx_call_id, row.body
        extension = str(body["extension"])
        start: dict[str, Any] = {"call_id": call, "event": "start", "at": _now(),
                                 "direction": "out", "phone": body["phone"],
                                 "extensions": [extension]}
        if body.get("call_id"):
            start["origin_id"] = body["call_id"]
        if body.get("line"):
            start["line"] = body["line"]
        self._post(start)
        time.sleep(self.ring)
        if not self.answer:
            self._post({"call_id": call, "event": "end", "at": _now(), "status": "no_answer",
                        "duration": 0})
            return
        self._post({"call_id": call, "event": "answer", "at": _now(), "extension": extension})
        time.sleep(self.talk)
        self._post({"call_id": call, "event": "end", "at": _now(), "status": "answered",
                    "duration": self.talk})

    def _post(self, event: dict[str, Any]) -> None:
        """One event; a failed post (no answer, 5xx) is tried again a few times."""
        for attempt in range(5):
            try:
                response = self._http.post(EVENTS_PATH, json=event)
            except httpx.HTTPError as exc:
                error = f"{event['call_id']} {event['event']}: {exc!r}"
            else:
                if response.status_code < 500:
                    with self._lock:
                        self.posted.append((event, response.status_code))
                        if response.status_code != 202:
                            self.errors.append(f"{event['call_id']} {event['event']}: HTTP "
                                               f"{response.status_code} {response.text[:200]}")
                    return
                error = f"{event['call_id']} {event['event']}: HTTP {response.status_code}"
            time.sleep(0.2 * 2 ** attempt)
        with self._lock:
            self.errors.append(error)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def main(argv: list[str] | None = None) -> None:
    """Run the test PBX until SIGINT/SIGTERM, printing each request it takes or refuses."""
    ap = argparse.ArgumentParser(prog="python -m sandbox.pbx", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--app", required=True, help="the app's base URL (its PBX API)")
    ap.add_argument("--api-key", required=True, help="the portal's PBX API key")
    ap.add_argument("--secret", required=True, help="the portal's pbx_secret")
    ap.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0: free)")
    ap.add_argument("--no-answer", action="store_true", help="end every call unanswered")
    ap.add_argument("--ring", type=float, default=2.0, help="seconds from start to answer/end")
    ap.add_argument("--talk", type=float, default=5.0, help="seconds talked when answered")
    ap.add_argument("--status", type=int, default=200, help="the answer to an originate")
    args = ap.parse_args(argv)
    stop = threading.Event()

    def shown(row: Originate) -> None:
        print(f"originate {json.dumps(row.body)} -> {row.status} as {row.pbx_call_id}",
              flush=True)

    pbx = TestPBX(app=args.app, api_key=args.api_key, secret=args.secret,
                  answer=not args.no_answer, ring=args.ring, talk=args.talk,
                  status=args.status, port=args.port, on_originate=shown).start()
    print(f"test PBX: pbx_originate_url={pbx.url}", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    seen = 0
    while not stop.wait(0.5):
        for refused in pbx.refused[seen:]:
            print(f"refused {refused.status}: {refused.reason}", flush=True)
        seen = len(pbx.refused)
        for error in pbx.errors:
            print(f"report failed: {error}", flush=True)
        pbx.errors.clear()
    pbx.close()


if __name__ == "__main__":
    main()
