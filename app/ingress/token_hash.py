"""A keyed hash of each portal's application_token, stored beside the encrypted token.

Intake compares an event's token with this hash (HMAC-SHA256 under a key derived from
``SECRET_KEY``) instead of decrypting the stored token: the check is part of the INSERT that
stores the event (``inbox.store_verified``), no Fernet and no cache. The hash is written
whenever the token is (an attribute listener on ``Portal.application_token``, so every
writer sets it). Rows written before the column existed, or under another ``SECRET_KEY``,
are filled lazily: intake then decrypts once, compares, and stores the hash only if the
encrypted token is still the one it read.

A stored hash reads ``<key id>:<hex>``; the key id tells whether it was made with the
current key. The hash is no more useful to an attacker than the token itself (which
may reach an employee's browser in the iframe form); without the key it reveals nothing,
and because it is keyed, comparing it in SQL leaks nothing useful by timing.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import current_app, has_app_context
from sqlalchemy import String, event, type_coerce, update

from app.tenants.models import Portal

LABEL = b"b24relay application_token hash v1"


def _key() -> tuple[bytes, str]:
    """(hash key, its id) for the current app, derived once from SECRET_KEY."""
    ext = current_app.extensions
    cached = ext.get("ingress_token_hash_key")
    if cached is None:
        key = hmac.new(str(current_app.config["SECRET_KEY"]).encode(), LABEL,
                       hashlib.sha256).digest()
        cached = ext["ingress_token_hash_key"] = (key, hashlib.sha256(key).hexdigest()[:8])
    return cached


def of(token: str | None) -> str | None:
    """The stored form of ``token`` (None for none, or outside an app: filled lazily)."""
    if not token or not has_app_context():
        return None
    key, key_id = _key()
    return f"{key_id}:{hmac.new(key, token.encode(), hashlib.sha256).hexdigest()}"


def current(stored: str | None) -> bool:
    """Whether ``stored`` was made with the current key (else the token must be decrypted)."""
    if not stored:
        return False
    return stored.partition(":")[0] == _key()[1]


def matches(stored: str | None, token: str | None) -> bool:
    """Constant-time check of ``token`` against a current stored hash."""
    candidate = of(token)
    if not stored or not candidate:
        return False
    return hmac.compare_digest(stored, candidate)


@event.listens_for(Portal.application_token, "set")
def _on_token_set(target: Portal, value: str | None, _old: object, _initiator: object) -> None:
    target.application_token_hash = of(value)


RAW_TOKEN = type_coerce(Portal.application_token, String)  # the ciphertext, not decrypted


def fill(conn: object, portal_id: int, ciphertext: str, hashed: str | None) -> None:
    """Store a lazily computed hash, unless the token changed since it was read."""
    conn.execute(update(Portal).where(Portal.id == portal_id, RAW_TOKEN == ciphertext)  # type: ignore[attr-defined]
                 .values(application_token_hash=hashed))
