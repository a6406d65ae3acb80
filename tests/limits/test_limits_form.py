"""The settings' validation of dispatcher limits and routing rules (issue 24 point 2), shared
by the settings page and ``flask portals settings``: each bad value refused by its key with
its message, nothing written unless every value is good, the stored values canonical."""

from __future__ import annotations

from typing import Any

import pytest

from app.dispatcher.credentials import CredentialStore
from app.extensions import db
from app.installation import settings_form
from app.tenants.models import Plan
from tests.ingress.conftest import make_portal


@pytest.mark.parametrize(("values", "field", "words"), [
    ({"max_batches_in_flight": "0"}, "max_batches_in_flight", "a number from 1 to 60"),
    ({"max_batches_in_flight": "61"}, "max_batches_in_flight", "a number from 1 to 60"),
    ({"max_batches_in_flight": "-3"}, "max_batches_in_flight", "must be auto or a number"),
    ({"max_batches_in_flight": "lots"}, "max_batches_in_flight", "must be auto or a number"),
    ({"sequential": "sometimes"}, "sequential", "sequential must be 1 or 0"),
    ({"route_priority": "contact,deal"}, "route_priority", "'deal' is not a CRM kind"),
    ({"route_priority": "lead contact lead"}, "route_priority", "'lead' is listed twice"),
    ({"route_priority": "Contact, contact"}, "route_priority", "'contact' is listed twice"),
    ({"route_skip_absent": "perhaps"}, "route_skip_absent", "route_skip_absent must be 1 or 0"),
])
def test_a_bad_value_is_refused_by_its_field_and_nothing_is_written(app, values, field, words):
    portal = make_portal()
    good = {"max_batches_in_flight": "5", "sequential": "1", "route_priority": "lead",
            "route_skip_absent": "0"}
    with pytest.raises(settings_form.Invalid) as refused:
        settings_form.apply(portal, {**good, **values})
    assert list(refused.value.errors) == [field] and words in refused.value.errors[field]
    db.session.rollback()
    settings = settings_form.settings_of(portal)
    assert (settings.max_batches_in_flight, settings.sequential, settings.route_priority,
            settings.route_skip_absent) == (None, None, None, None)


def test_every_bad_field_gets_its_own_message(app):
    portal = make_portal()
    with pytest.raises(settings_form.Invalid) as refused:
        settings_form.apply(portal, {"max_batches_in_flight": "0", "route_priority": "deal",
                                     "sequential": "x", "crm_source": "OK"})
    assert set(refused.value.errors) == {"max_batches_in_flight", "route_priority", "sequential"}


def test_values_are_stored_canonically_and_empty_gives_the_apps_back(app):
    app.config.update(DISPATCH_MODE="parallel", DISPATCH_MAX_INFLIGHT=0,
                      TELEPHONY_ROUTE_PRIORITY="contact,company,lead",
                      TELEPHONY_ROUTE_SKIP_ABSENT=True)
    portal = make_portal()
    applied = settings_form.apply(portal, {"max_batches_in_flight": "12", "sequential": "yes",
                                           "route_priority": " Lead ,  CONTACT ",
                                           "route_skip_absent": "off"})
    db.session.commit()
    assert set(applied.changed) == {"max_batches_in_flight", "sequential", "route_priority",
                                    "route_skip_absent"}
    assert not applied.setup_needed
    settings = portal.settings
    assert (settings.max_batches_in_flight, settings.sequential, settings.route_priority,
            settings.route_skip_absent) == (12, True, "lead,contact", False)
    listed = dict(settings_form.listing(portal))
    assert (listed["max_batches_in_flight"], listed["sequential"], listed["route_priority"],
            listed["route_skip_absent"]) == ("12", "1", "lead,contact", "0")

    settings_form.apply(portal, {"route_priority": "none"})
    db.session.commit()
    assert settings.route_priority == "" and dict(settings_form.listing(portal))[
        "route_priority"] == "none"

    settings_form.apply(portal, {"max_batches_in_flight": "auto", "sequential": "",
                                 "route_priority": "default", "route_skip_absent": ""})
    db.session.commit()
    assert (settings.max_batches_in_flight, settings.sequential, settings.route_priority,
            settings.route_skip_absent) == (None, None, None, None)
    listed = dict(settings_form.listing(portal))
    assert listed["max_batches_in_flight"] == "(auto: 60)"
    assert listed["sequential"] == "(auto: 0)"
    assert listed["route_priority"] == "(app default: contact,company,lead)"
    assert listed["route_skip_absent"] == "(app default: 1)"


def test_the_most_batches_in_flight_follows_the_plan(app):
    enterprise = make_portal()
    enterprise.set_plan(Plan.ENTERPRISE)
    db.session.commit()
    settings_form.apply(enterprise, {"max_batches_in_flight": "300"})
    with pytest.raises(settings_form.Invalid) as refused:
        settings_form.apply(enterprise, {"max_batches_in_flight": "301"})
    assert "from 1 to 300" in refused.value.errors["max_batches_in_flight"]
    app.config.update(DISPATCH_MODE="sequential")
    assert dict(settings_form.listing(enterprise))["sequential"] == "(auto: 1)"


def test_the_dispatchers_snapshot_carries_the_portals_limits(app: Any):
    """What the engine reads per portal: with its credentials, in the same query."""
    portal, other = make_portal(), make_portal()
    settings_form.apply(portal, {"max_batches_in_flight": "7", "sequential": "1"})
    db.session.commit()
    store = CredentialStore(app)
    try:
        snap, plain = store.load(portal.id), store.load(other.id)
    finally:
        store.close()
    assert (snap.max_inflight, snap.sequential) == (7, True)
    assert (plain.max_inflight, plain.sequential) == (None, None)
