"""``flask outbox show|dead|replay|prune`` (the operator's view of the outbox) and
``flask dispatcher run`` (a dedicated sending process)."""

from __future__ import annotations

import signal
import threading

import click
from flask import current_app
from flask.cli import AppGroup

from app.dispatcher import outbox, retention
from app.extensions import db
from app.tenants.cli import portal_id_filter
from app.tenants.models import Portal

outbox_cli = AppGroup("outbox", help="Outgoing REST commands: depth, dead letters, replay, "
                                     "retention.")
dispatcher_cli = AppGroup("dispatcher", help="The outgoing dispatcher.")


@outbox_cli.command("show")
@click.option("--member-id", help="only this portal's")
def show(member_id: str | None) -> None:
    """Commands per portal, status and priority."""
    rows = outbox.depths(portal_id_filter(member_id))
    if not rows:
        click.echo("the outbox is empty")
    names = dict(db.session.execute(db.select(Portal.id, Portal.member_id)).all())
    for d in rows:
        priority = "realtime" if d.priority == 0 else "bulk"
        click.echo(f"{names.get(d.portal_id, d.portal_id):34} {d.status:9} {priority:9} "
                   f"{d.count:>8}")


@outbox_cli.command("dead")
@click.option("--member-id", help="only this portal's")
@click.option("--limit", default=50, show_default=True)
def dead(member_id: str | None, limit: int) -> None:
    """The newest dead commands: id, portal, method, attempts, reason."""
    rows = outbox.dead_letters(portal_id_filter(member_id), limit)
    if not rows:
        click.echo("no dead commands")
    for c in rows:
        click.echo(f"{c.id:>10} {c.portal_id:>6} {c.method:40} {c.attempts:>3}  {c.dead_reason}")


@outbox_cli.command("replay")
@click.argument("command_ids", nargs=-1, type=int)
@click.option("--member-id", help="with --all: every dead command of this portal")
@click.option("--all", "everything", is_flag=True, help="every dead command (of the portal)")
def replay(command_ids: tuple[int, ...], member_id: str | None, everything: bool) -> None:
    """Queue dead commands again with fresh attempts and a fresh retry horizon."""
    if not command_ids and not everything:
        raise click.UsageError("give command ids, or --all [--member-id ...]")
    replayed = outbox.replay_dead(command_ids, portal_id_filter(member_id))
    db.session.commit()
    click.echo(f"replayed {len(replayed)} command(s)"
               + (f": {' '.join(map(str, replayed))}" if replayed else ""))
    skipped = sorted(set(command_ids) - set(replayed))
    if skipped:
        click.echo(f"not dead (or not found), left alone: {' '.join(map(str, skipped))}",
                   err=True)


@outbox_cli.command("prune")
@click.option("--done-days", type=float, help="keep done commands this long "
              "[default: OUTBOX_KEEP_DONE_DAYS]")
@click.option("--dead-days", type=float, help="keep dead commands this long "
              "[default: OUTBOX_KEEP_DEAD_DAYS]")
def prune(done_days: float | None, dead_days: float | None) -> None:
    """Delete finished commands past their retention now (the hourly job does it too)."""
    policy = retention.Retention.from_config()
    policy = retention.Retention(
        done_days=policy.done_days if done_days is None else done_days,
        dead_days=policy.dead_days if dead_days is None else dead_days)
    result = retention.prune(policy)
    click.echo(f"deleted {result['done_deleted']} done and {result['dead_deleted']} dead "
               f"command(s) (kept: done {policy.done_days:g} days, dead {policy.dead_days:g} "
               "days)")


@dispatcher_cli.command("run")
def run() -> None:
    """Run a dispatcher engine in this process until SIGINT/SIGTERM."""
    from app.dispatcher.engine import Engine

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    engine = Engine(app).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"dispatcher {engine.owner} running")
    stop.wait()
    engine.stop(timeout=float(app.config["DISPATCH_REQUEST_TIMEOUT"]))
