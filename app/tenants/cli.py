"""``flask portals``: list, show, refresh, disable, enable (the factory adds the use cases' own:
``resume`` from app/installation/cli.py, ``api-key`` from app/ingress/cli.py)."""

from __future__ import annotations

from datetime import datetime, timedelta

import click
from flask.cli import AppGroup
from sqlalchemy import select

from app.bitrix import errors
from app.config import REFRESH_TOKEN_DAYS
from app.extensions import db
from app.tenants import service
from app.tenants.models import Portal, PortalStatus
from app.tenants.status import PortalUnavailable, set_status

portals_cli = AppGroup("portals", help="Inspect and operate the installed portals.")


def portal_id_filter(member_id: str | None) -> int | None:
    """A ``--member-id`` option turned into a portal id (None: every portal); unknown ids fail."""
    if member_id is None:
        return None
    portal = Portal.by_member_id(member_id)
    if portal is None:
        raise click.ClickException(f"no portal with member_id {member_id!r}")
    return portal.id


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def _dies(issued: datetime | None) -> datetime | None:
    """When a refresh token issued at ``issued`` expires unless spent (protocol §1.5)."""
    return issued + timedelta(days=REFRESH_TOKEN_DAYS) if issued else None


def portal_or_fail(member_id: str) -> Portal:
    """The portal with this member_id, or the command fails saying there is none."""
    portal = service.get_portal(member_id)
    if portal is None:
        raise click.ClickException(f"no portal with member_id {member_id}")
    return portal


@portals_cli.command("list")
def list_portals() -> None:
    """One line per portal: member_id, domain, status, plan, token expiry, last activity."""
    portals = db.session.scalars(select(Portal).order_by(Portal.id)).all()
    if not portals:
        click.echo("no portals")
        return
    click.echo(f"{'MEMBER_ID':34} {'DOMAIN':32} {'STATUS':17} {'PLAN':10} "
               f"{'TOKEN EXPIRES':19} {'LAST ACTIVITY':19}")
    for p in portals:
        click.echo(f"{p.member_id:34} {p.domain[:32]:32} {p.status:17} {p.plan:10} "
                   f"{_when(p.expires_at):19} {_when(p.last_activity_at):19}")


@portals_cli.command("show")
@click.argument("member_id")
def show_portal(member_id: str) -> None:
    """Everything about one portal except its secrets."""
    p = portal_or_fail(member_id)
    rows = [
        ("member_id", p.member_id), ("domain", p.domain), ("status", p.status),
        ("reason", p.status_reason or "-"), ("status changed", _when(p.status_changed_at)),
        ("client_endpoint", p.client_endpoint), ("server_endpoint", p.server_endpoint or "-"),
        ("plan", f"{p.plan} ({p.rate_per_second:g}/s, burst {p.rate_burst})"),
        ("scope", p.scope or "-"), ("app status", p.app_status or "-"),
        ("tokens", "stored" if p.refresh_token else "none"),
        ("token version", p.token_version), ("token expires", _when(p.expires_at)),
        ("chain user", p.auth_user_id or "-"), ("last refresh", _when(p.last_refresh_at)),
        ("refresh token dies", _when(_dies(p.last_refresh_at))),
        ("refresh in flight since", _when(p.refresh_started_at)),
        ("last activity", _when(p.last_activity_at)), ("installed", _when(p.installed_at)),
        ("users sync", f"{p.users_sync_status or '-'} {_when(p.users_sync_at)}"),
        ("users sync error", p.users_sync_error or "-"),
    ]
    for label, value in rows:
        click.echo(f"{label + ':':25} {value}")


@portals_cli.command("refresh")
@click.argument("member_id")
def refresh_portal(member_id: str) -> None:
    """Refresh the portal's tokens now (single-flight, like any other refresh)."""
    p = portal_or_fail(member_id)
    try:
        creds = service.refresh_now(p)
    except PortalUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    except errors.BitrixError as exc:
        raise click.ClickException(f"refresh failed: {exc}") from exc
    click.echo(f"refreshed {member_id}: token version {creds.token_version}, "
               f"expires {_when(creds.expires_at)}")


@portals_cli.command("disable")
@click.argument("member_id")
@click.option("--reason", default=None, help="Shown on the settings page and by `show`.")
def disable_portal(member_id: str, reason: str | None) -> None:
    """Hold every call to the portal until `enable`."""
    set_status(portal_or_fail(member_id), PortalStatus.DISABLED, reason)
    click.echo(f"disabled {member_id}")


@portals_cli.command("enable")
@click.argument("member_id")
def enable_portal(member_id: str) -> None:
    """Make the portal active again; the next call re-checks it against Bitrix24."""
    set_status(portal_or_fail(member_id), PortalStatus.ACTIVE)
    click.echo(f"enabled {member_id}")
