"""``flask portals api-key MEMBER_ID`` and ``flask inbox dead|replay``: the operator's side of
intake (PBX keys, and events that failed for good)."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from app.ingress import inbox
from app.ingress.auth import issue_api_key
from app.tenants.cli import portal_id_filter
from app.tenants.models import Portal

inbox_cli = AppGroup("inbox", help="Events that failed for good: list them, replay them.")


@click.command("api-key")
@click.argument("member_id")
def api_key_command(member_id: str) -> None:
    """Create or rotate the PBX API key of a portal and print it (shown only this once)."""
    portal = Portal.by_member_id(member_id)
    if portal is None:
        raise click.ClickException(f"no portal with member_id {member_id!r}")
    key = issue_api_key(portal)
    click.echo(key)
    click.echo(f"PBX API key for {portal.domain}: it is stored hashed and cannot be shown "
               "again; any previous key no longer works.", err=True)


@inbox_cli.command("dead")
@click.option("--member-id", help="only this portal's")
@click.option("--limit", default=50, show_default=True)
def list_dead(member_id: str | None, limit: int) -> None:
    """The newest dead-lettered events: id, received, source and type, attempts, reason."""
    rows = inbox.dead_letters(portal_id_filter(member_id), limit)
    if not rows:
        click.echo("no dead events")
        return
    for d in rows:
        click.echo(f"{d.id:>10} {d.received_at:%Y-%m-%d %H:%M:%S} {d.source:4} "
                   f"{d.event_type:28} {d.attempts:>3}  {d.reason}")


@inbox_cli.command("replay")
@click.argument("row_ids", nargs=-1, type=int)
@click.option("--member-id", help="replay every dead event of this portal (or only the given ids)")
def replay(row_ids: tuple[int, ...], member_id: str | None) -> None:
    """Queue dead events again with fresh attempts, once their cause is fixed."""
    if not row_ids and member_id is None:
        raise click.UsageError("give inbox ids, or --member-id for all of a portal's")
    replayed = inbox.replay_dead(row_ids, portal_id_filter(member_id))
    click.echo(f"replayed {len(replayed)} event(s)" + (f": {' '.join(map(str, replayed))}"
                                                        if replayed else ""))
    skipped = sorted(set(row_ids) - set(replayed))
    if skipped:
        click.echo(f"not dead (or not found), left alone: {' '.join(map(str, skipped))}",
                   err=True)
