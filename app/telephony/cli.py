"""``flask calls show``: the operator's view of the calls table (incomplete, parked,
unroutable, collided or failed calls are visible here, with why); ``flask calls retry``:
apply a parked call's events once its start has come."""

from __future__ import annotations

from collections.abc import Sequence

import click
from flask.cli import AppGroup
from sqlalchemy import select

from app.extensions import db
from app.telephony import handlers, machine, recording
from app.telephony.extensions import extensions_cli
from app.telephony.machine import State
from app.telephony.models import Call
from app.tenants.cli import portal_id_filter
from app.tenants.models import Portal, aware
from app.tenants.status import PortalUnavailable, ensure_callable

calls_cli = AppGroup("calls", help="PBX calls and the Bitrix24 calls they became.")
calls_cli.add_command(extensions_cli)  # flask calls extensions list|set|unset


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
    return (f"{call.id:>8} {call.pbx_call_id[:32]:32} {call.state:10} "
            f"{call.b24_call_id or '-'} owner={call.owner_user_id or '-'} "
            + "; ".join(notes(call))).rstrip()


def notes(call: Call) -> list[str]:
    """What is worth knowing about a call beyond its state (also the call pages' notes)."""
    found = [f"replay ({call.replay})" if call.replay else "",
             "collision" if call.collision else "",
             f"skipped: {call.skip_reason}" if call.skip_reason else "",
             f"register: {call.register_error}" if call.register_error else "",
             "it may be open in Bitrix24 unfinished (flask calls reprocess --dry-run lists it)"
             if call.replay and (call.register_error or "").startswith("unknown outcome")
             else "",
             f"user {call.refused_user_id} refused: registered with the fallback user"
             if call.refused_user_id is not None else "",
             f"finish {call.finish_outcome}" if call.finish_outcome else "",
             f"finish: {call.finish_error}" if call.finish_error else "",
             steps(call),
             f"lead: {call.lead_error}" if call.lead_error else "",
             _waiting(call), _recording(call)]
    return [n for n in found if n]


def _recording(call: Call) -> str:
    """The recording's state: attached (its file), queued (when), or why it is not."""
    if call.record_state is None:
        return ""
    voicemail = " voicemail" if call.record_voicemail else ""
    note = f"record{voicemail} {call.record_state}"
    if call.record_state == recording.RecordState.ATTACHED and call.record_file_id is not None:
        note += f" (file {call.record_file_id})"
    if call.record_state == recording.RecordState.QUEUED:
        note += f" (try {call.record_attempts + 1} due {recording.due_at(call)})"
    return note + (f": {call.record_error}" if call.record_error else "")


def _waiting(call: Call) -> str:
    """What the call's pending events wait for, and how long they waited when parked."""
    if not call.pending:
        return ""
    if call.parked_at is None:
        return f"{len(call.pending)} event(s) wait for the start"
    waited = int((aware(call.parked_at) - aware(call.created_at)).total_seconds())
    note = f"parked: {len(call.pending)} event(s) waited {waited} s for its start"
    if call.state != State.INCOMPLETE:
        note += f"; the start has come since: flask calls retry {call.id}"
    return note


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


@calls_cli.command("clicks")
@click.option("--member-id", help="only this portal's")
@click.option("--limit", default=50, show_default=True)
def clicks(member_id: str | None, limit: int) -> None:
    """The newest click-to-calls and web-form callbacks: kind, CALL_ID, user, extension,
    state, tries, and why it failed."""
    from app.telephony.models import Originate

    query = select(Originate).order_by(Originate.id.desc()).limit(limit)
    portal_id = portal_id_filter(member_id)
    if portal_id is not None:
        query = query.where(Originate.portal_id == portal_id)
    rows = db.session.scalars(query).all()
    if not rows:
        click.echo("no clicks")
    for row in rows:
        click.echo(f"{row.id:>8} {row.kind:8} {(row.b24_call_id or '-')[:40]:40} "
                   f"user={row.user_id or '-'} "
                   f"ext={row.extension or '-'} {row.state:7} tries={row.attempts}"
                   + (f" {row.error}" if row.error else ""))
