"""Who sent this: Bitrix24's application_token per portal, the PBX's API key per portal.

The application_token check runs on every event. It compares a keyed hash of the
event's token with the one stored beside the encrypted token (app/ingress/token_hash.py),
so no token is decrypted on the way. The common case (the hash matches, the event is
new) is checked inside the statement that stores the event (``inbox.store_verified``);
everything else comes here, and reads the portal's committed row: nothing is cached, so
a changed or cleared token counts in every process from its commit on.

PBX keys, unlike that, are cached per process by key hash for ``CACHE_SECONDS``: a rotated
key is dropped at once in the process that rotated it, and keeps working in the
other processes for at most ``CACHE_SECONDS`` (5 s). Unknown keys are not cached.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select

from app.extensions import db, retry_if_connection_died
from app.ingress import provisional, token_hash
from app.ingress.models import PortalApiKey
from app.tenants.models import Portal, PortalStatus

CACHE_SECONDS = 5.0
INSTALL_EVENT = "ONAPPINSTALL"
API_KEY_PREFIX = "b24r_"


class Rejected(Exception):
    """The request is refused with ``status``; ``reason`` labels the rejection metric.

    ``message`` goes to the sender; ``detail`` (default: the message) only to the log,
    for what the sender must not learn.
    """

    def __init__(self, status: int, reason: str, message: str, *, detail: str | None = None,
                 **extra: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.detail = detail or message
        self.extra = extra


@dataclass(frozen=True)
class KnownPortal:
    """What intake needs to know about a portal (never its token: a keyed hash of it)."""

    id: int
    member_id: str
    token_hash: str | None
    status: str

    @property
    def application_token(self) -> str | None:
        """Whether a token is stored (its hash; what ``provisional.awaiting_token`` asks)."""
        return self.token_hash

    def token_matches(self, token: str | None) -> bool:
        """Constant-time check of an event's token against the stored one."""
        return token_hash.matches(self.token_hash, token)


@dataclass(frozen=True)
class Sender:
    """The portal an event is from (None on a first-contact ONAPPINSTALL) and its trust.

    ``unverified``: a first-contact ONAPPINSTALL, its handler checks it with ``app.info``.
    ``provisional``: the portal awaits its application_token; the event is kept unprocessed
    until that token arrives and matches (app/ingress/provisional.py).
    """

    portal: KnownPortal | None
    unverified: bool = False
    provisional: bool = False


def _key_cache() -> dict[str, tuple[float, KnownPortal]]:
    return current_app.extensions.setdefault("ingress_api_key_cache", {})


def _forget_keys_of(portal_id: int) -> None:
    cache = _key_cache()
    for key_hash in [h for h, (_, known) in cache.items() if known.id == portal_id]:
        cache.pop(key_hash, None)


def lookup_portal(member_id: str) -> KnownPortal | None:
    """The portal with this member_id, as committed now."""
    query = (select(Portal.id, Portal.member_id, Portal.application_token_hash, Portal.status,
                    token_hash.RAW_TOKEN.label("ciphertext"))
             .where(Portal.member_id == member_id))
    row = retry_if_connection_died(lambda: db.session.execute(query).first(),
                                   reset=db.session.rollback)
    if row is None:
        return None
    hashed = row.application_token_hash
    if row.ciphertext is not None and not token_hash.current(hashed):
        hashed = _fill_hash(row.id, row.ciphertext)
    return KnownPortal(row.id, row.member_id, hashed if row.ciphertext else None, row.status)


def _fill_hash(portal_id: int, ciphertext: str) -> str | None:
    """A row without a current hash (older than the column, or another SECRET_KEY): decrypt
    once, store the hash if the token is still the one read, and use it."""
    token = db.session.scalar(select(Portal.application_token).where(Portal.id == portal_id))
    hashed = token_hash.of(token)
    with db.engine.begin() as conn:
        token_hash.fill(conn, portal_id, ciphertext, hashed)
    return hashed


def verify_b24(member_id: str, token: str | None, event_name: str) -> Sender:
    """Check ``auth[application_token]`` against the stored one, in constant time.

    Without a stored one to compare: a first-contact ONAPPINSTALL is accepted unverified,
    any other event of a portal awaiting its token provisionally; the rest is refused.
    """
    if not token:
        raise Rejected(401, "missing_token", "auth[application_token] is required")
    portal = lookup_portal(member_id)
    if portal is not None and portal.token_matches(token):
        return Sender(portal)
    first_contact = (portal is None or portal.token_hash is None
                     or portal.status == PortalStatus.UNINSTALLED.value)
    if event_name == INSTALL_EVENT and first_contact:
        # Nothing to compare with yet: the install handler verifies it via app.info.
        return Sender(portal, unverified=True)
    if portal is not None and provisional.awaiting_token(portal):
        # Installed from the short form, its ONAPPINSTALL late: kept, checked when it comes.
        return Sender(portal, provisional=True)
    # An unknown member_id is answered (and counted: /metrics is public) like a forged
    # token, or the answer would tell anyone which portals have the app installed.
    raise Rejected(401, "forged_token", "application_token does not match",
                   detail=f"no installation for member_id {member_id}" if portal is None else None)


def hash_api_key(key: str) -> str:
    """The stored form of a PBX key (keys are 32 random bytes, so plain SHA-256 suffices)."""
    return hashlib.sha256(key.encode()).hexdigest()


def issue_api_key(portal: Portal) -> str:
    """Create or rotate the portal's PBX key; the old key stops working at once."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    record = db.session.scalars(select(PortalApiKey)
                                .where(PortalApiKey.portal_id == portal.id)).first()
    if record is None:
        record = PortalApiKey(portal_id=portal.id)
        db.session.add(record)
    record.key_hash = hash_api_key(key)
    record.prefix = key[:12]
    db.session.commit()
    _forget_keys_of(portal.id)
    return key


def verify_api_key(authorization: str | None) -> KnownPortal:
    """The portal whose key is in ``Authorization: Bearer <key>``.

    Cached per process by key hash for ``CACHE_SECONDS`` (5 s): after a rotation in
    another process the old key is accepted for at most that long (and a portal's
    status change shows after at most that long). Unknown keys always ask the database.
    """
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Rejected(401, "missing_key", "Authorization: Bearer <api key> is required")
    key_hash = hash_api_key(key.strip())
    cache = _key_cache()
    hit = cache.get(key_hash)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    row = db.session.execute(
        select(Portal.id, Portal.member_id, Portal.status)
        .join(PortalApiKey, PortalApiKey.portal_id == Portal.id)
        .where(PortalApiKey.key_hash == key_hash)).first()
    if row is None:
        cache.pop(key_hash, None)
        raise Rejected(401, "bad_key", "unknown API key")
    known = KnownPortal(row.id, row.member_id, None, row.status)
    cache[key_hash] = (time.monotonic() + CACHE_SECONDS, known)
    return known
