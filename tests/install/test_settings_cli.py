"""``flask portals settings MEMBER_ID [key=value ...]`` (issue 23 point 6): every portal
setting read from the terminal with its secrets masked, and set with the settings page's own
validation and messages (app/installation/settings_form.py). The page is the real one, over
HTTP from the sandbox portal's iframe; the database is the test database.
"""

from __future__ import annotations

from typing import Any

from app.extensions import db
from app.installation import settings_form
from app.tenants.models import Portal
from app.tenants.users import PortalUser
from tests.install.conftest import portal_row
from tests.install.test_settings_form import _open, _save


def _cli(app: Any, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["portals", "settings", *args])


def _listed(output: str) -> dict[str, str]:
    return {key.strip(): value.strip() for key, _, value in
            (line.partition(":") for line in output.splitlines()) if value}


def _users(member_id: str, **active: bool) -> None:
    portal = portal_row(member_id)
    db.session.add_all(PortalUser(portal_id=portal.id, user_id=int(user[1:]), name=user,
                                  extension=None, active=on) for user, on in active.items())
    db.session.commit()


def test_the_listing_names_every_setting_and_masks_the_secret(app, installed):
    member_id = installed["member_id"]
    secret = "a-secret-nobody-should-read-twice"
    result = _cli(app, member_id, "pbx_originate_url=https://pbx.example.com/originate",
                  f"pbx_secret={secret}")
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    listed = _cli(app, member_id)
    assert listed.exit_code == 0, listed.output
    rows = _listed(listed.output)
    assert set(rows) == set(settings_form.LISTED)
    assert rows["pbx_originate_url"] == "https://pbx.example.com/originate"
    assert rows["pbx_secret"] == settings_form.MASK and secret not in listed.output
    assert rows["event_mode"] == "online" and rows["default_user_id"] == "(not set)"
    assert portal_row(member_id).settings.pbx_secret == secret


def test_pbx_secret_new_is_generated_and_printed_once(app, installed):
    member_id = installed["member_id"]
    result = _cli(app, member_id, "pbx_secret=new")
    assert result.exit_code == 0, result.output
    stored = portal_row(member_id).settings.pbx_secret
    assert stored and len(stored) >= settings_form.MIN_SECRET and stored != "new"
    assert result.output.count(stored) == 1
    assert stored not in _cli(app, member_id).output
    again = _cli(app, member_id, "pbx_secret=new")
    assert portal_row(member_id).settings.pbx_secret not in (stored, None)
    assert again.exit_code == 0


def test_bad_values_are_refused_with_their_reason_and_nothing_is_written(app, installed):
    member_id = installed["member_id"]
    _users(member_id, u50=True, u51=False)
    cases = {
        "pbx_originate_url=ftp://pbx.example.com/x": "must be http(s)://host/",
        "pbx_originate_url=https:///nohost": "must be http(s)://host/",
        "pbx_secret=short": "16 to 256 characters",
        "default_user_id=51": "user 51 is inactive",
        "default_user_id=77": "user 77 is not a user of this portal",
        "default_user_id=bob": "must be a Bitrix24 user id",
        "event_mode=sometimes": "event mode must be online or offline",
        "crm_create=maybe": "crm_create must be 1 or 0",
        "colour=blue": "unknown setting 'colour'",
        "max_batches_in_flight=999": "a number from 1 to 60",
        "route_priority=contact,deal": "'deal' is not a CRM kind",
        "pbx_secret": "is not KEY=VALUE",
    }
    for assignment, reason in cases.items():
        # A valid value next to the bad one: all or nothing.
        result = _cli(app, member_id, "pbx_originate_url=https://pbx.example.com/o",
                      assignment)
        assert result.exit_code != 0, assignment
        assert reason in result.output, (assignment, result.output)
        db.session.expire_all()
        settings = portal_row(member_id).settings
        assert (settings.pbx_originate_url, settings.pbx_secret, settings.default_user_id,
                settings.event_mode) == (None, None, None, "online"), assignment
    assert _cli(app, "no-such-portal").exit_code != 0


def test_an_active_user_becomes_the_fallback_and_an_empty_value_clears_it(app, installed):
    member_id = installed["member_id"]
    _users(member_id, u50=True)
    assert _cli(app, member_id, "default_user_id=50").exit_code == 0
    assert portal_row(member_id).settings.default_user_id == 50
    assert _cli(app, member_id, "default_user_id=").exit_code == 0
    db.session.expire_all()
    assert portal_row(member_id).settings.default_user_id is None


def test_the_terminal_and_the_page_refuse_a_value_with_the_same_words(app, installed, sandbox,
                                                                     live_app):
    member_id = installed["member_id"]
    page = _save(live_app, _open(sandbox, member_id), "74950001 Sales\nnot/a/number")
    terminal = _cli(app, member_id, "lines=74950001 Sales;not/a/number")
    message = "line number 'not/a/number' is not valid"
    assert page.status_code == 400 and message.replace("'", "&#39;") in page.text
    assert terminal.exit_code != 0 and message in terminal.output
    assert portal_row(member_id).settings.lines == []
    # And a valid list set from the terminal is what the page shows and keeps.
    result = _cli(app, member_id, "lines=74950001 Sales;74950002")
    assert result.exit_code == 0, result.output
    assert "setup runs again" in result.output
    assert [line["number"] for line in portal_row(member_id).settings.lines] == \
        ["74950001", "74950002"]
    opened = sandbox.open_placement(member_id)
    assert "74950001 Sales\n74950002 74950002</textarea>" in opened["body"]


def test_a_portal_without_a_settings_row_lists_and_sets(app, installed):
    portal = Portal(member_id="m-bare", domain="bare.example", status="active",
                    client_endpoint="https://bare.example/rest/")
    db.session.add(portal)
    db.session.commit()
    listed = _cli(app, "m-bare")
    assert listed.exit_code == 0, listed.output
    rows = _listed(listed.output)
    assert (rows["event_mode"], rows["crm_create"], rows["pbx_secret"]) == (
        "online", "1", "(not set)")
    result = _cli(app, "m-bare", "pbx_originate_url=http://10.0.0.5:8080/originate")
    assert result.exit_code == 0, result.output
    assert portal_row("m-bare").settings.pbx_originate_url == "http://10.0.0.5:8080/originate"
