"""The live dashboard of one portal (issue 24 point 3): a use case that reads the services'
public functions only (the ingress's inbox depth, the dispatcher's outbox, statistics and
operating-time ledger, the tenant's status and token), never their tables.

``build(portal)`` returns the page's JSON; the calls' part comes from the telephony use case
(``app.telephony.summary``), which the placement view adds: use cases do not import each
other.
"""

from app.dashboard.build import build

__all__ = ["build"]
