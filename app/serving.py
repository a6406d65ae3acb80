"""gunicorn's gthread worker, buffering each whole request before a thread sees it.

Stock gthread gives a connection a thread as soon as it is readable, and that thread then
blocks on the socket until the body has arrived: 16 connections that sent headers and 10
bytes of body held every thread of two workers for as long as they cared to stay (one for
600 s), and Bitrix24 events sent meanwhile were lost (Bitrix24 never resends).

:class:`BufferingWorker` reads each request in the worker's main loop instead, without
blocking, until its headers and whole body are buffered (``Content-Length`` bytes, or a
chunked body up to its last chunk), and only then hands the connection to the thread pool;
the buffered bytes go into gunicorn's own parser buffer (its "unreader"), which the parser
reads before it would touch the socket. A thread therefore never waits for a client:

- a request not complete within ``REQUEST_DEADLINE`` seconds of its first byte (a new
  connection: of its accept) gets ``408`` and is closed, however it trickles;
- a body declared or buffered past the app's ``MAX_CONTENT_LENGTH`` (+1 byte) is handed over
  at once and the app answers 413 from what is buffered; the connection then closes;
- headers over ``REQUEST_HEADER_BYTES`` get ``431``; chunk framing that cannot be read
  gets ``400``; both close the connection;
- once handed over, the thread's socket reads and writes wait no longer than what is left
  of the deadline (at least 1 s): the app never needs to read past the buffer, but should
  it (or should a client not read its answer), the thread is still bounded.

Memory per connection is bounded by the header cap plus the body limit (plus the framing
of a chunked body, capped too), and connections by gunicorn's ``worker_connections``
(measured: 600 connections stalled after 250 KB of body each added 144 MB to two workers,
given back after the deadline; 200 stalled after 10 bytes, nothing measurable). Settings
(app/config.py): ``REQUEST_DEADLINE_SECONDS`` (10) and ``REQUEST_HEADER_BYTES`` (64 KiB).
Keep-alive requests and pipelined ones go through the same buffering. gunicorn's own
limits (``limit_request_*``) still apply: its parser reads the buffered request as usual.
TLS and HTTP/2 are left to stock gthread (TLS ends at the load balancer here).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from app.config import request_settings

log = logging.getLogger(__name__)

RECV_BYTES = 64 * 1024
MIN_SOCKET_TIMEOUT = 1.0  # a thread's socket wait once a request is handed over, at least
SWEEP_SECONDS = 0.25  # how often deadlines are checked: their precision
# A closed connection's last answer needs the client's FIN, not a thread; lingering waits
# that long at most, off the main loop's critical path (stock gthread blocks it for 2 s).
LINGER_SECONDS = 2.0
LINGER_DRAIN_BYTES = 64 * 1024
# Chunk framing may cost this much beyond the body itself (1-byte chunks are 6 bytes each).
CHUNK_OVERHEAD_BYTES = 64 * 1024

MORE, READY, BAD, HEADERS_TOO_LARGE, TOO_LARGE = "more", "ready", "bad", "headers", "large"
REFUSALS = {
    BAD: b"400 Bad Request",
    HEADERS_TOO_LARGE: b"431 Request Header Fields Too Large",
    TOO_LARGE: b"413 Content Too Large",
    "deadline": b"408 Request Timeout",
}


@dataclass
class RequestBuffer:
    """One HTTP/1.x request as it arrives, and whether it is whole yet (framing only)."""

    body_limit: int
    header_limit: int
    data: bytearray = field(default_factory=bytearray)
    head_end: int = -1
    length: int | None = None       # Content-Length, or None for a chunked body
    chunk_pos: int = 0              # where the next chunk-size line starts
    chunk_body: int = 0             # body bytes in the chunks before chunk_pos
    oversize: bool = False          # handed over past the body limit: close after the answer
    expect_continue: bool = False
    _scanned: int = 0

    def feed(self, chunk: bytes) -> str:
        """Add bytes from the socket; MORE, READY, or a refusal (BAD, HEADERS_TOO_LARGE...)."""
        self.data += chunk
        return self.state()

    def state(self) -> str:
        """Where the buffered request stands."""
        if self.head_end < 0:
            end = self.data.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end < 0:
                self._scanned = len(self.data)
                return HEADERS_TOO_LARGE if len(self.data) > self.header_limit else MORE
            if end + 4 > self.header_limit:
                return HEADERS_TOO_LARGE
            self.head_end = self.chunk_pos = end + 4
            self._read_head(bytes(self.data[:end]))
        if self.oversize:
            return READY
        if self.length is None:
            return self._scan_chunks()
        return READY if len(self.data) - self.head_end >= self.length else MORE

    def _read_head(self, head: bytes) -> None:
        """Learn the body's framing; anything unusual is handed to gunicorn's parser to judge."""
        lines = head.split(b"\r\n")
        fields: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields.setdefault(name.strip().lower(), []).append(value.strip())
        lengths, codings = fields.get(b"content-length", []), fields.get(b"transfer-encoding")
        self.expect_continue = (lines[0].endswith(b"HTTP/1.1")
                                and fields.get(b"expect") == [b"100-continue"])
        if codings is not None:
            last = b",".join(codings).split(b",")[-1].strip().lower()
            if last != b"chunked" or lengths:
                self.length = 0  # gunicorn refuses this framing before reading any body
            return
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            self.length = 0      # likewise: a 400 from gunicorn, no body read
            return
        self.length = int(lengths[0]) if lengths else 0
        # Declared too large: the app answers 413 from the header without reading the body.
        self.oversize = self.length > self.body_limit

    def _scan_chunks(self) -> str:
        """Walk the chunks buffered so far; READY at the last one or past the body limit."""
        while True:
            line_end = self.data.find(b"\r\n", self.chunk_pos)
            if line_end < 0:
                return BAD if len(self.data) - self.chunk_pos > 1024 else MORE
            size_text = bytes(self.data[self.chunk_pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                return BAD
            if size == 0:
                return self._trailers(line_end)
            arrived = min(size, len(self.data) - line_end - 2)
            if self.chunk_body + arrived > self.body_limit:
                self.oversize = True  # limit+1 bytes are here: the app reads them, answers 413
                return READY
            if len(self.data) > self.head_end + self.body_limit + CHUNK_OVERHEAD_BYTES:
                return TOO_LARGE
            next_pos = line_end + 2 + size + 2
            if len(self.data) < next_pos:
                return MORE
            if self.data[next_pos - 2:next_pos] != b"\r\n":
                return BAD
            self.chunk_pos, self.chunk_body = next_pos, self.chunk_body + size

    def _trailers(self, line_end: int) -> str:
        if self.data.find(b"\r\n\r\n", line_end) >= 0:
            return READY
        return HEADERS_TOO_LARGE if len(self.data) - line_end > self.header_limit else MORE


def _recv(sock: socket.socket) -> bytes | None:
    """What a readable non-blocking socket holds: None for nothing yet, b"" once it is gone."""
    try:
        return sock.recv(RECV_BYTES)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


@dataclass
class _Pending:
    """A connection whose request is still arriving."""

    conn: TConn
    buffer: RequestBuffer
    deadline: float
    continue_sent: bool = False
    watched: bool = False           # registered with the poller


@dataclass
class _Lingering:
    """A closed-for-writing connection waiting for its client's FIN."""

    sock: socket.socket
    deadline: float
    drained: int = 0


