"""The portal status machine, driven by what Bitrix24 answers (issue 4, item 6).

=====================  ==========================  =====================================
Bitrix24 answer        portal status               recovery
=====================  ==========================  =====================================
302 to a new host      unchanged (endpoints move)  automatic: the call is repeated
invalid_grant          auth_failed                 an admin opens the app / reinstall
PORTAL_DELETED         portal_deleted              none (the portal is gone)
PAYMENT_REQUIRED       payment_required            renew, then an admin opens the app
ACCESS_DENIED,         access_denied               grant the scope/rights, admin opens
insufficient_scope                                 the app
NOT_INSTALLED,         uninstalled                 install the app again
ERROR_OAUTH, ...
OVERLOAD_LIMIT         blocked                     automatic: a probe (one app.info)
                                                   every OVERLOAD_PROBE_MINUTES; an admin
                                                   opening the app; ``flask portals
                                                   resume`` (probe now) or ``enable``
operator               disabled                    ``flask portals enable``
=====================  ==========================  =====================================

Every state but ``active`` and ``installing`` holds the portal's calls: nothing
is sent (``PortalUnavailable``), and queued commands stay queued.

``blocked`` is Bitrix24 support's manual block of the portal's REST access (protocol
§4.3: "stop, alert a human"). Each move into it is logged at error and counted in
``b24relay_portal_blocked_total`` (the first block, then every probe that finds it still
there), so an alert on that counter's increase holds exactly while a portal is blocked.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter
from sqlalchemy import update
from sqlalchemy.orm.attributes import set_committed_value

from app.bitrix import errors
from app.extensions import db
from app.i18n import N_, Words, shown
from app.tenants.models import Portal, PortalStatus, utcnow

log = logging.getLogger(__name__)

BLOCKED = Counter("b24relay_portal_blocked_total",
                  "OVERLOAD_LIMIT answers that left a portal blocked (Bitrix24 support's manual "
                  "REST block): the first one, then each probe that finds it still there. A "
                  "human must contact Bitrix24 support.")

HELD = frozenset({PortalStatus.AUTH_FAILED, PortalStatus.PAYMENT_REQUIRED,
                  PortalStatus.ACCESS_DENIED, PortalStatus.PORTAL_DELETED,
                  PortalStatus.UNINSTALLED, PortalStatus.DISABLED, PortalStatus.BLOCKED})
# A fresh chain from an admin's iframe open shows the app works again for these (a chain is
# kept only after user.admin answered on the portal's REST, so a REST block is over too).
CLEARED_BY_NEW_CHAIN = frozenset({PortalStatus.AUTH_FAILED, PortalStatus.PAYMENT_REQUIRED,
                                  PortalStatus.ACCESS_DENIED, PortalStatus.BLOCKED})
# Our own words are ``Words``: stored and logged in English, shown in the page's language
# (:func:`shown_reason` recognises them in a stored reason).
REASONS: dict[PortalStatus, Words] = {
    PortalStatus.AUTH_FAILED: N_("Bitrix24 no longer accepts the app's refresh token. Open the "
                                 "app in Bitrix24 once as an administrator to reconnect it. If "
                                 "that does not help, reinstall the app."),
    PortalStatus.PAYMENT_REQUIRED: N_("The app's subscription on this portal has ended. Renew it "
                                      "in Bitrix24 Market, then open the app in Bitrix24 once as "
                                      "an administrator to reconnect it."),
    PortalStatus.ACCESS_DENIED: N_("Bitrix24 denied the app access (a permission or scope is "
                                   "missing). Check the app's access rights in Bitrix24, then "
                                   "open the app in Bitrix24 once as an administrator to "
                                   "reconnect it."),
    PortalStatus.PORTAL_DELETED: N_("The Bitrix24 portal was deleted or closed; nothing is "
                                    "sent."),
    PortalStatus.UNINSTALLED: N_("The app is not installed on this portal any more. Install it "
                                 "again from Bitrix24 Market to resume."),
    PortalStatus.DISABLED: N_("Switched off by an operator; `flask portals enable` switches it "
                              "on."),
    PortalStatus.BLOCKED: N_("Bitrix24 support has blocked the app's REST access on this portal "
                             "(OVERLOAD_LIMIT). Nothing is sent and nothing is lost: calls and "
                             "events wait. The app checks regularly whether the block was "
                             "lifted and then resumes by itself; ask Bitrix24 support to lift "
                             "it."),
}
INTERRUPTED = N_("A token refresh was interrupted (the process stopped after the request left) "
                 "and Bitrix24 had already rotated the tokens, so the stored refresh token is "
                 "spent. ")

_ACCESS_CODES = frozenset({"ACCESS_DENIED", "INSUFFICIENT_SCOPE", "INVALID_SCOPE"})


class PortalUnavailable(Exception):
    """The portal's status holds its calls; nothing was sent to Bitrix24."""

    def __init__(self, member_id: str, status: str, reason: str | None) -> None:
        super().__init__(f"portal {member_id} is {status}: {reason or 'no reason recorded'}")
        self.member_id, self.status, self.reason = member_id, status, reason


def is_held(status: str | PortalStatus) -> bool:
    """Whether a portal in this status must not be called."""
    return PortalStatus(status) in HELD


