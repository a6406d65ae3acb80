"""Routing to the responsible manager: whose client is calling, before the PBX rings anyone.

``GET /api/v1/calls/route?phone=...`` (app/telephony/views.py) asks :func:`route`. The answer
comes from a Redis cache keyed by (portal, the number in E.164 as the call's register sends
it), so it costs a GET. On a miss, ``telephony.externalCall.searchCrmEntities`` is called
with the portal's stored chain, the installer's, an administrator's (the search is filtered
by the caller's CRM rights, protocol §8.7), through the dispatcher's direct path, in a
thread of this process; the request waits for it at most ``TELEPHONY_ROUTE_WAIT`` seconds
and then answers "no preference", while the thread finishes and fills the cache.

Why a thread and not a worker actor: the answer is wanted within 1.5 s, and a message to a
worker waits behind whatever the workers' queue holds (a burst of call events), so a fast
portal's answer would miss the bound for reasons of our own. The threads are bounded: at
most ``TELEPHONY_ROUTE_LOOKUPS`` per process are in flight (each ends within the REST
client's timeout), one per (portal, number) across processes (a Redis lock; another
process's asker polls the cache); a miss that finds no free slot answers 204 at once. And
at most ``TELEPHONY_ROUTE_WAITERS`` requests per process wait for a lookup at once: the
others answer 204 at once while their lookup runs. A waiting request holds a web thread,
and the web threads also take the PBX's call events; with every thread allowed to wait,
misses at a slow portal (bench/route.py: 4 a second, 10 s each) queued up to 0.5 s past
the bound. A lookup gives its database connection back before it calls Bitrix24.

What routes (:func:`choose`): the matches are ordered by the portal's routing priority
(its settings' ``route_priority``, else ``TELEPHONY_ROUTE_PRIORITY``; kinds left out never
route, an empty priority never routes), and the first whose responsible can take the call
wins. Skipped: the fallback user (every unanswered call's leads are his: naming him would
send every new caller to one person), a responsible not at work (``TIMEMAN_STATUS`` CLOSED,
PAUSED or EXPIRED, with the portal's ``route_skip_absent``, else
``TELEPHONY_ROUTE_SKIP_ABSENT``; OPENED routes, and so do NOT_INSTALLED and
UNAVAILABLE, which say the portal does not track him, not that he is away), and anyone
not an active user with an extension in the portal's extension map. Without a routable
match the answer is "no preference", but the entry keeps the first match's CRM record and
responsible: a call's register reads them (:func:`cached`) for its CRM binding and owner.

The portal's rules change with its settings: each entry keeps the rules it was chosen under
(``Match.rules``, :func:`rules_of`), and an entry of other rules than the portal's is a miss.
The rules a process checks entries against are read at most every :data:`RULES_MEMO`
seconds per portal, so a save takes effect within that, not after the cache's TTL; a lookup
that started under the old rules stores its answer with them, so it is never served.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis
from flask import Flask, current_app
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from app.dispatcher import direct
from app.extensions import db, redis_ext
from app.telephony import options
from app.telephony.machine import CrmMatch, normalise_phone
from app.tenants.models import Portal, PortalSettings
from app.tenants.users import extension_map

log = logging.getLogger(__name__)

SEARCH = "telephony.externalCall.searchCrmEntities"
EXTENSION = "b24relay.telephony.routing"
KEY = "b24relay:route:{portal}:{phone}"
LOCK = "b24relay:route-lookup:{portal}:{phone}"
# Of TELEPHONY_ROUTE_WAIT, kept for writing the answer, so that the PBX has it within the
# bound counted from the request's arrival (a bench at 10 s per request saw the bound plus
# 60 ms at p99 on a loaded machine when the wait counted from the lookup's start).
ANSWER_MARGIN = 0.05
LOCK_SECONDS = 120  # longer than a lookup can take (REST timeout 65 s, pacing up to 30 s)
POLL = 0.02  # seconds between cache reads while another process looks the number up
# Per portal and UTC day: routing questions asked and answered with someone (the dashboard).
TALLY = "b24relay:route-tally:{portal}:{day}"
TALLY_KEEP = 2 * 86400
ABSENT = frozenset({"CLOSED", "PAUSED", "EXPIRED"})  # TIMEMAN_STATUS: the day is not open
RULES_MEMO = 2.0  # seconds a process keeps a portal's routing rules for checking entries
RULES_EXTENSION = "b24relay.telephony.routing-rules"  # the app's memo of portals' rules


@dataclass(frozen=True)
class Rules:
    """A portal's routing rules: the CRM kinds in order (empty: never route), and whether a
    responsible not at work is skipped."""

    priority: tuple[str, ...]
    skip_absent: bool

    @property
    def fingerprint(self) -> str:
        """The rules as an entry keeps them: ``contact,lead|1``."""
        return f"{','.join(self.priority)}|{int(self.skip_absent)}"


def split_kinds(text: str) -> list[str]:
    """``"contact, Lead"`` -> ``["contact", "lead"]`` (commas or spaces separate them)."""
    return [kind.strip().lower() for kind in text.replace(",", " ").split() if kind.strip()]


def rules_of(settings: PortalSettings | None) -> Rules:
    """The routing rules a portal's calls use: its settings' own, else the app's."""
    cfg = current_app.config
    own = settings.route_priority if settings is not None else None
    skip = settings.route_skip_absent if settings is not None else None
    priority = split_kinds(str(cfg["TELEPHONY_ROUTE_PRIORITY"]) if own is None else own)
    return Rules(tuple(priority),
                 bool(cfg["TELEPHONY_ROUTE_SKIP_ABSENT"]) if skip is None else bool(skip))


