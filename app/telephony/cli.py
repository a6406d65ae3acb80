"""``flask calls show``: the operator's view of the calls table (incomplete, unroutable,
collided or failed calls are visible here, with why)."""

from __future__ import annotations

from collections.abc import Sequence

import click
from flask.cli import AppGroup
from sqlalchemy import select

from app.extensions import db
from app.telephony.machine import State
from app.telephony.models import Call
from app.tenants.cli import portal_id_filter

calls_cli = AppGroup("calls", help="PBX calls and the Bitrix24 calls they became.")


def newest(portal_id: int | None = None, state: str | None = None,
           limit: int = 50) -> Sequence[Call]:
    """The newest calls, optionally of one portal and in one state (index ix_calls_state_id)."""
    query = select(Call).order_by(Call.id.desc()).limit(limit)
    if portal_id is not None:
        query = query.where(Call.portal_id == portal_id)
    if state is not None:
        query = query.where(Call.state == state)
    return db.session.scalars(query).all()


def describe(call: Call) -> str:
    """One line: the call, where it stands, and anything wrong with it."""
    notes = ["collision" if call.collision else "",
             f"skipped: {call.skip_reason}" if call.skip_reason else "",
             f"register: {call.register_error}" if call.register_error else "",
             f"user {call.refused_user_id} refused: registered with the fallback user"
             if call.refused_user_id is not None else "",
             f"finish {call.finish_outcome}" if call.finish_outcome else "",
             f"finish: {call.finish_error}" if call.finish_error else "",
             steps(call),
             f"lead: {call.lead_error}" if call.lead_error else "",
             f"{len(call.pending)} event(s) wait for the start" if call.pending else ""]
    return (f"{call.id:>8} {call.pbx_call_id[:32]:32} {call.state:10} "
            f"{call.b24_call_id or '-'} owner={call.owner_user_id or '-'} "
            + "; ".join(n for n in notes if n)).rstrip()


def steps(call: Call) -> str:
    """The finish's way there when it took more than one command, e.g. ``finish unknown >
    finish dead (Call is not found...) > statistic.get done``."""
    done = call.finish_steps or []
    if len(done) < 2:
        return ""
    return "steps: " + " > ".join(
        f"{s['method'].rsplit('.', 1)[-1] if 'externalcall' in s['method'] else s['method']} "
        f"{s['outcome']}" + (f" ({s['reason'][:60]})" if s.get("reason") else "")
        for s in done)


@calls_cli.command("show")
@click.option("--member-id", help="only this portal's")
@click.option("--state", type=click.Choice([s.value for s in State]), help="only calls here")
@click.option("--limit", default=50, show_default=True)
def show(member_id: str | None, state: str | None, limit: int) -> None:
    """The newest calls: id, PBX call id, state, CALL_ID, owner, and what went wrong."""
    rows = newest(portal_id_filter(member_id), state, limit)
    if not rows:
        click.echo("no calls")
    for call in rows:
        click.echo(describe(call))
