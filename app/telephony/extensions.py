"""Extensions to users, telephony's side (issue 22 point 5, protocol §8.10).

- ``flask calls extensions list|set|unset``: the portal's overrides (5+-digit and
  alphanumeric extensions, shared phones), kept on the floor with the map they override
  (app.tenants.users.ExtensionOverride: the settings page and the call-card widget read the
  same merged map as the machine);
- :func:`ask_sync_for_unmapped`: a PBX event naming an extension nobody answers asks for a
  user sync of the portal, at most once per ``TELEPHONY_UNKNOWN_EXTENSION_SYNC_INTERVAL``
  (a Redis key taken with SET NX EX). The sync is the installation's worker actor, enqueued
  by name (app.queue), so this use case imports nothing of the other; the call itself does
  not wait for it: its card goes to whoever is mapped now, else the fallback user.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import click
import dramatiq
import redis
from flask import current_app

from app.extensions import db, redis_ext
from app.queue import enqueue
from app.tenants.models import Portal
from app.tenants.users import (
    extension_map,
    find_user,
    normalise_extension,
    overrides,
    set_override,
    unset_override,
)

log = logging.getLogger(__name__)

SYNC_ACTOR = "sync_portal_users"  # workers/install.py: submits the portal's user.get pages
# The fields of PBX_EVENTS.md that name extensions, per event that routes a card.
EXTENSION_FIELDS = {"start": ("extensions",), "answer": ("extension",),
                    "transfer": ("from_extension", "to_extension")}


def named_extensions(event: Mapping[str, Any]) -> list[str]:
    """The extensions a start, answer or transfer names (none for other events)."""
    names: list[str] = []
    for name in EXTENSION_FIELDS.get(str(event.get("event") or ""), ()):
        value = event.get(name)
        values: Iterable[Any] = value if isinstance(value, list) else [value]
        names.extend(ext for v in values if (ext := normalise_extension(v)))
    return names


def ask_sync_for_unmapped(portal: Portal, event: Mapping[str, Any],
                          mapped: Mapping[str, int] | None = None) -> bool:
    """Ask for a user sync when ``event`` names an extension that maps to nobody (``mapped``:
    the portal's extension map when the caller has it); whether one was asked for now.
    Never raises for Redis or the broker: the call goes on."""
    named = named_extensions(event)
    if not named:
        return False
    unmapped = sorted(set(named) - set(extension_map(portal) if mapped is None else mapped))
    if not unmapped:
        return False
    interval = float(current_app.config["TELEPHONY_UNKNOWN_EXTENSION_SYNC_INTERVAL"])
    if interval <= 0:
        return False
    try:
        if not redis_ext.client.set(f"b24relay:unknown-extension-sync:{portal.id}", "1",
                                    nx=True, ex=max(1, round(interval))):
            return False  # asked within the interval already
        enqueue(SYNC_ACTOR, portal.id)
    except (redis.RedisError, dramatiq.errors.DramatiqError, OSError) as exc:
        log.warning("portal %s: unknown extension(s) %s, no user sync asked (%s)",
                    portal.member_id, ", ".join(unmapped)[:200], exc)
        return False
    log.info("portal %s: unknown extension(s) %s, user sync asked", portal.member_id,
             ", ".join(unmapped)[:200])
    return True


# ---------------------------------------------------------------- flask calls extensions

extensions_cli = click.Group(
    "extensions", help="The portal's extension overrides (5+ digits, letters, shared phones).")


def _portal(member_id: str) -> Portal:
    portal = Portal.by_member_id(member_id)
    if portal is None:
        raise click.ClickException(f"no portal with member_id {member_id!r}")
    return portal


@extensions_cli.command("list")
@click.option("--member-id", required=True, help="the portal")
def list_overrides(member_id: str) -> None:
    """The overrides, each with its user and whether the map uses it, then the merged map."""
    portal = _portal(member_id)
    states = overrides(portal)
    if not states:
        click.echo("no overrides")
    for state in states:
        row = state.override
        status = f"IGNORED: {state.problem}" if state.problem else "in use"
        note = f"  ({row.note})" if row.note else ""
        click.echo(f"{row.extension:16} -> user {row.user_id:<8} {status}{note}")
    merged = extension_map(portal)
    click.echo(f"map: {len(merged)} extension(s) "
               + ", ".join(f"{ext}={uid}" for ext, uid in sorted(merged.items())[:50]))


@extensions_cli.command("set")
@click.option("--member-id", required=True, help="the portal")
@click.argument("extension")
@click.argument("user_id", type=int)
@click.option("--note", default="", help="why (a shared phone, the PBX's numbering, ...)")
def set_command(member_id: str, extension: str, user_id: int, note: str) -> None:
    """Route EXTENSION to Bitrix24 user USER_ID (it wins over the user's UF_PHONE_INNER)."""
    portal = _portal(member_id)
    try:
        row = set_override(portal, extension, user_id, note)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    db.session.commit()
    user = find_user(portal, user_id)
    if user is None or not user.active:
        problem = "user is unknown (not in the last user sync)" if user is None else (
            "user is inactive")
        click.echo(f"{row.extension} -> user {user_id} saved, but IGNORED while the {problem}")
    else:
        click.echo(f"{row.extension} -> user {user_id} ({user.name or 'no name'})")


@extensions_cli.command("unset")
@click.option("--member-id", required=True, help="the portal")
@click.argument("extension")
def unset_command(member_id: str, extension: str) -> None:
    """Remove the override of EXTENSION (its user.get mapping, if any, applies again)."""
    portal = _portal(member_id)
    if not unset_override(portal, extension):
        raise click.ClickException(f"no override for extension {extension!r}")
    db.session.commit()
    click.echo(f"{normalise_extension(extension)}: override removed")
