"""Hiding secrets in what the app's pages show of stored events, commands and error texts.

Intake strips an event's tokens before it is stored (app/ingress/sealed.py), but a page
must not depend on that alone: a PBX may put a token where we do not expect one, an error
text may quote a URL with its ``auth=``, and a command's params may carry one. So:

- a field whose name says it is secret (auth, token, secret, password, signature, key...)
  is shown as :data:`HIDDEN`, whatever it holds;
- in every text, ``name=value`` pairs with such a name, and ``Bearer ...``, lose the value;
- the portal's own secrets (its tokens, its application_token, its PBX secret) are replaced
  wherever they appear, under any name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from app.tenants.models import Portal

HIDDEN = "[hidden]"
SECRET_NAMES = ("auth", "token", "secret", "password", "passwd", "sealed", "signature",
                "api_key", "apikey", "credential", "cookie", "session")
_PAIR = re.compile(r"(?i)((?:[\w\[\]]*(?:" + "|".join(SECRET_NAMES) + r"|sig)[\w\[\]]*)"
                   r"\s*[=:]\s*)(\"?)[^\s&\"',;}]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
SHORTEST_SECRET = 8  # shorter values are not scrubbed by value (they would hit ordinary text)


def secret_name(name: str) -> bool:
    """Whether a field's name says it holds a secret."""
    lowered = name.lower()
    return any(part in lowered for part in SECRET_NAMES)


def portal_secrets(portal: Portal) -> list[str]:
    """The portal's secret values, to scrub from any text shown to its users."""
    settings = portal.settings
    values = [portal.access_token, portal.refresh_token, portal.application_token,
              settings.pbx_secret if settings else None]
    return [v for v in values if v and len(v) >= SHORTEST_SECRET]


def text(value: str, secrets: Iterable[str] = ()) -> str:
    """A text with its secret-looking values hidden."""
    for secret in secrets:
        value = value.replace(secret, HIDDEN)
    value = _PAIR.sub(lambda m: m.group(1) + m.group(2) + HIDDEN, value)
    return _BEARER.sub(lambda m: m.group(1) + HIDDEN, value)


def data(value: Any, secrets: Iterable[str] = ()) -> Any:
    """JSON data with secret fields hidden and every text scrubbed (see :func:`text`)."""
    secrets = list(secrets)
    if isinstance(value, dict):
        return {str(k): HIDDEN if secret_name(str(k)) else data(v, secrets)
                for k, v in value.items()}
    if isinstance(value, list):
        return [data(v, secrets) for v in value]
    if isinstance(value, str):
        return text(value, secrets)
    return value


def pretty(value: Any, secrets: Iterable[str] = ()) -> str:
    """Redacted JSON data as indented text, for a page's ``<pre>`` (escaped by the template)."""
    return json.dumps(data(value, secrets), ensure_ascii=False, indent=1, sort_keys=True,
                      default=str)