class _Conn(TConn):
    """gthread's connection, closing through the worker's non-blocking linger."""

    def __init__(self, worker: BufferingWorker, *args: Any) -> None:
        super().__init__(*args)
        self.worker = worker
        self.oversize = False
        self.continue_sent = False
        self.deadline = 0.0

    def close(self, graceful: bool = False) -> None:
        """Close now, or after the client's FIN without blocking the main loop."""
        if graceful:
            self.worker.linger(self.sock)
        else:
            super().close()


class BufferingWorker(ThreadWorker):
    """gthread, but a thread only ever gets a request that has fully arrived."""

    def run(self) -> None:
        """Read the limits from the app, then run gthread's main loop."""
        config = getattr(self.wsgi, "config", {})
        if "REQUEST_DEADLINE" not in config:  # an app not built by create_app (bench's bare ones)
            config = request_settings()
        self.deadline = float(config["REQUEST_DEADLINE"])
        self.header_limit = int(config["REQUEST_HEADER_BYTES"])
        self.body_limit = int(config["MAX_CONTENT_LENGTH"])
        self.buffering = not self.cfg.is_ssl and getattr(self.cfg, "protocol", "http") == "http"
        if not self.buffering:
            log.warning("request buffering is off (TLS or uwsgi): slow clients hold threads")
        self.pending: dict[TConn, _Pending] = {}
        self.lingering: dict[socket.socket, _Lingering] = {}
        self.next_sweep = 0.0
        super().run()

    def accept(self, listener: socket.socket) -> None:
        """Accept a connection and start buffering its first request."""
        try:
            client, addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(_Conn(self, self.cfg, client, addr, listener.getsockname()))

    def enqueue_req(self, conn: TConn) -> None:
        """Every path to the thread pool (new, kept-alive, pipelined) buffers first."""
        if not self.buffering or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
            super().enqueue_req(conn)
            return
        buffered = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        pending = _Pending(conn, RequestBuffer(self.body_limit, self.header_limit),
                           time.monotonic() + self.deadline)
        self.pending[conn] = pending
        conn.sock.setblocking(False)
        if buffered:
            self._advance(pending, pending.buffer.feed(buffered))
        if conn in self.pending:
            # Usually the request is there already (a kept-alive connection is here because
            # it became readable): read it now rather than after one more turn of the loop.
            self._on_readable(pending, conn.sock)
        if conn in self.pending:
            pending.watched = True
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self._on_readable, pending))

    def _on_readable(self, pending: _Pending, sock: socket.socket) -> None:
        data = _recv(sock)
        if data is None:
            return
        if not data:  # the client went away mid-request
            self._close(pending)
            return
        self._advance(pending, pending.buffer.feed(data))

    def _advance(self, pending: _Pending, state: str) -> None:
        if state == READY:
            self._hand_over(pending)
        elif state == MORE:
            self._maybe_continue(pending)
        else:
            self._refuse(pending, REFUSALS[state])

    def _maybe_continue(self, pending: _Pending) -> None:
        """Ask for the body of an ``Expect: 100-continue`` request: it is read here now."""
        buffer = pending.buffer
        if buffer.head_end >= 0 and buffer.expect_continue and not pending.continue_sent:
            pending.continue_sent = True
            try:
                pending.conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass  # a full send buffer or a gone client: the deadline settles it

    def _hand_over(self, pending: _Pending) -> None:
        """Give the whole request to gunicorn's parser and the connection to a thread."""
        conn = self._drop(pending)
        if conn.parser is None:
            # What TConn.init does for plain HTTP/1 (no I/O), so the bytes can go in now.
            conn.initialized = True
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(pending.buffer.data))
        conn.oversize = pending.buffer.oversize
        conn.deadline = pending.deadline
        conn.continue_sent = pending.continue_sent
        super().enqueue_req(conn)

    def handle_request(self, req: Any, conn: TConn) -> bool:
        """Serve as gthread does, closing after an over-limit request's answer."""
        # Belt and braces: should the app read past what was buffered (the rest of an
        # over-limit body), or the client not read its answer, the thread waits on the
        # socket no longer than what is left of the request's deadline.
        # A connection that was never buffered (TLS, uwsgi) has no deadline: stock behaviour.
        if conn.deadline:
            conn.sock.settimeout(max(conn.deadline - time.monotonic(), MIN_SOCKET_TIMEOUT))
        if conn.oversize:
            req.force_close()  # its unread rest must not be drained by a thread
        if conn.continue_sent:
            req._expected_100_continue = False  # sent already, before the body was read
        return super().handle_request(req, conn)

    def _refuse(self, pending: _Pending, status: bytes) -> None:
        """Answer a request that will not be served, and close its connection."""
        conn = self._drop(pending)
        self.nr_conns -= 1
        log.info("request from %s refused before the app: %s", conn.client, status.decode())
        answer = b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        try:
            conn.sock.send(answer)
        except OSError:
            pass
        self.linger(conn.sock)

    def _close(self, pending: _Pending) -> None:
        self._drop(pending)
        self.nr_conns -= 1
        pending.conn.close()

    def _drop(self, pending: _Pending) -> TConn:
        """Stop watching a pending connection; it is the caller's to serve or close."""
        del self.pending[pending.conn]
        if pending.watched:
            self.poller.unregister(pending.conn.sock)
        return pending.conn

    def linger(self, sock: socket.socket) -> None:
        """Close after the client's FIN (so it reads the last answer), waiting in the loop."""
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        state = _Lingering(sock, time.monotonic() + LINGER_SECONDS)
        self.lingering[sock] = state
        self.poller.register(sock, selectors.EVENT_READ, partial(self._on_linger, state))

    def _on_linger(self, state: _Lingering, sock: socket.socket) -> None:
        data = _recv(sock)
        if data is None:
            return
        state.drained += len(data)
        if not data or state.drained > LINGER_DRAIN_BYTES:
            self._end_linger(state)

    def _end_linger(self, state: _Lingering) -> None:
        del self.lingering[state.sock]
        try:
            self.poller.unregister(state.sock)
        except (KeyError, ValueError, OSError):
            pass
        state.sock.close()

    def murder_pending(self) -> None:
        """gthread's sweep, plus requests past their deadline (408) and overdue lingers."""
        super().murder_pending()
        now = time.monotonic()
        if now < self.next_sweep:  # the loop turns per event; hundreds pending need not
            return
        self.next_sweep = now + SWEEP_SECONDS
        for pending in [p for p in self.pending.values() if p.deadline <= now]:
            if pending.buffer.data:
                self._refuse(pending, REFUSALS["deadline"])
            else:  # an idle connection that never started a request: just close it
                self._close(pending)
        for state in [s for s in self.lingering.values() if s.deadline <= now]:
            self._end_linger(state)
