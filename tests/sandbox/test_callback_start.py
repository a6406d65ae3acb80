"""ONEXTERNALCALLBACKSTART as the portal sends it (protocol §8.9): the web form's number, the
text and voice, the CRM entity and the line, and no CALL_ID or USER_ID, with nothing
registered (issue 23 point 2: the app registers the callback itself)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from .conftest import call
from .test_sandbox_events import installed

FIELDS = ["PHONE_NUMBER", "TEXT", "VOICE", "CRM_ENTITY_TYPE", "CRM_ENTITY_ID", "LINE_NUMBER"]


def test_a_callback_request_names_nobody_and_registers_nothing(sandbox, fake_app, http):
    p = installed(sandbox, fake_app)
    call(http, p, "event.bind", event="ONEXTERNALCALLBACKSTART",
         handler=fake_app.url + "/b24/events")
    call(http, p, "telephony.externalLine.add", NUMBER="7", NAME="Sales")
    out = sandbox.trigger_event(p["member_id"], "ONEXTERNALCALLBACKSTART", {
        "PHONE_NUMBER": "+4930777222", "TEXT": "A callback from the site",
        "VOICE": "ruinternalfemale",
        "CRM_ENTITY_TYPE": "LEAD", "CRM_ENTITY_ID": "12",
        # what the portal never sends with this event, however the caller plays it
        "CALL_ID": "externalCall.x", "USER_ID": "2"})
    assert out["statuses"] == [200]
    pairs = parse_qsl(fake_app.paths("/b24/events")[-1].body.decode(), keep_blank_values=True)
    data = [(k[5:-1], v) for k, v in pairs if k.startswith("data[")]
    assert [k for k, _ in data] == FIELDS
    assert dict(data) == {"PHONE_NUMBER": "+4930777222", "TEXT": "A callback from the site",
                          "VOICE": "ruinternalfemale", "CRM_ENTITY_TYPE": "LEAD",
                          "CRM_ENTITY_ID": "12", "LINE_NUMBER": "7"}
    assert sandbox.calls(p["member_id"])["active"] == []
    assert sandbox.log(p["member_id"], method="telephony.externalcall.register") == []
