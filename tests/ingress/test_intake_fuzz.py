"""Whatever arrives, intake answers with a status it documents, never 5xx; refusals keep nothing.

Hypothesis writes the bodies: broken Bitrix24 forms (bytes, brackets, escapes, clashing keys
around a valid member_id and token) and PBX JSON with fields of every wrong type and value.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.ingress import enqueuer
from tests.ingress.conftest import FORM, inbox_count
from tests.ingress.test_pbx_intake import CALL

B24_STATUSES = {200, 400, 401, 413}
PBX_STATUSES = {202, 400, 401, 413, 422}
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

pieces = st.sampled_from(["a", "[", "]", "[]", "=", "&", "%", "%5B", "%5D", "%ZZ", "%C3",
                          "+", "é", "\x00", "data", "auth", "event", "0", "1", "ONCRMDEALADD"])
junk = st.lists(pieces, max_size=30).map("".join)


@FUZZ
@given(prefix=junk, suffix=junk, raw=st.binary(max_size=64))
def test_any_b24_body_gets_a_documented_answer(app, client, portal, prefix, suffix, raw):
    auth = (f"auth%5Bmember_id%5D={portal.member_id}"
            f"&auth%5Bapplication_token%5D={portal.application_token}")
    before = inbox_count()
    try:
        for body in (f"{prefix}&{auth}&{suffix}", raw, f"event=X&{auth}&{prefix}={suffix}"):
            response = client.post("/b24/events", data=body, headers=FORM)
            assert response.status_code in B24_STATUSES, (body, response.data[:300])
            if response.status_code != 200:
                assert inbox_count() == before
            before = inbox_count()
    finally:
        # A stored event is sent to the broker by the enqueuer's thread about 5 ms after its
        # answer, and dramatiq's RedisBroker draws random.randint on every enqueue. Left
        # running, that send changed the global random state while Hypothesis drew the next
        # example: it reported "random inside strategies" (an error here), and the replay
        # without the race drew further (FlakyStrategyDefinition). So each example ends with
        # its sends done.
        assert enqueuer.drain(app), "the enqueuer did not send this example's rows in 5 s"


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False), st.text(max_size=20),
                    st.sampled_from(["start", "answer", "transfer", "end", "record", "in", "out",
                                     "answered", "2026-11-22T16:40:00+03:00", "https://[::1",
                                     "https://pbx.example/r/1.mp3", "101"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
GONE = object()
# Per field, values a PBX might really get wrong, besides any value at all.
TRICKY = {
    "call_id": ["", " ", "x" * 300, 0],
    "event": ["START", "hangup", ""],
    "at": ["2026-11-22T16:40:00", "2026-11-22T16:40:00.123456789+03:00", "2026-13-01T00:00:00Z",
           "yesterday", "2026-11-22T16:40:00+25:00", ""],
    "direction": ["IN", "both"],
    "phone": ["", "x" * 300],
    "line": ["", None, ["+7495"]],
    "extensions": [[], [""], ["101", None], "101,102", [["101"]]],
    "extension": ["", None, 101.5],
    "from_extension": ["", None], "to_extension": ["", {}],
    "status": ["ANSWERED", "hung", ""],
    "duration": [-1, 1e308, 2**70, "42", True, 4.5],
    "url": ["https://[::1/r.mp3", "https://pbx.example:rec/r.mp3", "https://:8080/r.mp3",
            "ftp://pbx.example/r.mp3", "http://", "pbx.example/r.mp3", "https://pbx.example/r.mp3"],
}
def _mutated(event: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    out = {**event, field: value}
    return {k: v for k, v in out.items() if v is not GONE}


def _change(event: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """One of the event's own fields (or any field) set to a tricky value, anything, or gone."""
    field = st.sampled_from(list(event) * 3 + list(TRICKY))
    return field.flatmap(lambda f: st.one_of(st.sampled_from(TRICKY[f]), values, st.just(GONE))
                         .map(lambda v: _mutated(event, f, v)))


# Near-valid events (one of a real call's with one field changed or dropped) reach the checks
# deep in the schema; arbitrary dictionaries of the known fields cover the rest.
events = st.one_of(st.sampled_from(CALL).flatmap(_change),
                   st.dictionaries(st.sampled_from(list(TRICKY)), values, max_size=len(TRICKY)))


@FUZZ
@given(body=st.one_of(events, st.fixed_dictionaries({"events": st.lists(events, max_size=3)}),
                      values))
def test_any_pbx_body_gets_a_documented_answer(app, client, api_key, body: Any):
    before = inbox_count()
    response = client.post("/api/v1/calls/events", data=json.dumps(body),
                           headers={"Authorization": f"Bearer {api_key}",
                                    "Content-Type": "application/json"})
    assert response.status_code in PBX_STATUSES, (body, response.data[:300])
    if response.status_code != 202:
        assert inbox_count() == before
