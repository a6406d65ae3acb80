"""Setup against the stricter sandbox (issue #11 point 6): a placement.bind error answered with
HTTP 200 is a failure the admin is told about; placement.unbind's count of 2 per handler
changes nothing.
"""

from __future__ import annotations

from app.dispatcher import direct
from app.extensions import db
from app.installation import plan, setup
from tests.install.conftest import portal_row

OLD_HANDLER = "http://old-host.example.test/placements/call-card"


def test_a_placement_bind_error_with_http_200_fails_setup_and_says_why(sandbox, make_portal,
                                                                         live_app):
    portal = make_portal(missing_placements=["CALL_CARD"])
    failed = sandbox.install_app(portal["member_id"], live_app.url)
    assert failed["status"] == 502 and "installFinish" not in failed["body"]  # the page won't
    assert "placement.bind CALL_CARD: ERROR_PLACEMENT_NOT_FOUND" in failed["body"]
    row = portal_row(portal["member_id"])
    assert row.status == "installing"
    assert row.status_reason.startswith("Setup did not finish")
    assert "placement.bind CALL_CARD: ERROR_PLACEMENT_NOT_FOUND" in row.status_reason
    placed = {p["placement"] for p in sandbox.bindings(portal["member_id"])["placements"]}
    assert placed == {"TELEPHONY_ANALYTICS_MENU"}  # what did bind, and no claim about the rest


def test_a_widget_left_on_an_old_address_is_moved_once(sandbox, installed, live_app):
    member_id = installed["member_id"]
    direct.call_method(portal_row(member_id), "placement.bind",
                        {"PLACEMENT": "CALL_CARD", "HANDLER": OLD_HANDLER, "TITLE": "old"})
    report = setup.setup_portal(portal_row(member_id))
    db.session.commit()
    assert report.placements_unbound == ["CALL_CARD"] and report.placements_bound == []
    placed = {(p["placement"], p["handler"]) for p in sandbox.bindings(member_id)["placements"]}
    assert placed == {(code, handler) for code, (handler, _) in
                      plan.wanted_placements().items()}
    again = setup.setup_portal(portal_row(member_id))
    db.session.commit()
    assert not again.changed
