"""The tokens an event carries are never stored in clear.

A Bitrix24 event's ``auth`` block may hold ``access_token``, ``refresh_token`` (the
triggering user's) and ``application_token`` (the portal's shared secret). Intake
strips them once the application_token is checked, before the row is written: a
parked or dead row would otherwise keep them for weeks. Only ONAPPINSTALL and
ONAPPUPDATE need them later (their handlers check the access token with app.info and
keep the chain and the application_token), so for those two the three values are
kept encrypted (the same Fernet keys as the portal's token columns) in one payload
field. Processing unseals them into the event a handler gets, in memory only, and a
finished row drops the field.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from cryptography.fernet import InvalidToken

from app.crypto import cipher

log = logging.getLogger(__name__)

SECRET_AUTH_KEYS = ("access_token", "refresh_token", "application_token")
TOKEN_EVENTS = frozenset({"ONAPPINSTALL", "ONAPPUPDATE"})
SEALED_FIELD = "sealed_auth"  # top level of the stored payload; only intake writes it


def strip(event: dict[str, Any], event_type: str) -> None:
    """Take the tokens out of a parsed, verified event (in place); seal those handlers need."""
    event.pop(SEALED_FIELD, None)  # a sender's own field of that name is never trusted
    auth = event.get("auth")
    if not isinstance(auth, dict):
        return
    tokens = {key: auth.pop(key) for key in SECRET_AUTH_KEYS if key in auth}
    if tokens and event_type in TOKEN_EVENTS:
        event[SEALED_FIELD] = cipher().encrypt(json.dumps(tokens).encode()).decode()


def unsealed(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored payload with its sealed tokens back in ``auth`` (for a handler)."""
    event = copy.deepcopy(payload)
    sealed = event.pop(SEALED_FIELD, None)
    if not isinstance(sealed, str):
        return event
    try:
        tokens = json.loads(cipher().decrypt(sealed.encode()))
    except (InvalidToken, ValueError):
        log.warning("an event's sealed tokens cannot be read with TOKEN_ENCRYPTION_KEY; "
                    "its handler gets none")
        return event
    auth = event.get("auth")
    if not isinstance(auth, dict):
        auth = event["auth"] = {}
    auth.update(tokens)
    return event


def scrubbed(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload without tokens, sealed or (rows stored by earlier versions) in clear."""
    auth = payload.get("auth")
    clear = isinstance(auth, dict) and any(key in auth for key in SECRET_AUTH_KEYS)
    if not clear and SEALED_FIELD not in payload:
        return payload
    clean = copy.deepcopy(payload)
    clean.pop(SEALED_FIELD, None)
    if clear:
        for key in SECRET_AUTH_KEYS:
            clean["auth"].pop(key, None)
    return clean
