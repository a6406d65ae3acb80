"""``flask calls show``: calls that went wrong are visible, with why."""

from __future__ import annotations

from typing import Any

from tests.ingress.conftest import make_portal
from tests.telephony.conftest import map_extensions, pbx
from tests.telephony.test_handlers import START, feed


def _calls(app: Any, *args: str) -> Any:
    result = app.test_cli_runner().invoke(args=["calls", "show", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_incomplete_skipped_and_unroutable_calls_are_listed_with_why(app):
    portal = make_portal()
    map_extensions(portal, {"101": 1, "102": 2})
    feed(portal, pbx("early", "end", 9, status="answered", duration=3))
    feed(portal, pbx("anon", "start", 0, **{**START, "phone": "anonymous"}))
    feed(portal, pbx("nobody", "start", 0, **{**START, "extensions": ["555"]}))
    feed(portal, pbx("fine", "start", 0, **START))

    incomplete = _calls(app, "--state", "incomplete").splitlines()
    assert len(incomplete) == 1 and "early" in incomplete[0]
    assert "1 event(s) wait for the start" in incomplete[0]
    everything = _calls(app, "--member-id", portal.member_id)
    assert "anonymous caller" in everything and "no ringing extension is mapped" in everything
    assert everything.splitlines()[0].split()[1] == "fine", "newest first"
    assert _calls(app, "--state", "ended") == "no calls\n"
    other = make_portal()
    assert _calls(app, "--member-id", other.member_id) == "no calls\n"
