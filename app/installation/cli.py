"""The installation use case's ``flask portals`` commands: ``resume`` (probe a blocked portal)
and ``settings`` (read and set a portal's settings, as its settings page does).

The ``portals`` group is the floor's (app/tenants/cli.py); the factory adds these commands to it.
"""

from __future__ import annotations

import click

from app.extensions import db
from app.installation import blocked, settings_form
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


@click.command("settings")
@click.argument("member_id")
@click.argument("assignments", nargs=-1, metavar="[KEY=VALUE]...")
def portal_settings(member_id: str, assignments: tuple[str, ...]) -> None:
    """List the portal's settings (secrets masked), or validate and set KEY=VALUE ones.

    The same validation and messages as the settings page (app/installation/settings_form.py).
    An empty value clears an optional setting; ``pbx_secret=new`` generates a secret and
    prints it once. Nothing is written unless every value is valid.
    """
    p = Portal.by_member_id(member_id)
    if p is None:
        raise click.ClickException(f"no portal with member_id {member_id}")
    if not assignments:
        for key, text in settings_form.listing(p):
            click.echo(f"{key + ':':24} {text}")
        return
    values: dict[str, str] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise click.ClickException(f"{assignment!r} is not KEY=VALUE")
        values[key.strip()] = value
    try:
        applied = settings_form.apply(p, values)
    except settings_form.Invalid as exc:
        db.session.rollback()
        raise click.ClickException(f"{exc}; nothing was changed") from exc
    db.session.commit()
    settings_form.after_commit(p, applied)
    if not applied.changed:
        click.echo(f"{member_id}: nothing changed")
        return
    shown = dict(settings_form.listing(p))
    for key in applied.changed:
        click.echo(f"set {key}: {shown[key]}")
    if applied.new_secret is not None:
        click.echo(f"pbx_secret (shown once, give it to the PBX): {applied.new_secret}")
    if applied.setup_needed:
        click.echo("the portal's setup runs again (lines, event bindings)")
