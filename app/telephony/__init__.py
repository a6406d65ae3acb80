"""Telephony (issue 22): PBX call events become Bitrix24 calls: the card while the phone
rings, the call in the CRM when it ends.

- ``models``: the calls table, one row per PBX call;
- ``machine``: the pure state machine (a call and one event in, the new call and the
  commands out);
- ``handlers``: the PBX event handlers and the outcome handlers that run it;
- ``click``: click-to-call (ONEXTERNALCALLSTART): the signed originate to the PBX, and the
  PBX's call joined to the click's ``CALL_ID``.
- ``callback``: web-form callbacks (ONEXTERNALCALLBACKSTART): the employee chosen, the call
  registered (TYPE 4), then the same originate, join and failure finish as a click.
- ``sweeper``: finishes calls whose end never came, parks events whose start never came
  (run periodically by workers/calls.py); ``cli``: ``flask calls show`` / ``retry`` /
  ``reprocess``.
- ``reprocess``: past calls missing from Bitrix24, sent again (``flask calls reprocess``),
  and the statistics check of a PBX's replayed start.

The factory wires it in with :func:`init_app`.
"""

from __future__ import annotations

from typing import Any


def init_app(app: Any) -> None:
    """Wire telephony in: the calls table, the PBX event handlers, the outcome handlers,
    ``flask calls``."""
    from app.dispatcher import register_outcome_handlers
    from app.ingress import registry
    from app.telephony import callback, click, reprocess
    from app.telephony import models as _models  # noqa: F401 - the calls table, for Alembic
    from app.telephony.cli import calls_cli
    from app.telephony.handlers import HANDLERS, OUTCOME_HANDLERS

    registry.register(HANDLERS, source="pbx")
    registry.register({"ONEXTERNALCALLSTART": click.on_click,
                       "ONEXTERNALCALLBACKSTART": callback.on_callback})
    register_outcome_handlers(OUTCOME_HANDLERS)
    register_outcome_handlers({click.FINISHED: click.finished,
                               callback.REGISTERED: callback.registered})
    register_outcome_handlers(reprocess.OUTCOME_HANDLERS)
    app.cli.add_command(calls_cli)
