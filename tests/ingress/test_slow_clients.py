"""Slow clients cost a bounded time and no thread: real gunicorn from gunicorn.conf.py.

16, then 200, connections send their headers and 10 bytes of body, then nothing (one more
trickles a byte a second), while real Bitrix24 events arrive at a steady rate: every event
is acknowledged and stored, quickly, and the slow connections are closed by the request
deadline. With stock gthread (``GUNICORN_CMD_ARGS=--worker-class gthread``) the slow
connections take every thread and the events time out.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.ingress import auth
from app.serving import BAD, HEADERS_TOO_LARGE, MORE, READY, TOO_LARGE, RequestBuffer
from bench.slow_clients import SlowClients, slow_request
from sandbox.appsetup import free_port
from tests.conftest import ROOT, child_env, wait_for
from tests.ingress.conftest import FORM, b24_body, inbox_rows

# Latency bounds: run alone, not beside another xdist worker's load (make test runs these after).
pytestmark = pytest.mark.serial

DEADLINE = 6           # REQUEST_DEADLINE_SECONDS for the server under test
EVENT_RATE = 50        # real events per second, for EVENT_SECONDS
EVENT_SECONDS = 3
# The acceptance figure: real events' p99 stays under 25 ms with the slow connections open
# (bench/slow_clients.py measures it at length). A machine busy with something else slows
# every request alike, so the bound is 25 ms or twice the same server's p99 measured just
# before without slow connections, whichever is larger: stalls of the box pass, waiting for
# a thread does not. Stock gthread fails either way: its events wait until they time out.
P99_GOAL_MS = float(os.environ.get("SLOW_CLIENTS_P99_MS", "25"))
WARM_UP = 20
REQUEST_TIMEOUT = 5.0


class Gunicorn:
    """The Procfile's web server (gunicorn.conf.py) on a free loopback port."""

    def __init__(self, config: dict[str, Any], log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        env = child_env(config, BIND=f"127.0.0.1:{self.port}", LOG_LEVEL="WARNING",
                        REQUEST_DEADLINE_SECONDS=str(DEADLINE), **env)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._healthy, timeout=30)

    def _healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return self.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def connection(self) -> http.client.HTTPConnection:
        """A keep-alive client connection."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request on its own connection: status and body."""
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture
def start_gunicorn(app: Any, tmp_path: Path) -> Iterator[Any]:
    """Factory: start gunicorn for the test app's database and Redis; stopped after."""
    started: list[Gunicorn] = []

    def start(**env: str) -> Gunicorn:
        started.append(Gunicorn(app.config, tmp_path / f"gunicorn-{len(started)}.log", **env))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def send_events(server: Gunicorn, portal: Any, count: int, rate: float, first: int = 0
                ) -> list[tuple[int, float, int | None]]:
    """``count`` events at ``rate``/s on a keep-alive connection: (status, ms, inbox id) each.

    A request that gets no answer within REQUEST_TIMEOUT counts as status -1; sending
    stops at the planned end plus that timeout, and whatever was not sent by then too.
    """
    results: list[tuple[int, float, int | None]] = []
    conn, started = server.connection(), time.monotonic()
    for i in range(first, first + count):
        due = started + (i - first) / rate
        time.sleep(max(0.0, due - time.monotonic()))
        if time.monotonic() > started + count / rate + REQUEST_TIMEOUT:
            break
        body = b24_body(portal.member_id, portal.application_token,
                        data={"FIELDS": {"ID": str(i)}})
        sent = time.perf_counter()
        try:
            conn.request("POST", "/b24/events", body=body, headers=FORM)
            response = conn.getresponse()
            payload = response.read()
        except OSError:
            results.append((-1, (time.perf_counter() - sent) * 1000, None))
            conn.close()
            conn = server.connection()
            continue
        ident = json.loads(payload).get("id") if response.status == 200 else None
        results.append((response.status, (time.perf_counter() - sent) * 1000, ident))
    conn.close()
    return results + [(-1, float("inf"), None)] * (count - len(results))


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.mark.parametrize("slow", [16, 200])
def test_real_events_are_acknowledged_while_slow_clients_wait(start_gunicorn, portal, slow):
    server = start_gunicorn()
    events = EVENT_RATE * EVENT_SECONDS
    # Not measured: each worker's first requests open its database and Redis connections.
    warm_up = [send_events(server, portal, 1, 1, first=i) for i in range(WARM_UP)]
    baseline = send_events(server, portal, events, EVENT_RATE, first=WARM_UP)
    attackers = SlowClients("127.0.0.1", server.port, slow).start()
    try:
        time.sleep(0.3)  # every slow connection is in before the first event
        results = send_events(server, portal, events, EVENT_RATE, first=WARM_UP + events)
        # Each is let go by its deadline (the sweep runs once a second; slack for a busy box).
        settle = time.monotonic() + DEADLINE + 3
        while len(attackers.outcomes) <= slow and time.monotonic() < settle:
            time.sleep(0.1)
    finally:
        attackers.stop()
    statuses = [status for status, _, _ in results]
    assert statuses == [200] * events, f"not acknowledged: {sorted(set(statuses))}"
    acked = sorted(ident for _, _, ident in
                   [*baseline, *results, *(r for w in warm_up for r in w)])
    assert acked == [row.id for row in inbox_rows()]
    quiet, attacked = p99([ms for _, ms, _ in baseline]), p99([ms for _, ms, _ in results])
    print(f"{slow} slow connections: p99 {attacked:.1f} ms (without them {quiet:.1f} ms)")
    assert attacked < max(P99_GOAL_MS, 2 * quiet), sorted(ms for _, ms, _ in results)[-5:]
    ended = {status for status, _ in attackers.outcomes}
    assert ended <= {"408", "closed"}, f"every slow connection ended by the deadline: {ended}"
    held = sorted(held for _, held in attackers.outcomes)
    assert held[0] >= EVENT_SECONDS, "the slow connections stayed while the events went by"
    assert held[-1] < DEADLINE + 3, "and were let go by the deadline, the trickler too"


