"""A per-portal key in the event handler URL: which events come through our own bindings.

The app binds its event handlers with the admin's token as ``/b24/events?k=<key>``,
where the key is an HMAC of the portal's member_id under the server's ``SECRET_KEY``
(:func:`for_member`). Bitrix24 keeps a handler URL as given and calls it as it is,
query string included, so every event delivered through those bindings carries the
key; an event that does not carry it came from elsewhere (or from a binding made
before the key existed).

Who can read the key: the portal's administrators (``event.get`` with an admin's
token lists every handler of the app). An employee cannot: ``event.get`` called with
a non-admin's token lists only the handlers bound with that user's id (the rest
module filters on ``USER_ID``), and ours are bound with none (``auth_type`` 0). The
key travels in no event body, iframe form or page.

What the key is for: telling Bitrix24's deliveries apart from a forger's *before* the
portal's application_token is known (app/ingress/provisional.py, first_contact.py),
so that a forger's flood cannot use up the ration Bitrix24's events need. It is not
an authorisation: it never makes an event verified, never releases a kept event, and
never lets an event uninstall a portal or change its credentials. Once the portal has
its application_token, that token alone decides, with or without a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from flask import current_app

PARAM = "k"
_LABEL = b"b24relay event handler key v1\x00"
_BYTES = 16  # 128 bits: 22 URL-safe characters


def for_member(member_id: str) -> str:
    """The handler key of the portal ``member_id`` (URL-safe, no padding)."""
    secret = str(current_app.config["SECRET_KEY"]).encode()
    mac = hmac.new(secret, _LABEL + member_id.encode(), hashlib.sha256).digest()[:_BYTES]
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def matches(member_id: str, key: str | None) -> bool:
    """Whether ``key`` (the ``k`` query parameter, if any) is the portal's, in constant time."""
    if not key or len(key) > 64:
        return False
    return hmac.compare_digest(key.encode(), for_member(member_id).encode())
