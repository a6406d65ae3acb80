"""PBX_EVENTS.md's compatible extensions: ring/ring_end for hunting queues, voicemail,
caller_name and origin_id on the start; checked at intake, naming the wrong field."""

from __future__ import annotations

from typing import Any

import pytest

from app.ingress import pbx
from tests.ingress.conftest import inbox_rows

AT = "2026-11-22T16:40:00+03:00"
START = {"call_id": "q-1", "event": "start", "at": AT, "direction": "in",
         "phone": "+74951234567", "extensions": ["600"]}


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    return {"call_id": "q-1", "event": kind, "at": AT, **fields}


def test_a_hunting_queue_call_is_accepted_and_stored_in_order(api_key, deliver):
    call = [{**START, "caller_name": " ACME Ltd ", "origin_id": "externalCall.abc.1"},
            ev("ring", extension=101), ev("ring_end", extension="101"),
            ev("ring", extension="102"), ev("answer", extension="102"),
            ev("end", status="no_answer", duration=0, sip_code=486, voicemail=True),
            ev("record", url="https://pbx.example/vm/q-1.wav", voicemail=True)]
    response = deliver.pbx(api_key, {"events": call})
    assert response.status_code == 202, response.json
    rows = inbox_rows()
    assert [r.event_type for r in rows] == ["start", "ring", "ring_end", "ring", "answer",
                                            "end", "record"]
    assert rows[0].payload["caller_name"] == "ACME Ltd", "trimmed, kept"
    assert rows[0].payload["origin_id"] == "externalCall.abc.1"
    assert rows[1].payload["extension"] == "101", "an extension sent as a number is a string"
    assert rows[5].payload["sip_code"] == "486" and rows[5].payload["voicemail"] is True
    assert rows[6].payload["voicemail"] is True


@pytest.mark.parametrize("event, field", [
    (ev("ring"), "extension"),
    (ev("ring_end", extension=""), "extension"),
    (ev("ring", extension=["101"]), "extension"),
    (ev("end", status="no_answer", duration=0, voicemail="yes"), "voicemail"),
    (ev("record", url="https://pbx.example/1.mp3", voicemail=1), "voicemail"),
    ({**START, "caller_name": ""}, "caller_name"),
    ({**START, "caller_name": "x" * 257}, "caller_name"),
    ({**START, "origin_id": {"id": 1}}, "origin_id"),
    (ev("end", status="swept", duration=0), "status"),  # the sweeper's own: never a PBX's
])
def test_a_wrong_new_field_is_refused_naming_it(event, field):
    with pytest.raises(pbx.InvalidEvent) as caught:
        pbx.validate_body(event)
    assert caught.value.field == field


def test_the_new_fields_are_optional_so_old_senders_still_pass():
    assert pbx.validate_body(START) == [START]
    end = ev("end", status="answered", duration=3)
    assert pbx.validate_body(end) == [end]
