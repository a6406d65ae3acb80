"""Unverified first contact: an ONAPPINSTALL from a portal the app cannot check yet.

Nothing is stored to compare its application_token with, so anyone can send one, for
any member_id; each is stored for the worker to check with the auth server's
``app.info``. Two things bound what a forger gets out of it:

- only what the check and the install handler need is stored (``pruned``), and one
  that is still large after pruning is refused with 413;
- a per-minute ceiling per source address and one for all addresses together
  (``FIRST_CONTACT_PER_ADDRESS_PER_MINUTE``, 30; ``FIRST_CONTACT_PER_MINUTE``, 300),
  counted in Redis; beyond them the answer is 429 and nothing is stored. It applies
  to unknown and uninstalled portals (:func:`rationed`), and to a portal an admin just
  installed that waits for its token unless the event carries its handler key (its
  real ONAPPINSTALL, bound by the installer, does).

Provisional events (any event for a portal an admin installed whose application_token
is still missing, app/ingress/provisional.py) are rationed per portal in
``PROVISIONAL_EVENT_MAX_AGE`` (600 s), the time such a row may be kept; beyond a
ration the answer is 429 and nothing is stored (:func:`admit_provisional`). Anyone who
knows a member_id (every employee: it is in their iframe form) can send them, so
Bitrix24's own deliveries must not share a ration with him. They need not: they come
through the handlers the app bound, whose URL carries the portal's handler key
(app/tenants/handler_key.py), which employees cannot read. So there are two rations:

- events with the key: ``PROVISIONAL_KEYED_EVENTS_PER_PORTAL`` (10,000), far above a
  portal's burst before its ONAPPINSTALL arrives; only Bitrix24 (or an admin) fills it;
- events without it: ``PROVISIONAL_EVENTS_PER_PORTAL`` (1000), of which one source
  address (IPv4, or an IPv6 /64) may take ``PROVISIONAL_EVENTS_PER_ADDRESS`` (100). Only
  a portal bound before handler keys existed sends real events here (its next setup
  re-binds it with the key).

A forger without the key fills at most the second ration per waiting portal, and each
row goes within twice that time; the key never makes a row verified (its token decides).

The trade-off: Bitrix24 never resends, so a real ONAPPINSTALL refused by a ceiling
is lost (the installer POST, which the app treats as primary, still installs the
portal). The ceilings are far above real install rates, and a single attacker
address reaches its own ceiling long before the global one. The source address is
the one ProxyFix takes from the front proxy's X-Forwarded-For. When Redis cannot
be asked, the ceiling is not applied (fail open): intake must keep answering, and
the event is stored.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from typing import Any

import redis
from flask import current_app

from app.ingress import inbox, provisional
from app.ingress.auth import KnownPortal, Rejected
from app.ingress.sealed import SEALED_FIELD
from app.redis_breaker import RedisBreaker
from app.tenants import handler_key
from app.tenants.models import PortalStatus

log = logging.getLogger(__name__)

AUTH_KEPT = ("member_id", "domain", "server_endpoint", "client_endpoint", "user_id", "expires",
             "expires_in", "scope", "status")
SMALL_SCALAR = 64      # characters: data[VERSION], data[LANGUAGE_ID], ... are a few each
MAX_STORED_BYTES = 4096  # a real ONAPPINSTALL is under 1 KB even with its sealed tokens
WINDOW_SECONDS = 60

# One round trip: count the address; count it globally only while the address is under
# its own ceiling, so one address cannot use up everybody's share.
_COUNT = """
local mine = redis.call('INCR', KEYS[1])
if mine == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if mine > tonumber(ARGV[1]) then return 1 end
local all = redis.call('INCR', KEYS[2])
if all == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
if all > tonumber(ARGV[2]) then return 2 end
return 0
"""


# One key, one ceiling: count, and say whether this one is over it.
_COUNT_ONE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then return 1 end
return 0
"""


def pruned(event: dict[str, Any]) -> dict[str, Any]:
    """What verification and the install handler need of a first-contact event, nothing else."""
    data = given if isinstance(given := event.get("data"), dict) else {}
    auth = signed if isinstance(signed := event.get("auth"), dict) else {}
    kept: dict[str, Any] = {
        "event": event.get("event"), "ts": event.get("ts"),
        "data": {k: v for k, v in data.items() if isinstance(v, str) and len(v) <= SMALL_SCALAR},
        "auth": {k: auth[k] for k in AUTH_KEPT if isinstance(auth.get(k), str)},
    }
    if isinstance(event.get(SEALED_FIELD), str):
        kept[SEALED_FIELD] = event[SEALED_FIELD]
    size = len(json.dumps(kept))
    if size > MAX_STORED_BYTES:
        raise Rejected(413, "too_large", f"a first-contact event must be under "
                                         f"{MAX_STORED_BYTES} bytes of what is kept")
    return kept


