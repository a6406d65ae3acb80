"""A call's story as the pages show it (the call page and the call-card widget)."""

from __future__ import annotations

from typing import Any

from app.telephony import story
from app.tenants.models import Portal
from placements.dead import redact


def shown(portal: Portal, told: story.Story) -> dict[str, Any]:
    """A story as the pages show it: events and commands with their secrets hidden."""
    secrets = redact.portal_secrets(portal)
    return {
        "call": told.call,
        "notes": [redact.text(n, secrets) for n in told.notes],
        "events": [{"id": e.id, "kind": e.event_type, "status": e.status,
                    "attempts": e.attempts, "received_at": e.received_at,
                    "processed_at": e.processed_at, "at": str(e.payload.get("at") or ""),
                    "error": redact.text(e.error, secrets),
                    "body": redact.pretty(e.payload, secrets)} for e in told.events],
        "commands": [{"id": c.id, "method": c.method, "status": c.status,
                      "outcome": c.outcome or "", "attempts": c.attempts,
                      "submitted_at": c.submitted_at, "first_sent_at": c.first_sent_at,
                      "completed_at": c.completed_at,
                      "reason": redact.text(_said(c), secrets),
                      "body": redact.pretty(c.params, secrets)} for c in told.commands],
    }


def _said(command: Any) -> str:
    """A command's reason and Bitrix24's error, in one line."""
    error = command.error if isinstance(command.error, dict) else {}
    said = ": ".join(str(v) for v in (error.get("error"), error.get("error_description")) if v)
    return "; ".join(part for part in (command.reason, said) if part)