def _current_rules(portal_id: int) -> str | None:
    """The portal's rules (fingerprint) as this process last read them, at most
    :data:`RULES_MEMO` seconds ago; None when the database cannot say (entries are served)."""
    view = _portal_view(portal_id)
    return view[0] if view is not None else None


def _country(portal_id: int) -> str | None:
    """The country the portal's numbers are read in (its call options; memoised with its
    rules), so the cache's key is the number its calls' register sends."""
    view = _portal_view(portal_id)
    return view[1] if view is not None else options.default_country(None)


def _portal_view(portal_id: int) -> tuple[str, str | None] | None:
    """(rules fingerprint, default country) of the portal, read at most every RULES_MEMO."""
    now = time.monotonic()
    memo = _memo().get(portal_id)
    if memo is not None and now - memo[0] < RULES_MEMO:
        return memo[1], memo[2]
    try:
        row = db.session.execute(
            select(PortalSettings.route_priority, PortalSettings.route_skip_absent,
                   PortalSettings.default_country)
            .where(PortalSettings.portal_id == portal_id)).first()
    except SQLAlchemyError as exc:
        log.warning("portal %s: routing rules unread (%s); cached answers served",
                    portal_id, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    settings = (PortalSettings(route_priority=row[0], route_skip_absent=row[1],
                               default_country=row[2]) if row is not None else None)
    found = rules_of(settings).fingerprint, options.default_country(settings)
    _remember_rules(portal_id, *found)
    return found


def _memo() -> dict[int, tuple[float, str, str | None]]:
    """portal id -> (read at, monotonic; its rules; its country): this app's, shared by its
    threads."""
    memo: dict[int, tuple[float, str, str | None]] = current_app.extensions.setdefault(
        RULES_EXTENSION, {})
    return memo


def _remember_rules(portal_id: int, fingerprint: str, country: str | None) -> None:
    memo, now = _memo(), time.monotonic()
    if len(memo) > 10_000:  # many portals: forget the stale ones
        for pid in [p for p, (at, *_) in list(memo.items()) if now - at >= RULES_MEMO]:
            memo.pop(pid, None)
    memo[portal_id] = (now, fingerprint, country)


@dataclass(frozen=True)
class Match:
    """A cache entry: the CRM record for the number (none: no match) and whom it routes to."""

    entity_type: str | None = None
    entity_id: int | None = None
    responsible: int | None = None  # the record's responsible (register's preferred owner)
    user_id: int | None = None      # whom routing names; None: no preference
    extension: str | None = None
    rules: str | None = None        # the rules it was chosen under (Rules.fingerprint)

    @property
    def routable(self) -> bool:
        return self.user_id is not None and bool(self.extension)

    def answer(self) -> dict[str, Any] | None:
        """The 200 body, or None for 204 (PBX_EVENTS.md "Routing")."""
        if not self.routable:
            return None
        entity = ({"type": self.entity_type, "id": self.entity_id}
                  if self.entity_type and self.entity_id else None)
        return {"extension": self.extension, "user_id": self.user_id, "entity": entity}

    def hint(self) -> CrmMatch | None:
        """What a call's register takes from it (None when there is no CRM record)."""
        if not (self.entity_type and self.entity_id):
            return None
        return CrmMatch(responsible=self.responsible, entity_type=self.entity_type,
                        entity_id=self.entity_id)


def phone_key(raw: str, country: str | None) -> str | None:
    """The number as the cache and the call's register know it (E.164, read in the portal's
    default ``country``: app/telephony/options.py); None for an anonymous caller."""
    return normalise_phone(raw, country)


def cached(portal_id: int, phone: str) -> Match | None:
    """The cache entry for the (normalised) number, or None on a miss (also for an entry
    chosen under other rules than the portal's)."""
    raw = redis_ext.client.get(KEY.format(portal=portal_id, phone=phone))
    if raw is None:
        return None
    try:
        match = Match(**json.loads(raw))
    except (ValueError, TypeError):
        return None  # an entry of another version: a miss
    current = _current_rules(portal_id)
    if current is not None and match.rules != current:
        return None  # chosen under the portal's old rules
    return match


def store(portal_id: int, phone: str, match: Match) -> None:
    """Cache ``match``: TELEPHONY_ROUTE_TTL when it names someone, else the negative TTL.
    An entry without its rules is kept with the portal's current ones."""
    if match.rules is None:
        match = replace(match, rules=_current_rules(portal_id))
    cfg = current_app.config
    ttl = cfg["TELEPHONY_ROUTE_TTL" if match.routable else "TELEPHONY_ROUTE_NEGATIVE_TTL"]
    redis_ext.client.set(KEY.format(portal=portal_id, phone=phone),
                         json.dumps(asdict(match)), px=max(1, int(float(ttl) * 1000)))


def route(portal_id: int, raw_phone: str, started: float | None = None) -> Match | None:
    """The routing answer for a number: from the cache, else from a lookup that gets at most
    TELEPHONY_ROUTE_WAIT seconds from ``started`` (the request's arrival, ``time.monotonic``),
    less :data:`ANSWER_MARGIN` for answering (None: no answer in time, "no preference")."""
    match = _route(portal_id, raw_phone, started)
    _tally(portal_id, match is not None and match.routable)
    return match


def _tally(portal_id: int, routed: bool) -> None:
    """Count the question, and the answer when it names someone: the day's hit rate."""
    day = TALLY.format(portal=portal_id, day=time.strftime("%Y%m%d", time.gmtime()))
    try:
        pipe = redis_ext.client.pipeline(transaction=False)
        pipe.hincrby(day, "asked", 1)
        if routed:
            pipe.hincrby(day, "routed", 1)
        pipe.expire(day, TALLY_KEEP)
        pipe.execute()
    except redis.RedisError as exc:
        log.debug("portal %s: routing tally not kept: %s", portal_id, exc)


def hit_rate(portal_id: int, day: str | None = None) -> tuple[int, int]:
    """(asked, routed) for the portal on ``day`` (``YYYYMMDD`` UTC; default today)."""
    raw = redis_ext.client.hgetall(TALLY.format(
        portal=portal_id, day=day or time.strftime("%Y%m%d", time.gmtime())))
    counts = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    return counts.get("asked", 0), counts.get("routed", 0)


def _route(portal_id: int, raw_phone: str, started: float | None) -> Match | None:
    phone = phone_key(raw_phone, _country(portal_id))
    if phone is None:
        return None  # an anonymous caller has no client to route to
    hit = cached(portal_id, phone)
    if hit is not None:
        return hit
    wait = float(current_app.config["TELEPHONY_ROUTE_WAIT"])
    deadline = (time.monotonic() if started is None else started) + wait - ANSWER_MARGIN
    lookups = _lookups()
    future = lookups.start(portal_id, phone)
    if not lookups.waiters.acquire(blocking=False):
        return None  # enough requests wait already: this one answers now, its lookup goes on
    try:
        if future is None:  # another process looks it up: its answer lands in the cache
            return _poll(portal_id, phone, deadline)
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        return None  # the lookup goes on and fills the cache
    finally:
        lookups.waiters.release()


def _poll(portal_id: int, phone: str, deadline: float) -> Match | None:
    while time.monotonic() < deadline:
        time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))
        hit = cached(portal_id, phone)
        if hit is not None:
            return hit
    return None


