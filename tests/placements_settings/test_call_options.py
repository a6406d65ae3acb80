"""A portal's call options (issue 24 point 2): set per portal with the settings' validation,
read by the PBX event handler, the app's TELEPHONY_* settings where the portal has none.

The handler runs in this process on the test database, as the inbox worker runs it; what it
submits is read from the outbox.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.extensions import db
from app.installation import settings_form
from app.telephony.machine import State
from tests.ingress.conftest import make_portal
from tests.telephony.conftest import map_extensions, pbx
from tests.telephony.test_handlers import commands, feed

START = {"direction": "in", "phone": "030 1234567", "extensions": ["101"], "line": "+4930555"}


@pytest.fixture
def portals(app: Any) -> tuple[Any, Any]:
    """Portal A with its own call options, portal B with the app's."""
    app.config.update(TELEPHONY_DEFAULT_COUNTRY="", TELEPHONY_CRM_SOURCE="",
                      TELEPHONY_ADD_TO_CHAT=True, TELEPHONY_ANONYMOUS_CALLS="skip",
                      TELEPHONY_ANONYMOUS_NUMBER="", TELEPHONY_INTERNAL_CALLS="skip")
    a, b = make_portal(), make_portal()
    for portal in (a, b):
        map_extensions(portal, {"101": 1, "102": 2})
    settings_form.apply(a, {"default_country": "de", "crm_source": "CALL",
                            "add_to_chat": "0", "anonymous_calls": "register",
                            "anonymous_number": "+4930999", "internal_calls": "register"})
    db.session.commit()
    return a, b


def _register(portal: Any, call_id: str, **fields: Any) -> dict[str, Any]:
    call = feed(portal, pbx(call_id, "start", 0, **{**START, **fields}))
    return dict(commands(call)[0].params) if commands(call) else {}


def test_each_portal_calls_with_its_own_options(portals):
    a, b = portals
    own, app_default = _register(a, "a1"), _register(b, "b1")
    assert (own["PHONE_NUMBER"], own["CRM_SOURCE"]) == ("+49301234567", "CALL")
    assert app_default["PHONE_NUMBER"] == "0301234567" and app_default.get("CRM_SOURCE") is None

    # Anonymous and internal calls: A registers them, B (the app's "skip") sends nothing.
    assert _register(a, "a2", phone="")["PHONE_NUMBER"] == "+4930999"
    assert _register(a, "a3", phone="102")["PHONE_NUMBER"] == "102"
    assert _register(b, "b2", phone="") == {}
    assert feed(b, pbx("b3", "start", 0, **{**START, "phone": "102"})).state == \
        State.SKIPPED.value

    # The finish: A posts no chat message, B does.
    for portal, call_id, chat in ((a, "a4", 0), (b, "b4", 1)):
        call = feed(portal, pbx(call_id, "start", 0, **START))
        call = feed(portal, pbx(call_id, "end", 5, status="no_answer", duration=0))
        assert call.finish_params["ADD_TO_CHAT"] == chat


def test_an_empty_value_gives_the_portal_the_apps_default_back(portals):
    a, _ = portals
    settings_form.apply(a, {"default_country": "", "crm_source": "default"})
    db.session.commit()
    params = _register(a, "a5")
    assert params["PHONE_NUMBER"] == "0301234567" and params.get("CRM_SOURCE") is None
    listed = dict(settings_form.listing(a))
    assert listed["default_country"] == "(app default: (not set))"
    assert listed["add_to_chat"] == "0"


@pytest.mark.parametrize(("values", "field", "words"), [
    ({"default_country": "XX"}, "default_country", "not a known two-letter country code"),
    ({"default_country": "Deutschland"}, "default_country", "not a known two-letter"),
    ({"add_to_chat": "maybe"}, "add_to_chat", "add_to_chat must be 1 or 0"),
    ({"internal_calls": "ring"}, "internal_calls", "must be skip or register"),
    ({"anonymous_number": "call me"}, "anonymous_number", "must be digits"),
    ({"crm_source": "<b>"}, "crm_source", "must be a source ID"),
    ({"anonymous_calls": "register", "anonymous_number": ""}, "anonymous_number",
     "needs the number they are registered under"),
])
def test_a_bad_option_is_refused_by_its_field_and_nothing_is_written(app, values, field,
                                                                     words):
    app.config.update(TELEPHONY_ANONYMOUS_NUMBER="")
    portal = make_portal()
    values = {"crm_source": "WEB", **values} if field != "crm_source" else values
    with pytest.raises(settings_form.Invalid) as refused:
        settings_form.apply(portal, values)
    assert list(refused.value.errors) == [field] and words in refused.value.errors[field]
    db.session.rollback()
    settings = settings_form.settings_of(portal)
    assert (settings.crm_source, settings.default_country, settings.add_to_chat,
            settings.anonymous_calls) == (None, None, None, None)


def test_every_bad_field_gets_its_own_message(app):
    portal = make_portal()
    with pytest.raises(settings_form.Invalid) as refused:
        settings_form.apply(portal, {"default_country": "XX", "lines": "not/a/number",
                                     "pbx_originate_url": "ftp://x", "crm_source": "OK"})
    assert set(refused.value.errors) == {"default_country", "lines", "pbx_originate_url"}
    assert "line number 'not/a/number' is not valid" in str(refused.value)  # the terminal's words