def _raw(server: Gunicorn, data: bytes, pause: float = 0.0, pieces: int = 1) -> bytes:
    """Send ``data`` in ``pieces`` with ``pause`` seconds between them; read to the close."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE + 3) as sock:
        step = -(-len(data) // pieces)
        for start in range(0, len(data), step):
            sock.sendall(data[start:start + step])
            time.sleep(pause)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def _event_request(body: str, close: bool = False) -> bytes:
    """A whole event POST as bytes."""
    extra = "Connection: close\r\n" if close else ""
    return (f"POST /b24/events HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM['Content-Type']}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n{body}").encode()


def test_large_fast_bodies_slow_but_timely_ones_and_the_pbx_are_served(start_gunicorn, portal):
    server = start_gunicorn()
    large = b24_body(portal.member_id, portal.application_token, event="ONUSERADD",  # handled:
                     data={"FIELDS": {"ID": "1", "COMMENTS": "x" * 200_000}})  # may be large
    assert server.request("POST", "/b24/events", large, FORM)[0] == 200
    trickled = _event_request(b24_body(portal.member_id, portal.application_token,
                                       ts="1736405808"), close=True)
    # Under the deadline, however it arrives: 8 pieces over 2.4 s.
    assert _raw(server, trickled, pause=0.3, pieces=8).startswith(b"HTTP/1.1 200")
    key = auth.issue_api_key(portal)
    call = {"call_id": "pbx-1", "event": "start", "at": "2026-11-22T16:40:00+03:00",
            "direction": "in", "phone": "+74951234567", "extensions": ["101"]}
    status, _ = server.request("POST", "/api/v1/calls/events", json.dumps(call),
                               {"Authorization": f"Bearer {key}",
                                "Content-Type": "application/json"})
    assert status == 202
    assert len(inbox_rows()) == 3


def test_keep_alive_and_pipelined_requests_are_each_buffered(start_gunicorn, portal):
    server = start_gunicorn()
    bodies = [b24_body(portal.member_id, portal.application_token, ts=str(1736405800 + i))
              for i in range(5)]
    # Two whole requests in one write, then the start of a third that never ends.
    pipelined = _event_request(bodies[0]) + _event_request(bodies[1]) + \
        _event_request(bodies[2])[:60]
    answer = _raw(server, pipelined)
    assert answer.count(b"HTTP/1.1 200") == 2 and answer.count(b"HTTP/1.1 408") == 1, answer
    conn = server.connection()
    for body in bodies[3:]:  # kept alive: one connection, a request at a time
        conn.request("POST", "/b24/events", body=body, headers=FORM)
        assert conn.getresponse().read() and conn.sock is not None
    conn.close()
    assert len(inbox_rows()) == 4


def test_oversized_or_unframable_requests_are_answered_at_once_and_closed(start_gunicorn,
                                                                         portal):
    server = start_gunicorn()
    declared = slow_request("x").replace(b"Content-Length: 1000", b"Content-Length: 10000000")
    started = time.monotonic()
    assert _raw(server, declared).startswith(b"HTTP/1.1 413")
    chunked = (b"POST /b24/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
    assert _raw(server, chunked + b"zz\r\n").startswith(b"HTTP/1.1 400")
    huge_headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 70_000 + b"\r\n\r\n"
    assert _raw(server, huge_headers).startswith(b"HTTP/1.1 431")
    assert time.monotonic() - started < 2, "answered without waiting for the rest"
    # Clients that read their 413 and never close: the server waits for their FIN in its
    # loop, not by blocking it (stock gthread's close lingers up to 2 s on the main thread).
    stubborn = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    for sock in stubborn:
        sock.sendall(declared)
        assert sock.recv(64).startswith(b"HTTP/1.1 413")
    try:
        started = time.monotonic()
        event = b24_body(portal.member_id, portal.application_token)
        assert server.request("POST", "/b24/events", event, FORM)[0] == 200
        assert time.monotonic() - started < 1
    finally:
        for sock in stubborn:
            sock.close()


def _chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nX-T: 1\r\n\r\n"


def _fed_byte_by_byte(buffer: RequestBuffer, data: bytes) -> list[str]:
    return [buffer.feed(data[i:i + 1]) for i in range(len(data))]


CHUNKED_HEAD = b"POST /b24/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"


def test_a_request_is_whole_only_at_its_last_byte_however_it_is_framed():
    body = b"event=ONCRMDEALUPDATE&data=" + b"x" * 300
    for request in (CHUNKED_HEAD + _chunked(body, 7),
                    b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"):
        states = _fed_byte_by_byte(RequestBuffer(body_limit=1024, header_limit=4096), request)
        assert states == [MORE] * (len(request) - 1) + [READY]


def test_a_body_past_the_limit_is_handed_over_at_limit_plus_one_byte():
    limit = 100
    request = CHUNKED_HEAD + _chunked(b"y" * 1000, 30)
    buffer = RequestBuffer(body_limit=limit, header_limit=4096)
    states = _fed_byte_by_byte(buffer, request)
    ready_at = states.index(READY)
    body_bytes = bytes(buffer.data[:ready_at + 1]).count(b"y")
    assert body_bytes == limit + 1 and buffer.oversize
    declared = RequestBuffer(body_limit=limit, header_limit=4096)
    assert declared.feed(b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n") == READY
    assert declared.oversize


@pytest.mark.parametrize("data, state", [
    (CHUNKED_HEAD + b"zz\r\n", BAD),                             # not a chunk size
    (CHUNKED_HEAD + b"3\r\nabcXY", BAD),                        # no CRLF after the data
    (CHUNKED_HEAD + b"1" * 2000, BAD),                          # a size line with no end
    (b"GET / HTTP/1.1\r\nX: " + b"p" * 5000, HEADERS_TOO_LARGE),
    (CHUNKED_HEAD + (b"1;" + b"e" * 100 + b"\r\nA\r\n") * 1000, TOO_LARGE),  # framing bloat
    # Framing gunicorn refuses (400) without reading a body: handed to it at once.
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", READY),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", READY),
])
def test_requests_that_cannot_be_framed_are_refused_or_left_to_gunicorn(data, state):
    assert RequestBuffer(body_limit=1024, header_limit=4096).feed(data) == state
