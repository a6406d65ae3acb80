"""A queue that hunts, end to end: ring/ring_end events posted to intake reach the handlers
(not parked as unhandled), and the portal's command log shows each ringing phone its card
and hides it when the phone stops, before the finish."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import wait_for
from tests.telephony.conftest import pbx
from tests.telephony.test_end_to_end import (  # noqa: F401 - fixtures
    card_log,
    cards_left_open,
    finished,
    line,
    oauth_app,
    stat,
)

pytestmark = pytest.mark.timeout(180)


def test_a_hunting_queue_call_shows_and_hides_per_ringing_phone(
        line: Any, sandbox: Any) -> None:  # noqa: F811 - the imported fixture
    line["post"](
        pbx("hunt-1", "start", 0, direction="in", phone="+4930555444", extensions=["101"],
            caller_name="ACME"),  # the hunt's first phone
        pbx("hunt-1", "ring", 0, extension="101"),  # has the card from the start already
        pbx("hunt-1", "ring_end", 15, extension="101"),
        pbx("hunt-1", "ring", 15, extension="102"),
        pbx("hunt-1", "ring", 16, extension="102"),  # a duplicate: changes nothing
        pbx("hunt-1", "ring_end", 30, extension="102"),
        pbx("hunt-1", "ring", 30, extension="103"),
        pbx("hunt-1", "answer", 36, extension="103"),
        pbx("hunt-1", "ring_end", 36, extension="103"),  # he answered: keeps the card
        pbx("hunt-1", "end", 59, status="answered", duration=23))
    call = wait_for(lambda: finished(line["portal_id"], "hunt-1"), timeout=60)
    assert call.finish_outcome == "done" and call.caller_name == "ACME"
    log = card_log(sandbox, line["member_id"], "hunt-1")
    assert log == [("register", 1), ("show", [1]), ("hide", [1]), ("show", [2]), ("hide", [2]),
                   ("show", [3]), ("finish", 3)]
    assert cards_left_open(log) == set()
    assert stat(sandbox, line["member_id"], "hunt-1")["CALL_FAILED_CODE"] == "200"
