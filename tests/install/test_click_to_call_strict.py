"""Click-to-call against the stricter sandbox (issue #11 point 5): the event is stored with
every field verbatim, and processing it registers nothing (the portal already registered the
call; tests/telephony/test_click_to_call.py follows the originate to the PBX and back).
"""

from __future__ import annotations

from sqlalchemy import select

from app.extensions import db
from app.ingress.models import InboxEvent
from tests.install.conftest import process_queued

FIELDS = ["PHONE_NUMBER", "PHONE_NUMBER_INTERNATIONAL", "EXTENSION", "USER_ID", "CALL_LIST_ID",
          "LINE_NUMBER", "IS_MOBILE", "CALL_ID", "CRM_ENTITY_TYPE", "CRM_ENTITY_ID"]


def test_click_to_call_is_stored_verbatim_and_never_registered_again(sandbox, installed):
    member_id = installed["member_id"]
    out = sandbox.trigger_event(member_id, "ONEXTERNALCALLSTART",
                                {"PHONE_NUMBER": "+4930777", "USER_ID": "2"}, user_id=2)
    assert out["statuses"] == [200]
    assert list(out["data"]) == FIELDS and out["data"]["CRM_ENTITY_TYPE"] == "LEAD"
    db.session.remove()
    [row] = db.session.scalars(select(InboxEvent).where(
        InboxEvent.event_type == "ONEXTERNALCALLSTART")).all()
    assert row.payload["data"] == out["data"]
    assert process_queued("ONEXTERNALCALLSTART") == ["done"]  # an originate, no register
    assert sandbox.log(member_id, method="telephony.externalcall.register") == []
    counters = sandbox.counters(member_id)
    assert counters["violations"]["register_for_click_to_call"] == 0
    assert counters["duplicate_calls"] == 0
    [active] = sandbox.calls(member_id)["active"]
    assert active["CALL_ID"] == out["data"]["CALL_ID"]
