"""``flask portals settings`` reads and sets the dispatcher limits and routing rules with the
page's words (app/installation/settings_form.py), and a save from the terminal is announced to
the dispatcher engines as a page save is."""

from __future__ import annotations

import html

from app.dispatcher.credentials import limits_channel
from app.extensions import db
from tests.conftest import wait_for
from tests.install.conftest import portal_row
from tests.install.test_settings_cli import _cli, _listed
from tests.limits.test_limits_page import _field_error, submit
from tests.placements_settings.conftest import open_page


def test_the_terminal_lists_and_sets_limits_and_rules(app, installed, redis_client):
    member_id = installed["member_id"]
    rows = _listed(_cli(app, member_id).output)
    assert rows["max_batches_in_flight"] == "(auto: 60)"
    assert rows["sequential"] == "(auto: 0)"
    assert rows["route_priority"] == "(app default: contact,company,lead)"

    heard = redis_client.pubsub()
    heard.subscribe(limits_channel(redis_client))
    wait_for(lambda: heard.get_message(timeout=0.1))  # the subscribe confirmation
    result = _cli(app, member_id, "max_batches_in_flight=9", "sequential=1",
                  "route_priority=company,lead", "route_skip_absent=0")
    assert result.exit_code == 0, result.output
    message = wait_for(lambda: heard.get_message(timeout=0.2))
    assert int(message["data"]) == portal_row(member_id).id  # the engines are told
    heard.close()
    rows = _listed(_cli(app, member_id).output)
    assert (rows["max_batches_in_flight"], rows["sequential"], rows["route_priority"],
            rows["route_skip_absent"]) == ("9", "1", "company,lead", "0")


def test_the_terminal_refuses_with_the_pages_words(app, installed, sandbox, live_app):
    member_id = installed["member_id"]
    for assignment, field in (("max_batches_in_flight=61", "max_batches_in_flight"),
                              ("route_priority=lead,lead", "route_priority")):
        result = _cli(app, member_id, assignment)
        assert result.exit_code != 0
        key, _, value = assignment.partition("=")
        page = submit(live_app, open_page(sandbox, member_id), **{key: value}).text
        words = result.output.strip().splitlines()[-1].split(": ", 1)[-1]
        words = words.removesuffix("; nothing was changed")
        assert html.unescape(_field_error(page, field)) == words
    db.session.remove()
    assert portal_row(member_id).settings.max_batches_in_flight is None
