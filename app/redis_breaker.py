"""A breaker for Redis calls that a request must not wait on: after a failure, stop trying.

Intake answers Bitrix24 in milliseconds whether Redis is up or not (a Redis it cannot
reach costs a short timeout, ``fast_redis`` in app/ingress/inbox). Paying that timeout on
every request while Redis is down would still slow every answer, so after a failed call
the caller skips Redis for ``backoff`` seconds and does without it (leaves the row for
the sweeper, applies no ceiling); the first call after that tries again. An outage thus
costs one short timeout per backoff window, not one per request.

One breaker per app and per use, kept in ``app.extensions`` (the threads of a process
share it). It is a plain float: two threads that see it expire together both try, which
costs one more timeout at worst.
"""

from __future__ import annotations

import time

BACKOFF_SECONDS = 1.0  # how long Redis is left alone after a failed call


class RedisBreaker:
    """Says whether to try Redis now: not for ``backoff`` seconds after a failure."""

    def __init__(self, backoff: float = BACKOFF_SECONDS) -> None:
        self.backoff = backoff
        self._down_until = 0.0  # time.monotonic() before which no call is tried

    def allow(self) -> bool:
        """Whether a call may try Redis now (no failure within the last ``backoff`` seconds)."""
        return time.monotonic() >= self._down_until

    def failed(self) -> None:
        """A call failed: refuse calls for ``backoff`` seconds from now."""
        self._down_until = time.monotonic() + self.backoff
