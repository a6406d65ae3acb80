"""A portal's call options: its own value (PortalSettings), else the app's TELEPHONY_* setting.

One home for them, because several paths must agree: the country a number is read with is
the same for a call's register, the routing cache's key, click-to-call's and a callback's
number, and the call lookup's search, or a routed answer is missed and a call is not found.
"""

from __future__ import annotations

from typing import Any

from flask import current_app

from app.tenants.models import PortalSettings

# A portal's call option (PortalSettings column) -> the app's setting used where it is NULL.
CALL_OPTION_DEFAULTS = {"default_country": "TELEPHONY_DEFAULT_COUNTRY",
                        "crm_source": "TELEPHONY_CRM_SOURCE",
                        "add_to_chat": "TELEPHONY_ADD_TO_CHAT",
                        "anonymous_calls": "TELEPHONY_ANONYMOUS_CALLS",
                        "anonymous_number": "TELEPHONY_ANONYMOUS_NUMBER",
                        "internal_calls": "TELEPHONY_INTERNAL_CALLS"}


def option(settings: PortalSettings | None, name: str) -> Any:
    """The portal's own value of a call option, else the app's default."""
    value = getattr(settings, name, None) if settings is not None else None
    return current_app.config[CALL_OPTION_DEFAULTS[name]] if value is None else value


def default_country(settings: PortalSettings | None) -> str | None:
    """The ISO country a number without its ``+`` is read in, for this portal (None: none)."""
    return str(option(settings, "default_country") or "") or None
