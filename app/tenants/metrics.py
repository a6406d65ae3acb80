"""Prometheus metrics of the token chains (multiprocess-safe; see app/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter

REFRESHES = Counter(
    "b24relay_token_refreshes_total",
    "Refresh requests sent to the Bitrix24 auth server, by outcome: refreshed; chain_lost "
    "(invalid_grant: the portal is auth_failed); client_rejected (wrong_client or "
    "invalid_client: B24_CLIENT_ID/B24_CLIENT_SECRET are wrong, no portal is changed); "
    "uninstalled, payment_required, portal_deleted, access_denied (the status the portal "
    "moved to); refused (any other error answer); no_answer (the request got no usable "
    "answer); error (anything else).",
    ["outcome"])
