"""The installation use case's ``flask portals`` command: ``resume`` (probe a blocked portal).

The ``portals`` group is the floor's (app/tenants/cli.py); the factory adds this command to it.
"""

from __future__ import annotations

import click

from app.installation import blocked
from app.tenants.models import Portal, PortalStatus


@click.command("resume")
@click.argument("member_id")
def resume_portal(member_id: str) -> None:
    """Probe a blocked portal now (one app.info); it resumes if Bitrix24 lifted the block."""
    p = Portal.by_member_id(member_id)
    if p is None:
        raise click.ClickException(f"no portal with member_id {member_id}")
    if p.status != PortalStatus.BLOCKED.value:
        raise click.ClickException(f"{member_id} is {p.status}, not blocked")
    outcome = blocked.probe(p)
    if outcome == blocked.SKIPPED:
        raise click.ClickException("a dispatcher is still settling its last batch, or the "
                                   "status changed; try again in a minute")
    click.echo({blocked.LIFTED: f"resumed {member_id}: the portal answers again",
                blocked.STILL_BLOCKED: f"{member_id} is still blocked (OVERLOAD_LIMIT)",
                blocked.NO_ANSWER: f"{member_id}: no answer; still blocked, probed again later",
                }.get(outcome, f"{member_id} is now {p.status}: {p.status_reason}"))
    if outcome != blocked.LIFTED:
        raise SystemExit(1)