def choose(results: Sequence[Mapping[str, Any]], *, priority: Sequence[str],
           extensions: Mapping[int, str], fallback_user: int | None,
           skip_absent: bool) -> Match:
    """The match that routes (see the module's docstring); without one, the first match's
    record and responsible with nobody named."""
    rank = {kind.upper(): i for i, kind in enumerate(priority)}
    ordered = sorted((r for r in results if str(r.get("CRM_ENTITY_TYPE")) in rank),
                     key=lambda r: rank[str(r.get("CRM_ENTITY_TYPE"))])  # stable: B24's order
    first: Match | None = None
    for record in ordered:
        entity_id, user = _int(record.get("CRM_ENTITY_ID")), _responsible(record)
        if entity_id is None:
            continue
        candidate = Match(entity_type=str(record["CRM_ENTITY_TYPE"]), entity_id=entity_id,
                          responsible=user)
        first = first or candidate
        if user is None or user == fallback_user or user not in extensions:
            continue  # nobody, the fallback, inactive or without an extension
        assigned = record.get("ASSIGNED_BY")
        status = str(assigned.get("TIMEMAN_STATUS") or "") if isinstance(assigned, Mapping) else ""
        if skip_absent and status.upper() in ABSENT:
            continue
        return Match(entity_type=candidate.entity_type, entity_id=entity_id, responsible=user,
                     user_id=user, extension=extensions[user])
    return first or Match()


