"""Events that arrive before their portal's application_token: kept, then checked, never trusted.

The short iframe form real portals send (protocol §2.3) carries no APPLICATION_TOKEN,
so after the installer POST a portal is ``active`` without one; ONAPPINSTALL brings it,
and may arrive late (§2.4). Bitrix24 never resends an event, so refusing what comes in
between loses it. Instead, an event for a portal that *awaits its token*
(:func:`awaiting_token`) is stored ``provisional``:

- intake seals the application_token it claims (app/ingress/sealed.py), rations it
  per portal (``first_contact.admit_provisional``: events that carry the portal's
  handler key, app/tenants/handler_key.py, have a ration of their own that forgers
  cannot reach) and answers 200: it is stored;
- nothing processes a provisional row: it is never queued, and neither the sweeper nor
  a stray message can claim it (claims take ``received``/``queued`` rows only);
- once the portal has its token (ONAPPINSTALL's, checked with ``app.info`` and
  ``user.admin`` by its handler) :func:`release` compares each row's claim with it in
  constant time: a match is queued for its handler like any verified event; any other
  row is deleted as forged (logged, counted);
- a row older than ``PROVISIONAL_EVENT_MAX_AGE`` (600 s) is deleted as unverifiable,
  matching claim or not (:func:`expire`): an event that late would do harm (a
  click-to-call ten minutes on).

Release runs right after a token event is handled (:func:`after_handled`, from inbox
processing) and from the inbox sweeper (:func:`sweep`), which also catches a row
stored while its portal's token was being recorded.

Only the application_token releases a row. An event's user access token could be
checked with the auth server's ``app.info`` at once, but that proves only that some
user of the portal sent it: on short-form portals, the ones that land here, employees
never see the application token, while any of them has an access token. It would also
cost an auth-server call per event, and robot-triggered events carry no token at all.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, cast

from flask import current_app
from prometheus_client import Counter
from sqlalchemy import CursorResult, delete, func, select, update

from app.extensions import db
from app.ingress import inbox, sealed
from app.ingress.models import InboxEvent, InboxStatus
from app.tenants.models import Portal, PortalStatus, aware, utcnow

log = logging.getLogger(__name__)

STATUS = InboxStatus.PROVISIONAL.value
# Events whose handler may record a portal's application_token.
TOKEN_SOURCES = frozenset({"ONAPPINSTALL", "ONAPPUPDATE"})
BATCH = 5000
MAX_STORED_BYTES = 16384  # real events are a few hundred bytes; ONEXTERNALCALLSTART ~1 KB

OUTCOMES = Counter("b24relay_provisional_events_total",
                   "Events kept before their portal's application_token, by what became of "
                   "them: kept, released (token matched), forged (it did not), expired.",
                   ["outcome"])


class PortalLike(Protocol):
    """What tells whether a portal awaits its token: the Portal row or intake's cached copy."""

    @property
    def application_token(self) -> str | None: ...

    @property
    def status(self) -> str: ...


def awaiting_token(portal: PortalLike) -> bool:
    """Whether events for ``portal`` are kept provisionally: installed, its token still missing."""
    return portal.application_token is None and portal.status == PortalStatus.ACTIVE.value


def dedupe_key(key: str, claimed: str) -> str:
    """The inbox dedupe key of a provisional event: a forgery copying a real event's body
    under another token cannot take the real one's place (and be dropped with it)."""
    return inbox.digest([key, "provisional", hashlib.sha256(claimed.encode()).hexdigest()])


def kept(portal_id: int) -> int:
    """How many of the portal's events wait for its token (its settings page shows it)."""
    return int(db.session.scalar(select(func.count(InboxEvent.id)).where(
        InboxEvent.portal_id == portal_id, InboxEvent.status == STATUS)) or 0)


@dataclass
class Verdict:
    """Row ids per outcome of one release."""

    released: list[int] = field(default_factory=list)
    forged: list[int] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)


def _max_age() -> timedelta:
    return timedelta(seconds=float(current_app.config["PROVISIONAL_EVENT_MAX_AGE"]))


def _judge(rows: list[Any], token: str) -> Verdict:
    """Sort the rows: too old, claiming the portal's token, or anything else."""
    verdict, oldest = Verdict(), utcnow() - _max_age()
    for row in rows:
        claimed = sealed.claimed_token(row.payload) or ""
        if aware(row.received_at) < oldest:
            verdict.expired.append(row.id)
        elif hmac.compare_digest(claimed.encode(), token.encode()):
            verdict.released.append(row.id)
        else:
            verdict.forged.append(row.id)
    return verdict


