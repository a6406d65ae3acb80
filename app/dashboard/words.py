"""Errors in words a person understands: Bitrix24's codes and the dispatcher's reasons.

The raw text stays beside the sentence (it is what support asks for); the page shows both,
escaped. Unknown codes get a general sentence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask_babel import lazy_gettext as _l

CODES = {
    "QUERY_LIMIT_EXCEEDED": _l("Bitrix24 refused: too many requests at once. The app waits "
                               "and sends again."),
    "OPERATION_TIME_LIMIT": _l("Bitrix24 paused this method: it used its 10-minute time "
                               "budget. It goes out again when the budget frees up."),
    "EXPIRED_TOKEN": _l("The access token had expired; the app renews it by itself."),
    "INVALID_TOKEN": _l("Bitrix24 did not accept the app's token. Reopen the app from the "
                        "portal."),
    "INVALID_GRANT": _l("The app's connection to the portal was lost. An administrator must "
                        "reopen the app."),
    "NO_AUTH_FOUND": _l("Bitrix24 did not accept the app's token. Reopen the app from the "
                        "portal."),
    "INSUFFICIENT_SCOPE": _l("The app lacks a permission it needs. Reinstall it with the "
                             "permissions it asks for."),
    "ACCESS_DENIED": _l("Bitrix24 denied access. Check the app's permissions and the "
                        "portal's plan."),
    "PAYMENT_REQUIRED": _l("The portal's subscription has ended: Bitrix24 refuses the app's "
                           "requests."),
    "ERROR_METHOD_NOT_FOUND": _l("Bitrix24 does not know this method (a module is switched "
                                 "off, or the plan lacks it)."),
    "NOT_FOUND": _l("Bitrix24 could not find what the command refers to (deleted, or a "
                    "wrong id)."),
    "ERROR_CORE": _l("Bitrix24 failed inside (ERROR_CORE). It is usually temporary."),
    "INTERNAL_SERVER_ERROR": _l("Bitrix24 failed inside. It is usually temporary."),
    "OVERLOAD_LIMIT": _l("Bitrix24 blocked the app's access for overload. Contact Bitrix24 "
                         "support."),
}
GENERAL = _l("Bitrix24 refused the command.")
UNKNOWN = _l("The command's answer was lost, so its outcome is unknown; it was not sent "
             "again to avoid doing it twice.")
DEPENDENCY = _l("An earlier command it depended on failed, so it was not sent.")
EXPIRED = _l("It kept failing until its retry time ran out.")


def explain(error: Mapping[str, Any] | None, reason: str | None) -> str:
    """One sentence for a dead command (its Bitrix24 ``error`` and the dispatcher's reason)."""
    text = (reason or "").lower()
    if "unknown outcome" in text:
        return str(UNKNOWN)
    if "still failing after" in text:
        return str(EXPIRED)
    if text.startswith("depends on command"):
        return str(DEPENDENCY)
    code = str((error or {}).get("error") or "").upper()
    if code in CODES:
        return str(CODES[code])
    for known, sentence in CODES.items():
        if known.lower() in text:
            return str(sentence)
    return str(GENERAL)
