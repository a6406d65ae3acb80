"""A lean open-loop HTTP/1.1 load generator for the intake benchmark.

The client shares the machine's two cores with the server it measures, so every
microsecond it spends is taken from the server under test. An aiohttp client
used about 0.5 ms of CPU per request (a quarter of a core at 500 requests/s);
this one writes pre-rendered requests straight to asyncio transports over a
pool of keep-alive connections and parses only what it needs from each answer
(status, Content-Length, Connection, and the JSON body's ``id``).

Open loop: request *i* is due at ``t0 + i/rate`` whatever happened before, and
its latency counts from that due time, so a server stall (or the client's own
lag, reported separately) is never hidden by the client waiting for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

IDLE_REUSE_SECONDS = 1.0  # well under the server's keep-alive, so it never closes mid-send
TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 1024


def render_requests(url: str, bodies: Sequence[bytes], content_type: str) -> list[bytes]:
    """Whole HTTP/1.1 POST requests, one per body, ready to write to a socket."""
    parts = urlsplit(url)
    head = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: {content_type}\r\nUser-Agent: b24relay-bench\r\n")
    return [(head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in bodies]


@dataclass
class _Run:
    """One run's shared state; a result is (HTTP status or -1, latency ms, inbox id)."""

    loop: asyncio.AbstractEventLoop
    results: list[tuple[int, float, int | None]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    idle: list[_Connection] = field(default_factory=list)
    busy: set[_Connection] = field(default_factory=set)
    connections: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0

    def record(self, status: int, due: float, ident: int | None, failure: str | None) -> None:
        self.results.append((status, (self.loop.time() - due) * 1000.0, ident))
        if failure:
            self.failures[failure] = self.failures.get(failure, 0) + 1
        if len(self.results) >= self.expected:
            self.done.set()


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.due = 0.0
        self.in_flight = False
        self.last_used = run.loop.time()
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, due: float) -> None:
        self.due, self.in_flight = due, True
        self.run.busy.add(self)
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4:end + 4 + length])
        del self.buffer[:end + 4 + length]
        status = int(head[0].split(" ", 2)[1])
        ident = None
        if 200 <= status < 300 and headers.get("content-type", "").startswith("application/json"):
            ident = json.loads(body).get("id")
        self._finish(status, ident, None)
        if headers.get("connection", "").lower() == "close":
            self._drop()
        elif not self.closing:
            self.last_used = self.run.loop.time()
            self.run.idle.append(self)

    def _finish(self, status: int, ident: int | None, failure: str | None) -> None:
        if self.in_flight:
            self.in_flight = False
            self.run.busy.discard(self)
            self.run.record(status, self.due, ident, failure)

    def _drop(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def fail(self, reason: str) -> None:
        self._finish(-1, None, reason)
        self._drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.run.connections -= 1
        if self in self.run.idle:
            self.run.idle.remove(self)
        self._finish(-1, None, type(exc).__name__ if exc else "ConnectionClosed")


async def _open_and_send(run: _Run, host: str, port: int, request: bytes, due: float) -> None:
    run.connections += 1
    try:  # the watchdog only sees sent requests, so the connect has its own deadline
        _, conn = await asyncio.wait_for(
            run.loop.create_connection(lambda: _Connection(run), host, port),
            max(0.1, due + TIMEOUT_SECONDS - run.loop.time()))
    except Exception as exc:  # noqa: BLE001 - every request ends up counted
        run.connections -= 1
        run.record(-1, due, None, type(exc).__name__)
        return
    conn.send(request, due)


def _take_idle(run: _Run) -> _Connection | None:
    now = run.loop.time()
    while run.idle:
        conn = run.idle.pop()
        if not conn.closing and now - conn.last_used < IDLE_REUSE_SECONDS:
            return conn
        conn._drop()
    return None


async def _watchdog(run: _Run) -> None:
    """Fail requests that got no answer within TIMEOUT_SECONDS of their due time."""
    while not run.done.is_set():
        await asyncio.sleep(0.5)
        now = run.loop.time()
        for conn in [c for c in run.busy if now - c.due > TIMEOUT_SECONDS]:
            conn.fail("Timeout")


async def generate(url: str, requests: Sequence[bytes], rate: float) -> dict[str, Any]:
    """Send ``requests`` at ``rate`` per second; results, elapsed time and the client's lag."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    run = _Run(loop=loop, expected=len(requests))
    watchdog = asyncio.create_task(_watchdog(run))
    pending: set[asyncio.Task[None]] = set()
    lag_max = 0.0
    t0 = loop.time() + 0.2
    for i, request in enumerate(requests):
        due = t0 + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag_max = max(lag_max, -delay)
        conn = _take_idle(run)
        if conn is not None:
            conn.send(request, due)
        elif run.connections < MAX_CONNECTIONS:
            task = loop.create_task(_open_and_send(run, host, port, request, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        else:
            run.record(-1, due, None, "TooManyConnections")
    if requests:
        await run.done.wait()
    elapsed = loop.time() - t0
    watchdog.cancel()
    for conn in list(run.idle):
        conn._drop()
    return {"results": run.results, "elapsed": elapsed, "generator_lag_max_ms": lag_max * 1000,
            "failures": run.failures}


# ---------------------------------------------------------------- closed loop

@dataclass
class _Closed:
    """A closed-loop run: each connection sends its next request when its answer arrives."""

    loop: asyncio.AbstractEventLoop
    requests: Sequence[bytes]
    deadline: float
    next_index: int = 0
    open: int = 0
    results: list[tuple[int, float, int | None]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> bytes | None:
        if self.next_index >= len(self.requests) or self.loop.time() >= self.deadline:
            return None
        self.next_index += 1
        return self.requests[self.next_index - 1]

    def closed(self) -> None:
        self.open -= 1
        if self.open <= 0:
            self.done.set()


class _LoopConnection(_Connection):
    """A keep-alive connection that sends again as soon as it has its answer (closed loop)."""

    def __init__(self, closed: _Closed) -> None:
        self.closed_run = closed
        super().__init__(_Run(loop=closed.loop, expected=1 << 62))
        self.run.record = self._record  # type: ignore[method-assign]

    def _record(self, status: int, due: float, ident: int | None, failure: str | None) -> None:
        run = self.closed_run
        run.results.append((status, (run.loop.time() - due) * 1000.0, ident))
        if failure:
            run.failures[failure] = run.failures.get(failure, 0) + 1
        if status < 0:
            return  # the connection is gone; connection_lost ends this loop
        request = run.take()
        if request is None:
            self._drop()
        else:
            self.run.loop.call_soon(self._send_now, request)

    def _send_now(self, request: bytes) -> None:
        if not self.closing:
            self.send(request, self.run.loop.time())

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.closed_run.closed()


async def generate_closed(url: str, requests: Sequence[bytes], connections: int,
                          seconds: float) -> dict[str, Any]:
    """``connections`` keep-alive connections, each sending its next request when the previous
    answer arrives, for ``seconds`` (or until ``requests`` run out): the server's throughput.
    Latencies count from each request's send."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    t0 = loop.time()
    run = _Closed(loop=loop, requests=requests, deadline=t0 + seconds)
    for _ in range(connections):
        request = run.take()
        if request is None:
            break
        _, conn = await loop.create_connection(lambda: _LoopConnection(run), host, port)
        run.open += 1
        conn.send(request, loop.time())
    if run.open:
        await asyncio.wait_for(run.done.wait(), seconds + TIMEOUT_SECONDS)
    elapsed = loop.time() - t0
    return {"results": run.results, "elapsed": elapsed, "generator_lag_max_ms": 0.0,
            "failures": run.failures}