def reason_for(status: str | PortalStatus, detail: str | None = None) -> Words | None:
    """The human reason shown on the settings page and by the CLI (English as a ``str``)."""
    text = REASONS.get(PortalStatus(status))
    if text and detail:
        return N_("%(reason)s (Bitrix24: %(detail)s)", reason=text, detail=detail)
    return text


def shown_reason(status: str | PortalStatus, stored: str | None) -> str | None:
    """A portal's reason for a page, in its language: our own wording (stored in English) is
    translated, with Bitrix24's detail kept as it came; any other stored text as it is."""
    if not stored:
        reason = reason_for(status)
        return shown(reason) if reason else None
    return shown(_as_words(PortalStatus(status), stored))


def _as_words(status: PortalStatus, stored: str) -> str:
    """``stored`` as the ``Words`` it was written from, when it is our wording."""
    if stored.startswith(INTERRUPTED):
        return shown(INTERRUPTED) + shown(_as_words(status, stored[len(INTERRUPTED):]))
    text = REASONS.get(status)
    if text is None or not stored.startswith(text):
        return stored
    if stored == text:
        return text
    tail = stored[len(text):]
    if tail.startswith(" (Bitrix24: ") and tail.endswith(")"):
        return reason_for(status, tail[len(" (Bitrix24: "):-1]) or stored
    return stored


def transition_for(error: errors.ApiError) -> PortalStatus | None:
    """The status a top-level Bitrix24 error moves the portal to, if any."""
    if isinstance(error, errors.InvalidGrant):
        return PortalStatus.AUTH_FAILED
    if isinstance(error, errors.PortalDeleted):
        return PortalStatus.PORTAL_DELETED
    if isinstance(error, errors.PaymentRequired):
        return PortalStatus.PAYMENT_REQUIRED
    if isinstance(error, errors.NotInstalled):
        return PortalStatus.UNINSTALLED
    if isinstance(error, errors.OverloadLimit):
        return PortalStatus.BLOCKED
    if error.code.upper() in _ACCESS_CODES:
        return PortalStatus.ACCESS_DENIED
    return None


def ensure_callable(portal: Portal) -> None:
    """Raise PortalUnavailable when the portal's status holds its calls."""
    if is_held(portal.status):
        raise PortalUnavailable(portal.member_id, portal.status, portal.status_reason)


def record(portal: Portal, status: PortalStatus, reason: str | None,
           only_if_version: int | None = None) -> bool:
    """Write a status change in its own transaction (the caller's session is not committed).

    With ``only_if_version`` the change applies only while the stored chain is still
    that version: a refresher that lost its chain never overrides a newer one.
    """
    return write(portal, _moved_to(status, reason), only_if_version)


def _moved_to(status: PortalStatus, reason: str | None) -> dict[str, Any]:
    """The columns a move to ``status`` writes."""
    return {"status": status.value, "status_reason": None if reason is None else str(reason),
            "status_changed_at": utcnow()}


def write(portal: Portal, values: dict[str, Any], only_if_version: int | None = None,
          only_if_status: PortalStatus | None = None) -> bool:
    """Update the portal's row in its own transaction and mirror what was written onto it.

    The one writer of a portal's row outside the caller's unit of work: the caller's
    session is neither committed nor dirtied. With ``only_if_version`` the update applies
    only while the stored chain is still that version; with ``only_if_status``, only while
    the portal is still in that status (another process may have moved it meanwhile).
    """
    stmt = update(Portal).where(Portal.id == portal.id)
    if only_if_version is not None:
        stmt = stmt.where(Portal.token_version == only_if_version)
    if only_if_status is not None:
        stmt = stmt.where(Portal.status == only_if_status.value)
    with db.engine.begin() as conn:
        changed = conn.execute(stmt.values(**values)).rowcount == 1
    if changed:
        sync(portal, values)
    return changed


def sync(portal: Portal, values: dict[str, Any]) -> None:
    """Mirror committed column values onto the in-memory portal without dirtying it."""
    for key, value in values.items():
        set_committed_value(portal, key, value)


def apply_error(portal: Portal, error: errors.ApiError) -> None:
    """Move the portal per a top-level error; raise PortalUnavailable when it is now held."""
    target = transition_for(error)
    if target is None:
        return
    was = portal.status
    record(portal, target, reason_for(target, f"{error.code} {error.description}".strip()))
    if target is PortalStatus.BLOCKED and was != target.value:  # once, not per batch in flight
        BLOCKED.inc()
        log.error("portal %s: Bitrix24 blocked its REST access (OVERLOAD_LIMIT); its calls are "
                  "held. A human must ask Bitrix24 support to lift the block", portal.member_id)
    raise PortalUnavailable(portal.member_id, target.value, portal.status_reason) from error


def set_status(portal: Portal, status: str | PortalStatus, reason: str | None = None) -> None:
    """Set a status through the caller's session and commit it (operators, install, uninstall)."""
    value = PortalStatus(status)
    portal.status = value.value
    reason = reason or reason_for(value)
    portal.status_reason = None if reason is None else str(reason)  # stored in English
    portal.status_changed_at = utcnow()
    db.session.commit()


def swap(portal: Portal, expected: PortalStatus, status: PortalStatus,
         reason: str | None) -> bool:
    """Move the portal from ``expected`` to ``status`` in its own transaction, only if it is
    still ``expected`` (another process may have moved it meanwhile); True when it moved."""
    return write(portal, _moved_to(status, reason), only_if_status=expected)