def _counter(name: str = "first_contact_count") -> Any:
    """A counting script, registered once per process (EVALSHA, not the source, per call)."""
    ext = current_app.extensions
    if "first_contact_count" not in ext:
        client = inbox.fast_redis(current_app.config["REDIS_URL"])
        ext["first_contact_count"] = client.register_script(_COUNT)
        ext["provisional_count"] = client.register_script(_COUNT_ONE)
        ext["first_contact_redis_breaker"] = RedisBreaker()
    return ext[name]


def _count(name: str, keys: list[str], args: list[Any]) -> int:
    """Run a counting script; 0 (under every ceiling) when Redis cannot be asked (fail open)."""
    ext = current_app.extensions
    count = _counter(name)
    breaker = ext["first_contact_redis_breaker"]
    if not breaker.allow():
        return 0
    try:
        return int(count(keys=keys, args=args))
    except redis.RedisError as exc:
        breaker.failed()
        log.warning("intake ceiling not applied, Redis unavailable: %s", exc)
        return 0


def source(address: str | None) -> str:
    """What one sender is counted as: an IPv4 address, or the /64 an IPv6 address is in
    (one host or subscriber is commonly handed a whole /64)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def rationed(portal: KnownPortal | None, key: str | None = None) -> bool:
    """Whether a first contact for ``portal`` counts against the ceilings.

    Unknown and uninstalled portals do. A portal a verified admin installed through
    ``/install`` that still waits for its application_token does only for events
    without its handler key (``key``, the ``k`` query parameter): on portals that send
    the short iframe form (protocol §2.3) its ONAPPINSTALL is the only source of that
    token, so refusing it would leave the portal deaf to every later event; the
    installer binds it with the key, and forgeries without it must not flood the inbox
    (nor the auth server with ``app.info`` checks). Whatever is kept is still pruned
    and checked with ``app.info``.
    """
    if portal is None or portal.status == PortalStatus.UNINSTALLED.value:
        return True
    return provisional.awaiting_token(portal) and not handler_key.matches(portal.member_id, key)


def admit(address: str | None, portal: KnownPortal | None = None,
          key: str | None = None) -> None:
    """Count a first contact from ``address``; 429 beyond a ceiling (none if Redis is out)."""
    if not rationed(portal, key):
        return
    cfg = current_app.config
    prefix = f"b24relay:first-contact:{int(time.time() // WINDOW_SECONDS)}"
    over = _count("first_contact_count",
                  [f"{prefix}:addr:{source(address)}", f"{prefix}:all"],
                  [cfg["FIRST_CONTACT_PER_ADDRESS_PER_MINUTE"], cfg["FIRST_CONTACT_PER_MINUTE"],
                   2 * WINDOW_SECONDS])
    if over:
        scope = "from this address" if over == 1 else "in total"
        raise Rejected(429, "first_contact_limit",
                       f"too many install events from unknown portals {scope}; retry later",
                       detail=f"first-contact ceiling {scope} reached by {address}")


def admit_provisional(portal: KnownPortal, address: str | None = None,
                      key: str | None = None) -> None:
    """Count a provisional event for ``portal`` in its ration (the keyed one if ``key`` is
    the portal's handler key); 429 beyond it (none if Redis is out)."""
    cfg = current_app.config
    keyed = handler_key.matches(portal.member_id, key)
    window = max(1, int(cfg["PROVISIONAL_EVENT_MAX_AGE"]))
    prefix = f"b24relay:provisional:{portal.id}"
    if keyed:
        over = _count("provisional_count", [f"{prefix}:keyed"],
                      [cfg["PROVISIONAL_KEYED_EVENTS_PER_PORTAL"], window])
    else:  # the first contacts' script: the address's share first, then the portal's
        over = _count("first_contact_count", [f"{prefix}:addr:{source(address)}", prefix],
                      [cfg["PROVISIONAL_EVENTS_PER_ADDRESS"],
                       cfg["PROVISIONAL_EVENTS_PER_PORTAL"], window])
    if over:
        scope = "with its handler key" if keyed else (
            f"from {source(address)}" if over == 1 else "without its handler key")
        raise Rejected(429, "provisional_limit",
                       "too many events before the install event; retry later",
                       detail=f"provisional ceiling {scope} reached for portal "
                              f"{portal.member_id}")