def _int(value: Any) -> int | None:
    try:
        number = int(str(value))
    except ValueError:
        return None
    return number if number > 0 else None


def _responsible(record: Mapping[str, Any]) -> int | None:
    assigned = record.get("ASSIGNED_BY")
    found = _int(record.get("ASSIGNED_BY_ID"))
    if found is None and isinstance(assigned, Mapping):
        found = _int(assigned.get("ID"))
    return found


def lookup(portal_id: int, phone: str) -> Match:
    """Ask the portal (admin's chain, direct path), choose, cache; errors cache "no
    preference" for the negative TTL, so a failing portal is not asked on every ring."""
    rules: Rules | None = None
    try:
        portal = db.session.get(Portal, portal_id)
        if portal is None:
            return Match()
        users = {user: ext for ext, user in sorted(extension_map(portal).items(), reverse=True)}
        fallback = portal.settings.default_user_id if portal.settings else None
        rules = rules_of(portal.settings)
        _remember_rules(portal_id, rules.fingerprint, options.default_country(portal.settings))
        # Give the database connection back before a request that may take seconds: held
        # through it, TELEPHONY_ROUTE_LOOKUPS lookups emptied the pool and the requests
        # waited for a connection (bench/route.py). The direct path writes in its own ones.
        db.session.close()
        if rules.priority:  # an empty priority never routes: Bitrix24 is not asked
            results = direct.call_method(portal, SEARCH, {"PHONE_NUMBER": phone})
        else:
            results = []
        match = choose(results if isinstance(results, list) else [],
                       priority=rules.priority, extensions=users, fallback_user=fallback,
                       skip_absent=rules.skip_absent)
    except Exception as exc:  # noqa: BLE001 - any failure means "no preference" for now
        log.warning("portal %s: routing lookup failed: %s", portal_id,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        match = Match()
    match = replace(match, rules=rules.fingerprint if rules is not None else None)
    try:
        store(portal_id, phone, match)
    except redis.RedisError as exc:
        log.warning("portal %s: routing answer not cached: %s", portal_id, exc)
    return match


class Lookups:
    """This process's lookup threads: bounded, one per (portal, number)."""

    def __init__(self, app: Flask) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._pid = 0
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[tuple[int, str], Future[Match]] = {}
        # requests of this process waiting for a lookup (TELEPHONY_ROUTE_WAITERS)
        self.waiters = threading.BoundedSemaphore(int(app.config["TELEPHONY_ROUTE_WAITERS"]))

    def start(self, portal_id: int, phone: str) -> Future[Match] | None:
        """The lookup's future (joined if this process runs one already); None when another
        process runs it; a done future answering "no preference" when no slot is free."""
        key = (portal_id, phone)
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's threads are not ours
                limit = int(self._app.config["TELEPHONY_ROUTE_LOOKUPS"])
                self._pool = ThreadPoolExecutor(limit, thread_name_prefix="route")
                self._running, self._pid = {}, os.getpid()
            running = self._running.get(key)
            if running is not None:
                return running
            if len(self._running) >= int(self._app.config["TELEPHONY_ROUTE_LOOKUPS"]):
                log.warning("routing: %d lookups in flight; %s answered without one",
                            len(self._running), phone)
                return _done(None)
            if not redis_ext.client.set(LOCK.format(portal=portal_id, phone=phone), os.getpid(),
                                        nx=True, ex=LOCK_SECONDS):
                return None
            assert self._pool is not None
            future = self._pool.submit(self._run, portal_id, phone)
            self._running[key] = future
            return future

    def drain(self, timeout: float) -> bool:
        """Wait until this process's lookups have ended (or ``timeout``); True when none runs.

        A lookup outlives the request it answered (that is the point of the 204); whoever
        disposes the app's engine waits here first, or the lookup's connection would go back
        to a pool already disposed and stay open."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                running = list(self._running.values())
            if not running:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            wait(running, timeout=left)

    def _run(self, portal_id: int, phone: str) -> Match:
        try:
            with self._app.app_context():
                return lookup(portal_id, phone)
        finally:
            with self._lock:
                self._running.pop((portal_id, phone), None)
            try:
                with self._app.app_context():
                    redis_ext.client.delete(LOCK.format(portal=portal_id, phone=phone))
            except redis.RedisError:
                pass  # it expires


def _done(value: Match | None) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def drain(app: Flask, timeout: float = 15.0) -> bool:
    """Wait for ``app``'s routing lookups still running (see ``Lookups.drain``)."""
    found = app.extensions.get(EXTENSION)
    return found is None or found.drain(timeout)


def _lookups() -> Lookups:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    found = app.extensions.get(EXTENSION)
    if found is None:
        found = app.extensions.setdefault(EXTENSION, Lookups(app))
    return found
