"""The self-diagnosis (issue 24 point 6): one read-only round against the portal, and a finding
with advice for each thing that is wrong.

Against the sandbox portal over loopback, with the app installed through the live app (the
real /install, installFinish, ONAPPINSTALL), the test database and Redis. Each fault is seeded
in the sandbox the way a portal would get it (an unbound event, a scope withdrawn, another
default line, a clock off, a method failing) or in the app's records (users and extensions).
After every round the sandbox's command log must show reads only.
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.dispatcher import direct
from app.extensions import db
from app.installation import diagnosis, plan, settings_form
from app.installation import diagnosis_text as text
from app.installation.diagnosis import Level, Report
from app.installation.models import PortalDiagnosis
from app.tenants.models import PortalStatus, utcnow
from app.tenants.status import set_status
from app.tenants.users import ExtensionOverride
from tests.conftest import wait_for
from tests.install.conftest import LiveApp, portal_row, process_queued

pytestmark = pytest.mark.timeout(120)

# Everyone with an extension of their own: a portal with nothing to find.
STAFF = [
    {"id": 1, "name": "Ada", "last_name": "Admin", "admin": True, "extension": "101"},
    {"id": 2, "name": "Bob", "admin": False, "extension": "102"},
    {"id": 3, "name": "Cy", "admin": False, "extension": "103"},
]


@pytest.fixture
def form_kind() -> str:
    """The diagnosis does not read the iframe form: one of them is enough here."""
    return "full"


def _install(sandbox: Any, make_portal: Any, live_app: LiveApp, **extra: Any) -> str:
    portal = make_portal(**{"users": STAFF, **extra})
    member_id = portal["member_id"]
    result = sandbox.install_app(member_id, live_app.url)
    assert result["status"] == 200, result["body"]
    sandbox.finish_install(member_id)
    process_queued("ONAPPINSTALL")
    wait_for(lambda: portal_row(member_id).application_token == portal["application_token"])
    return member_id


@pytest.fixture
def healthy(sandbox: Any, make_portal: Any, live_app: LiveApp) -> str:
    """An installed portal with nothing wrong: its member_id."""
    return _install(sandbox, make_portal, live_app)


def _last_seq(sandbox: Any, member_id: str) -> int:
    return max((e["seq"] for e in sandbox.log(member_id)), default=0)


def _check(sandbox: Any, member_id: str) -> Report:
    """One round; asserts the portal saw read methods only, and that every finding's words
    find all their facts."""
    since = _last_seq(sandbox, member_id)
    db.session.remove()
    report = diagnosis.check(portal_row(member_id))
    sent = {e["method"] for e in sandbox.log(member_id, since=since)}
    assert sent <= diagnosis.READ_METHODS, sent - diagnosis.READ_METHODS
    assert [f.code for f in report.findings] == [code for code, _ in diagnosis.CHECKS]
    for f in report.findings:
        _assert_worded(f)
    return report


def _assert_worded(f: diagnosis.Finding) -> None:
    assert f.key in text.MESSAGES, f.key
    words = " ".join(part if isinstance(part, str) else " ".join(part)
                     for part in text.MESSAGES[f.key])
    named = set(re.findall(r"%\((\w+)\)s", words))
    unknown = named - set(f.facts) - {"member_id", "domain", "check", "key"}
    assert not unknown, f"{f.key} names facts it lacks: {unknown}"


def _finding(report: Report, code: str) -> diagnosis.Finding:
    found = report.finding(code)
    assert found is not None, code
    return found


def _words(report: Report, code: str) -> tuple[str, str]:
    f = _finding(report, code)
    return text.render(f.code, f.key, f.facts, {"member_id": report.member_id,
                                                 "domain": report.domain})


def _not_ok(report: Report) -> dict[str, str]:
    return {f.code: f.key for f in report.findings if f.level is not Level.OK}


def _rest(member_id: str, method: str, params: dict[str, Any]) -> Any:
    """A write made as the app makes it, to seed a fault (not part of any round)."""
    return direct.call_method(portal_row(member_id), method, params)


def test_a_healthy_portal_gives_all_ok_and_only_reads(sandbox, healthy):
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {}, [(f.code, f.key, f.facts) for f in report.findings]
    assert report.level is Level.OK
    assert _finding(report, "outgoing_line").facts["line_id"] == "REST_APP:1"
    assert _finding(report, "round_trip").facts["mode"] == "batch"
    assert abs(_finding(report, "clock").facts["skew_seconds"]) <= 1
    sent = [e for e in sandbox.log(healthy) if e["method"] == "scope"]
    assert len(sent) == 1 and sent[0]["in_batch"], "one round, one batch"


def test_a_missing_event_binding_is_an_error_naming_the_event_and_the_fix(sandbox, healthy):
    _rest(healthy, "event.unbind", {"event": "ONUSERADD",
                                    "handler": plan.event_handler_url(healthy)})
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {"events": "events.missing"}
    events = _finding(report, "events")
    assert events.level is Level.ERROR and events.facts["missing"] == ["ONUSERADD"]
    summary, advice = _words(report, "events")
    assert "ONUSERADD" in summary and f"flask portals setup {healthy}" in advice


def test_no_click_to_call_binding_also_loses_the_default_line(sandbox, healthy):
    _rest(healthy, "event.unbind", {"event": "ONEXTERNALCALLSTART",
                                    "handler": plan.event_handler_url(healthy)})
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {"events": "events.missing", "outgoing_line": "outgoing.no"}
    assert _finding(report, "outgoing_line").facts["line_kind"] == "base"


def test_bound_handler_urls_never_show_the_handler_key(sandbox, healthy, live_app):
    stale = f"{live_app.url}/b24/events?k=old-key-of-the-portal"
    _rest(healthy, "event.bind", {"event": "ONUSERADD", "handler": stale})
    report = _check(sandbox, healthy)
    events = _finding(report, "events")
    assert events.key == "events.stale" and events.level is Level.WARN
    assert events.facts["extra"] == [f"ONUSERADD {live_app.url}/b24/events"]
    assert "old-key" not in json.dumps(report.as_dict())


def test_a_missing_scope_is_an_error_and_its_reads_are_findings(sandbox, healthy):
    sandbox.set_scope(healthy, "telephony,placement,user_basic")
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {"scopes": "scopes.missing"}
    assert _finding(report, "scopes").facts["missing_scopes"] == ["crm"]
    summary, advice = _words(report, "scopes")
    assert "crm (client matching" in summary and "reinstall the app" in advice

    sandbox.set_scope(healthy, "crm,placement,user_basic")
    report = _check(sandbox, healthy)
    assert _finding(report, "scopes").facts["missing_scopes"] == ["telephony"]
    for code in ("lines", "outgoing_line"):  # their reads need telephony: not checked, and why
        found = _finding(report, code)
        assert (found.level, found.key) == (Level.WARN, "probe.scope"), found
        assert found.facts["error"] == "insufficient_scope"
    assert _finding(report, "events").level is Level.OK  # the rest of the report still came


@pytest.mark.parametrize("line_id, kind", [("sip12", "sip"), ("reg3", "sip"),
                                           ("74951234567", "rented"), ("REST_APP:9", "app")])
def test_another_default_line_is_named_with_where_to_set_it(sandbox, healthy, line_id, kind):
    sandbox.set_outgoing_line(healthy, line_id)
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {"outgoing_line": "outgoing.no"}
    found = _finding(report, "outgoing_line")
    assert found.level is Level.WARN  # no click-to-call configured yet
    assert (found.facts["line_id"], found.facts["line_kind"]) == (line_id, kind)
    assert "Telephony > Telephony settings" in _words(report, "outgoing_line")[1]


def test_the_default_line_matters_more_once_click_to_call_is_configured(sandbox, healthy):
    settings_form.apply(portal_row(healthy), {"pbx_originate_url": "https://pbx.example.com/o",
                                              "lines": "4930111 Main"})
    db.session.commit()
    _rest(healthy, "telephony.externalLine.add", {"NUMBER": "4930111", "NAME": "Main",
                                                  "CRM_AUTO_CREATE": "Y"})
    report = _check(sandbox, healthy)
    assert _finding(report, "outgoing_line").facts["line_id"] == "4930111"  # our line: yes
    assert _not_ok(report) == {}
    sandbox.set_outgoing_line(healthy, "sip7")
    found = _finding(_check(sandbox, healthy), "outgoing_line")
    assert (found.level, found.key) == (Level.ERROR, "outgoing.no")
    assert found.facts["our_lines"] == ["4930111"]


def test_an_unreadable_default_line_says_cannot_tell_with_the_raw_value(sandbox, healthy):
    sandbox.set_outgoing_line(healthy, "vox:trunk-7")
    found = _finding(_check(sandbox, healthy), "outgoing_line")
    assert (found.level, found.key, found.facts["line_id"]) == (
        Level.WARN, "outgoing.unknown", "vox:trunk-7")


def test_a_line_absent_from_bitrix24_is_an_error(sandbox, healthy):
    settings_form.apply(portal_row(healthy), {"lines": "4930111 Main\n4930222 Support"})
    db.session.commit()  # no worker here: the setup that would add them does not run
    _rest(healthy, "telephony.externalLine.add", {"NUMBER": "4930111", "NAME": "Main",
                                                  "CRM_AUTO_CREATE": "Y"})
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {"lines": "lines.missing"}
    assert _finding(report, "lines").facts["missing"] == ["4930222"]
    assert "flask portals setup" in _words(report, "lines")[1]


def test_users_without_an_extension_are_named(sandbox, make_portal, live_app):
    member_id = _install(sandbox, make_portal, live_app,
                         users=[*STAFF, {"id": 4, "name": "Dee\x1b[2J", "extension": ""},
                                {"id": 5, "name": "Eve", "active": False}])
    report = _check(sandbox, member_id)
    assert _not_ok(report) == {"extensions_missing": "extensions.missing"}
    found = _finding(report, "extensions_missing")
    assert found.facts["users"] == ["Dee\x1b[2J (4)"] and found.facts["count"] == 1
    summary, advice = _words(report, "extensions_missing")
    assert "Dee?[2J (4)" in summary and "flask calls extensions set" in advice
    # An override gives her one: nobody is left without.
    portal = portal_row(member_id)
    db.session.add(ExtensionOverride(portal_id=portal.id, extension="10444", user_id=4))
    db.session.commit()
    assert _finding(_check(sandbox, member_id), "extensions_missing").level is Level.OK


def test_two_users_with_one_extension_is_an_error_until_an_override_decides(
        sandbox, make_portal, live_app):
    member_id = _install(sandbox, make_portal, live_app,
                         users=[*STAFF[:2], {"id": 3, "name": "Cy", "extension": "102"}])
    report = _check(sandbox, member_id)
    assert _not_ok(report) == {"extensions_taken": "extensions.duplicate"}
    assert _finding(report, "extensions_taken").facts["duplicates"] == ["102: Bob (2), Cy (3)"]
    portal = portal_row(member_id)
    db.session.add(ExtensionOverride(portal_id=portal.id, extension="102", user_id=3))
    db.session.add(ExtensionOverride(portal_id=portal.id, extension="7", user_id=99))
    db.session.commit()
    report = _check(sandbox, member_id)
    taken = _finding(report, "extensions_taken")
    assert (taken.level, taken.key) == (Level.WARN, "extensions.shadowed")
    assert taken.facts["shadowed"] == ["102: Bob (2) -> Cy (3)"]
    ignored = _finding(report, "overrides")
    assert (ignored.level, ignored.facts["ignored"]) == (Level.WARN, ["7 -> 99"])


@pytest.mark.parametrize("skew, direction", [(600, "ahead"), (-600, "behind")])
def test_a_clock_ten_minutes_off_is_found(sandbox, healthy, skew, direction):
    sandbox.set_clock_skew(healthy, skew)
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {"clock": "clock.skewed"}
    clock = _finding(report, "clock")
    assert clock.facts["direction"] == direction and 598 <= clock.facts["skew"] <= 602
    summary, advice = _words(report, "clock")
    assert f"{direction} ours" in summary.replace("ahead of", "ahead") and "NTP" in advice


def test_a_method_failing_the_batch_is_asked_alone_and_the_rest_still_reports(sandbox, healthy):
    sandbox.set_fault(healthy, "http_500", methods=["voximplant.line.outgoing.get"])
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {"round_trip": "round.one_by_one", "outgoing_line": "probe.no_answer"}
    assert _finding(report, "outgoing_line").facts["method"] == "voximplant.line.outgoing.get"
    assert "INTERNAL_SERVER_ERROR" in _finding(report, "round_trip").facts["batch_error"]
    assert _finding(report, "clock").level is Level.OK  # timed from a single answer


def test_asked_alone_a_refused_read_still_leaves_the_portal_status_alone(sandbox, healthy):
    sandbox.set_scope(healthy, "crm,placement,user_basic")  # lines and the default line refused
    sandbox.set_fault(healthy, "http_500", methods=["placement.get"])
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {
        "round_trip": "round.one_by_one", "scopes": "scopes.missing",
        "placements": "probe.no_answer", "lines": "probe.scope", "outgoing_line": "probe.scope"}
    assert portal_row(healthy).status == PortalStatus.ACTIVE.value
    # The faulted whole batch never ran; then each read went in a batch of its own.
    assert [e["in_batch"] for e in sandbox.log(healthy, method="voximplant.line.outgoing.get")] \
        == [True]


def test_a_paused_method_inside_the_batch_is_a_finding(sandbox, healthy):
    sandbox.set_fault(healthy, "operation_time_limit", methods=["placement.get"])
    report = _check(sandbox, healthy)
    assert _not_ok(report) == {"placements": "probe.operating"}
    assert _finding(report, "round_trip").facts["mode"] == "batch"


def test_a_portal_that_does_not_answer_still_gets_a_report(sandbox, healthy):
    sandbox.set_fault(healthy, "html_502")
    report = _check(sandbox, healthy)
    round_trip = _finding(report, "round_trip")
    assert (round_trip.level, round_trip.key) == (Level.ERROR, "round.no_answer")
    assert _finding(report, "events").key == "probe.no_answer"
    assert _finding(report, "clock").key == "probe.skipped"
    assert _finding(report, "extensions_taken").level is Level.OK  # the app's own records
    assert portal_row(healthy).status == PortalStatus.ACTIVE.value


def test_a_token_bitrix24_refuses_is_an_error_of_the_chain(sandbox, healthy):
    sandbox.set_fault(healthy, "invalid_token")
    report = _check(sandbox, healthy)
    token = _finding(report, "token")
    assert (token.level, token.key, token.facts["error"]) == (
        Level.ERROR, "token.rejected", "invalid_token")
    assert _finding(report, "round_trip").key == "round.no_token"
    assert "Open b24relay in Bitrix24 once as a portal administrator" in _words(report, "token")[1]


def test_an_old_chain_and_a_refresh_left_hanging_are_warnings(sandbox, healthy):
    portal = portal_row(healthy)
    portal.last_refresh_at = utcnow() - timedelta(days=160)
    db.session.commit()
    token = _finding(_check(sandbox, healthy), "token")
    assert (token.key, token.facts["age_days"], token.facts["days_left"]) == (
        "token.aging", 160, 20)
    portal = portal_row(healthy)
    portal.refresh_started_at = utcnow() - timedelta(minutes=10)
    db.session.commit()
    assert _finding(_check(sandbox, healthy), "token").key == "token.refresh_stuck"


def test_every_message_key_the_checks_use_has_words():
    source = Path(diagnosis.__file__).read_text()
    keys = set(re.findall(r'Level\.\w+, "([a-z_]+\.[a-z_]+)"', source))
    keys |= {f"probe.{kind}" for kind in ("scope", "access", "operating", "not_found",
                                          "no_answer", "error", "skipped")}
    assert len(keys) > 40 and keys <= set(text.MESSAGES), keys - set(text.MESSAGES)
    assert {code for code, _ in diagnosis.CHECKS} == set(text.CHECKS)


def test_a_held_portal_is_not_asked_and_says_why(sandbox, healthy):
    set_status(portal_row(healthy), PortalStatus.DISABLED, "maintenance")
    since = _last_seq(sandbox, healthy)
    report = _check(sandbox, healthy)
    assert sandbox.log(healthy, since=since) == []
    assert (_finding(report, "status").level, _finding(report, "status").facts["reason"]) == (
        Level.ERROR, "maintenance")
    assert _finding(report, "round_trip").key == "round.not_sent"
    assert {_finding(report, c).key for c in ("install", "events", "outgoing_line")} == {
        "probe.skipped"}


def test_report_is_stored_and_read_back(sandbox, healthy):
    sandbox.set_clock_skew(healthy, 600)
    report = _check(sandbox, healthy)
    diagnosis.store(portal_row(healthy), report, "page")
    db.session.commit()
    again = _check(sandbox, healthy)
    diagnosis.store(portal_row(healthy), again, "cli")
    db.session.commit()
    db.session.remove()
    assert db.session.query(PortalDiagnosis).count() == 1
    stored, row = diagnosis.last_report(portal_row(healthy))
    assert (row.trigger, row.level) == ("cli", "warn")
    assert stored.as_dict() == again.as_dict()


def _cli(app: Any, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["portals", "check", *args])


def test_the_cli_prints_the_report_and_fails_on_an_error(app, sandbox, healthy):
    ok = _cli(app, healthy)
    assert ok.exit_code == 0, ok.output
    assert "0 error(s), 0 warning(s)." in ok.output and "OK       event bindings" in ok.output
    sandbox.set_scope(healthy, "telephony,placement,user_basic")
    bad = _cli(app, healthy)
    assert bad.exit_code == 1, bad.output
    assert "ERROR    scopes" in bad.output and "-> An administrator must grant them" in bad.output
    assert "1 error(s)" in bad.output
    as_json = _cli(app, healthy, "--json")
    data = json.loads(as_json.output)
    assert as_json.exit_code == 1 and data["level"] == "error"
    scopes = next(f for f in data["findings"] if f["code"] == "scopes")
    assert scopes["facts"]["missing_scopes"] == ["crm"] and "crm" in scopes["summary"]
    db.session.remove()
    assert diagnosis.last_report(portal_row(healthy))[1].trigger == "cli"
    assert _cli(app, "no-such-portal").exit_code != 0


def test_the_gate_runs_once_per_interval_and_schedules_one_trailing_round(app, redis_client):
    app.config["DIAGNOSIS_MIN_INTERVAL"] = 30.0
    assert diagnosis.admit(7) == 0.0
    later = diagnosis.admit(7)
    assert later is not None and 28 < later <= 30
    assert diagnosis.admit(7) is None and diagnosis.admit(7) is None  # joined the trailing one
    assert diagnosis.admit(8) == 0.0  # per portal
    # The trailing round itself, come too early (clocks): it schedules itself once more.
    assert diagnosis.admit(7, trailing=True) is not None
    redis_client.delete("b24relay:diagnosis:ran:7")
    assert diagnosis.admit(7, trailing=True) == 0.0


def test_a_worker_runs_the_round_after_install_and_after_a_settings_change(
        app, sandbox, make_portal, live_app, start_worker, redis_client):
    app.config["DIAGNOSIS_SETTLE_SECONDS"] = 0.0  # the live app enqueues at once
    member_id = _install(sandbox, make_portal, live_app)
    worker = start_worker(threads=2, DIAGNOSIS_MIN_INTERVAL="4", DISPATCH_SWEEP_INTERVAL="1",
                          **live_app.worker_env())

    def stored(trigger: str) -> Report | None:
        db.session.remove()
        found = diagnosis.last_report(portal_row(member_id))
        return found[0] if found and found[1].trigger == trigger else None

    after_install = wait_for(lambda: stored("install"), timeout=60)
    assert after_install.level is Level.OK, worker.output()
    saved = app.test_cli_runner().invoke(
        args=["portals", "settings", member_id, "pbx_originate_url=https://pbx.example.com/o"])
    assert saved.exit_code == 0, saved.output
    after_save = wait_for(lambda: stored("settings"), timeout=60)
    assert after_save.checked_at > after_install.checked_at
    assert len(sandbox.log(member_id, method="scope")) == 2  # one round each

    # Saved again and again within DIAGNOSIS_MIN_INTERVAL: one more round, at its end.
    for n in range(3):
        again = app.test_cli_runner().invoke(
            args=["portals", "settings", member_id, f"pbx_originate_url=https://pbx{n}.test/o"])
        assert again.exit_code == 0, again.output
    wait_for(lambda: len(sandbox.log(member_id, method="scope")) == 3, timeout=30)
    last = wait_for(lambda: (r := stored("settings")) and r.checked_at > after_save.checked_at
                    and r, timeout=30)
    time.sleep(5)  # past another interval: nothing more comes
    assert len(sandbox.log(member_id, method="scope")) == 3, worker.output()
    assert last.level is Level.OK
