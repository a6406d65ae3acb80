"""A ceiling on unverified first-contact events, the one kind intake stores without a check.

An ONAPPINSTALL for a portal the app does not know yet carries nothing to compare
its application_token with, so it is stored as ``unverified`` and the install
handler checks it against the auth server's ``app.info``. Anyone can post one, and
each costs a row and an outgoing call to the auth server. So they are counted in
Redis per one-minute window, per client address and in total:
``UNVERIFIED_INSTALLS_PER_IP`` (30) and ``UNVERIFIED_INSTALLS_TOTAL`` (600) a minute.
Over either, the answer is 429 and nothing is stored; events refused for their
address do not count towards the total.

The per-address count trusts the address ProxyFix derives (one X-Forwarded-For hop):
behind a proxy that is the sender; without one a sender can vary it, and the total
still holds. When Redis cannot count, the event is let through (intake keeps
storing while Redis is down, and the ``app.info`` check still applies).
"""

from __future__ import annotations

import logging
import time

import redis
from flask import current_app

from app.ingress.auth import Rejected

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60


def admit_unverified(client_address: str | None) -> None:
    """Count one unverified first-contact event; Rejected(429) once a ceiling is passed."""
    cfg = current_app.config
    window = int(time.time() // WINDOW_SECONDS)
    prefix = f"{cfg.get('DRAMATIQ_NAMESPACE', 'b24relay')}:intake:unverified:{window}"
    try:
        # The total counts only what the per-address ceiling let through, so one noisy
        # address cannot use up everybody's budget.
        if _count(f"{prefix}:ip:{client_address or '-'}") > cfg["UNVERIFIED_INSTALLS_PER_IP"]:
            raise Rejected(429, "rate_limited",
                           "too many install events for unknown portals from this address; "
                           "retry in a minute")
        if _count(f"{prefix}:all") > cfg["UNVERIFIED_INSTALLS_TOTAL"]:
            raise Rejected(429, "rate_limited",
                           "too many install events for unknown portals; retry in a minute")
    except redis.RedisError as exc:  # cannot count: let it through (see above)
        log.warning("unverified-event ceiling not checked, Redis unavailable: %s", exc)


def _count(key: str) -> int:
    from app.ingress.inbox import intake_redis

    pipe = intake_redis().pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, WINDOW_SECONDS * 2)
    return int(pipe.execute()[0])
