"""``flask portals api-key MEMBER_ID``: create or rotate a portal's PBX API key."""

from __future__ import annotations

import click

from app.ingress.auth import issue_api_key
from app.tenants.models import Portal


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