def _queue(rows: list[Any], ids: list[int]) -> list[int]:
    """provisional -> queued (verified now) for ``ids``; the ids this call moved."""
    wanted, moved, now = set(ids), [], utcnow()
    for row in rows:
        if row.id in wanted and cast(CursorResult, db.session.execute(  # a DML's result
                update(InboxEvent).where(InboxEvent.id == row.id, InboxEvent.status == STATUS)
                .values(status=InboxStatus.QUEUED.value, unverified=False, claimed_at=now,
                        payload=sealed.unclaimed(row.payload, row.event_type))
                .execution_options(synchronize_session=False))).rowcount:
            moved.append(row.id)
    return moved


def _drop(ids: list[int]) -> None:
    if ids:
        db.session.execute(delete(InboxEvent).where(InboxEvent.id.in_(ids),
                                                    InboxEvent.status == STATUS)
                           .execution_options(synchronize_session=False))


def release(portal_id: int) -> Verdict:
    """Check the portal's provisional rows against its token: queue matches, drop the rest.

    Its own unit of work (committed here, then the released rows are queued). A portal
    still without a token is left alone. Two releases at once move each row once.
    """
    token = db.session.scalar(select(Portal.application_token).where(Portal.id == portal_id))
    if not token:
        return Verdict()
    rows = db.session.execute(
        select(InboxEvent.id, InboxEvent.event_type, InboxEvent.payload, InboxEvent.received_at)
        .where(InboxEvent.portal_id == portal_id, InboxEvent.status == STATUS)
        .order_by(InboxEvent.id).limit(BATCH)).all()
    verdict = _judge(list(rows), token)
    verdict.released = _queue(list(rows), verdict.released)
    _drop(verdict.forged + verdict.expired)
    db.session.commit()
    if verdict.released:
        inbox.enqueue(verdict.released, "b24", via="provisional")
    _report(portal_id, verdict)
    return verdict


def _report(portal_id: int, verdict: Verdict) -> None:
    for outcome in ("released", "forged", "expired"):
        OUTCOMES.labels(outcome).inc(len(getattr(verdict, outcome)))
    if verdict.forged:
        log.warning("portal %s: %d event(s) kept before its application_token arrived did not "
                    "carry it and were dropped as forged (inbox ids %s)", portal_id,
                    len(verdict.forged), verdict.forged[:20])
    if verdict.released or verdict.expired:
        log.info("portal %s: %d kept event(s) verified and queued, %d dropped as too old to "
                 "verify", portal_id, len(verdict.released), len(verdict.expired))


def after_handled(event_type: str, member_id: str) -> None:
    """After a token event is handled: release what its portal kept meanwhile.

    Never fails the event already handled: a failure here is left to :func:`sweep`.
    """
    if event_type.upper() not in TOKEN_SOURCES:
        return
    try:
        portal_id = db.session.scalar(select(Portal.id).where(Portal.member_id == member_id))
        if portal_id is not None:
            release(portal_id)
    except Exception:  # noqa: BLE001 - the sweeper releases them later
        db.session.rollback()
        log.exception("releasing the kept events of portal %s failed; the sweeper retries",
                      member_id)


def expire() -> int:
    """Delete provisional rows older than ``PROVISIONAL_EVENT_MAX_AGE`` (unverifiable)."""
    count = cast(CursorResult, db.session.execute(  # a DML statement's result
        delete(InboxEvent).where(InboxEvent.status == STATUS,
                                 InboxEvent.received_at < utcnow() - _max_age())
        .execution_options(synchronize_session=False))).rowcount or 0
    db.session.commit()
    if count:
        OUTCOMES.labels("expired").inc(count)
        log.info("%d event(s) kept for a portal's application_token expired unverified", count)
    return count


def sweep() -> int:
    """Release the kept rows of portals that have their token now; expire the old ones."""
    portal_ids = db.session.scalars(
        select(InboxEvent.portal_id).distinct()
        .join(Portal, Portal.id == InboxEvent.portal_id)
        .where(InboxEvent.status == STATUS, Portal.application_token.is_not(None))).all()
    released = sum(len(release(portal_id).released) for portal_id in portal_ids
                   if portal_id is not None)  # the join left none out; this tells mypy
    expire()
    return released
