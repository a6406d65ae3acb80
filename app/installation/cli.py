"""The installation use case's ``flask portals`` commands: ``resume`` (probe a blocked portal),
``settings`` (read and set a portal's settings, as its settings page does), ``check`` (the
self-diagnosis, now) and ``setup`` (run the portal's setup again).

The ``portals`` group is the floor's (app/tenants/cli.py); the factory adds these commands to it.
"""

from __future__ import annotations

import json
import textwrap

import click
from flask_babel import force_locale

from app.extensions import db
from app.i18n import language_of
from app.installation import blocked, diagnosis, settings_form, upkeep
from app.installation import diagnosis_text as text
from app.tenants.cli import portal_or_fail
from app.tenants.models import PortalStatus
from app.tenants.status import is_held

WIDTH = 100


@click.command("resume")
@click.argument("member_id")
def resume_portal(member_id: str) -> None:
    """Probe a blocked portal now (one app.info); it resumes if Bitrix24 lifted the block."""
    p = portal_or_fail(member_id)
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
    p = portal_or_fail(member_id)
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


@click.command("check")
@click.argument("member_id")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (with its words).")
@click.option("--lang", default="en", show_default=True,
              help="The language of the words: en or ru (a Bitrix24 LANG code is mapped).")
def check_portal(member_id: str, as_json: bool, lang: str) -> None:
    """Run the self-diagnosis now: one read-only round against the portal, each finding with
    what to do. The report is kept as the portal's last (for the settings page). Exit status 1
    when a finding is an error."""
    p = portal_or_fail(member_id)
    db.session.commit()  # no transaction held open while the portal answers
    report = diagnosis.check(p)
    diagnosis.store(p, report, "cli")
    db.session.commit()
    with force_locale(language_of(lang)):
        click.echo(json.dumps(_worded(report), indent=2, ensure_ascii=False) if as_json
                   else "\n".join(_lines(report)))
    if report.level is diagnosis.Level.ERROR:
        raise SystemExit(1)


def _context(report: diagnosis.Report) -> dict[str, str]:
    return {"member_id": report.member_id, "domain": report.domain}


def _worded(report: diagnosis.Report) -> dict[str, object]:
    data = report.as_dict()
    for finding, row in zip(report.findings, data["findings"], strict=True):
        row["summary"], row["advice"] = text.render(finding.code, finding.key, finding.facts,
                                                    _context(report))
    return data


def _lines(report: diagnosis.Report) -> list[str]:
    """The report for a terminal: a header, one block per finding, the totals."""
    out = [text.fill(text.HEADER, {**_context(report), "seconds": report.seconds,
                                   "at": report.checked_at.isoformat(timespec="seconds")}), ""]
    for finding in report.findings:
        summary, advice = text.render(finding.code, finding.key, finding.facts,
                                      _context(report))
        out.append(f"{text.translated(text.LEVELS[finding.level.value]):8} "
                   f"{text.translated(text.CHECKS.get(finding.code, finding.code))}")
        out.extend(textwrap.wrap(summary, WIDTH, initial_indent="    ",
                                 subsequent_indent="    "))
        if advice and finding.level is not diagnosis.Level.OK:
            out.extend(textwrap.wrap(advice, WIDTH, initial_indent="    " + text.ADVICE_MARK,
                                     subsequent_indent="       "))
    out += ["", text.fill(text.FOOTER, {"errors": report.count(diagnosis.Level.ERROR),
                                        "warnings": report.count(diagnosis.Level.WARN)})]
    return out


@click.command("setup")
@click.argument("member_id")
def setup_portal(member_id: str) -> None:
    """Run the portal's setup again: bind the events, widgets and lines it lacks and read its
    users (submitted to the dispatcher; `flask portals check` shows the result)."""
    p = portal_or_fail(member_id)
    if is_held(p.status):
        raise click.ClickException(f"{member_id} is {p.status}: {p.status_reason}")
    upkeep.submit_setup(p)
    db.session.commit()
    click.echo(f"{member_id}: setup submitted; the dispatcher sends it within seconds")
