"""The tokens an event carries are never stored in clear.

A Bitrix24 event's ``auth`` block may hold ``access_token``, ``refresh_token`` (the
triggering user's) and ``application_token`` (the portal's shared secret). Intake
strips them once the application_token is checked, before the row is written: a
parked or dead row would otherwise keep them for weeks. Only ONAPPINSTALL and
ONAPPUPDATE need them later (their handlers check the access token with app.info and
keep the chain and the application_token), so for those two the three values are
kept encrypted (the same Fernet keys as the portal's token columns) in one payload
field; ONEXTERNALCALLSTART keeps its clicker's access_token the same way (the click is
confirmed with it, app/telephony/click.py). Processing unseals them into the event a
handler gets, in memory only, and a finished row drops the field.

A *provisional* event (its portal still waits for its application_token, see
app/ingress/provisional.py) could not be checked yet: the application_token it
claims is sealed the same way, whatever the event, so that it can be compared once
the portal's own arrives (:func:`claimed_token`); a released row keeps it no longer
than its event needs (:func:`unclaimed`).
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
# Events whose handler confirms the triggering user with Bitrix24: their access_token is
# sealed too (only it), so a click-to-call names its clicker by proof, not by a form field.
USER_TOKEN_EVENTS = frozenset({"ONEXTERNALCALLSTART"})
SEALED_FIELD = "sealed_auth"  # top level of the stored payload; only intake writes it


def strip(event: dict[str, Any], event_type: str, claim: bool = False) -> None:
    """Take the tokens out of a parsed event (in place); seal those handlers need.

    ``claim``: the event is provisional, so its application_token is sealed too, for the
    check that could not be made yet.
    """
    event.pop(SEALED_FIELD, None)  # a sender's own field of that name is never trusted
    auth = event.get("auth")
    if not isinstance(auth, dict):
        return
    tokens = {key: auth.pop(key) for key in SECRET_AUTH_KEYS if key in auth}
    if event_type not in TOKEN_EVENTS:
        tokens = {k: v for k, v in tokens.items()
                  if (claim and k == "application_token")
                  or (k == "access_token" and event_type in USER_TOKEN_EVENTS)}
    if tokens:
        event[SEALED_FIELD] = cipher().encrypt(json.dumps(tokens).encode()).decode()


def claimed_token(payload: dict[str, Any]) -> str | None:
    """The application_token a stored provisional event claimed (None: none, or unreadable)."""
    auth = unsealed(payload).get("auth")
    token = auth.get("application_token") if isinstance(auth, dict) else None
    return token if isinstance(token, str) and token else None


def unclaimed(payload: dict[str, Any], event_type: str) -> dict[str, Any]:
    """A released provisional payload: only ONAPPINSTALL / ONAPPUPDATE keep sealed tokens."""
    if event_type in TOKEN_EVENTS or SEALED_FIELD not in payload:
        return payload
    return {k: v for k, v in payload.items() if k != SEALED_FIELD}


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