def retry_call(row_id: int) -> str:
    """Apply one call's waiting events if its start has come (its own commit); what happened."""
    row = handlers.locked(Call.id == row_id)
    if row is None:
        return "gone"
    waiting = len(row.pending or [])
    portal = db.session.get(Portal, row.portal_id)
    if portal is None or not waiting:
        db.session.rollback()
        return "nothing waits"
    if row.state == State.INCOMPLETE:
        db.session.rollback()
        return f"{waiting} event(s) still wait for the start (nothing registers without it)"
    try:
        ensure_callable(portal)
    except PortalUnavailable as exc:
        db.session.rollback()
        return f"the portal is on hold: {exc}"
    after, commands = machine.retry(handlers.state_of(row), handlers.policy_for(portal))
    handlers.store(row, after)
    handlers.send(row, commands)
    db.session.commit()
    return f"applied {waiting} event(s): {len(commands)} command(s), now {after.state.value}"


@calls_cli.command("retry")
@click.argument("call", required=False)
@click.option("--member-id", help="this portal's calls (all its parked calls without CALL)")
@click.option("--state", type=click.Choice([s.value for s in State]),
              help="only parked calls in this state")
def retry(call: str | None, member_id: str | None, state: str | None) -> None:
    """Apply the events of a parked call (id or PBX call id) whose start has come since;
    without CALL, every parked call of --member-id."""
    portal_id = portal_id_filter(member_id)
    if call is None and portal_id is None:
        raise click.UsageError("name a call (id or PBX call id) or a portal (--member-id)")
    query = select(Call.id, Call.pbx_call_id).order_by(Call.id)
    if portal_id is not None:
        query = query.where(Call.portal_id == portal_id)
    if state is not None:
        query = query.where(Call.state == state)
    if call is not None:
        named = Call.pbx_call_id == call
        query = query.where(named | (Call.id == int(call)) if call.isdigit() else named)
    else:
        query = query.where(Call.parked_at.is_not(None))
    rows = db.session.execute(query).all()
    db.session.commit()
    if not rows:
        click.echo("no such call" if call is not None else "no parked calls")
    for row in rows:
        click.echo(f"{row.id:>8} {row.pbx_call_id[:32]:32} {retry_call(row.id)}")


@calls_cli.command("reprocess")
@click.option("--member-id", required=True, help="the portal")
@click.option("--since", required=True, help="from this start time (ISO 8601 with an offset)")
@click.option("--until", required=True, help="to this start time (ISO 8601 with an offset)")
@click.option("--dry-run", is_flag=True, help="list what would be sent; send nothing")
@click.option("--yes", is_flag=True, help="do not ask (the robots warning is still printed)")
def reprocess_calls(member_id: str, since: str, until: str, dry_run: bool, yes: bool) -> None:
    """Send again the portal's calls that started in [--since, --until] and are not in
    Bitrix24 as finished: register (SHOW=0, the original start) and finish (ADD_TO_CHAT=0)
    back to back, then the recording. Calls the statistics list are marked done instead."""
    from app.telephony import reprocess

    try:
        start, end = reprocess.parse_time(since), reprocess.parse_time(until)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if end < start:
        raise click.BadParameter("--until is before --since")
    portal = Portal.by_member_id(member_id)
    if portal is None:
        raise click.ClickException(f"no portal with member_id {member_id!r}")
    try:
        items = reprocess.plan(portal, start, end)
    except PortalUnavailable as exc:
        raise click.ClickException(f"the portal is on hold: {exc}") from exc
    db.session.rollback()  # plan() writes nothing; no transaction stays open while asking
    for item in items:
        click.echo(f"{item.row_id:>8} {item.pbx_call_id[:32]:32} "
                   f"{item.started.isoformat() if item.started else '-':25} "
                   f"{item.phone or '-':16} owner={item.owner or '-'} "
                   f"{item.status or '-':9} {item.action}"
                   + (f": {item.note}" if item.note else ""))
    todo = [i for i in items if i.action in (reprocess.Action.SEND, reprocess.Action.FINISH)]
    found = [i for i in items if i.action == reprocess.Action.FOUND]
    click.echo(f"{len(items)} call(s) started in the period: {len(todo)} to send, "
               f"{len(found)} found in Bitrix24 (marked done), "
               f"{sum(i.action == reprocess.Action.DONE for i in items)} done already, "
               f"{sum(i.action == reprocess.Action.SKIP for i in items)} skipped")
    if dry_run:
        click.echo("dry run: nothing sent, nothing changed")
        return
    if not todo and not found:
        return
    if todo:
        click.echo(f"WARNING: {reprocess.WARNING}", err=True)
        if not yes:
            click.confirm(f"Send {len(todo)} past call(s) to Bitrix24?", abort=True)
    counts = reprocess.send(portal, [*todo, *found])
    click.echo("sent: " + (", ".join(f"{n} {action}" for action, n in counts.items())
                           or "nothing"))
